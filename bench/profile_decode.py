"""
Where a decode step's time goes: torch.profiler's per-op self time of one decode step in the middle of each
bench_sample.py workload (its batch sizes, cache lengths and prompts), ops of the same name and shapes summed,
with their share of the step; and the sampling that follows the step, the same way.

    python bench/profile_decode.py                      # embedded default model, CPU, both workloads
    python bench/profile_decode.py --workload judge --top 12 --json out/profile.json
"""
import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_sample  # noqa: E402
import sample  # noqa: E402
from common import keep_freed_memory, write_json  # noqa: E402
from model import Transformer  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402


def top_ops(prof, top):
    """[(op, input shapes, self ms, share of the profiled total)] of the `top` largest by self time."""
    rows = [e for e in prof.key_averages(group_by_input_shape=True) if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in rows)
    rows.sort(key=lambda e: -e.self_cpu_time_total)
    return total / 1e3, [(e.key, str(e.input_shapes)[:90], round(e.self_cpu_time_total / 1e3, 2),
                          round(e.self_cpu_time_total / total, 3)) for e in rows[:top]]


def profile_workload(model, tok, name, top):
    """Profile decode step number new_tokens // 2 of the workload, and the sampling right after it."""
    prompts, n, new = bench_sample.workloads(tok)[name]
    out, count = {}, [0]
    real_step, real_sample = sample.decode_one_token, sample.sample_rows

    def step(model, tokens, view):
        count[0] += 1
        if count[0] != new // 2:
            return real_step(model, tokens, view)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            logits = real_step(model, tokens, view)
        out["rows"], out["kv_len"] = tokens.size(0), view.kv_len
        out["step_ms"], out["step"] = top_ops(prof, top)
        return logits

    def sample_rows(*a, **kw):
        if count[0] != new // 2 or "sampling" in out:
            return real_sample(*a, **kw)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            result = real_sample(*a, **kw)
        out["sampling_ms"], out["sampling"] = top_ops(prof, top)
        return result

    sample.decode_one_token, sample.sample_rows = step, sample_rows
    try:
        bench_sample.run_ours(model, prompts, n, new)  # (its warm-up run has only 2 new tokens: never profiled)
    finally:
        sample.decode_one_token, sample.sample_rows = real_step, real_sample
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Per-op profile of one decode step of each bench_sample.py workload.")
    p.add_argument("--model", default=None, help="HF folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--workload", default="both", choices=("actor", "judge", "both"))
    p.add_argument("--top", type=int, default=10, help="ops to list per profile")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads")
    p.add_argument("--json", default=None, help="also write the profiles here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as sample.py's processes run
    if args.model is None:
        from data.prepare_default import ensure_default_model
        args.model = ensure_default_model()
    model, tok = Transformer.from_pretrained(args.model).eval(), Tokenizer.from_pretrained(args.model)
    result = {}
    for name in ["actor", "judge"] if args.workload == "both" else [args.workload]:
        r = result[name] = profile_workload(model, tok, name, args.top)
        print(f"\n{name}: decode step of {r['rows']} rows, keys up to {r['kv_len']}: {r['step_ms']:.1f} ms profiled "
              f"(the profiler adds its own overhead); sampling after it {r['sampling_ms']:.1f} ms")
        for what in ("step", "sampling"):
            for op, shapes_, ms, share in r[what]:
                print(f"  {what:8s} {100 * share:5.1f}%  {ms:8.2f} ms  {op:40s} {shapes_}")
    if args.json:
        write_json(args.json, result, indent=1)


if __name__ == "__main__":
    main()
