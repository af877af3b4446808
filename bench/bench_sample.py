"""
Generation throughput of sample.py's engine vs Hugging Face `transformers` `generate`, side by side in one run,
same weights, prompts and settings, a fixed number of new tokens (end tokens ignored) so both do identical work.

    python bench/bench_sample.py                         # embedded default model, CPU, both workloads
    python bench/bench_sample.py --workload judge --threads 2
    python bench/bench_sample.py --shape 1b --gpu-scale --device cuda --json out/sample_1b.json   # GPU, bf16

Workloads: actor-shaped (16 short prompts x 4 samples x 128 new tokens) and judge-shaped (8 prompts of about
400 tokens x 3 samples x 64 new tokens); --gpu-scale: a paper iteration's (256 x 7 x 512; 64 prompts of about
1,500 tokens x 11 x 256). Prints tokens/s of each and the ratio. Each side first runs the timed workload's
prompts and samples with 2 new tokens (ours with the cache planned for the full length, so a compiled step sees
its timed shapes), so allocation, kernel selection and compilation stay out of the timed run. The JSON is
written after every side of every workload; a side that fails (out of memory) or runs out of --time-limit is
recorded as such and the run goes on.

The run also measures the machine's matrix-multiply peak (an n x n x n product, best kernel the engine may use)
and times each of our decode steps: their matmul FLOPs (2 x rows x the model's matmul parameters; attention not
counted) over their seconds give each step's share of that peak, reported overall and as median, least and most.
On a CPU both sides run with the allocator setting sample.py's processes use (common.keep_freed_memory).
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
from common import keep_freed_memory, parse_dtype  # noqa: E402
from model import Transformer, onednn_linear  # noqa: E402
import sample  # noqa: E402
from sample import Request, complete  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

SHORT = ["Write a haiku about the sea.", "What is the boiling point of water?", "Give me a tip for studying.",
         "Name three primary colors.", "How do birds fly?", "Tell me a fun fact about cats.",
         "What does a compiler do?", "Suggest a name for a bakery.", "Why do we sleep?", "Explain gravity briefly.",
         "What is 7 times 8?", "Describe a rainy day.", "How do I boil an egg?", "What is photosynthesis?",
         "Recommend a weekend hobby.", "Translate 'thank you' into Spanish."]
PARAGRAPH = ("The committee met on Tuesday to review the proposal for the new library wing. Members raised questions "
             "about the budget, the timeline, and the expected number of visitors. The architect presented three "
             "designs, each with a different balance of reading space, study rooms and storage for the archive. ")
WARM_TOKENS = 2


def workloads(tok, gpu=False):
    """name -> (prompts, samples per prompt, new tokens). --gpu-scale: the shapes of a paper iteration's
    generation (many short actor prompts x 7 samples; long judge prompts x 11 judgments)."""
    n_actor, k_actor, t_actor, n_judge, len_judge, k_judge, t_judge = (256, 7, 512, 64, 1500, 11, 256) if gpu else \
        (16, 4, 128, 8, 400, 3, 64)
    actor = [tok.encode_prompt(f"{SHORT[i % len(SHORT)]} (Question {i}.)") for i in range(n_actor)], k_actor, t_actor
    judge_prompts = []
    for i in range(n_judge):
        text = f"Review {i}: " + PARAGRAPH * (len_judge // 60) + "Rate the response above on a scale of 0 to 5 and justify the score."
        ids = tok.encode_prompt(text)
        judge_prompts.append(ids[:len_judge - 8] + ids[-8:] if len(ids) > len_judge else ids)
    return {"actor": actor, "judge": (judge_prompts, k_judge, t_judge)}


def ours_requests(prompts, n, new_tokens, share=True, room=0):
    """One request of n samples per prompt (the prompt prefilled once), or with share=False the same work as
    n separate requests. room: cache positions planned beyond new_tokens (a warm-up with the timed shapes)."""
    if share:
        return [Request(p, n=n, temperature=0.8, top_p=0.95, max_new_tokens=new_tokens, stop_ids=(), seed=i,
                        probe_room=room) for i, p in enumerate(prompts)]
    return [Request(p, n=1, temperature=0.8, top_p=0.95, max_new_tokens=new_tokens, stop_ids=(), seed=i * n + k,
                    probe_room=room) for i, p in enumerate(prompts) for k in range(n)]


def run_ours(model, prompts, n, new_tokens, compile=False, share=True):
    """-> {"tok_s", "seconds", "steps": (rows, seconds) of each decode step of the timed run, eager only}."""
    # the cache is planned for prompt + max_new_tokens + probe_room: the warm-up's 2 tokens plus that room give
    # the timed run's cache and step shapes, at the cost of 2 tokens
    complete(model, ours_requests(prompts, n, WARM_TOKENS, share, new_tokens - WARM_TOKENS),
             max_rows=len(prompts) * n, compile=compile)
    reqs = ours_requests(prompts, n, new_tokens, share)
    steps, real_step = [], sample.decode_one_token

    def timed_step(model, tokens, view):  # each decode step's rows and seconds (a sync on a GPU: it is counted)
        t = time.perf_counter()
        out = real_step(model, tokens, view)
        sync()
        steps.append((tokens.size(0), time.perf_counter() - t))
        return out

    sync()
    if not compile:  # (compiled, the step is one graph: a wrapper would be compiled anew, inside the timed run)
        sample.decode_one_token = timed_step
    try:
        t0 = time.perf_counter()
        out = complete(model, reqs, max_rows=len(prompts) * n, compile=compile)
        sync()
        dt = time.perf_counter() - t0
    finally:
        sample.decode_one_token = real_step
    ntok = sum(len(c.tokens) for r in out for c in r)
    assert ntok == len(prompts) * n * new_tokens, ntok
    return {"tok_s": ntok / dt, "seconds": dt, "steps": steps}


def matmul_peak(device, dtype, n=2048, tries=3):
    """The machine's matrix-multiply throughput, measured now: best GFLOP/s of an n x n x n product with the
    kernels the engine may use (F.linear; on a CPU in fp32 also oneDNN on a prepacked weight, as generation runs)."""
    x, w = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    kernels = {"F.linear": lambda: torch.nn.functional.linear(x, w)}
    if x.device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        kernels["oneDNN prepacked"] = lambda: onednn_linear(x, packed)
    best = {}
    for name, fn in kernels.items():
        fn()
        for _ in range(tries):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            best[name] = max(best.get(name, 0), 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    top = max(best, key=best.get)
    return {"gflop_s": round(best[top], 1), "kernel": top, "by_kernel": {k: round(v, 1) for k, v in best.items()}}


def step_shares(steps, params, peak_gflop_s):
    """Matmul FLOPs (2 x rows x matmul parameters; attention not counted) of each decode step over its seconds,
    as a share of the measured peak: overall, and the median, least and most of the steps."""
    shares = sorted(2 * rows * params / s / 1e9 / peak_gflop_s for rows, s in steps)
    total = sum(2 * rows * params for rows, _ in steps) / sum(s for _, s in steps) / 1e9
    return {"decode_steps": len(steps), "mean_step_ms": round(1e3 * sum(s for _, s in steps) / len(steps), 1),
            "decode_seconds": round(sum(s for _, s in steps), 2), "gflop_s": round(total, 1),
            "share": round(total / peak_gflop_s, 3), "share_median": round(shares[len(shares) // 2], 3),
            "share_min": round(shares[0], 3), "share_max": round(shares[-1], 3)}


def run_hf(hf, prompts, n, new_tokens, pad_id, warm=True):
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as decoder-only generation needs
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    ids, mask = ids.to(hf.device), mask.to(hf.device)
    kw = dict(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.8, top_p=0.95, num_return_sequences=n,
              pad_token_id=pad_id)
    with torch.no_grad():
        if warm:  # the timed batch with 2 new tokens: its prefill and first steps allocate and pick kernels
            hf.generate(**kw, max_new_tokens=WARM_TOKENS, min_new_tokens=WARM_TOKENS)
        sync()
        t0 = time.perf_counter()
        out = hf.generate(**kw, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        sync()
    dt = time.perf_counter() - t0
    ntok = (out.shape[1] - T) * out.shape[0]
    assert ntok == len(prompts) * n * new_tokens, ntok
    return {"tok_s": ntok / dt, "seconds": dt}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measured(fn, repeats, params=None, peak=None):
    """Best tokens/s of `repeats` runs, the individual runs, the device's peak memory over them, and (given the
    model's matmul parameters and the measured matmul peak) the best run's decode steps as shares of that peak."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    runs = [fn() for _ in range(repeats)]
    mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    best = max(runs, key=lambda r: r["tok_s"])
    out = {"tok_s": round(best["tok_s"], 1), "runs": [round(r["tok_s"], 1) for r in runs], "seconds": round(best["seconds"], 2),
           "peak_gib": round(mem, 1) if mem is not None else None}
    if best.get("steps") and params and peak:
        out["decode"] = step_shares(best["steps"], params, peak)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Generation tokens/s: this engine vs transformers.generate.")
    p.add_argument("--model", default=None, help="HF folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--shape", default=None, choices=sorted(shapes.SHAPES),
                   help="a random-initialised Llama-shaped model instead, made on the device (bench/shapes.py)")
    p.add_argument("--random-1b", action="store_const", const="1b", dest="shape", help="the same as --shape 1b")
    p.add_argument("--gpu-scale", action="store_true", help="the workloads at a paper iteration's size (GPU)")
    p.add_argument("--max-prompts", type=int, default=0, help="use only the first N prompts of each workload (memory)")
    p.add_argument("--new-tokens", type=int, default=0, help="new tokens per sample instead of the workload's (smoke runs)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file (again after every side)")
    p.add_argument("--workload", default="both", choices=("actor", "judge", "both"), help="which workload(s)")
    p.add_argument("--sides", default="ours,transformers", help="ours, transformers, or both (in this order)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for both")
    p.add_argument("--compile", action="store_true", help="compile our decode step (GPU)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs each (best is reported), after the warm-up")
    p.add_argument("--no-share-too", action="store_true", help="also time ours with every sample as its own request")
    p.add_argument("--time-limit", type=float, default=0, help="seconds for the whole run; parts past it are recorded as not run")
    args = p.parse_args(argv)
    harness.exit_cleanly_on_sigterm()
    torch.set_num_threads(args.threads)
    if args.device == "cpu":  # the allocator setting sample.py's processes run with (common.init_distributed); both sides
        keep_freed_memory()
    dtype = parse_dtype(args.dtype, args.device)
    if args.shape:
        ours = shapes.random_model(args.shape, args.device, dtype).eval()
        tok = Tokenizer.from_pretrained(shapes.tokenizer_dir())
    else:
        if args.model is None:
            from data.prepare_default import ensure_default_model
            args.model = ensure_default_model()
        ours = Transformer.from_pretrained(args.model, device=args.device, dtype=dtype).eval()
        tok = Tokenizer.from_pretrained(args.model)
    sides = args.sides.split(",")
    res = harness.Results(args.json, harness.deadline_from(args.time_limit), benchmark="sample",
                          model=args.model or f"random {args.shape}", params=ours.num_params(), device=args.device,
                          dtype=str(dtype), compile=args.compile, env=shapes.environment(args.device), workloads={})
    res.part(("attention",), lambda: shapes.attention_report(args.device, dtype))
    peak = res.part(("matmul_peak",), lambda: matmul_peak(args.device, dtype))
    params = shapes.matmul_params(ours)
    print(f"model {res.data['model']} | {ours.num_params() / 1e6:.0f}M params | {args.device} {dtype} | threads "
          f"{args.threads} | transformers {res.data['env']['transformers']} | torch {torch.__version__}", flush=True)
    print(f"attention kernels (picked; max difference from float64, None = refused): {res.data['attention']}", flush=True)
    if peak:
        print(f"matmul peak measured now: {peak['gflop_s']:.0f} GFLOP/s ({peak['kernel']}; {peak['by_kernel']})", flush=True)
    hf = None
    names = ["actor", "judge"] if args.workload == "both" else [args.workload]
    for name in names:
        prompts, n, new = workloads(tok, args.gpu_scale)[name]
        prompts, new = prompts[:args.max_prompts or None], args.new_tokens or new
        plen = sum(map(len, prompts)) / len(prompts)
        res.set(("workloads", name), {"prompts": len(prompts), "mean_prompt_tokens": round(plen), "samples": n,
                                      "new_tokens": new})
        for side in sides:
            if side == "ours":
                fn = lambda: measured(lambda: run_ours(ours, prompts, n, new, args.compile), args.repeats, params,  # noqa: E731
                                      peak and peak["gflop_s"])
            elif side == "transformers":
                if hf is None:
                    hf = shapes.hf_model(ours)  # the same weight tensors: no second copy
                fn = lambda: measured(lambda: run_hf(hf, prompts, n, new, tok.pad_id), args.repeats)  # noqa: E731
            else:
                raise SystemExit(f"--sides: unknown side {side!r} (ours, transformers)")
            r = res.part(("workloads", name, side), fn)
            harness.free_device_memory()  # one side's cache must not crowd the other's
            print(f"{name:5s} | {len(prompts)} prompts (mean {plen:.0f} tokens) x {n} samples x {new} new tokens | {side:12s} "
                  + (f"{r['tok_s']:8.1f} tok/s" if r else res.get(("workloads", name, side))["error"]), flush=True)
            if r and "decode" in r:
                d = r["decode"]
                print(f"{name:5s} | {side}: {d['decode_steps']} decode steps, {d['decode_seconds']:.1f} s of {r['seconds']:.1f} s, "
                      f"{d['mean_step_ms']:.0f} ms each; their matmuls at {d['gflop_s']:.0f} GFLOP/s = {100 * d['share']:.0f}% of the "
                      f"peak (steps: median {100 * d['share_median']:.0f}%, {100 * d['share_min']:.0f}-{100 * d['share_max']:.0f}%)",
                      flush=True)
        a, b = (res.get(("workloads", name, s)) or {} for s in ("ours", "transformers"))
        if "tok_s" in a and "tok_s" in b:
            res.set(("workloads", name, "ratio"), round(a["tok_s"] / b["tok_s"], 3))
            print(f"{name:5s} | ratio {a['tok_s'] / b['tok_s']:.2f}x", flush=True)
        if args.no_share_too:
            r = res.part(("workloads", name, "ours_unshared"),
                         lambda: measured(lambda: run_ours(ours, prompts, n, new, args.compile, share=False), args.repeats))
            if r and "tok_s" in a:
                print(f"{name:5s} | ours without prefix sharing {r['tok_s']:8.1f} tok/s | prefix-sharing gain "
                      f"{a['tok_s'] / r['tok_s']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
