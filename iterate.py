"""
The main job: whole iterations of Meta-Rewarding (or Self-Rewarding), M_t -> M_{t+1}, stage by stage:
prompts -> responses -> judgments + actor pairs -> meta-judgments + judge pairs -> DPO -> evaluation -> report;
with --sft-data, an iteration 0 first (SFT of the seed model on EFT and IFT data, see eft.py).

    python iterate.py --run-dir runs/demo                                   # the demo preset, embedded model, CPU
    python iterate.py --run-dir runs/sr --method self-rewarding --iterations 3
    torchrun --nproc_per_node 8 iterate.py --preset paper --model /models/Llama-3-8B-Instruct \
        --sft-data runs/eft/eft.jsonl --prompts pool.jsonl --run-dir runs/paper
    python iterate.py --preset paper --model DIR --prompts pool.jsonl --dry-run      # every stage's command line

Each iteration writes <run-dir>/iter<t>/ (file formats in the README) and records finished stages in its
manifest.json; re-running the same command continues where a killed run stopped and does nothing once all
is done. Per-iteration schedules are comma lists, the last value repeating: --rho 0,0.32,0.32,0.4.
Every stage is a script (sample.py, judge.py, meta_judge.py, train_dpo.py, evaluate.py, and the sibling methods'
own) run in this process with the command line --dry-run prints; --sample-args, --judge-args, ... add any of
that script's flags. The presets are in presets.py; each method's stages (`loop_stages`) beside its rules.
"""
import argparse
import json
import os
import random
import shlex
import shutil
import time

import evaluate
import evaluator
import judge
import lift
import meta_judge
import reasoning
import report
import sample
import self_instruct
import tpo
import train_dpo
from common import (barrier, check_flags, check_model_dir, check_prompt_fields, file_digest, init_distributed, load_function,
                    load_template, lock_folder, model_fingerprint, print0, read_jsonl, render, resolve_model, strict_json,
                    unescape, wandb_run, write0, write_json, write_jsonl)
from presets import JUDGED, PRESETS, ROOT, VERIFIED, actor_argv, apply_preset, flag, method_metric, preset_rules, schedule
from sample import chat_flag, engine_flags
from tokenizer import CHAT_FORMATS

# the scripts a stage can be, by the name the plan gives
SCRIPTS = {m.__name__: m for m in (sample, judge, meta_judge, train_dpo, evaluate, lift, reasoning, tpo, evaluator, self_instruct)}


def read_json(path, default=None):
    """A JSON file of the run folder, or `default` while it is not written yet."""
    if not os.path.exists(path):
        return default
    with open(path) as fh:
        return json.load(fh)


def load_manifest(d):
    return read_json(os.path.join(d, "manifest.json"), {"stages": {}})


# -----------------------------------------------------------------------------
# The plan: which stages iteration t runs, each as a script's command line


def prompt_slices(args):
    """Each iteration's prompts: the pool shuffled once by the run seed and cut into consecutive slices, so no
    prompt is used in two iterations (0 prompts per iteration: the whole pool, every iteration). With
    --select val the first --val-prompts-n of a slice are held out of training, to choose the checkpoint.
    -> [(training prompts, validation prompts)] per iteration; a pool too small is an error now."""
    if args.method in VERIFIED:  # questions (with gold answers for IRPO: ours or GSM8K's), asked with the solution format
        template = load_template(args.reasoning_template, ("prompt",))
        qs = reasoning.read_questions(args.prompts, gold=args.method == "irpo")  # ScPO votes: gold optional
        pool = [dict(q, prompt=render(template, prompt=q["prompt"]), question=q["prompt"]) for q in qs]
    else:
        pool = read_jsonl(args.prompts, required=("id", "prompt"), what="prompt", check=check_prompt_fields)
    order = list(range(len(pool)))
    random.Random(args.seed).shuffle(order)
    held = args.val_prompts_n if args.select == "val" else 0
    slices, start = [], 0
    iters = 1 if args.method == "self-taught-evaluator" else args.iterations  # its later iterations judge iteration 1's pairs
    sizes = [int(schedule(args.prompts_per_iter, t)) for t in range(1, iters + 1)]
    if sum(sizes) > len(pool):
        raise SystemExit(f"--prompts {args.prompts}: {len(pool)} prompts, but {iters} iteration(s) of "
                         f"--prompts-per-iter {args.prompts_per_iter} need {sum(sizes)} different ones; add prompts or lower it")
    for t, n in enumerate(sizes, 1):
        picked = order if n == 0 else order[start:start + n]
        start += n
        if held >= len(picked):
            raise SystemExit(f"--val-prompts-n {held}: iteration {t} has only {len(picked)} prompts")
        slices.append(([pool[i] for i in picked[held:]], [pool[i] for i in picked[:held]]))
    slices += [([], [])] * (args.iterations - iters)
    if held and args.method in VERIFIED and any("answer" not in p for _, val in slices for p in val):
        raise SystemExit(f"--select val: --method {args.method} chooses the epoch by accuracy on held-out questions, "
                         f"but some questions of {args.prompts} have no gold `answer`")
    return slices


def plan(args, t, model_in):
    """[(stage name, script name or None for the loop's own stages, argv)] of iteration t >= 1: the prompts and
    the actor's samples, then the method's own way from samples to pairs, training, evaluation and the report."""
    d = os.path.join(args.run, f"iter{t}")
    f = lambda name: os.path.join(d, name)  # noqa: E731
    seed = str(args.seed * 1000 + t)
    stages = [("prompts", None, []), ("responses", "sample", actor_argv(args, t, f, seed, model_in))]
    if args.new_prompts:  # the model writes new prompts (questions) first; they join the iteration's slice
        template = os.path.join(ROOT, "data", "templates", "question.txt" if args.method in VERIFIED else "self_instruct.txt")
        stages.insert(0, ("new_prompts", "self_instruct", [
            "--model", model_in, "--pool", args.prompts, "--out", f("new_prompts.jsonl"), "--count", str(args.new_prompts),
            "--template", template, "--seed", seed, "--id-prefix", f"new{t}"] + engine_flags(args)
            + shlex.split(args.self_instruct_args or "")))
    if args.method == "self-taught-evaluator" and t > 1:  # the pairs are the first iteration's, judged again
        stages = []
    make = {"irpo": reasoning.loop_stages, "scpo": reasoning.loop_stages, "lift": lift.loop_stages, "tpo": tpo.loop_stages,
            "self-taught-evaluator": evaluator.loop_stages}.get(args.method, meta_judge.loop_stages)
    more, data = make(args, t, f, seed, model_in)
    if args.method == "self-taught-evaluator":  # its judges restart from the seed; --ste-dpo: then DPO + NLL
        sft_out = f("sft_model") if args.ste_dpo else f("model")
        train = [("train", "train_dpo", train_argv(args, args.model, data, sft_out, sft=True))]
        if args.ste_dpo:
            train.append(("train_dpo", "train_dpo", train_argv(args, sft_out, [f("ste_sft.pairs.jsonl")], f("model"))
                          + ([] if args.nll_coef else ["--nll-coef", "1.0"])))
    else:
        train = [("train", "train_dpo", train_argv(args, model_in, data, f("model")))]
    return stages + more + train + eval_and_report(args, d, model_in, t)


def train_argv(args, start, data, out, sft=False):
    """train_dpo.py's command line: DPO (or SFT) of the model `start` on the data files, into `out`."""
    ratio = args.sft_min_lr_ratio if sft else args.min_lr_ratio
    lr = ["--lr", str(args.sft_lr if sft else args.lr)] + (["--min-lr-ratio", str(ratio)] if ratio is not None else [])
    more = ["--objective", "sft"] if sft else ["--beta", str(args.beta)] + (["--nll-coef", str(args.nll_coef)] if args.nll_coef else [])
    more += ["--truncate", "skip"] if args.method == "irpo" and not sft else []  # IRPO drops a pair too long to train whole
    return (["--model", start, "--data", *data, "--out", out, "--epochs", str(args.sft_epochs if sft else args.epochs),
             "--batch-size", str(args.sft_batch_size if sft else args.batch_size), "--micro-batch-size", str(args.micro_batch_size),
             "--max-len", str(args.max_len), "--seed", str(args.seed), "--save-every", "50", "--resume",
             "--log-every", "1", "--dtype", args.dtype] + lr + more + chat_flag(args) + shlex.split(args.train_args or ""))


def plan_sft(args):
    """Iteration 0: SFT of the seed model on --sft-data (EFT judgments and IFT replies), into iter0/model."""
    d = os.path.join(args.run, "iter0")
    stages = [("train", "train_dpo", train_argv(args, args.model, args.sft_data, os.path.join(d, "model"), sft=True)
               + shlex.split(args.sft_args or ""))]
    return stages + evaluator.eval_pair_stages(args, d) + eval_and_report(args, d, args.model)


def eval_argv(args, a, metric, prompts, out_dir, b=None, judge=None, samples=None):
    """evaluate.py's command line: model A (against B) by `metric` on `prompts`, with that metric's own flags only
    (evaluate.py refuses another metric's); a caller adds its generation flags."""
    verdict = ["--verdict-mode", args.verdict_mode, "--judge-max-new-tokens", str(args.meta_max_new_tokens)]
    own = {"winrate": ["--judge", judge] + verdict + (["--strip-thoughts"] if args.method == "tpo" and args.thoughts else [])
           + (["--system-prompt", args.system_prompt] if args.system_prompt else []),
           "judge-accuracy": verdict, "accuracy": ["--samples", str(samples), "--reasoning-template", args.reasoning_template],
           "length": ["--limits", args.eval_limits]}[metric]
    return ["--a", a] + (["--b", b] if b else []) + ["--metric", metric, "--prompts", prompts, "--out-dir", out_dir,
                                                     "--seed", str(args.seed)] + engine_flags(args) + own


def eval_and_report(args, d, model_in, t=0):
    """The iteration's model (A) against its starting model (B) on held-out data, by the evaluation metric (-1
    prompts: none), then the report."""
    m, prompts, limit = args.eval_metric, args.eval_prompts, str(args.eval_prompts_n)
    ste = m == "judge-accuracy" and args.method == "self-taught-evaluator"
    if ste:  # made in the run's first iteration
        prompts, limit = os.path.join(args.run, "iter0" if args.sft_data else "iter1", "eval_pairs.jsonl"), "0"
    # winrate: A's answers also exported for the official benchmark judges
    more = (["--generator-name", f"{run_name(args)}-iter{t}", "--export-alpaca-eval", os.path.join(d, "eval", "alpaca_eval_outputs.json"),
             "--export-arena-hard", os.path.join(d, "eval", "arena_hard_answers.jsonl")] if m == "winrate" else []) + \
        ["--limit", limit, "--max-new-tokens", str(args.eval_max_new_tokens), "--temperature", str(args.eval_temperature)] + \
        shlex.split(args.eval_args or "")
    ev = lambda src, out: eval_argv(args, os.path.join(d, "model"), m, src, os.path.join(d, out), model_in,  # noqa: E731
                                    args.eval_judge, args.eval_samples) + more
    stages = [("evaluate", "evaluate", ev(prompts, "eval"))]
    if ste and not args.other_prompt:  # and on x' pairs
        stages.append(("evaluate_modified", "evaluate", ev(os.path.join(os.path.dirname(prompts), "eval_modified_pairs.jsonl"),
                                                           "eval_modified")))
    return (stages if args.eval_prompts_n >= 0 else []) + judge_eval_stage(args, d, model_in) + [("report", None, [])]


def judge_eval_stage(args, d, model_in):
    """--judge-eval: the iteration's model as a judge of labelled pairs (position-consistent accuracy, and p(right)
    in expected mode), so the report can follow the judge across iterations beside the actor's win rate; the
    run's first iteration also scores its starting model (B), the baseline."""
    if not args.judge_eval or args.method not in JUDGED + ("tpo",):
        return []
    first = os.path.join(args.run, "iter0" if args.sft_data else "iter1")
    return [("judge_eval", "evaluate", eval_argv(args, os.path.join(d, "model"), "judge-accuracy", args.judge_eval,
                                                 os.path.join(d, "judge_eval"), model_in if d == first else None))]


def iterations(args):
    """[(t, its folder, model in, its stages)] for the whole run: iteration 0 when there is SFT data."""
    out, model_in = [], args.model
    for t in range(0 if args.sft_data else 1, args.iterations + 1):
        d = os.path.join(args.run, f"iter{t}")
        out.append((t, d, model_in, plan(args, t, model_in) if t else plan_sft(args)))
        model_in = os.path.join(d, "model")
    return [(t, d, m, [(name, script, argv + wandb_flags(args, t, name) if script == "train_dpo" else argv)
                       for name, script, argv in stages]) for t, d, m, stages in out]


def wandb_flags(args, t, name):
    """--wandb: a training stage logs its steps to its own W&B run, grouped under the run folder's name."""
    return ["--wandb", args.wandb, "--wandb-group", run_name(args), "--wandb-name", f"iter{t}-{name}"] if args.wandb else []


def run_name(args):
    return os.path.basename(os.path.abspath(args.run))


# -----------------------------------------------------------------------------
# Running a stage; the loop's own stages


def run_stage(args, t, d, name, script, argv, model_in):
    if name == "prompts":
        return stage_prompts(args, t, d)
    if name == "report":
        return stage_report(args, t, d)
    if name in ("train", "train_dpo"):
        return stage_train(args, t, d, name, argv, model_in)
    pairs = argv[argv.index("--prompts") + 1] if name == "evaluate_modified" else None
    if pairs and os.path.getsize(pairs) == 0:  # the seed wrote no usable x' for any held-out prompt
        return {"skipped": f"{pairs} is empty: the seed model made no x' pair to score"}
    if name == "evaluate" and args.eval_metric == "winrate" and t >= 1 and model_in != args.model:  # B: a model of this run
        reuse_answers(args, os.path.join(os.path.dirname(model_in), "eval"), os.path.join(d, "eval"))
    return SCRIPTS[script].main(argv)


def reuse_answers(args, prev, folder):
    """The win rate's B is the previous iteration's model, whose answers to the same prompts with the same
    settings that iteration's evaluation already made as its A: they are copied rather than generated again
    (sample.py checks the copied settings as for any resume, so answers made otherwise are never taken)."""
    made = read_json(os.path.join(prev, "answers_a.settings.json"))
    if int(os.environ.get("RANK", 0)) == 0 and made \
            and made.get("model") == model_fingerprint(os.path.join(os.path.dirname(prev), "model")):
        copy_answers(prev, "answers_a", folder)
    barrier(args.world)


def copy_answers(src, name, folder):
    """<src>/<name>.jsonl and its settings as B's answers of evaluate.py's folder, unless it has its own already."""
    if os.path.exists(os.path.join(src, name + ".jsonl")) and not os.path.exists(os.path.join(folder, "answers_b.jsonl")):
        os.makedirs(folder, exist_ok=True)
        for ext in (".jsonl", ".settings.json"):
            shutil.copy2(os.path.join(src, name + ext), os.path.join(folder, "answers_b" + ext))


def stage_prompts(args, t, d):
    """This iteration's slice of the pool (see prompt_slices), and its validation prompts if any."""
    train, val = args.slices[t - 1]
    if int(os.environ.get("RANK", 0)) == 0:
        thought = load_template(args.thought_template, ("prompt",)) if args.method == "tpo" and args.thoughts else None

        def keep(p, asked):  # the pool's own system prompt, else --system-prompt; a gold answer travels along
            system = p.get("system") or args.system_prompt
            return {"id": p["id"], **asked, **({"system": system} if system else {}),
                    **{k: p[k] for k in ("answer", "solution", "generated") if k in p}}
        # TPO asks for thoughts, keeping the request apart for the judge
        asked = train + (val if args.val_retrain else [])  # --val-retrain trains on the held-out prompts at the end
        if args.new_prompts:  # the prompts the model wrote this iteration, asked as the pool's are
            made = read_jsonl(os.path.join(d, "new_prompts.jsonl"), required=("id", "prompt"))
            ask = load_template(args.reasoning_template, ("prompt",)) if args.method in VERIFIED else None
            asked += [{"id": p["id"], "prompt": render(ask, prompt=p["prompt"]) if ask else p["prompt"], "generated": True}
                      for p in made]
        write_jsonl(os.path.join(d, "prompts.jsonl"), [keep(p, {"prompt": render(thought, prompt=p["prompt"]), "request": p["prompt"]}
                                                       if thought else {"prompt": p["prompt"]}) for p in asked])
        if val:  # as the pool gives them: evaluate.py asks with the method's template itself
            write_jsonl(os.path.join(d, "val_prompts.jsonl"), [keep(p, {"prompt": p.get("question", p["prompt"])}) for p in val])
    barrier(args.world)
    return {"prompts": len(train), "val_prompts": len(val), **({"new_prompts": len(read_jsonl(
        os.path.join(d, "new_prompts.jsonl"), required=()))} if args.new_prompts else {})}


def stage_train(args, t, d, name, argv, model_in):
    """DPO (or iteration 0's SFT) on the data files that hold records; with none, the next model is this one."""
    i, j = argv.index("--data") + 1, argv.index("--out")
    missing = [f for f in argv[i:j] if not os.path.exists(f)]
    if missing:
        raise SystemExit(f"{missing[0]}: missing, though the stage that writes it is marked done; delete "
                         f"{os.path.join(d, 'manifest.json')} to run iteration {t} again")
    # iteration 0 trains on the user's own data, checked at start: never skipped. An iteration whose stages made
    # no pairs has nothing to learn: the loop goes on with the model it has, and the report says so.
    files = argv[i:j] if t == 0 else [f for f in argv[i:j] if os.path.getsize(f) > 0]
    out, start = argv[j + 1], argv[argv.index("--model") + 1]
    if not files:
        # nothing to learn from: the next model is the one training would start from, said plainly in the report
        if int(os.environ.get("RANK", 0)) == 0:
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(start, out)
        barrier(args.world)
        return {"steps": 0, "skipped": "no training data; model copied unchanged"}
    argv = argv[:i] + files + argv[j:]
    if t >= 1 and args.select == "val" and name == "train":
        counts = select_epoch(args, d, argv, out, model_in)
    else:
        counts = train_dpo.main(argv)
    return dict(counts, data_files=[os.path.basename(f) for f in files])


def train_epochs(args):
    """The epochs of an iteration's training: the Self-Taught Evaluator's is an SFT."""
    return args.sft_epochs if args.method == "self-taught-evaluator" else args.epochs


def select_argv(args, model, model_in, d, folder):
    """evaluate.py's command line that scores one epoch's model on the iteration's held-out prompts: the win rate
    against M_t judged by the fixed judge when there is one, else by M_t itself, in both orders; the Self-Taught
    Evaluator's judge accuracy on pairs from held-out prompts, made in iteration 1."""
    metric = method_metric(args.method)
    prompts = os.path.join(args.run, "iter1", "val_pairs.jsonl") if metric == "judge-accuracy" else os.path.join(d, "val_prompts.jsonl")
    return eval_argv(args, model, metric, prompts, folder, model_in if metric == "winrate" else None,
                     args.judge_model or model_in, samples=1) + ["--max-new-tokens", str(args.eval_max_new_tokens)]


def selection_score(res):
    return {"winrate": lambda: res["win_rate"], "accuracy": lambda: res["a"]["greedy"],
            "length": lambda: 1 - res["a"]["instructed"]["violation_rate"],
            "judge-accuracy": lambda: res["a"]["accuracy"]}[res["metric"]]()


def without_val(args, d, argv):
    """--val-retrain: the held-out prompts were sampled and paired with the rest, so the data files are written
    again without their pairs (a pair's id is its prompt's id, or starts with it and a slash) for the selection."""
    val = {str(p["id"]) for p in read_jsonl(os.path.join(d, "val_prompts.jsonl"))}
    i, j = argv.index("--data") + 1, argv.index("--out")
    kept = []
    for path in argv[i:j]:
        sel = os.path.splitext(path)[0] + ".selection.jsonl"
        write0(sel, [r for r in read_jsonl(path, required=()) if str(r.get("id", "")).split("/")[0] not in val])
        kept += [sel] if os.path.getsize(sel) > 0 else []
    if not kept:
        raise SystemExit(f"iteration folder {d}: every pair is from a held-out prompt; raise --prompts-per-iter")
    return argv[:i] + kept + argv[j:]


def select_epoch(args, d, argv, out, model_in):
    """--select val: train epoch by epoch; after each, score the epoch's model on the iteration's held-out
    prompts (selection_score). Only the best epoch so far stays on disk (an 8B model is 16 GB); at the end it
    becomes the iteration's model, or with --val-retrain the number of epochs to train again for, the held-out
    prompts' pairs included (IRPO's way). Resumable: select.json records each epoch's training and score."""
    record_f, rank0 = os.path.join(d, "select.json"), int(os.environ.get("RANK", 0)) == 0
    load = lambda: read_json(record_f, {"trained": 0, "score": {}, "best": None})  # noqa: E731
    rec, counts, full = load(), {}, argv
    if args.val_retrain:
        argv = without_val(args, d, argv)
        argv[argv.index("--out") + 1] = out = os.path.join(d, "selection_model")
    for e in range(1, train_epochs(args) + 1):
        if str(e) in rec["score"]:
            continue
        if rec["trained"] < e:  # a training killed after its last epoch ended is not redone (train_dpo knows)
            counts = train_dpo.main(argv + ["--epoch-models", "--stop-after-epochs", str(e)])
            if rank0:
                rec["trained"] = e
                write_json(record_f, rec)
        folder = os.path.join(d, "select", f"epoch{e}")
        if rank0 and e > 1:  # M_t's answers are the same for every epoch: reuse them
            copy_answers(os.path.join(d, "select", "epoch1"), "answers_b", folder)
        barrier(args.world)
        score = selection_score(evaluate.main(select_argv(args, f"{out}.epoch{e}", model_in, d, folder)))
        if rank0:
            best = rec["best"]
            rec.setdefault("fingerprint", {})[str(e)] = model_fingerprint(f"{out}.epoch{e}")
            if best is None or score > rec["score"][str(best)]:
                if best is not None:
                    shutil.rmtree(f"{out}.epoch{best}", ignore_errors=True)
                rec["best"] = e
            else:
                shutil.rmtree(f"{out}.epoch{e}", ignore_errors=True)
            rec["score"][str(e)] = score
            write_json(record_f, rec)
        barrier(args.world)
        rec = load()
    if args.val_retrain:  # the same start and data order, the held-out pairs back in, for the chosen epochs
        counts = dict(train_dpo.main(full + ["--epochs", str(rec["best"])]), retrained_epochs=rec["best"])
    if rank0:  # the last epoch's run wrote `out`; the best epoch replaces it unless that is the last one
        best = f"{out}.epoch{rec['best']}"
        if not args.val_retrain and rec["best"] != train_epochs(args) and os.path.exists(best):
            shutil.rmtree(out, ignore_errors=True)
            os.replace(best, out)
        parent, base = os.path.split(os.path.abspath(out))
        for name in os.listdir(parent):  # every epoch folder, also one a kill left between two steps
            if name.startswith(base + ".epoch") or (args.val_retrain and name == base):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    barrier(args.world)
    return dict(counts, select="val", select_metric=method_metric(args.method),
                val_score_by_epoch=rec["score"], best_epoch=rec["best"])


def stage_report(args, t, d):
    if int(os.environ.get("RANK", 0)) == 0:
        report.write_report(d, t, load_manifest(d))
    barrier(args.world)
    return {"report": os.path.join(d, "report.md")}


# -----------------------------------------------------------------------------
# The command line


def build_parser():
    p = argparse.ArgumentParser(description="Run iterations of Meta-Rewarding / Self-Rewarding.")
    p.add_argument("--run-dir", dest="run", default=os.path.join("runs", "demo"), help="run folder (iterations go in <run-dir>/iter<t>)")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="defaults for every flag left unset")
    p.add_argument("--method", default=None, choices=("meta-rewarding", "self-rewarding", "lift", "irpo", "scpo", "tpo",
                                                      "self-taught-evaluator"),
                   help="with the meta-judge, or without it (every other value the same); lift: judge-free length-"
                        "instructed pairs; irpo, scpo: verifiable answers (gold, or a vote) instead of the judges; tpo: "
                        "thoughts judged by their responses; self-taught-evaluator: the judge trained on synthetic pairs")
    p.add_argument("--lift", action="store_true", default=None, help="also train on length-instructed copies of the actor pairs (LIFT: a loose and a binding limit)")
    p.add_argument("--lift-per-prompt", type=int, default=None, help="--method lift: pairs per prompt")
    p.add_argument("--model", default=None, help="starting model M0, an HF folder or Hub id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompts", default=None, help="prompt pool (JSONL id, prompt; with gold `answer` for irpo, scpo)")
    p.add_argument("--iterations", type=int, default=None, help="iterations to run in total (iteration 0 not counted)")
    p.add_argument("--seed", type=int, default=0, help="run seed (prompt order, sampling, data order)")
    p.add_argument("--dry-run", action="store_true", help="print every iteration's prompts and stage command lines as JSON; run nothing")
    s = p.add_argument_group("iteration 0 (SFT)")
    s.add_argument("--sft-data", nargs="+", default=None, help="SFT records (eft.py's eft.jsonl, ift.jsonl): train M0 on them first")
    s.add_argument("--sft-lr", type=float, default=None, help="SFT peak learning rate")
    s.add_argument("--sft-epochs", type=int, default=None, help="SFT epochs")
    s.add_argument("--sft-batch-size", type=int, default=None, help="SFT examples per optimizer step")
    s.add_argument("--sft-min-lr-ratio", type=float, default=None, help="SFT final learning rate as a fraction of its peak")
    s.add_argument("--sft-args", default=None, help="more train_dpo.py flags for iteration 0")
    a = p.add_argument_group("actor")
    a.add_argument("--prompts-per-iter", default=None, help="fresh prompts per iteration, a schedule (0 = the whole pool each time)")
    a.add_argument("--new-prompts", "--new-questions", dest="new_prompts", type=int, default=None,
                   help="each iteration, the model first writes this many new prompts (questions for scpo) few-shot from "
                        "--prompts (self_instruct.py); they join the iteration's slice")
    a.add_argument("--self-instruct-args", default=None, help="more self_instruct.py flags for --new-prompts (shots, temperature, ...)")
    a.add_argument("--n-responses", type=int, default=None, help="responses per prompt (K)")
    a.add_argument("--system-prompt", default=None, help="system prompt of every actor prompt whose record has none")
    a.add_argument("--temperature", default=None, help="actor sampling temperature, a schedule (e.g. 0.8,0.8,1.3)")
    a.add_argument("--top-p", type=float, default=None, help="actor nucleus mass")
    a.add_argument("--max-new-tokens", type=int, default=None, help="response length limit")
    a.add_argument("--truncated", default=None, choices=("drop", "keep"),
                   help="responses and judgments cut at their token limit: in no pair (drop), or only ever rejected (keep)")
    j = p.add_argument_group("judge and meta-judge")
    j.add_argument("--n-judgments", type=int, default=None, help="judgments per response (N)")
    j.add_argument("--judge-model", default=None, help="a fixed judge for the judge and meta-judge stages (default: the model itself)")
    j.add_argument("--judge-temperature", default=None, help="judge and meta-judge temperature, a schedule (default: the actor's)")
    j.add_argument("--judge-top-p", type=float, default=None, help="judge and meta-judge nucleus mass (default: the actor's)")
    j.add_argument("--score-mode", default=None, choices=("parse", "expected"), help="judge score mode")
    j.add_argument("--verdict-mode", default=None, choices=("parse", "expected"), help="meta-judge (and evaluation) verdict mode")
    j.add_argument("--judge-max-new-tokens", type=int, default=None, help="judgment length limit")
    j.add_argument("--meta-max-new-tokens", type=int, default=None, help="meta-judgment and evaluation verdict length limit")
    j.add_argument("--rho", default=None, help="length-control schedule, e.g. 0,0.32,0.32,0.4")
    j.add_argument("--max-chosen-chars", default=None, help="schedule: longest chosen response in characters (0 = no cap)")
    j.add_argument("--judge-pairs-iters", default=None, help="iterations whose DPO data include judge pairs (and so run the meta-judge)")
    j.add_argument("--max-chosen-judgment-chars", default=None, help="schedule: longest chosen judgment in characters (0 = no cap)")
    j.add_argument("--judge-fn", default=None, metavar="MODULE:FUNC", help="replace the LLM judge by a Python scoring function (ablations)")
    add_train_eval_flags(p)
    g = p.add_argument_group("engine and pass-through")
    g.add_argument("--max-rows", type=int, default=None, help="sequences decoded together")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    g.add_argument("--chat-format", default=None, choices=CHAT_FORMATS,
                   help="override the detected chat format in every stage (plain: the prompt text alone, for base models)")
    g.add_argument("--stop", action="append", default=None, type=unescape,
                   help="text that ends an actor's answer (repeat for several; escapes such as \\n decoded)")
    g.add_argument("--wandb", default=None, metavar="PROJECT",
                   help="log to Weights & Biases (pip install wandb): each training stage's steps (run iter<t>-<stage>) and "
                        "each iteration's stage counts and seconds (run iter<t>), grouped by the run folder's name; "
                        "a re-run logs only the stages it runs, to new W&B runs")
    for stage in ("sample", "judge", "meta-judge", "train", "eval", "lift"):
        g.add_argument(f"--{stage}-args", default=None, help=f"more flags for every {stage} stage, as one string")
    add_method_flags(p)
    return p


def add_train_eval_flags(p):
    """The flags of each iteration's DPO (and checkpoint selection) and of its evaluation."""
    t = p.add_argument_group("DPO")
    t.add_argument("--beta", type=float, default=None, help="DPO beta")
    t.add_argument("--nll-coef", type=float, default=None, help="weight of the NLL of the chosen response (DPO+NLL)")
    t.add_argument("--lr", type=float, default=None, help="DPO peak learning rate")
    t.add_argument("--min-lr-ratio", type=float, default=None, help="final learning rate as a fraction of the peak")
    t.add_argument("--epochs", type=int, default=None, help="DPO epochs per iteration")
    t.add_argument("--batch-size", type=int, default=None, help="pairs per optimizer step")
    t.add_argument("--micro-batch-size", type=int, default=None, help="pairs per forward per rank")
    t.add_argument("--max-len", type=int, default=None, help="training sequence length limit")
    t.add_argument("--select", default=None, choices=("last", "val"),
                   help="the iteration's model: the last epoch's, or the best on held-out prompts against M_t")
    t.add_argument("--val-prompts-n", type=int, default=None, help="--select val: prompts of each iteration's slice held out of training")
    t.add_argument("--val-retrain", action="store_true", default=None,
                   help="--select val: then train again for the chosen number of epochs with the held-out prompts' pairs included (IRPO)")
    t.add_argument("--no-sft", action="store_true", default=None,
                   help="skip iteration 0 on purpose in a preset whose recipe has it (paper, self-rewarding-paper)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-prompts", default=None, help="held-out prompts (default: data/eval_prompts.jsonl)")
    e.add_argument("--eval-prompts-n", type=int, default=None, help="held-out prompts per evaluation (0 = all, -1 = no evaluation)")
    e.add_argument("--eval-metric", default=None, choices=("winrate", "length", "accuracy", "judge-accuracy"),
                   help="evaluate.py --metric (default: the method's: length for lift, accuracy for irpo and scpo, "
                        "judge-accuracy for the self-taught evaluator, else the win rate)")
    e.add_argument("--eval-limits", default=None, help="word limits of --eval-metric length (default 10,20,40)")
    e.add_argument("--eval-samples", type=int, default=None, help="sampled answers per question of --eval-metric accuracy (default 4)")
    e.add_argument("--eval-max-new-tokens", type=int, default=None, help="answer length limit in evaluation")
    e.add_argument("--eval-temperature", type=float, default=None, help="temperature of the evaluation's sampled answers (default 0.7)")
    e.add_argument("--eval-judge", default=None, help="judge of the evaluation (default: the starting model M0)")
    e.add_argument("--judge-eval", default=None, metavar="FILE",
                   help="labelled pairs (prompt, chosen, rejected): score each iteration's model as a judge on them, "
                        "to follow the judge across iterations in the report")


def add_method_flags(p):
    """The flags of the sibling methods (IRPO and ScPO, TPO, the Self-Taught Evaluator)."""
    r = p.add_argument_group("verifiable rewards (irpo, scpo)")
    r.add_argument("--reasoning-template", default=None,
                   help="how a question is asked ({prompt}); default data/templates/reasoning.txt: step by step, then `Final answer: <number>`")
    r.add_argument("--pairs-per-question", type=int, default=None, help="IRPO: pairs per question (K)")
    r.add_argument("--tau", default=None, help="ScPO: vote threshold, a schedule (e.g. 0.5,0.7)")
    r.add_argument("--extra-samples", type=int, default=None,
                   help="ScPO: this many more samples per question, drawn hotter, that may be the rejected side (they do not vote)")
    r.add_argument("--extra-temperature", type=float, default=None, help="ScPO: temperature of --extra-samples (default 1.2)")
    r.add_argument("--no-gold-solution", dest="gold_solution", action="store_false", default=None,
                   help="IRPO: leave a question's gold worked solution (GSM8K's `solution`) out of its winning set")
    o = p.add_argument_group("tpo and self-taught-evaluator")
    o.add_argument("--thought-template", default=None,
                   help="TPO: the actor's prompt ({prompt}): thoughts, then the response, after two markers (default data/templates/thought.txt)")
    o.add_argument("--no-thoughts", dest="thoughts", action="store_false", default=None,
                   help="TPO's control: the same loop with direct responses")
    o.add_argument("--other-prompt", action="store_true", default=None,
                   help="self-taught-evaluator: the worse answer is the answer to another request (for models too small to write x')")
    o.add_argument("--ste-dpo", action="store_true", default=None,
                   help="self-taught-evaluator: after SFT, DPO + NLL (--nll-coef, default 1) on right vs wrong judgments")


def parse_args(argv=None):
    return apply_preset(build_parser().parse_args(argv))


def check_run(args):
    """Every flag and input of the whole run, checked before any work, so that a typo or a bad value fails now
    and not hours into a run: the loop's own flags, every stage's argv by that stage's own parser, the models,
    the data files, the prompt slices, and the run folder's recorded settings."""
    check_flags(("--iterations", args.iterations, args.iterations >= 1, "at least 1"),
                ("--eval-prompts-n", args.eval_prompts_n, args.eval_prompts_n >= -1, ">= -1 (-1 = no evaluation)"),
                ("--val-prompts-n", args.val_prompts_n, args.val_prompts_n >= (1 if args.select == "val" else 0),
                 "at least 1 with --select val"),
                ("--select", args.select, args.select != "val" or train_epochs(args) > 1,
                 "last with one epoch (there is only one to choose: the held-out prompts would go unused)"),
                ("--val-retrain", args.val_retrain, not args.val_retrain or args.select == "val", "given with --select val only"),
                *preset_rules(args))
    for _, _, _, stages in iterations(args):
        for name, script, argv in stages:
            if script is not None:
                SCRIPTS[script].parse_args(argv)
    if not args.dry_run:  # (a dry run may plan for models and data that live on another machine)
        check_models(args)
        for path in args.sft_data or ():  # iteration 0 trains on these: missing or empty is an error, never a skip
            read_jsonl(path, required=(), what="SFT record", check=train_dpo.check_sft)
    args.slices = prompt_slices(args)
    check_eval_data(args)
    check_run_settings(args)


def check_models(args):
    """The models a later stage loads, and a judge function, loaded or checked now (not after hours)."""
    for key in ("model", "judge_model", "eval_judge"):
        if getattr(args, key):
            check_model_dir(getattr(args, key), flag(key), args.chat_format)
    if args.judge_fn:
        load_function(args.judge_fn)


def check_eval_data(args):
    """The evaluation's inputs: enough held-out prompts for --eval-prompts-n, gold answers for accuracy, and
    labelled pairs for judge accuracy (made from the prompts by the Self-Taught Evaluator, else given)."""
    if args.judge_eval:
        read_jsonl(args.judge_eval, required=("prompt", "chosen", "rejected"), what="labelled pair (--judge-eval)",
                   check=evaluator.check_pair)
    if args.eval_prompts_n < 0:
        return
    if args.eval_metric == "judge-accuracy" and args.method != "self-taught-evaluator":
        n = len(read_jsonl(args.eval_prompts, required=("prompt", "chosen", "rejected"), what="labelled pair "
                           "(--eval-metric judge-accuracy scores the judge on prompt/chosen/rejected records)",
                           check=evaluator.check_pair))
    elif args.eval_metric == "accuracy":
        n = len(reasoning.read_questions(args.eval_prompts))  # gold answers to score against
    else:
        n = len(read_jsonl(args.eval_prompts, required=("id", "prompt"), what="prompt", check=check_prompt_fields))
    if args.eval_prompts_n > n:
        raise SystemExit(f"--eval-prompts-n {args.eval_prompts_n}: {args.eval_prompts} holds only {n}; lower it, "
                         "or give 0 for all of them")


def fingerprint(value):
    """What a path holds, not how it was typed (`./m`, `m/`, an absolute path or a moved folder are the same):
    a checkpoint folder's weights, a file's bytes."""
    if isinstance(value, list):
        return [fingerprint(v) for v in value]
    if value is None or not os.path.exists(value):
        return value
    return model_fingerprint(value) if os.path.isdir(value) else file_digest(value)


# flags that name files or folders: the run is tied to their contents
PATH_FLAGS = ("model", "prompts", "eval_prompts", "judge_eval", "reasoning_template", "thought_template", "judge_model",
              "eval_judge", "sft_data")


def run_settings(args):
    """The settings a run folder is tied to, paths by their contents. --iterations may grow (more iterations
    extend a run); anything else changed would change what a done stage started from."""
    skip = ("world", "iterations", "slices", "dry_run", "run", "given", "wandb")  # wandb: logging only
    return strict_json({k: fingerprint(v) if k in PATH_FLAGS else v for k, v in vars(args).items() if k not in skip})


def check_run_settings(args):
    """A run folder made with other settings (another model, SFT data added, other values) is refused."""
    old = read_json(os.path.join(args.run, "run.json"))
    if old is None:
        return
    now = run_settings(args)
    diffs = [f"{flag(k)}: {old.get(k)} -> {now.get(k)}" for k in sorted(set(old) | set(now)) if old.get(k) != now.get(k)]
    if diffs:
        raise SystemExit(f"{args.run}: was run with other settings ({'; '.join(diffs)}); its finished stages started "
                         "from those, so use another --run-dir (or delete this one to start it again)")


def dry_run(args):
    """The whole run as JSON: each iteration's prompt ids and every stage's full command line."""
    doc = {"iterations": []}
    for t, d, model_in, stages in iterations(args):
        train, val = args.slices[t - 1] if t >= 1 else ([], [])
        doc["iterations"].append({
            "iteration": t, "model_in": model_in, "prompt_ids": [p["id"] for p in train],
            **({"val_prompt_ids": [p["id"] for p in val]} if val else {}),
            "stages": [{"name": name, "argv": [f"{m}.py" if m else f"iterate.py:{name}"] + argv} for name, m, argv in stages]})
    print(json.dumps(doc, indent=1))
    return doc


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        args.world, args.model = 1, args.model or os.path.join(ROOT, "checkpoints", "smollm2-135m-instruct")
        args.eval_judge = args.eval_judge or args.model
        check_run(args)
        return dry_run(args)
    rank, args.world, device = init_distributed()
    # the models as local folders: the embedded default converted, a Hub id fetched (by rank 0 first, then the
    # other ranks find it in the cache)
    given = {k: getattr(args, k) for k in ("model", "judge_model", "eval_judge")}
    for first in (True, False):
        if (rank == 0) == first:
            for k, v in given.items():
                setattr(args, k, resolve_model(v, flag(k)) if v or k == "model" else None)
        barrier(args.world)
    args.eval_judge = args.eval_judge or args.model
    check_run(args)
    plan_ = iterations(args)
    done = [(t, name, load_manifest(d)["stages"].get(name, {})) for t, d, _, stages in plan_ for name, _, _ in stages]
    if all(x.get("done") for *_, x in done):  # said before the lock: a finished run may sit where nothing can be written
        print0(f"{args.run}: all {args.iterations} iteration(s) are already done; nothing to do")
        return [(t, name, x.get("seconds", 0.0), "done before") for t, name, x in done]
    lock = lock_folder(args.run) if rank == 0 else None  # a second job on this folder stops here
    settings = run_settings(args)
    if rank == 0 and not os.path.exists(os.path.join(args.run, "run.json")):
        write_json(os.path.join(args.run, "run.json"), settings)
    timings = []
    for t, d, model_in, stages in plan_:
        os.makedirs(d, exist_ok=True)
        manifest = load_manifest(d)
        manifest.update(iteration=t, model_in=model_in, model_out=os.path.join(d, "model"), method=args.method)
        wb = None  # --wandb: this iteration's W&B run, opened when its first stage has run
        for name, script, stage_argv in stages:
            done = manifest["stages"].get(name, {})
            if done.get("done"):
                timings.append((t, name, done.get("seconds", 0.0), "done before"))
                continue
            print0(f"\n=== iteration {t} | {name} ===")
            t0 = time.time()
            counts = run_stage(args, t, d, name, script, stage_argv, model_in)
            sec = round(time.time() - t0, 1)
            manifest["stages"][name] = {"done": True, "seconds": sec, "counts": counts or {}}
            if rank == 0:
                write_json(os.path.join(d, "manifest.json"), manifest)
            if args.wandb and rank == 0:
                wb = wb or wandb_run(args.wandb, run_name(args), f"iter{t}", dict(settings, iteration=t))
                wb.log({f"{name}/{k}": v for k, v in dict(counts or {}, seconds=sec).items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
            barrier(args.world)
            timings.append((t, name, sec, "ran"))
        if wb:
            wb.finish()
    print0("\nwhere the time went (seconds):")
    for t, name, sec, how in timings:
        print0(f"  iter{t} {name:15s} {sec:8.1f}  {how}")
    print0(f"  total {sum(x[2] for x in timings if x[3] == 'ran'):.1f}s this run | final model "
           f"{os.path.join(plan_[-1][1], 'model')} | reports {os.path.join(args.run, 'iter*', 'report.md')}")
    if lock is not None:
        lock.close()
    return timings


if __name__ == "__main__":
    main()
