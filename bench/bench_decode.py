"""
Batch-1 decode speed against its memory-bandwidth roofline: one request, greedy, a fixed number of new tokens,
with the decode step eager, compiled, and compiled with CUDA graphs (mode reduce-overhead), beside
transformers `generate` on the same weights. At batch 1 every new token reads all the weights once, so
tokens/s cannot exceed (copy bandwidth) / (weight bytes); the share of that roofline is printed.

    python bench/bench_decode.py --shape 8b --device cuda          # bf16 on the GPU
    python bench/bench_decode.py --shape tiny --device cpu --new-tokens 32    # a smoke run

The copy bandwidth is measured here (a 2 GiB device-to-device copy: bytes read + written over its time).
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shapes  # noqa: E402
from common import parse_dtype  # noqa: E402
from model import Transformer  # noqa: E402
from sample import Request, complete  # noqa: E402


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, gib=2.0):
    n = int(gib * 2**30) // 4 if device == "cuda" else 2**26
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best  # bytes/s, read + write


def ours_tok_s(model, prompt, new_tokens, compile):
    req = [Request(prompt=prompt, temperature=0.0, max_new_tokens=new_tokens)]
    complete(model, req, max_rows=1, compile=compile)  # warm-up (and compilation, CUDA-graph capture)
    complete(model, req, max_rows=1, compile=compile)
    sync(str(next(model.parameters()).device.type))
    t0 = time.perf_counter()
    (c,), = complete(model, req, max_rows=1, compile=compile)
    sync(str(next(model.parameters()).device.type))
    assert len(c.tokens) == new_tokens
    return new_tokens / (time.perf_counter() - t0)


def hf_tok_s(hf, prompt, new_tokens):
    ids = torch.tensor([prompt], device=hf.device)
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    with torch.no_grad():
        hf.generate(input_ids=ids, **kw)
        sync(hf.device.type)
        t0 = time.perf_counter()
        out = hf.generate(input_ids=ids, **kw)
        sync(hf.device.type)
    assert out.shape[1] - len(prompt) == new_tokens
    return new_tokens / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description="Batch-1 decode tokens/s and the share of the bandwidth roofline.")
    p.add_argument("--shape", default="1b", choices=sorted(shapes.SHAPES), help="a random-initialised model shape")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens decoded")
    p.add_argument("--modes", default="eager,default,reduce-overhead", help="our decode step: eager and torch.compile modes")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers reference")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    dtype = parse_dtype(args.dtype, args.device)
    tmp = tempfile.mkdtemp()
    path = shapes.random_checkpoint(args.shape, tmp, args.device, dtype)
    model = Transformer.from_pretrained(path, device=args.device, dtype=dtype).eval()
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    bw = copy_bandwidth(args.device)
    roof = bw / weight_bytes
    prompt = list(range(100, 100 + args.prompt_tokens))
    out = {"shape": args.shape, "device": args.device, "dtype": str(dtype), "params": model.num_params(),
           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "weight_bytes": weight_bytes,
           "copy_bandwidth_gb_s": round(bw / 1e9, 1), "roofline_tok_s": round(roof, 1), "ours": {}}
    print(f"{args.shape}: {model.num_params() / 1e9:.2f}B params, {weight_bytes / 2**30:.2f} GiB of weights | copy "
          f"bandwidth {bw / 1e9:.0f} GB/s | roofline {roof:.0f} tok/s at batch 1")
    for mode in args.modes.split(","):
        compile = False if mode == "eager" else True if mode == "default" else mode
        r = ours_tok_s(model, prompt, args.new_tokens, compile)
        out["ours"][mode] = {"tok_s": round(r, 1), "roofline_share": round(r / roof, 3)}
        print(f"ours {mode:16s} {r:8.1f} tok/s | {100 * r / roof:5.1f}% of the roofline")
    if not args.no_hf:
        import transformers
        del model
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
        r = hf_tok_s(hf, prompt, args.new_tokens)
        out["transformers"] = {"tok_s": round(r, 1), "roofline_share": round(r / roof, 3), "version": transformers.__version__}
        print(f"transformers generate {r:8.1f} tok/s | {100 * r / roof:5.1f}% of the roofline")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
