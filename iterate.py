"""
The main job: whole iterations of Meta-Rewarding (or Self-Rewarding), M_t -> M_{t+1}, stage by stage:
prompts -> responses -> judgments + actor pairs -> meta-judgments + judge pairs -> DPO -> evaluation -> report.

    python iterate.py --run-dir runs/demo                                   # the demo preset, embedded model, CPU
    python iterate.py --run-dir runs/sr --method self-rewarding --iterations 3
    torchrun --nproc_per_node 8 iterate.py --preset paper --model /models/Llama-3-8B-Instruct --run-dir runs/paper

Each iteration writes runs/<name>/iter<t>/ (file formats in the README) and records finished stages in its
manifest.json; re-running the same command continues where a killed run stopped and does nothing once all
is done. Per-iteration schedules are comma lists, the last value repeating: --rho 0,0.32,0.32,0.4.
"""
import argparse
import json
import os
import random
import shutil
import time

import evaluate
import judge
import meta_judge
import sample
import train_dpo
from common import barrier, check_flags, init_distributed, lock_folder, print0, read_jsonl, resolve_model, write_jsonl

ROOT = os.path.dirname(os.path.abspath(__file__))

# Presets fill every flag the user leaves unset. `paper`: Wu et al. 2024 (Meta-Rewarding; figures partly from
# secondary sources) and Yuan et al. 2024 (Self-Rewarding), for a Llama-3-8B-Instruct-class model on a GPU node.
PRESETS = {
    "demo": dict(iterations=2, prompts_per_iter="6", n_responses=4, n_judgments=3, temperature=0.8, top_p=0.95,
                 max_new_tokens=96, judge_max_new_tokens=64, meta_max_new_tokens=48, score_mode="expected",
                 verdict_mode="expected", rho="0", judge_pairs_iters="1,2", max_chosen_judgment_chars=None,
                 beta=0.1, lr=1e-5, epochs=2, batch_size=4, micro_batch_size=2, max_len=1024,
                 eval_prompts_n=12, eval_max_new_tokens=96, max_rows=32),
    "paper": dict(iterations=4, prompts_per_iter="0", n_responses=7, n_judgments=11, temperature=0.8, top_p=0.95,
                  max_new_tokens=1024, judge_max_new_tokens=512, meta_max_new_tokens=512, score_mode="parse",
                  verdict_mode="parse", rho="0,0.32,0.32,0.4", judge_pairs_iters="1,2", max_chosen_judgment_chars=1000,
                  beta=0.1, lr=5e-7, epochs=1, batch_size=32, micro_batch_size=2, max_len=4096,
                  eval_prompts_n=0, eval_max_new_tokens=1024, max_rows=256),
}
SELF_REWARDING_PAPER = dict(n_responses=4, n_judgments=3, temperature=0.7, top_p=0.9)


def schedule(value, t):
    """The value of a comma-list schedule for iteration t (1-based); the last entry repeats."""
    items = [x.strip() for x in str(value).split(",") if x.strip()]
    return items[min(t, len(items)) - 1]


def load_manifest(d):
    f = os.path.join(d, "manifest.json")
    if os.path.exists(f):
        with open(f) as fh:
            return json.load(fh)
    return {"stages": {}}


def save_manifest(d, manifest):
    if int(os.environ.get("RANK", 0)) != 0:
        return
    tmp = os.path.join(d, "manifest.json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, os.path.join(d, "manifest.json"))


def engine_flags(args):
    return ["--max-rows", str(args.max_rows), "--dtype", args.dtype]


# -----------------------------------------------------------------------------
# The stages of iteration t: each is a script's command line, run in this process


def plan(args, t, model_in):
    """[(stage name, script module or None for the loop's own stages, argv)] of iteration t."""
    d = os.path.join(args.run, f"iter{t}")
    f = lambda name: os.path.join(d, name)  # noqa: E731
    seed = str(args.seed * 1000 + t)
    stages = [("prompts", None, []),
              ("responses", sample, ["--model", model_in, "--prompts", f("prompts.jsonl"), "--out", f("responses.jsonl"),
                                     "--n-responses", str(args.n_responses), "--temperature", str(args.temperature),
                                     "--top-p", str(args.top_p), "--max-new-tokens", str(args.max_new_tokens),
                                     "--seed", seed] + engine_flags(args))]
    judging = ["--judge-fn", args.judge_fn] if args.judge_fn else []
    stages.append(("judgments", judge, ["--model", model_in, "--responses", f("responses.jsonl"), "--out",
                                        f("judgments.jsonl"), "--pairs", f("actor_pairs.jsonl"),
                                        "--n-judgments", str(args.n_judgments), "--score-mode", args.score_mode,
                                        "--temperature", str(args.temperature), "--top-p", str(args.top_p),
                                        "--max-new-tokens", str(args.judge_max_new_tokens), "--rho", schedule(args.rho, t),
                                        "--seed", seed] + judging + engine_flags(args)))
    pair_files = [f("actor_pairs.jsonl")]
    if args.method == "meta-rewarding":
        cap = ["--max-chosen-chars", str(args.max_chosen_judgment_chars)] if args.max_chosen_judgment_chars else []
        stages.append(("meta_judgments", meta_judge, [
            "--model", model_in, "--judgments", f("judgments.jsonl"), "--out", f("meta_judgments.jsonl"),
            "--pairs", f("judge_pairs.jsonl"), "--verdict-mode", args.verdict_mode, "--temperature", str(args.temperature),
            "--top-p", str(args.top_p), "--max-new-tokens", str(args.meta_max_new_tokens), "--seed", seed] + cap + engine_flags(args)))
        if str(t) in args.judge_pairs_iters.split(","):
            pair_files.append(f("judge_pairs.jsonl"))
    stages.append(("train", train_dpo, [
        "--model", model_in, "--pairs", *pair_files, "--out", f("model"), "--beta", str(args.beta), "--lr", str(args.lr),
        "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--micro-batch-size",
        str(args.micro_batch_size), "--max-len", str(args.max_len), "--seed", str(args.seed), "--save-every", "50",
        "--resume", "--log-every", "1", "--dtype", args.dtype]))
    if args.eval_prompts_n >= 0:
        stages.append(("evaluate", evaluate, [
            "--a", f("model"), "--b", model_in, "--judge", args.eval_judge, "--prompts", args.eval_prompts,
            "--limit", str(args.eval_prompts_n), "--out-dir", f("eval"), "--max-new-tokens", str(args.eval_max_new_tokens),
            "--verdict-mode", args.verdict_mode, "--judge-max-new-tokens", str(args.meta_max_new_tokens),
            "--max-rows", str(args.max_rows), "--dtype", args.dtype, "--seed", str(args.seed)]))
    stages.append(("report", None, []))
    return stages


def run_stage(args, t, name, module, argv, model_in):
    d = os.path.join(args.run, f"iter{t}")
    if name == "prompts":
        return stage_prompts(args, t, d)
    if name == "report":
        return stage_report(args, t, d)
    if name == "train":
        return stage_train(args, argv, model_in)
    return module.main(argv)


def stage_prompts(args, t, d):
    """This iteration's prompts: the next slice of the pool, shuffled once by the run seed."""
    if int(os.environ.get("RANK", 0)) == 0:
        pool = read_jsonl(args.prompts, required=("id", "prompt"), what="prompt")
        random.Random(args.seed).shuffle(pool)
        n = int(schedule(args.prompts_per_iter, t)) or len(pool)
        start = sum(int(schedule(args.prompts_per_iter, s)) or len(pool) for s in range(1, t)) % len(pool)
        picked = [pool[(start + k) % len(pool)] for k in range(min(n, len(pool)))]
        write_jsonl(os.path.join(d, "prompts.jsonl"), [{"id": p["id"], "prompt": p["prompt"], **(
            {"system": p["system"]} if p.get("system") else {})} for p in picked])
    barrier(args.world)
    return {"prompts": len(read_jsonl(os.path.join(d, "prompts.jsonl")))}


def stage_train(args, argv, model_in):
    """DPO on this iteration's pair files that hold pairs; with none, the next model is this one."""
    i, j = argv.index("--pairs") + 1, argv.index("--out")
    files = [f for f in argv[i:j] if os.path.exists(f) and os.path.getsize(f) > 0]
    out = argv[j + 1]
    if not files:
        # nothing to learn from: the next model is this one, said plainly in the manifest and report
        if int(os.environ.get("RANK", 0)) == 0:
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(model_in, out)
        barrier(args.world)
        return {"steps": 0, "skipped": "no preference pairs; model copied unchanged"}
    counts = train_dpo.main(argv[:i] + files + argv[j:])
    return dict(counts, pair_files=[os.path.basename(f) for f in files])


def stage_report(args, t, d):
    if int(os.environ.get("RANK", 0)) == 0:
        write_report(d, t, load_manifest(d))
    barrier(args.world)
    return {"report": os.path.join(d, "report.md")}


def _read_if(path):
    return read_jsonl(path, required=()) if os.path.exists(path) and os.path.getsize(path) > 0 else []


def _dist(xs):
    if not xs:
        return "n/a"
    xs = sorted(xs)
    return f"mean {sum(xs) / len(xs):.2f}, median {xs[len(xs) // 2]:.2f}, min {xs[0]:.2f}, max {xs[-1]:.2f}"


def write_report(d, t, manifest):
    """report.md of one iteration: counts, skips, failure rates, chosen vs rejected, position bias, DPO
    curves (a PNG too where matplotlib is installed), evaluation."""
    st = {k: v.get("counts", {}) for k, v in manifest["stages"].items()}
    lines = [f"# Iteration {t} ({manifest.get('method')})", "",
             f"Model in: `{manifest.get('model_in')}`  ", f"Model out: `{manifest.get('model_out')}`", "",
             "## Stages", "", "| stage | seconds | counts |", "|---|---|---|"]
    for name, v in manifest["stages"].items():
        counts = {k: x for k, x in v.get("counts", {}).items() if not isinstance(x, (list, dict)) or k.endswith("skips")}
        lines.append(f"| {name} | {v.get('seconds')} | {json.dumps(counts)} |")
    pairs = _read_if(os.path.join(d, "actor_pairs.jsonl"))
    lines += ["", "## Actor pairs: chosen vs rejected", "",
              f"{len(pairs)} pairs; skips: {st.get('judgments', {}).get('actor_pair_skips', {})}; "
              f"judge parse failures: {st.get('judgments', {}).get('parse_failures', 'n/a')} "
              f"(rate {st.get('judgments', {}).get('parse_failure_rate', 'n/a')}, score mode "
              f"{st.get('judgments', {}).get('score_mode', 'n/a')})", "",
              "| | score | length (chars) |", "|---|---|---|",
              f"| chosen | {_dist([p['score_chosen'] for p in pairs])} | {_dist([len(p['chosen']) for p in pairs])} |",
              f"| rejected | {_dist([p['score_rejected'] for p in pairs])} | {_dist([len(p['rejected']) for p in pairs])} |"]
    if "meta_judgments" in st:
        m = st["meta_judgments"]
        lines += ["", "## Meta-judge", "",
                  f"{m.get('battles')} battles, unparseable verdicts {m.get('unparseable_rate')}, first-position win rate "
                  f"{m.get('first_position_win_rate')} (omega1 {m.get('omega1')}, omega2 {m.get('omega2')}); "
                  f"{m.get('judge_pairs')} judge pairs, skips {m.get('pair_skips')}"]
    metrics = _read_if(os.path.join(d, "model.train", "metrics.jsonl"))
    lines += ["", "## DPO", ""]
    if metrics:
        lines += ["| step | loss | reward acc | margin | chosen logps | rejected logps | grad norm |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {m['step']} | {m['loss']:.4f} | {m['reward_acc']:.2f} | {m['margin']:.4f} | {m['chosen_logps']:.2f} | "
                  f"{m['rejected_logps']:.2f} | {m['grad_norm']:.3f} |" for m in metrics]
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            fig, ax = plt.subplots(1, 3, figsize=(12, 3))
            for a, key in zip(ax, ("loss", "reward_acc", "margin")):
                a.plot([m["step"] for m in metrics], [m[key] for m in metrics], marker="o")
                a.set_title(key)
                a.set_xlabel("step")
            fig.tight_layout()
            fig.savefig(os.path.join(d, "dpo.png"))
            plt.close(fig)
            lines += ["", "![DPO curves](dpo.png)"]
        except ImportError:
            pass
    else:
        lines.append(str(st.get("train", {}).get("skipped", "no training metrics")))
    ev = st.get("evaluate", {})
    if ev and "win_rate" in ev:
        lines += ["", "## Evaluation: this iteration's model (A) vs its starting model (B)", "",
                  f"{ev['prompts']} held-out prompts, judge `{ev['judge']}` ({ev['verdict_mode']} verdicts): "
                  f"wins {ev['wins']}, ties {ev['ties']}, losses {ev['losses']}; win rate {ev['win_rate']} "
                  f"(95% CI {ev['win_rate_ci95']}), length-controlled {ev['lc_win_rate']}; mean length A "
                  f"{ev['mean_chars_a']} vs B {ev['mean_chars_b']} chars; unparseable verdicts {ev['unparseable_verdicts']}"]
    with open(os.path.join(d, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


# -----------------------------------------------------------------------------


def build_parser():
    p = argparse.ArgumentParser(description="Run iterations of Meta-Rewarding / Self-Rewarding.")
    p.add_argument("--run-dir", dest="run", default=os.path.join("runs", "demo"), help="run folder (iterations go in <run-dir>/iter<t>)")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="defaults for every flag left unset")
    p.add_argument("--method", default="meta-rewarding", choices=("meta-rewarding", "self-rewarding"), help="with or without the meta-judge")
    p.add_argument("--model", default=None, help="starting model M0 (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompts", default=os.path.join(ROOT, "data", "prompts.jsonl"), help="prompt pool (JSONL id, prompt)")
    p.add_argument("--iterations", type=int, default=None, help="iterations to run in total")
    p.add_argument("--seed", type=int, default=0, help="run seed (prompt order, sampling, data order)")
    a = p.add_argument_group("actor")
    a.add_argument("--prompts-per-iter", default=None, help="prompts per iteration, a schedule (0 = the whole pool)")
    a.add_argument("--n-responses", type=int, default=None, help="responses per prompt (K)")
    a.add_argument("--temperature", type=float, default=None, help="sampling temperature of actor, judge and meta-judge")
    a.add_argument("--top-p", type=float, default=None, help="nucleus mass of actor, judge and meta-judge")
    a.add_argument("--max-new-tokens", type=int, default=None, help="response length limit")
    j = p.add_argument_group("judge and meta-judge")
    j.add_argument("--n-judgments", type=int, default=None, help="judgments per response (N)")
    j.add_argument("--score-mode", default=None, choices=("parse", "expected"), help="judge score mode")
    j.add_argument("--verdict-mode", default=None, choices=("parse", "expected"), help="meta-judge (and evaluation) verdict mode")
    j.add_argument("--judge-max-new-tokens", type=int, default=None, help="judgment length limit")
    j.add_argument("--meta-max-new-tokens", type=int, default=None, help="meta-judgment and evaluation verdict length limit")
    j.add_argument("--rho", default=None, help="length-control schedule, e.g. 0,0.32,0.32,0.4")
    j.add_argument("--judge-pairs-iters", default=None, help="iterations whose DPO data include judge pairs, e.g. 1,2")
    j.add_argument("--max-chosen-judgment-chars", type=int, default=None, help="skip judge pairs with a longer chosen judgment")
    j.add_argument("--judge-fn", default=None, metavar="MODULE:FUNC", help="replace the LLM judge by a Python scoring function (ablations)")
    t = p.add_argument_group("DPO")
    t.add_argument("--beta", type=float, default=None, help="DPO beta")
    t.add_argument("--lr", type=float, default=None, help="DPO peak learning rate")
    t.add_argument("--epochs", type=int, default=None, help="DPO epochs per iteration")
    t.add_argument("--batch-size", type=int, default=None, help="pairs per optimizer step")
    t.add_argument("--micro-batch-size", type=int, default=None, help="pairs per forward per rank")
    t.add_argument("--max-len", type=int, default=None, help="DPO sequence length limit")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-prompts", default=os.path.join(ROOT, "data", "eval_prompts.jsonl"), help="held-out prompts")
    e.add_argument("--eval-prompts-n", type=int, default=None, help="held-out prompts per evaluation (0 = all, -1 = no evaluation)")
    e.add_argument("--eval-max-new-tokens", type=int, default=None, help="answer length limit in evaluation")
    e.add_argument("--eval-judge", default=None, help="judge of the evaluation (default: the starting model M0)")
    g = p.add_argument_group("engine")
    g.add_argument("--max-rows", type=int, default=None, help="sequences decoded together")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    preset = dict(PRESETS[args.preset])
    if args.preset == "paper" and args.method == "self-rewarding":
        preset.update(SELF_REWARDING_PAPER)
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def check_run(args):
    """Every stage's flags for every iteration, checked by that stage's own parser before any work, so a typo
    or a bad value fails now and not hours into a run; and the run folder's recorded settings."""
    check_flags(("--iterations", args.iterations, args.iterations >= 1, "at least 1"),
                ("--eval-prompts-n", args.eval_prompts_n, args.eval_prompts_n >= -1, ">= -1 (-1 = no evaluation)"))
    for flag, value, kind in (("--prompts-per-iter", args.prompts_per_iter, int), ("--rho", args.rho, float),
                              ("--judge-pairs-iters", args.judge_pairs_iters, int)):
        try:
            ok = all(kind(x) >= 0 for x in str(value).split(",") if x.strip())
        except ValueError:
            ok = False
        check_flags((flag, value, ok, f"a comma list of non-negative {kind.__name__}s"))
    model_in = args.model
    for t in range(1, args.iterations + 1):
        for name, module, argv in plan(args, t, model_in):
            if module is not None:
                module.parse_args(argv)
        model_in = os.path.join(args.run, f"iter{t}", "model")
    first = load_manifest(os.path.join(args.run, "iter1"))
    old = first.get("settings")
    if old:
        now = json.loads(json.dumps(run_settings(args), default=str))
        diffs = [f"{k}: {old.get(k)} -> {now.get(k)}" for k in sorted(set(old) | set(now)) if old.get(k) != now.get(k)]
        if diffs:
            raise SystemExit(f"{args.run}: was run with other settings ({'; '.join(diffs)}); use another --run-dir "
                             "or delete this one")


def run_settings(args):
    """The settings a run folder is tied to (--iterations may grow: more iterations extend the run)."""
    return {k: v for k, v in vars(args).items() if k not in ("world", "iterations")}


def main(argv=None):
    args = parse_args(argv)
    rank, args.world, device = init_distributed()
    if args.model is None:
        args.model = resolve_model(None) if rank == 0 else None
        barrier(args.world)
        args.model = args.model or resolve_model(None)
    args.eval_judge = args.eval_judge or args.model
    check_run(args)
    lock = lock_folder(args.run) if rank == 0 else None  # a second job on this folder stops here
    settings = run_settings(args)
    model_in, timings, ran = args.model, [], 0
    for t in range(1, args.iterations + 1):
        d = os.path.join(args.run, f"iter{t}")
        os.makedirs(d, exist_ok=True)
        manifest = load_manifest(d)
        manifest.update(iteration=t, model_in=model_in, model_out=os.path.join(d, "model"), method=args.method)
        manifest.setdefault("settings", settings)
        for name, module, stage_argv in plan(args, t, model_in):
            done = manifest["stages"].get(name, {})
            if done.get("done"):
                timings.append((t, name, done.get("seconds", 0.0), "done before"))
                continue
            print0(f"\n=== iteration {t} | {name} ===")
            t0 = time.time()
            counts = run_stage(args, t, name, module, stage_argv, model_in)
            sec = round(time.time() - t0, 1)
            manifest["stages"][name] = {"done": True, "seconds": sec, "counts": _jsonable(counts)}
            save_manifest(d, manifest)
            barrier(args.world)
            timings.append((t, name, sec, "ran"))
            ran += 1
        model_in = os.path.join(d, "model")
    if ran == 0:
        print0(f"{args.run}: all {args.iterations} iteration(s) are already done; nothing to do")
    print0("\nwhere the time went (seconds):")
    for t, name, sec, how in timings:
        print0(f"  iter{t} {name:15s} {sec:8.1f}  {how}")
    print0(f"  total {sum(x[2] for x in timings if x[3] == 'ran'):.1f}s this run | final model {model_in} | "
           f"reports {os.path.join(args.run, 'iter*', 'report.md')}")
    if lock is not None:
        lock.close()
    return timings


def _jsonable(x):
    return json.loads(json.dumps(x, default=str)) if x is not None else {}


if __name__ == "__main__":
    main()
