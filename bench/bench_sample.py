"""
Generation throughput of sample.py's engine vs Hugging Face `transformers` `generate`, side by side in one run,
same model, prompts and settings, a fixed number of new tokens (end tokens ignored) so both do identical work.

    python bench/bench_sample.py                         # embedded default model, CPU, both workloads
    python bench/bench_sample.py --workload judge --threads 2
    python bench/bench_sample.py --random-1b --device cuda --dtype bfloat16 --compile   # GPU

Workloads: actor-shaped (16 short prompts x 4 samples x 128 new tokens) and judge-shaped (8 prompts of about
400 tokens x 3 samples x 64 new tokens). Prints tokens/s of each and the ratio.
"""
import argparse
import json
import os
import sys
import shutil
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shapes  # noqa: E402
from common import parse_dtype  # noqa: E402
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


def run_ours(model, prompts, n, new_tokens, compile=False, share=True):
    if share:  # one request of n samples per prompt: the prompt is prefilled once
        reqs = [Request(p, n=n, temperature=0.8, top_p=0.95, max_new_tokens=new_tokens, stop_ids=(), seed=i)
                for i, p in enumerate(prompts)]
    else:  # the same work as n separate requests: every sample prefills its own copy of the prompt
        reqs = [Request(p, n=1, temperature=0.8, top_p=0.95, max_new_tokens=new_tokens, stop_ids=(), seed=i * n + k)
                for i, p in enumerate(prompts) for k in range(n)]
    sync()
    t0 = time.perf_counter()
    out = complete(model, reqs, max_rows=len(prompts) * n, compile=compile)
    sync()
    dt = time.perf_counter() - t0
    ntok = sum(len(c.tokens) for r in out for c in r)
    assert ntok == len(prompts) * n * new_tokens, ntok
    return ntok / dt


def run_hf(hf, prompts, n, new_tokens, pad_id):
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as decoder-only generation needs
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    dev = hf.device
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=True, temperature=0.8,
                          top_p=0.95, num_return_sequences=n, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          pad_token_id=pad_id)
    sync()
    dt = time.perf_counter() - t0
    ntok = (out.shape[1] - T) * out.shape[0]
    assert ntok == len(prompts) * n * new_tokens, ntok
    return ntok / dt


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description="Generation tokens/s: this engine vs transformers.generate.")
    p.add_argument("--model", default=None, help="HF folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--shape", default=None, choices=("tiny", "1b", "3b", "8b"),
                   help="a random-initialised Llama-shaped model instead (bench/shapes.py)")
    p.add_argument("--random-1b", action="store_const", const="1b", dest="shape", help="the same as --shape 1b")
    p.add_argument("--gpu-scale", action="store_true", help="the workloads at a paper iteration's size (GPU)")
    p.add_argument("--max-prompts", type=int, default=0, help="use only the first N prompts of each workload (memory)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--workload", default="both", choices=("actor", "judge", "both"), help="which workload(s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for both")
    p.add_argument("--compile", action="store_true", help="compile our decode step (GPU)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs each (best is reported); one warm-up first")
    p.add_argument("--no-share-too", action="store_true", help="also time ours with every sample as its own request")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    dtype = parse_dtype(args.dtype, args.device)
    tmp = None
    if args.shape:
        tmp = tempfile.mkdtemp()
        path = shapes.random_checkpoint(args.shape, tmp, args.device, dtype)
    else:
        if args.model is None:
            from data.prepare_default import ensure_default_model
            args.model = ensure_default_model()
        path = args.model
    tok = Tokenizer.from_pretrained(path)
    ours = Transformer.from_pretrained(path, device=args.device, dtype=dtype).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
    print(f"model {path} | {ours.num_params() / 1e6:.0f}M params | {args.device} {dtype} | threads {args.threads} | "
          f"transformers {transformers.__version__} | torch {torch.__version__}")
    names = ["actor", "judge"] if args.workload == "both" else [args.workload]
    out = {"model": path if not args.shape else f"random {args.shape}", "params": ours.num_params(), "device": args.device,
           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "dtype": str(dtype),
           "compile": args.compile, "attention": shapes.attention_report(args.device, dtype), "workloads": {}}
    print(f"attention kernels (max difference from float64 math; None = refused): {out['attention']}")
    for name in names:
        prompts, n, new = workloads(tok, args.gpu_scale)[name]
        prompts = prompts[:args.max_prompts or None]
        run_ours(ours, prompts[:2], n, 8, args.compile)  # warm-up
        run_hf(hf, prompts[:2], n, 8, tok.pad_id)
        a = max(run_ours(ours, prompts, n, new, args.compile) for _ in range(args.repeats))
        b = max(run_hf(hf, prompts, n, new, tok.pad_id) for _ in range(args.repeats))
        plen = sum(map(len, prompts)) / len(prompts)
        print(f"{name:5s} | {len(prompts)} prompts (mean {plen:.0f} tokens) x {n} samples x {new} new tokens | "
              f"ours {a:8.1f} tok/s | transformers {b:8.1f} tok/s | ratio {a / b:.2f}x")
        out["workloads"][name] = {"prompts": len(prompts), "mean_prompt_tokens": round(plen), "samples": n, "new_tokens": new,
                                  "ours_tok_s": round(a, 1), "transformers_tok_s": round(b, 1), "ratio": round(a / b, 3)}
        if args.no_share_too:
            c = max(run_ours(ours, prompts, n, new, args.compile, share=False) for _ in range(args.repeats))
            print(f"{name:5s} | ours without prefix sharing {c:8.1f} tok/s | prefix-sharing gain {a / c:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
