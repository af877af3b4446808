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
from model import Transformer  # noqa: E402
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
    # the cache is planned for prompt + max_new_tokens + probe_room: the warm-up's 2 tokens plus that room give
    # the timed run's cache and step shapes, at the cost of 2 tokens
    complete(model, ours_requests(prompts, n, WARM_TOKENS, share, new_tokens - WARM_TOKENS),
             max_rows=len(prompts) * n, compile=compile)
    reqs = ours_requests(prompts, n, new_tokens, share)
    sync()
    t0 = time.perf_counter()
    out = complete(model, reqs, max_rows=len(prompts) * n, compile=compile)
    sync()
    dt = time.perf_counter() - t0
    ntok = sum(len(c.tokens) for r in out for c in r)
    assert ntok == len(prompts) * n * new_tokens, ntok
    return ntok / dt


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
    return ntok / dt


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measured(fn, repeats):
    """Best tokens/s of `repeats` runs, the individual runs, and the device's peak memory over them."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    runs = [fn() for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"tok_s": round(max(runs), 1), "runs": [round(r, 1) for r in runs],
            "peak_gib": round(peak, 1) if peak is not None else None}


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
    print(f"model {res.data['model']} | {ours.num_params() / 1e6:.0f}M params | {args.device} {dtype} | threads "
          f"{args.threads} | transformers {res.data['env']['transformers']} | torch {torch.__version__}", flush=True)
    print(f"attention kernels (picked; max difference from float64, None = refused): {res.data['attention']}", flush=True)
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
                fn = lambda: measured(lambda: run_ours(ours, prompts, n, new, args.compile), args.repeats)  # noqa: E731
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
