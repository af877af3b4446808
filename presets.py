"""
The presets of iterate.py: every flag a run leaves unset takes its preset's value, and every value is a flag.
A trailing "?" in a comment marks a value that no primary source confirms (a secondary source, a guess where the
paper is silent, or ours). Also the per-iteration schedules (comma lists, the last value repeating) and which
flags belong to which method, so that a flag another method would ignore is refused (apply_preset fills a run's
unset flags, preset_rules checks them).

    python iterate.py --preset paper --model DIR --prompts pool.jsonl --dry-run     # a preset's whole plan
"""
import os
import shlex

from sample import engine_flags

ROOT = os.path.dirname(os.path.abspath(__file__))

PRESETS = {
    # the embedded 135M model on a laptop CPU: the machinery end to end in minutes (expected score modes: the
    # model cannot write a parseable score)
    # and a system prompt asking for brevity, so that most answers end within 128 tokens (a cut one never wins)
    "demo": dict(method="meta-rewarding", iterations=2, prompts_per_iter="6", n_responses=4, n_judgments=3,
                 system_prompt="Answer briefly, in at most three sentences.",
                 temperature=0.8, top_p=0.95, max_new_tokens=128, judge_max_new_tokens=64, meta_max_new_tokens=32,
                 score_mode="expected", verdict_mode="expected", rho="0", judge_pairs_iters="1,2",
                 max_chosen_chars="0", max_chosen_judgment_chars="0", beta=0.1, lr=2e-5, epochs=1, batch_size=4,
                 micro_batch_size=2, max_len=1024, select="last", val_prompts_n=0, eval_prompts_n=12,
                 eval_max_new_tokens=64, max_rows=96,  # all 72 judgments of an iteration decode together
                 sft_lr=1e-5, sft_epochs=1, sft_batch_size=4),
    # Meta-Rewarding (Wu et al. 2024) on a Llama-3-8B-Instruct-class model, iteration 0 = SFT on EFT data
    "paper": dict(method="meta-rewarding", iterations=4,
                  prompts_per_iter="5000",  # fresh prompts per iteration, from a pool of 20,000
                  n_responses=7, n_judgments=11, temperature=0.8, top_p=0.95,
                  max_new_tokens=1024, judge_max_new_tokens=512, meta_max_new_tokens=512,  # ?
                  score_mode="parse", verdict_mode="parse",
                  rho="0,0.32,0.32,0.4",  # ? (secondary source)
                  judge_pairs_iters="1,2",  # judge pairs, and so meta-judging, in iterations 1-2 only
                  max_chosen_chars="2500,0",  # ? chosen response at most 2,500 characters in iteration 1
                  max_chosen_judgment_chars="1100,1000",  # ? chosen judgment caps in iterations 1 and 2
                  beta=0.1, batch_size=32, lr=5e-6, epochs=10,  # ? lr, batch and epochs (secondary source)
                  micro_batch_size=2, max_len=4096,
                  select="val", val_prompts_n=200,  # ? the criterion is not published: ours, see README
                  eval_prompts_n=0, eval_max_new_tokens=1024, max_rows=256,
                  sft_lr=5.5e-6, sft_epochs=2, sft_batch_size=16),  # ? Self-Rewarding's SFT values, as recalled
    # Self-Rewarding (Yuan et al. 2024) with its own settings; iteration 0 = SFT on IFT + EFT
    "self-rewarding-paper": dict(method="self-rewarding", iterations=2,
                                 prompts_per_iter="0",  # ? it made new prompts each iteration: pass a pool per run
                                 n_responses=4, n_judgments=3, temperature=0.7, top_p=0.9,
                                 max_new_tokens=1024, judge_max_new_tokens=512, meta_max_new_tokens=512,  # ?
                                 score_mode="parse", verdict_mode="parse", rho="0", judge_pairs_iters="",
                                 max_chosen_chars="0", max_chosen_judgment_chars="0",
                                 beta=0.1, lr=1e-6, batch_size=16, epochs=1,  # ? epochs
                                 micro_batch_size=2, max_len=4096, select="last", val_prompts_n=0,
                                 eval_prompts_n=0, eval_max_new_tokens=1024, max_rows=256,
                                 sft_lr=5.5e-6, sft_epochs=2, sft_batch_size=16),  # ? epochs
}
PRESETS["lift-demo"] = dict(
    # LIFT on the embedded model, judge-free (word counts are arithmetic, so even a 135M model gets a real signal)
    PRESETS["demo"], method="lift", iterations=1, prompts_per_iter="48", n_responses=4, system_prompt=None,
    temperature=1.0, top_p=0.95, max_new_tokens=96, lr=1e-5, epochs=2, batch_size=8, micro_batch_size=4,
    eval_prompts_n=20, eval_max_new_tokens=80, lift_per_prompt=3, truncated="keep")
PRESETS["reasoning-demo"] = dict(
    # IRPO (or --method scpo) on the embedded model: single-digit sums and products asked few-shot, on which it
    # is right in about a quarter of its sampled answers (data/make_arith.py; the README has the probe)
    PRESETS["demo"], method="irpo", iterations=1, prompts_per_iter="64", n_responses=6, system_prompt=None,
    temperature=0.8, top_p=0.95, max_new_tokens=48, pairs_per_question=3, tau="0.5", nll_coef=1.0, lr=1e-5,
    epochs=1, batch_size=8, micro_batch_size=4, eval_prompts_n=0, eval_max_new_tokens=48,
    prompts=os.path.join(ROOT, "data", "arith_train.jsonl"), eval_prompts=os.path.join(ROOT, "data", "arith_test.jsonl"),
    reasoning_template=os.path.join(ROOT, "data", "templates", "reasoning_fewshot.txt"))
PRESETS["irpo-paper"] = dict(
    # Iterative RPO (Pang et al. 2024) on GSM8K: --prompts gsm8k_train.jsonl (its own format is read as is)
    PRESETS["paper"], method="irpo", iterations=4, prompts_per_iter="0",  # the whole training set each iteration
    n_responses=30, pairs_per_question=10, temperature="0.8,0.8,1.3", top_p=1.0,  # T 1.3 from iteration 3
    max_new_tokens=512, beta=0.1, nll_coef=1.0, lr=7e-7, epochs=3, batch_size=16,  # ? epochs and batch
    # the checkpoint chosen by accuracy on 1,000 held-out training questions, then trained again with them
    # (--val-retrain, on by default here); choosing among epochs rather than steps is ours (?)
    select="val", val_prompts_n=1000, eval_samples=32)  # maj@32 (eval temperature 0.8)
PRESETS["scpo-paper"] = dict(
    # ScPO (Prasad et al. 2024): no gold answers; seed questions as --prompts (GSM8K's files read as they are), and
    # with --new-questions N the model writes N new ones each iteration (data/templates/question.txt), kept where
    # the vote passes tau; 8 more samples at T 1.2 find rejected answers
    PRESETS["paper"], method="scpo", iterations=2, prompts_per_iter="0", n_responses=8, tau="0.5,0.7",
    temperature=0.7, top_p=0.9, max_new_tokens=512, beta=0.5, nll_coef=1.0, lr=5e-6, epochs=10, batch_size=16,  # ? batch
    select="val", val_prompts_n=500, eval_samples=8)  # the epoch by dev accuracy; 500 held-out questions (?); 8-way SC
PRESETS["tpo-paper"] = dict(
    # Thinking LLMs / TPO (Wu et al. 2024): 8 samples, 5,000 prompts per iteration, 10 epochs, up to 5 iterations;
    # the paper judged with a separate judge model (pass --judge-model); its control is --no-thoughts
    PRESETS["paper"], method="tpo", iterations=5, n_responses=8, temperature=0.8, top_p=0.95,
    n_judgments=1, rho="0.5",  # ? one judgment (a reward model in the paper); rho in [0, 0.5]
    judge_pairs_iters="", max_chosen_chars="0", eval_prompts_n=0,
    select="val", val_prompts_n=200)  # the epoch by win rate on held-out prompts; 200 of them (?)
PRESETS["ste-paper"] = dict(
    # the Self-Taught Evaluator (Wang et al. 2024): the model writes x' and answers it (y-); the pairs are made once
    # and every iteration judges them again with its newest judge, then trains the seed; the released recipe's
    # DPO + NLL on right vs wrong judgments after the SFT (--ste-dpo)
    PRESETS["paper"], method="self-taught-evaluator", iterations=5, prompts_per_iter="0", n_responses=1,  # ? iterations
    temperature=0.7, top_p=0.9, max_new_tokens=1024, n_judgments=8, judge_max_new_tokens=1024,  # ? judgments per pair
    verdict_mode="parse", ste_dpo=True, beta=0.1, nll_coef=1.0, epochs=1, select="last", val_prompts_n=0,  # ? epochs
    eval_prompts_n=0, eval_max_new_tokens=1024)
PRESETS["ste-demo"] = dict(
    # the Self-Taught Evaluator on the embedded model: y- = the answer to another request; the model cannot write
    # a [[A]]/[[B]] verdict, so its probabilities of the letter after `Verdict: [[` decide (expected mode), and the
    # letter is written out at the end of the judgment
    PRESETS["demo"], method="self-taught-evaluator", iterations=1, prompts_per_iter="32", n_responses=1,
    system_prompt=None, temperature=0.8, max_new_tokens=48, n_judgments=4, judge_max_new_tokens=32,
    meta_max_new_tokens=32, verdict_mode="expected", sft_lr=3e-5, sft_epochs=2, sft_batch_size=8,
    micro_batch_size=4, eval_prompts_n=20, eval_max_new_tokens=48, other_prompt=True)
# flags that only some presets give a value: the rest take the default given here
OPTIONAL = {"min_lr_ratio": {"self-rewarding-paper": 0.1},  # Self-Rewarding: lr 1e-6 decaying to 1e-7
            "truncated": {None: "drop"}, "lift_per_prompt": {None: 2}, "nll_coef": {None: 0.0},
            "pairs_per_question": {None: 10}, "tau": {None: "0.5"}, "other_prompt": {None: False}, "ste_dpo": {None: False},
            "lift": {None: False}, "thoughts": {None: True}, "gold_solution": {None: True}, "no_sft": {None: False},
            "val_retrain": {None: False, "irpo-paper": True}, "new_prompts": {None: 0},
            # how the model writes new prompts: Self-Rewarding 8-shot (6 from the pool, 2 of its own), T 0.6, top-p 0.9;
            # ScPO 4-shot, T 0.7, top-p 0.9
            "self_instruct_args": {None: "", "self-rewarding-paper": "--shots 8 --generated-shots 2 --temperature 0.6 --top-p 0.9",
                                   "scpo-paper": "--shots 4 --temperature 0.7 --top-p 0.9"},
            # ScPO: 8 more samples at T 1.2 per question, candidates for the rejected side (the model grows consistent)
            "extra_samples": {None: 0, "scpo-paper": 8}, "extra_temperature": {None: 1.2},
            "eval_temperature": {None: 0.7, "irpo-paper": 0.8},  # IRPO reports maj@32 at T 0.8
            "sft_min_lr_ratio": {"self-rewarding-paper": 0.2, "paper": 0.2},  # 5.5e-6 decaying to 1.1e-6 (? for paper)
            "judge_eval": {"demo": os.path.join(ROOT, "data", "judge_eval.jsonl")}, "eval_limits": {None: "10,20,40"}, "eval_samples": {None: 4},
            "thought_template": {None: os.path.join(ROOT, "data", "templates", "thought.txt")},
            "prompts": {None: os.path.join(ROOT, "data", "prompts.jsonl")},
            "eval_prompts": {None: os.path.join(ROOT, "data", "eval_prompts.jsonl")},
            "reasoning_template": {None: os.path.join(ROOT, "data", "templates", "reasoning.txt")}}
VERIFIED = ("irpo", "scpo")
JUDGED = ("meta-rewarding", "self-rewarding")
# flags only some methods read: given to another, they would be silently ignored, so they are refused
METHOD_FLAGS = {"lift": JUDGED, "lift_per_prompt": ("lift",), "pairs_per_question": ("irpo",), "tau": ("scpo",),
                "reasoning_template": VERIFIED, "gold_solution": ("irpo",), "thought_template": ("tpo",), "thoughts": ("tpo",),
                "other_prompt": ("self-taught-evaluator",), "ste_dpo": ("self-taught-evaluator",),
                "judge_pairs_iters": ("meta-rewarding",), "new_prompts": JUDGED + ("scpo",), "self_instruct_args": JUDGED + ("scpo",),
                "extra_samples": ("scpo",), "extra_temperature": ("scpo",), "max_chosen_judgment_chars": ("meta-rewarding",),
                "max_chosen_chars": JUDGED, "rho": JUDGED + ("tpo",), "score_mode": JUDGED + ("tpo",),
                "judge_model": JUDGED + ("tpo",), "judge_fn": JUDGED + ("tpo",), "judge_args": JUDGED + ("tpo",),
                "meta_judge_args": ("meta-rewarding",), "lift_args": JUDGED, "judge_eval": JUDGED + ("tpo",), "val_retrain": JUDGED + ("lift", "tpo") + VERIFIED}
# flags only one evaluation metric reads
METRIC_FLAGS = {"eval_limits": "length", "eval_samples": "accuracy"}
# the flags that are schedules, and their values' type
SCHEDULES = (("prompts_per_iter", int), ("rho", float), ("temperature", float), ("judge_temperature", float), ("tau", float),
             ("judge_pairs_iters", int), ("max_chosen_chars", int), ("max_chosen_judgment_chars", int))


# each method's own measure (higher is better), its default --eval-metric and how --select val scores an epoch: the
# win rate against M_t, greedy accuracy on held-out questions, the share of word limits kept, or judge accuracy
METHOD_METRIC = {"irpo": "accuracy", "scpo": "accuracy", "lift": "length", "self-taught-evaluator": "judge-accuracy"}


def method_metric(method):
    return METHOD_METRIC.get(method, "winrate")


def apply_preset(args):
    """Every flag left unset (None) takes its preset's value (or OPTIONAL's default); the evaluation metric is the
    method's own and the judge samples as the actor unless told otherwise."""
    args.given = sorted(k for k, v in vars(args).items() if v is not None)  # set by the user, not by a preset
    preset = dict({k: v.get(args.preset, v.get(None)) for k, v in OPTIONAL.items()}, **PRESETS[args.preset])
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.eval_metric = args.eval_metric or method_metric(args.method)
    args.judge_temperature = args.temperature if args.judge_temperature is None else args.judge_temperature
    args.judge_top_p = args.top_p if args.judge_top_p is None else args.judge_top_p
    return args


def preset_rules(args):
    """check_flags rules: what a preset's recipe cannot do without is given, a flag given to a method or metric
    that would ignore it is refused, and a schedule is one value or one per iteration (only --judge-pairs-iters
    may name no iteration at all)."""
    needed = [("--sft-data", args.sft_data, args.sft_data or args.no_sft or args.preset not in ("paper", "self-rewarding-paper"),
               f"given: --preset {args.preset} starts with iteration 0, SFT on EFT and IFT data (make it with `python "
               "eft.py --oasst TREES.jsonl --model DIR --out runs/eft`, then --sft-data runs/eft/eft.jsonl runs/eft/ift.jsonl), "
               "or say --no-sft to skip it on purpose"),
              ("--judge-model", args.judge_model, args.judge_model or args.preset != "tpo-paper",
               "given: the TPO paper judged with a separate, fixed judge model (give the policy's own folder to judge "
               "with the policy itself)")]
    unused = [(flag(k), getattr(args, k), k not in args.given or args.method in ms,
               f"left out: only --method {' / '.join(ms)} uses it, and this run is --method {args.method}") for k, ms in METHOD_FLAGS.items()]
    unused += [(flag(k), getattr(args, k), k not in args.given or args.eval_metric == m,
                f"left out: only --eval-metric {m} uses it, and this run's is {args.eval_metric}") for k, m in METRIC_FLAGS.items()]
    return needed + unused + [(flag(k), getattr(args, k), is_schedule(getattr(args, k), kind, empty=k == "judge_pairs_iters"),
                               f"a comma list of non-negative {kind.__name__}s") for k, kind in SCHEDULES]


def flag(key):
    return "--" + {"run": "run-dir", "thoughts": "no-thoughts"}.get(key, key.replace("_", "-"))


def is_schedule(value, kind, empty=False):
    """A comma list of non-negative values of `kind` (empty: or nothing at all)."""
    items = [x.strip() for x in str(value).split(",")]
    try:
        return all(kind(x) >= 0 for x in items) or (empty and items == [""])
    except ValueError:
        return empty and items == [""]


def schedule(value, t):
    """The value of a comma-list schedule for iteration t (1-based); the last entry repeats."""
    items = [x.strip() for x in str(value).split(",") if x.strip()]
    return items[min(t, len(items)) - 1]


def in_schedule(iters, t):
    return str(t) in [x.strip() for x in str(iters).split(",")]


def actor_argv(args, t, f, seed, model_in, out="responses.jsonl", n=None, temperature=None):
    """sample.py's command line for the actor's samples of iteration t (votes count duplicates: no dedup for
    irpo and scpo)."""
    return ["--model", model_in, "--prompts", f("prompts.jsonl"), "--out", f(out), "--n-responses", str(args.n_responses if n is None else n),
            "--temperature", str(schedule(args.temperature, t) if temperature is None else temperature), "--top-p", str(args.top_p),
            "--max-new-tokens", str(args.max_new_tokens), "--seed", seed] + \
        (["--no-dedup"] if args.method in VERIFIED else []) + engine_flags(args) + stop_flags(args) + shlex.split(args.sample_args or "")


def stop_flags(args):
    """--stop for each stop string of the run (--stop, and the reasoning template's `#stop:` lines for irpo and
    scpo), written as sample.py reads them (it decodes escapes)."""
    from common import load_template, stop_argv
    stops = list(args.stop or []) + (list(load_template(args.reasoning_template, ("prompt",)).stops) if args.method in VERIFIED else [])
    return stop_argv(stops)
