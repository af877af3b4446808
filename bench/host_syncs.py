"""
Host syncs per decode step of sample.generate, by the line that makes them. A decode step on a GPU should wait
for the device once (the sampled tokens, which the host needs to tell which rows stop); every other wait, and
every small host-to-device copy that waits for its stream, leaves the GPU idle while the host catches up.

On the CPU nothing waits, so the script counts what would: values read by the host (item, bool, int: aten's
_local_scalar_dense; tolist), ops whose output size depends on values (nonzero), and tensors made from Python
data (torch.tensor(list, device=...); aten's lift_fresh), each a pageable copy that waits for its stream on a
GPU. With --device cuda it also counts the syncs themselves (torch.cuda.set_sync_debug_mode). On the CPU,
sampling runs as on a GPU (its first round of candidates as wide: sample.FIRST_CANDIDATES), so the count is the
GPU's.

    python bench/host_syncs.py                       # tiny model, CPU: counts by line, per decode step
    python bench/host_syncs.py --device cuda --json out/host_syncs.json
"""
import argparse
import collections
import os
import sys
import traceback
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sample  # noqa: E402
import shapes  # noqa: E402
from common import write_json  # noqa: E402

KINDS = {"aten._local_scalar_dense.default": "host reads a value", "aten.nonzero.default": "size from values",
         "aten.lift_fresh.default": "tensor from Python data"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def site():
    """The innermost frame of this project's code outside bench/ (and outside installed packages): file:line function."""
    for f in reversed(traceback.extract_stack()[:-2]):
        rel = os.path.relpath(f.filename, ROOT)
        if not rel.startswith(("..", "bench" + os.sep, ".venv")) and "site-packages" not in rel:
            return f"{os.path.relpath(f.filename, ROOT)}:{f.lineno} {f.name}"
    return "elsewhere"


class Recorder(TorchDispatchMode):
    """Events (kind, site) of the current step, one list per interval between two decode calls."""

    def __init__(self):
        super().__init__()
        self.steps = [[]]

    def add(self, kind):
        self.steps[-1].append((kind, site()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in KINDS:
            self.add(KINDS[str(func)])
        return func(*args, **(kwargs or {}))


def count(device, rows=8, new_tokens=12):
    model = shapes.random_model("tiny", device, torch.float32).eval()
    rec = Recorder()
    real_step, real_tolist = sample.decode_one_token, torch.Tensor.tolist

    def step(*a, **kw):  # each decode call closes an interval: everything the host did for one step
        out = real_step(*a, **kw)
        rec.steps.append([])
        return out

    def tolist(t):
        rec.add("host reads a tensor (tolist)")
        return real_tolist(t)

    # fixed-length samples (no stop tokens) with top-p, as the actor stage draws them: every step is alike
    reqs = [sample.Request(list(range(5, 5 + 7 + i)), n=2, temperature=0.8, top_p=0.95, max_new_tokens=new_tokens,
                           stop_ids=(), seed=i) for i in range(rows // 2)]

    def on_warning(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):  # what set_sync_debug_mode says at each CUDA sync
            rec.steps[-1].append(("CUDA sync", f"{os.path.relpath(filename, ROOT)}:{lineno}"))

    sample.decode_one_token, torch.Tensor.tolist = step, tolist
    first = dict(sample.FIRST_CANDIDATES)
    sample.FIRST_CANDIDATES[torch.device(device).type] = sample.FIRST_CANDIDATES["cuda"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = on_warning
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                with rec:
                    sample.complete(model, reqs, max_rows=rows)
            finally:
                if device == "cuda":
                    torch.cuda.set_sync_debug_mode(0)
    finally:
        sample.decode_one_token, torch.Tensor.tolist = real_step, real_tolist
        sample.FIRST_CANDIDATES.update(first)
    # the intervals between decode calls 2..n-1 are the steady state (the first follows the prefill, the last
    # ends the run)
    steady = rec.steps[2:-1]
    per_step = collections.Counter(e for s in steady for e in s)
    return {"decode_steps": len(rec.steps) - 1, "steady_steps": len(steady),
            "events_per_step": {f"{kind} | {where}": round(n / len(steady), 2) for (kind, where), n in sorted(per_step.items())},
            "total_per_step": round(sum(n for (kind, _), n in per_step.items() if kind != "CUDA sync") / len(steady), 2),
            "cuda_syncs_per_step": round(sum(n for (kind, _), n in per_step.items() if kind == "CUDA sync") / len(steady), 2)
            if device == "cuda" else None}


def main(argv=None):
    p = argparse.ArgumentParser(description="Count host syncs per decode step of sample.generate, by line.")
    p.add_argument("--device", default="cpu", help="cpu (counts what would sync) or cuda (also counts the syncs)")
    p.add_argument("--json", default=None, help="write the counts here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = dict(count(args.device), env=shapes.environment(args.device))
    print(f"{out['steady_steps']} steady decode steps of {out['decode_steps']}: {out['total_per_step']} events per step"
          + (f", {out['cuda_syncs_per_step']} CUDA syncs per step" if out["cuda_syncs_per_step"] is not None else ""))
    for what, n in out["events_per_step"].items():
        print(f"  {n:5.2f} per step  {what}")
    if args.json:
        write_json(args.json, out, indent=1)


if __name__ == "__main__":
    main()
