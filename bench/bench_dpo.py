"""
DPO training throughput: one DPO step (policy forward on chosen and rejected, loss, backward, AdamW step)
written with this project's model vs the same step written on the `transformers` model; same pairs, batch
and precision, the same optimizer (fused AdamW, as train_dpo.py uses) and the same allocator settings
(common.keep_freed_memory, which train_dpo.py applies on CPU). Each side runs in its own process so its peak
memory (max RSS on CPU, max allocated on GPU) is its own; both run in one invocation and the ratio is printed.

    python bench/bench_dpo.py                      # embedded default model, CPU, fp32
    python bench/bench_dpo.py --compile            # also ours with each block compiled (one-time compile excluded)
    python bench/bench_dpo.py --pairs 8 --response-tokens 200 --steps 3 --repeats 3
    python bench/bench_dpo.py --random-1b --device cuda --dtype bfloat16     # GPU: also prints MFU
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import parse_dtype  # noqa: E402
from model import Transformer  # noqa: E402
from common import keep_freed_memory  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from train_dpo import collate, preference_loss, sequence_logps  # noqa: E402

FILLER = ("The quick answer depends on several things, and it helps to take them one at a time so that nothing "
          "important is missed along the way. ")


def make_examples(tok, n, response_tokens):
    import random
    rng = random.Random(0)
    prompts = [json.loads(line)["prompt"] for line in open(os.path.join(ROOT, "data", "prompts.jsonl"))]
    out = []
    for i in range(n):
        p = tok.encode_prompt(prompts[i])
        body = tok.encode(FILLER * max(40, response_tokens // 10))
        c = body[rng.randrange(50):][:response_tokens] + [tok.eot_id]
        r = body[rng.randrange(50):][:response_tokens - rng.randrange(20)] + [tok.eot_id]
        out.append({"prompt": p, "responses": [c, r], "weight": 1.0})
    return out


def hf_sequence_logps(hf, tokens, mask):
    """The same quantity as train_dpo.sequence_logps, written the usual way on a transformers model."""
    logits = hf(input_ids=tokens[:, :-1], attention_mask=(tokens[:, :-1] >= 0).long()).logits.float()
    logps = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    m = mask[:, 1:]
    return (logps * m).sum(-1), m.sum(-1)


def child(args):
    torch.set_num_threads(args.threads)
    if args.device == "cpu":
        keep_freed_memory()
    dtype = torch.float32 if args.autocast else parse_dtype(args.dtype, args.device)
    tok = Tokenizer.from_pretrained(args.path)
    examples = make_examples(tok, args.pairs, args.response_tokens)
    if args.side in ("ours", "ours-compiled"):
        model = Transformer.from_pretrained(args.path, device=args.device, dtype=dtype)
        if args.side == "ours-compiled":  # as train_dpo.py --compile does
            for block in model.layers:
                block.compile()
        fn = sequence_logps
    else:
        import transformers
        model = transformers.AutoModelForCausalLM.from_pretrained(args.path, dtype=dtype).to(args.device)
        fn = hf_sequence_logps
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7, fused=True)
    tokens, mask = collate(examples, list(range(len(examples))), args.device)
    n = len(examples)
    ref = torch.zeros(n, device=args.device)

    def step():
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.autocast):
            logps, lengths = fn(model, tokens, mask)
        loss, _, _ = preference_loss(logps[:n].float(), logps[n:].float(), ref, ref, lengths[:n], lengths[n:])
        loss.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up (allocations, kernels)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if args.device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    ntok = int(tokens.numel())
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"tokens_per_s": ntok / dt, "seconds_per_step": dt, "peak_mib": peak, "tokens": ntok,
                      "params": params}))


def main():
    p = argparse.ArgumentParser(description="DPO step tokens/s: this code vs the same step on transformers.")
    p.add_argument("--model", default=None, help="HF folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--shape", default=None, choices=("tiny", "1b", "3b", "8b"), help="a random-initialised Llama-shaped model (bench/shapes.py)")
    p.add_argument("--random-1b", action="store_const", const="1b", dest="shape", help="the same as --shape 1b")
    p.add_argument("--autocast", action="store_true", help="fp32 weights and optimizer, bf16 autocast compute (train_dpo.py on one GPU)")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--pairs", type=int, default=8, help="pairs per step (2x sequences)")
    p.add_argument("--response-tokens", type=int, default=200, help="tokens per response")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating; the best is reported")
    p.add_argument("--compile", action="store_true", help="also time ours with each block compiled (train_dpo.py --compile)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads")
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)
    p.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return child(args)
    tmp = None
    if args.shape:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import shapes
        tmp = tempfile.mkdtemp()
        args.path = shapes.random_checkpoint(args.shape, tmp, args.device, parse_dtype(args.dtype, args.device))
    else:
        if args.model is None:
            from data.prepare_default import ensure_default_model
            args.model = ensure_default_model()
        args.path = args.model
    sides = ("ours", "ours-compiled", "transformers") if args.compile else ("ours", "transformers")
    res = {s: [] for s in sides}
    for _ in range(args.repeats):  # alternate the sides so drifts of a shared machine hit both alike
        for side in sides:
            cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--path", args.path, "--pairs",
                   str(args.pairs), "--response-tokens", str(args.response_tokens), "--steps", str(args.steps),
                   "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads)] + \
                (["--autocast"] if args.autocast else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
            res[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = {s: max(res[s], key=lambda r: r["tokens_per_s"]) for s in sides}
    a, b = best["ours"], best["transformers"]
    for s in res:
        print(f"{s}: " + ", ".join(f"{r['tokens_per_s']:.1f}" for r in res[s]) + " tok/s over the repeats")
    print(f"model {args.path} | {a['params'] / 1e6:.0f}M params | {args.device} {args.dtype} | {args.pairs} pairs x "
          f"{a['tokens'] // (2 * args.pairs)} tokens per sequence | threads {args.threads}")
    print(f"ours {a['tokens_per_s']:8.1f} tok/s, peak {a['peak_mib']:.0f} MiB | transformers {b['tokens_per_s']:8.1f} tok/s, "
          f"peak {b['peak_mib']:.0f} MiB | ratio {a['tokens_per_s'] / b['tokens_per_s']:.2f}x, memory {a['peak_mib'] / b['peak_mib']:.2f}x")
    if args.compile:
        c = best["ours-compiled"]
        print(f"ours compiled {c['tokens_per_s']:8.1f} tok/s, peak {c['peak_mib']:.0f} MiB | ratio to transformers "
              f"{c['tokens_per_s'] / b['tokens_per_s']:.2f}x, memory {c['peak_mib'] / b['peak_mib']:.2f}x")
        a = c
    res_out = {"shape": args.shape, "model": args.path, "device": args.device, "dtype": "fp32 + bf16 autocast" if args.autocast else args.dtype,
               "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "pairs": args.pairs,
               "tokens_per_sequence": a["tokens"] // (2 * args.pairs), "best": best}
    if args.device == "cuda":
        # 6 N per token for the policy's forward and backward (the reference log-probs are computed once before
        # training, so no reference forward is counted), plus the attention matmuls: 12 L d T per token (causal:
        # half of 2 x 2 x T x d per layer, forward and backward)
        peak_flops = float(os.environ.get("PEAK_TFLOPS", "989")) * 1e12  # H100/H200 SXM dense bf16
        cfg = json.load(open(os.path.join(args.path, "config.json")))
        T = res_out["tokens_per_sequence"]
        attn = 6 * cfg["num_hidden_layers"] * cfg["hidden_size"] * T
        for side in best:
            r = best[side]
            mfu = (6 * r["params"] + attn) * r["tokens_per_s"] / peak_flops
            res_out[f"{side}_mfu"] = round(mfu, 4)
            print(f"{side} MFU {100 * mfu:.1f}% ((6 N + 6 L d T) tokens/s over {peak_flops / 1e12:.0f} TFLOP/s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res_out, f, indent=1)
    if tmp:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
