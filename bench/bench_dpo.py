"""
DPO training throughput: one DPO step (policy log-probs of chosen and rejected, loss, backward, AdamW step) as
train_dpo.py runs it, vs the same step written the usual way on the `transformers` model; same pairs, weights,
precision, optimizer (fused AdamW, as train_dpo.py uses) and allocator settings (common.keep_freed_memory, which
train_dpo.py applies on CPU). Each side runs in its own process so its peak memory (max RSS on CPU, max allocated
on GPU) is its own; the sides alternate and the ratio is printed.

    python bench/bench_dpo.py                      # embedded default model, CPU, fp32
    python bench/bench_dpo.py --compile            # also ours with each block compiled (one-time compile excluded)
    python bench/bench_dpo.py --pairs 8 --response-tokens 200 --steps 3 --repeats 3
    python bench/bench_dpo.py --shape 3b --device cuda --autocast --activation-checkpointing --json out/dpo_3b.json

Ours: each pair packed into one row (train_dpo.collate_pairs: the prompt once, then both responses) and
train_dpo.pair_logps, with the log-prob head on response tokens only. transformers: the two-row formulation a
transformers user writes (each pair's prompt with its chosen response, and again with its rejected one; full
logits, log-softmax, gather). What is counted: tokens/s are pair tokens, each pair's prompt + chosen + rejected
once (no padding; the prompt once, whatever a side computes), per second; pairs/s likewise. MFU counts the
model FLOPs of those tokens (6 x the matrix parameters + attention, no recomputation), over the data-sheet peak.
The JSON is written after every side of every repeat; a side that fails (out of memory) or runs past
--time-limit is recorded with its error, and the other sides still run.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import shapes  # noqa: E402
from common import keep_freed_memory, parse_dtype  # noqa: E402
from model import Transformer  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from train_dpo import collate, collate_pairs, pair_logps, preference_loss  # noqa: E402

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
    """Summed log-probs of the response tokens of each row, written the usual way on a transformers model."""
    logits = hf(input_ids=tokens[:, :-1], attention_mask=(tokens[:, :-1] >= 0).long()).logits.float()
    logps = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    m = mask[:, 1:]
    return (logps * m).sum(-1), m.sum(-1)


def build(args, dtype):
    if args.shape:  # the same seed on the same device: both sides' processes build the same weights
        return shapes.random_model(args.shape, args.device, dtype)
    return Transformer.from_pretrained(args.model, device=args.device, dtype=dtype)


def child(args):
    """One side in this process: a warm-up step, then --steps timed steps -> one JSON line on stdout."""
    torch.set_num_threads(args.threads)
    if args.device == "cpu":
        keep_freed_memory()
    dtype = torch.float32 if args.autocast else parse_dtype(args.dtype, args.device)
    tok = Tokenizer.from_pretrained(args.model or shapes.tokenizer_dir())
    examples = make_examples(tok, args.pairs, args.response_tokens)
    idx, n = list(range(len(examples))), len(examples)
    model = build(args, dtype)
    if args.side in ("ours", "ours-compiled"):
        model.activation_checkpointing = args.activation_checkpointing
        if args.side == "ours-compiled":  # as train_dpo.py --compile does
            for block in model.layers:
                block.compile()
        batch = collate_pairs(examples, idx, args.device)
        positions = batch["tokens"].numel()

        def logps():
            return pair_logps(model, batch)
    else:
        model = shapes.hf_model(model)  # the same random weights, held by transformers' modules
        if args.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        tokens, mask = collate(examples, idx, args.device)  # every chosen row, then every rejected row
        positions = tokens[:, :-1].numel()

        def logps():
            lp, lengths = hf_sequence_logps(model, tokens, mask)
            return lp[:n], lp[n:], lengths[:n], lengths[n:]
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7, fused=True)
    ref = torch.zeros(n, device=args.device)

    def step():
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.autocast):
            pc, pr, nc, nr = logps()
        loss, _, _ = preference_loss(pc.float(), pr.float(), ref, ref, nc, nr)
        loss.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    from torch._dynamo.utils import counters
    t0 = time.perf_counter()
    step()  # warm-up on the timed batch: allocations, kernel choices, compilation
    warm = time.perf_counter() - t0
    graphs = counters["stats"]["unique_graphs"]
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if args.device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    pair_tokens = sum(len(e["prompt"]) + len(e["responses"][0]) + len(e["responses"][1]) for e in examples)
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seq = sum(2 * len(e["prompt"]) + len(e["responses"][0]) + len(e["responses"][1]) for e in examples) / (2 * n)
    print(json.dumps({"tokens_per_s": pair_tokens / dt, "pairs_per_s": n / dt, "seconds_per_step": dt, "peak_mib": peak,
                      "pair_tokens": pair_tokens, "mean_sequence_tokens": seq, "positions_computed": positions,
                      "warmup_s": warm,
                      "compiled_in_timed_steps": counters["stats"]["unique_graphs"] > graphs,
                      "matmul_params": shapes.matmul_params(model) if args.side != "transformers" else None}))


def run_side(args, side, timeout):
    """Run one side in a child process -> its figures, or {"error": ...}."""
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--pairs", str(args.pairs), "--response-tokens",
           str(args.response_tokens), "--steps", str(args.steps), "--device", args.device, "--dtype", args.dtype,
           "--threads", str(args.threads)] + (["--shape", args.shape] if args.shape else ["--model", args.model]) + \
        (["--autocast"] if args.autocast else []) + (["--activation-checkpointing"] if args.activation_checkpointing else [])
    t0 = time.time()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:  # run() has killed the child
        return {"error": f"time limit: killed after {time.time() - t0:.0f} s"}
    if out.returncode:
        lines = [x for x in out.stderr.strip().splitlines() if x.strip()]
        oom = any("OutOfMemoryError" in x or "out of memory" in x for x in lines)
        print(out.stderr[-3000:], file=sys.stderr)
        return {"error": ("out of memory: " if oom else f"exit code {out.returncode}: ") + (lines[-1] if lines else "")[:400]}
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["process_seconds"] = round(time.time() - t0, 1)
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description="DPO step tokens/s: train_dpo.py's step vs the same step on transformers.")
    p.add_argument("--model", default=None, help="HF folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--shape", default=None, choices=sorted(shapes.SHAPES), help="a random-initialised Llama-shaped model, made on the device")
    p.add_argument("--random-1b", action="store_const", const="1b", dest="shape", help="the same as --shape 1b")
    p.add_argument("--autocast", action="store_true", help="fp32 weights and optimizer, bf16 autocast compute (train_dpo.py on one GPU)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward, on both sides (memory)")
    p.add_argument("--json", default=None, help="also write the figures here (again after every side)")
    p.add_argument("--pairs", type=int, default=8, help="pairs per step")
    p.add_argument("--response-tokens", type=int, default=200, help="tokens per response")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating; the best is reported")
    p.add_argument("--compile", action="store_true", help="also time ours with each block compiled (train_dpo.py --compile; run last)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers side")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads")
    p.add_argument("--time-limit", type=float, default=0, help="seconds for the whole run; sides past it are recorded as not run")
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.side:
        return child(args)
    harness.exit_cleanly_on_sigterm()
    if not args.shape and args.model is None:
        from data.prepare_default import ensure_default_model
        args.model = ensure_default_model()
    sides = ["ours"] + ([] if args.no_hf else ["transformers"]) + (["ours-compiled"] if args.compile else [])
    res = harness.Results(args.json, harness.deadline_from(args.time_limit), benchmark="dpo", shape=args.shape,
                          model=args.model, device=args.device, pairs=args.pairs, response_tokens=args.response_tokens,
                          dtype="fp32 + bf16 autocast" if args.autocast else args.dtype,
                          activation_checkpointing=args.activation_checkpointing, env=shapes.environment(args.device),
                          counted="pair tokens: prompt + chosen + rejected of each pair, once, no padding", runs={})
    for rep in range(args.repeats):  # alternate the sides so drifts of a shared machine hit both alike
        for side in sides:
            def one():
                left = res.left()
                return run_side(args, side, None if left is None else max(left - 2, 1))
            r = res.part(("runs", side, str(rep)), one, min_seconds=10)
            print(f"{side}: " + (f"{r['tokens_per_s']:.1f} tok/s, {r['pairs_per_s']:.2f} pairs/s, peak {r['peak_mib']:.0f} MiB"
                                 if r else res.get(("runs", side, str(rep)))["error"]), flush=True)
            summarise(res, args, sides)
    for side in ("ours", "ours-compiled"):
        r = res.get((f"{side}_vs_transformers",))
        if r:
            print(f"{side} vs transformers (best of each): speed {r['speed']:.2f}x, peak memory {r['memory']:.2f}x")


def summarise(res, args, sides):
    """The best run of each side, ratios to transformers, and MFU on a GPU (written after every run)."""
    best = {}
    for side in sides:
        ok = [r for r in (res.get(("runs", side)) or {}).values() if "tokens_per_s" in r]
        if ok:
            best[side] = max(ok, key=lambda r: r["tokens_per_s"])
    res.set(("best",), best)
    hf = best.get("transformers")
    for side in ("ours", "ours-compiled"):
        if side in best and hf:
            res.set((f"{side}_vs_transformers",), {"speed": round(best[side]["tokens_per_s"] / hf["tokens_per_s"], 3),
                                                   "memory": round(best[side]["peak_mib"] / hf["peak_mib"], 3)})
    peak = res.data["env"]["spec"]["peak_bf16_tflops"] or float(os.environ.get("PEAK_TFLOPS", 0)) or None
    cfg = shapes.SHAPES.get(args.shape) if args.shape else None
    if args.device == "cuda" and peak and cfg and best:
        # per pair token: 6 N for the forward and backward matmuls (N without an untied embedding table: a lookup)
        # plus attention, 6 L d T over a sequence of T (causal: half of 2 x 2 x T x d per layer, forward and
        # backward); T the mean prompt + response length. The reference log-probs are computed once before
        # training, so no reference forward is counted; nor is recomputation under activation checkpointing.
        n = next((r["matmul_params"] for r in best.values() if r.get("matmul_params")), None)
        if n is None:
            return
        T = next(iter(best.values()))["mean_sequence_tokens"]  # prompt + one response, the mean
        attn = 6 * cfg["n_layers"] * cfg["n_heads"] * cfg["head_dim"] * T
        res.set(("mfu",), {side: round((6 * n + attn) * r["tokens_per_s"] / (peak * 1e12), 4) for side, r in best.items()})
        res.set(("peak_bf16_tflops",), peak)


if __name__ == "__main__":
    main()
