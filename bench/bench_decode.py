"""
Batch-1 decode speed against its memory-bandwidth roofline: one request, greedy, a fixed number of new tokens,
with our decode step eager, compiled, and compiled with CUDA graphs (mode reduce-overhead), beside transformers
`generate` on the same weights. At batch 1 every new token reads the weights once, so tokens/s cannot exceed
bandwidth / (bytes a step reads); the share of that roofline is printed.

    python bench/bench_decode.py --shape 8b --device cuda                     # bf16 on the GPU
    python bench/bench_decode.py --shape 1b --modes eager,transformers --json out/decode_1b.json
    python bench/bench_decode.py --shape tiny --device cpu --new-tokens 16    # a smoke run

Bytes a step reads: every weight once (a tied embedding once, as the head's matrix; an untied embedding table
not at all but for the row looked up) plus the keys and values cached so far (their mean over the steps).
Bandwidth: the data sheet's (by device name, see shapes.GPU_SPECS) and a measured 2 GiB device-to-device copy
(bytes read + written over its time); both roofline shares are given. Each mode warms up on the timed request
first (compilation and CUDA-graph capture happen there), and the JSON says whether anything compiled again
inside the timed run. The JSON is written after every mode; a mode that fails or runs out of --time-limit is
recorded as such and the next one runs.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import shapes  # noqa: E402
from common import parse_dtype  # noqa: E402
from model import Transformer  # noqa: E402
from sample import Request, complete  # noqa: E402

MODES = ("eager", "transformers", "default", "reduce-overhead")  # cheap first: a time limit cuts the compiles


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, gib=2.0):
    n = int(gib * 2**30) // 4 if torch.device(device).type == "cuda" else 2**24
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


def compile_counters():
    """dynamo's graph count and inductor's CUDA-graph skips so far (a graph made during the timed run means it
    compiled there; a skip means reduce-overhead ran without CUDA graphs)."""
    from torch._dynamo.utils import counters
    return {"graphs": counters["stats"]["unique_graphs"], "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def ours(model, prompt, new_tokens, compile):
    device = next(model.parameters()).device
    req = [Request(prompt=prompt, temperature=0.0, max_new_tokens=new_tokens)]
    t0 = time.perf_counter()
    complete(model, req, max_rows=1, compile=compile)  # warm-up on the timed shapes: compilation, graph capture
    complete(model, req, max_rows=1, compile=compile)
    warm = time.perf_counter() - t0
    before = compile_counters()
    sync(device)
    t0 = time.perf_counter()
    (c,), = complete(model, req, max_rows=1, compile=compile)
    sync(device)
    dt = time.perf_counter() - t0
    after = compile_counters()
    assert len(c.tokens) == new_tokens
    return {"tok_s": round(new_tokens / dt, 1), "warmup_s": round(warm, 1),
            "compiled_in_timed_run": after["graphs"] > before["graphs"], "cudagraph_skips": after["cudagraph_skips"]}


def transformers_side(model, prompt, new_tokens):
    hf = shapes.hf_model(model)  # the same weight tensors: no second copy
    ids = torch.tensor([prompt], device=hf.device)
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    with torch.no_grad():
        t0 = time.perf_counter()
        hf.generate(input_ids=ids, **kw)  # warm-up on the timed shapes
        warm = time.perf_counter() - t0
        sync(hf.device)
        t0 = time.perf_counter()
        out = hf.generate(input_ids=ids, **kw)
        sync(hf.device)
    assert out.shape[1] - len(prompt) == new_tokens
    return {"tok_s": round(new_tokens / (time.perf_counter() - t0), 1), "warmup_s": round(warm, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description="Batch-1 decode tokens/s and the share of the bandwidth roofline.")
    p.add_argument("--shape", default="1b", choices=sorted(shapes.SHAPES), help="a random-initialised model shape")
    p.add_argument("--model", default=None, help="an HF folder instead of a random model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens decoded")
    p.add_argument("--modes", default=",".join(MODES),
                   help="in this order: eager, transformers, and torch.compile modes of our decode step (default, reduce-overhead)")
    p.add_argument("--time-limit", type=float, default=0, help="seconds for the whole run; parts past it are recorded as not run")
    p.add_argument("--json", default=None, help="write the figures here (again after every mode)")
    args = p.parse_args(argv)
    harness.exit_cleanly_on_sigterm()
    dtype = parse_dtype(args.dtype, args.device)
    res = harness.Results(args.json, harness.deadline_from(args.time_limit), benchmark="decode", shape=args.shape,
                          model=args.model, device=args.device, dtype=str(dtype), new_tokens=args.new_tokens,
                          prompt_tokens=args.prompt_tokens, env=shapes.environment(args.device), modes={})
    model = (Transformer.from_pretrained(args.model, device=args.device, dtype=dtype) if args.model else
             shapes.random_model(args.shape, args.device, dtype)).eval()
    weights, per_pos = shapes.decode_step_bytes(model), shapes.kv_bytes_per_position(model)
    # the step that feeds position t reads t + 1 cached positions: P + 1 ... P + N - 1 over the N - 1 decode steps
    kv = per_pos * (args.prompt_tokens + args.new_tokens / 2)
    bw = copy_bandwidth(args.device)
    spec = res.data["env"]["spec"]["bandwidth_gb_s"]
    roof = {"params": model.num_params(), "weight_bytes_read": weights, "kv_bytes_read_mean": round(kv),
            "copy_bandwidth_gb_s": round(bw / 1e9, 1), "roofline_tok_s": round(bw / (weights + kv), 1),
            "spec_bandwidth_gb_s": spec, "spec_roofline_tok_s": round(spec * 1e9 / (weights + kv), 1) if spec else None}
    res.set(("roofline",), roof)
    print(f"{args.shape}: {model.num_params() / 1e9:.2f}B params, {weights / 2**30:.2f} GiB of weights read per step | "
          f"copy bandwidth {bw / 1e9:.0f} GB/s (data sheet: {spec or 'unknown'}) | roofline {roof['roofline_tok_s']:.0f} tok/s "
          f"(data sheet: {roof['spec_roofline_tok_s'] or 'unknown'}) at batch 1", flush=True)
    prompt = list(range(100, 100 + args.prompt_tokens))
    for mode in args.modes.split(","):
        if mode == "transformers":
            fn = lambda: transformers_side(model, prompt, args.new_tokens)  # noqa: E731
        elif mode in ("eager", "default", "reduce-overhead", "max-autotune"):
            compile = False if mode == "eager" else True if mode == "default" else mode
            fn = lambda: ours(model, prompt, args.new_tokens, compile)  # noqa: E731
        else:
            raise SystemExit(f"--modes: unknown mode {mode!r} (choose from {', '.join(MODES)})")
        r = res.part(("modes", mode), fn)
        if r:
            r["roofline_share"] = round(r["tok_s"] / roof["roofline_tok_s"], 3)
            r["spec_roofline_share"] = round(r["tok_s"] / roof["spec_roofline_tok_s"], 3) if spec else None
            res.set(("modes", mode), r)
            print(f"{mode:16s} {r['tok_s']:8.1f} tok/s | {100 * r['roofline_share']:5.1f}% of the measured roofline "
                  f"| warm-up {r['warmup_s']:.1f} s", flush=True)
        else:
            print(f"{mode:16s} {res.get(('modes', mode))['error']}", flush=True)


if __name__ == "__main__":
    main()
