"""
One iteration of the loop at the demo preset's shape on a random-initialised model, for the stage timings:
responses, judgments, meta-judgments, DPO, evaluation, as `iterate.py --run-dir DIR` runs them. A random model
never writes an end of turn, and an answer cut at its token limit never wins a pair, so the checkpoint gets extra
end tokens (every 32nd id: its answers end after about 32 tokens, as shapes.random_checkpoint says): the loop then
makes pairs and trains, and the JSON says how many. The checkpoint and the run folder are temporary.

    python bench/bench_loop.py --shape 1b --device cuda --json out/loop_1b.json
    python bench/bench_loop.py --shape tiny --device cpu --smoke          # a few prompts and tokens: the script's check
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import shapes  # noqa: E402

SMOKE = ["--prompts-per-iter", "4", "--max-new-tokens", "16", "--judge-max-new-tokens", "16", "--meta-max-new-tokens", "8",
         "--eval-prompts-n", "2", "--eval-max-new-tokens", "8"]


def count_lines(path):
    return sum(1 for line in open(path) if line.strip()) if os.path.exists(path) else 0


def main(argv=None):
    p = argparse.ArgumentParser(description="One demo-shaped iteration of the loop on a random model: stage timings.")
    p.add_argument("--shape", default="1b", choices=sorted(shapes.SHAPES), help="a random-initialised model shape")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--stop-every", type=int, default=32, help="every N-th token id ends an answer (0: none)")
    p.add_argument("--smoke", action="store_true", help="a few prompts and tokens (a CPU check of the script)")
    p.add_argument("--time-limit", type=float, default=0, help="seconds for the loop; it is killed past them")
    p.add_argument("--json", default=None, help="write the stage timings and counts here")
    args = p.parse_args(argv)
    harness.exit_cleanly_on_sigterm()
    res = harness.Results(args.json, harness.deadline_from(args.time_limit), benchmark="loop", shape=args.shape,
                          device=args.device, stop_every=args.stop_every, env=shapes.environment(args.device))
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    with harness.temporary_folder() as tmp:
        t0 = time.time()
        ckpt = shapes.random_checkpoint(args.shape, os.path.join(tmp, "model"), args.device, dtype, args.stop_every)
        res.set(("checkpoint_s",), round(time.time() - t0, 1))
        harness.free_device_memory()
        run = os.path.join(tmp, "run")
        cmd = [sys.executable, os.path.join(ROOT, "iterate.py"), "--run-dir", run, "--model", ckpt, "--iterations", "1"] + \
            (SMOKE if args.smoke else [])

        def loop():
            t0 = time.time()
            left = res.left()
            try:
                r = subprocess.run(cmd, timeout=None if left is None else max(left - 2, 1))
            except subprocess.TimeoutExpired:
                return {"error": f"time limit: the loop was killed after {time.time() - t0:.0f} s"}
            out = {"seconds": round(time.time() - t0, 1), "exit_code": r.returncode}
            man = os.path.join(run, "iter1", "manifest.json")
            if os.path.exists(man):
                stages = json.load(open(man))["stages"]
                # each stage's seconds and its numeric counts (samples, pairs, steps); not its nested reports
                out["stages"] = {k: {"seconds": v.get("seconds"), **{c: n for c, n in (v.get("counts") or {}).items()
                                                                   if isinstance(n, (int, float))}}
                                 for k, v in stages.items()}
            d = os.path.join(run, "iter1")
            out["pairs"] = {"actor": count_lines(os.path.join(d, "actor_pairs.jsonl")),
                            "judge": count_lines(os.path.join(d, "judge_pairs.jsonl"))}
            if r.returncode:
                out["error"] = f"iterate.py exit code {r.returncode}"
            return out
        r = res.part(("loop",), loop)
        print(json.dumps(res.get(("loop",))))
        return 0 if r else 1


if __name__ == "__main__":
    sys.exit(main())
