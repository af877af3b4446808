"""
Head-to-head evaluation of two checkpoints on held-out prompts: both answer every prompt, a judge model
compares the answers in both orders (a disagreement between the orders is a tie), and the win rate comes
with a bootstrap 95% interval and a length-controlled win rate.

    python evaluate.py --a runs/demo/iter2/model --b runs/demo/iter1/model --limit 20
    python evaluate.py --a DIR_A --b DIR_B --judge DIR_J --prompts data/eval_prompts.jsonl --verdict-mode parse
    python evaluate.py --a DIR_A --b DIR_B --export-alpaca-eval runs/eval/model_outputs.json
    python evaluate.py --a DIR_A --b DIR_B --prompts arena_hard.jsonl --export-arena-hard runs/eval/model_answer/mine.jsonl

Length-controlled win rate: a logistic model of the outcome on tanh(length difference / its std), read at
zero difference (the idea of AlpacaEval 2's length control, fitted on this comparison only).
Outputs (answers, comparisons, results.json) go to --out-dir; each step resumes where it stopped.
"""
import argparse
import hashlib
import json
import os
import random
import time

import numpy as np

import evaluator
import lift
import reasoning
import sample
import tpo
from common import (TEMPLATES, ShardWriter, barrier, check_flags, check_prompt_fields, file_digest, load_model, load_template,
                    merge_shards, model_fingerprint, print0, read_jsonl, render, resolve_model, stable_seed, start_stage,
                    strict_json, write0, write_json, write_jsonl)
from judge import make_probe, probe_candidates
from meta_judge import WINNER_MARK, parse_winner
from sample import (Request, add_engine_args, add_sampling_args, common_prefix, engine_flags, engine_rules, generate,
                    sampling_rules)

DEFAULT_EVAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "eval_prompts.jsonl")

# -----------------------------------------------------------------------------
# Statistics


def outcome(first_a, first_b):
    """+1 if A won in both orders, -1 if B did, 0 otherwise. first_a: the winner letter when A was shown
    first (so "A" means A); first_b: the letter when B was shown first (so "A" means B)."""
    a_first = {"A": 1, "B": -1}.get(first_a, 0)
    b_first = {"A": -1, "B": 1}.get(first_b, 0)
    return a_first if a_first == b_first else 0


def win_scores(outcomes):
    """Each prompt's score for A: a win 1, a tie 0.5, a loss 0."""
    o = np.asarray(outcomes, dtype=float)
    return (o > 0) + 0.5 * (o == 0)


def win_rate(outcomes):
    return float(win_scores(outcomes).mean())


def bootstrap_mean_ci(values, n_boot=2000, seed=0):
    """95% percentile interval of the mean of per-prompt values (prompts resampled with replacement); for a
    paired difference pass the per-prompt differences."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    means = v[np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def bootstrap_ci(outcomes, n_boot=2000, seed=0):
    """95% percentile interval of the win rate, resampling prompts."""
    return bootstrap_mean_ci(win_scores(outcomes), n_boot, seed)


def mean_ci(values, n_boot, seed):
    """(mean, [lo, hi]) of per-prompt values, rounded for results.json."""
    lo, hi = bootstrap_mean_ci(values, n_boot, seed)
    return round(float(np.mean(values)), 4), [round(lo, 4), round(hi, 4)]


def paired_diff(a, b, n_boot, seed):
    """The mean of per-prompt differences A - B with its bootstrap interval."""
    mean, ci = mean_ci(np.asarray(a, dtype=float) - np.asarray(b, dtype=float), n_boot, seed)
    return {"a_minus_b": mean, "ci95": ci}


def spearman(x, y):
    """Spearman rank correlation (ties get their average rank); nan when either side is constant."""
    def ranks(a):
        a = np.asarray(a, dtype=float)
        order = a.argsort(kind="stable")
        r = np.empty(len(a))
        r[order] = np.arange(len(a), dtype=float)
        for v in np.unique(a):  # average the ranks of tied values
            r[a == v] = r[a == v].mean()
        return r
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def length_controlled_win_rate(outcomes, len_a, len_b, l2=1e-3, iters=50):
    """sigmoid(t0) of the logistic fit y ~ sigmoid(t0 + t1 tanh(d / std(d))), d = len_a - len_b, y in {0, 0.5, 1}."""
    y = (np.asarray(outcomes, dtype=float) + 1) / 2
    d = np.asarray(len_a, dtype=float) - np.asarray(len_b, dtype=float)
    std = d.std()
    X = np.stack([np.ones_like(d), np.tanh(d / std) if std > 0 else np.zeros_like(d)], 1)
    t = np.zeros(2)
    for _ in range(iters):  # Newton on the (fractional-label) cross-entropy with a tiny ridge
        p = 1 / (1 + np.exp(-X @ t))
        grad = X.T @ (p - y) + l2 * t
        H = (X * (p * (1 - p))[:, None]).T @ X + l2 * np.eye(2)
        step = np.linalg.solve(H, grad)
        t -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(1 / (1 + np.exp(-t[0])))


# -----------------------------------------------------------------------------
# The evaluation


def answers(model_dir, out, args):
    """Every prompt's one answer at the evaluation's sampling settings."""
    got = answers_of(model_dir, out, args.prompts, args, 1, args.temperature, limit=args.limit, dedup=True)
    return {k: v[0] if v else "" for k, v in got.items()}


def compare(args, prompts, ans_a, ans_b, out):
    """Judge every prompt's two answers in both orders; appends one record per prompt to `out`."""
    import torch
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = {"judge": model_fingerprint(args.judge), "template": file_digest(args.template),
                "answers": hashlib.sha256(json.dumps([(p["prompt"], ans_a[str(p["id"])], ans_b[str(p["id"])])  # as judged
                                                      for p in prompts]).encode()).hexdigest()[:16],
                "verdict_mode": args.verdict_mode, "judge_max_new_tokens": args.judge_max_new_tokens, "dtype": args.dtype}
    done = start_stage(out, settings, args.redo, 0, 1)
    todo = [p for p in prompts if str(p["id"]) not in done]
    if not todo:
        merge_shards(out, [str(p["id"]) for p in prompts])
        return
    model, tok, _ = load_model(args.judge, device, args.dtype, args.chat_format)
    template = load_template(args.template, ("prompt", "response_a", "response_b"))
    expect = probe_candidates(tok, "Winner: Response", ["A", "B"]) if args.verdict_mode == "expected" else None
    probe = make_probe(tok, WINNER_MARK, expect) if expect else {}  # the letters' log-probs, read while generating
    requests = []  # two per prompt: A shown first, then B shown first
    for p in todo:
        a, b = ans_a[str(p["id"])], ans_b[str(p["id"])]
        both = [tok.encode_prompt(render(template, prompt=p["prompt"].strip(), response_a=x.strip(), response_b=y.strip()))
                for x, y in ((a, b), (b, a))]
        shared = common_prefix(both)  # the instructions and the question: prefilled once for both orders
        requests += [Request(ids, n=1, temperature=0.0, max_new_tokens=args.judge_max_new_tokens,
                             stop_ids=tuple(tok.stop_ids), shared_prefix=shared, **probe) for ids in both]
    from tqdm import tqdm
    writer, got = ShardWriter(out, 0), {}
    bar = tqdm(total=len(requests), desc="compare", unit="verdict")
    for q, comps in generate(model, requests, max_rows=args.max_rows):
        got[q] = comps[0]
        bar.update(1)
        k = q // 2
        if (q ^ 1) in got:  # both orders of prompt k are in
            comp = [got.pop(2 * k), got.pop(2 * k + 1)]
            v = [{"verdict": tok.decode(c.tokens), "parsed": parse_winner(tok.decode(c.tokens))} for c in comp]
            if expect is None:
                winners = [x["parsed"] for x in v]
            else:
                lps = [c.probe for c in comp]
                winners = ["A" if lp[0] > lp[1] else "B" if lp[1] > lp[0] else None for lp in lps]
                for x, lp in zip(v, lps):
                    x["logp_ab"] = [round(y, 4) for y in lp]
            for x, w in zip(v, winners):
                x["winner"] = w
            writer.write(strict_json({"id": todo[k]["id"], "prompt": todo[k]["prompt"], "a_first": v[0], "b_first": v[1],
                                      "outcome": outcome(winners[0], winners[1])}))
    bar.close()
    writer.close()
    merge_shards(out, [str(p["id"]) for p in prompts])


def evaluate(args):
    t0 = time.time()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    args.a, args.b = resolve_model(args.a, "--a"), args.b and resolve_model(args.b, "--b")  # Hub ids fetched
    if args.metric == "winrate":
        args.judge = resolve_model(args.judge, "--judge")
    if args.out_dir is None:
        args.out_dir = default_out_dir(args)
    os.makedirs(args.out_dir, exist_ok=True)
    res = {"length": evaluate_length, "accuracy": evaluate_accuracy, "winrate": evaluate_winrate,
           "judge-accuracy": evaluate_judge_accuracy}[args.metric](args, rank, world)
    res.update(out_dir=args.out_dir, seconds=round(time.time() - t0, 1))
    if rank == 0:
        write_json(os.path.join(args.out_dir, "results.json"), res)
    print0("evaluate | " + summary_line(res))
    return res


def summary_line(res):
    if res["metric"] == "judge-accuracy":
        parts = [f"{s.upper()} accuracy {res[s]['accuracy']} {res[s]['accuracy_ci95']} first-position {res[s]['first_position_rate']} "
                 f"unparsed {res[s]['unparsed_rate']}" + (f" p(right) {res[s]['p_right']} {res[s]['p_right_ci95']} p(first) {res[s]['p_first']}" if "p_right" in res[s] else "")
                 for s in ("a", "b") if s in res]
        parts += [f"A - B {k.split('_diff')[0]} {res[k]}" for k in ("accuracy_diff", "p_right_diff", "p_first_diff") if k in res]
        return " | ".join(parts) + f" | {res['seconds']}s"
    if res["metric"] == "accuracy":
        parts = [f"{s.upper()} greedy {res[s]['greedy']} {res[s]['greedy_ci95']} pass@1 {res[s]['pass1']} maj@{res['samples']} "
                 f"{res[s]['maj']} parse {res[s]['greedy_parse_rate']}/{res[s]['sampled_parse_rate']}" for s in ("a", "b") if s in res]
        if "greedy_diff" in res:
            parts.append(f"A - B greedy {res['greedy_diff']} pass@1 {res['pass1_diff']} maj {res['maj_diff']}")
        return " | ".join(parts) + f" | {res['seconds']}s"
    if res["metric"] == "length":
        parts = []
        for side in ("a", "b"):
            for w in ("instructed", "paraphrased") if side in res else ():
                r = res[side][w]
                parts.append(f"{side.upper()} {w} violations {r['violation_rate']:.3f} {r['violation_ci95']} "
                             f"spearman {r['spearman_limit_words']}")
            if side in res:
                parts.append(f"{side.upper()} unlimited {res[side]['plain']['mean_words']} words, empty {res[side]['plain']['empty_rate']}")
        if "instructed_violation_diff" in res:
            parts.append(f"A - B {res['instructed_violation_diff']}")
        return " | ".join(parts) + f" | {res['seconds']}s"
    return (f"A wins {res['wins']} ties {res['ties']} losses {res['losses']} | win rate {res['win_rate']:.3f} "
            f"{res['win_rate_ci95']} | LC win rate {res['lc_win_rate']:.3f} | chars A {res['mean_chars_a']} B "
            f"{res['mean_chars_b']} | unparseable {res['unparseable_verdicts']}/{2 * res['prompts']} | " + (f"resampled "
            f"{res['resampled_answers']}, no response after all tries {res['unmarked_answers']} | " if "resampled_answers" in res
            else "") + f"{res['seconds']}s")


def soft_score(rec):
    """A's soft score on one prompt from the judge's log-probs of the letters: p(A's answer is better) in each
    order (shown first, "A" names it; shown second, "B" does), averaged over the two orders, which cancels a
    position bias that is the same in both."""
    first, second = rec["a_first"]["logp_ab"], rec["b_first"]["logp_ab"]
    return (evaluator.sigmoid(first[0] - first[1]) + evaluator.sigmoid(second[1] - second[0])) / 2


def evaluate_winrate(args, rank, world):
    """--metric winrate: A and B answer every prompt; the judge compares them in both orders."""
    prompts = read_jsonl(args.prompts, required=("id", "prompt"), what="prompt", check=check_prompt_fields)
    prompts = prompts[:args.limit or None]
    if args.system_prompt:  # asked the way the loop asks its actor: its system prompt where a record has none
        pfile = os.path.join(args.out_dir, "asked_prompts.jsonl")
        write0(pfile, [dict(p, system=p.get("system") or args.system_prompt) for p in prompts])
        prompts = read_jsonl(pfile)
        args = argparse.Namespace(**{**vars(args), "prompts": pfile, "limit": 0})
    ask = {"a": args, "b": args}
    think = {side: args.strip_thoughts in ("both", side) for side in "ab"}
    if args.strip_thoughts:  # the thinking side(s) get the TPO prompt; the judge sees only what follows the thoughts
        template, pfile = load_template(args.thought_template, ("prompt",)), os.path.join(args.out_dir, "thought_prompts.jsonl")
        write0(pfile, [dict(p, prompt=render(template, prompt=p["prompt"])) for p in prompts])
        ask = {side: argparse.Namespace(**{**vars(args), "prompts": pfile, "limit": 0}) if think[side] else args for side in "ab"}
    got = {side: answers(getattr(args, side), os.path.join(args.out_dir, f"answers_{side}.jsonl"), ask[side]) for side in "ab"}
    again = {side: resample(side, got[side], ask[side]) for side in "ab" if think[side]}
    strip = lambda t: (tpo.split_thought(t) or ("", ""))[1]  # noqa: E731  (no response part after every try answers nothing)
    ans_a, ans_b = ({k: strip(t) if think[side] else t for k, t in got[side].items()} for side in "ab")
    cfile = os.path.join(args.out_dir, "comparisons.jsonl")
    if rank == 0:  # the comparisons are few next to the answers: one rank judges them
        compare(args, prompts, ans_a, ans_b, cfile)
    barrier(world)
    recs = read_jsonl(cfile)
    outcomes = [r["outcome"] for r in recs]
    la = [len(ans_a[str(r["id"])]) for r in recs]
    lb = [len(ans_b[str(r["id"])]) for r in recs]
    # each prompt's score for A: 1 for a win in both orders, 1/2 for a split, 0 for a loss; with soft verdicts the
    # judge's mean probability over the two orders that A's answer is the better one
    soft = args.verdict_mode == "expected"
    scores = [soft_score(r) for r in recs] if soft else win_scores(outcomes).tolist()
    rate, ci = mean_ci(scores, args.bootstrap, args.seed)
    verdicts = [r[o] for r in recs for o in ("a_first", "b_first")]
    if args.export_alpaca_eval and rank == 0:
        export = [{"instruction": p["prompt"], "output": ans_a[str(p["id"])], "generator": args.generator_name or args.a}
                  for p in prompts]
        write_json(args.export_alpaca_eval, export)
    if args.export_arena_hard and rank == 0:  # Arena-Hard-Auto's model_answer lines; the prompt ids are its question ids
        name = args.generator_name or args.a
        os.makedirs(os.path.dirname(os.path.abspath(args.export_arena_hard)), exist_ok=True)
        write_jsonl(args.export_arena_hard, [{
            "question_id": str(p["id"]), "answer_id": hashlib.sha256(f"{name}:{p['id']}".encode()).hexdigest()[:22],
            "model_id": name, "choices": [{"index": 0, "turns": [{"content": ans_a[str(p["id"])]}]}], "tstamp": time.time()}
            for p in prompts])
    return {"metric": "winrate", "a": args.a, "b": args.b, "judge": args.judge, "prompts": len(recs),
            "wins": sum(o > 0 for o in outcomes), "ties": sum(o == 0 for o in outcomes),
            "losses": sum(o < 0 for o in outcomes), "win_rate": rate, "win_rate_ci95": ci, "soft": soft,
            "lc_win_rate": round(length_controlled_win_rate([2 * x - 1 for x in scores], la, lb), 4),
            "mean_chars_a": round(float(np.mean(la)), 1), "mean_chars_b": round(float(np.mean(lb)), 1),
            "unparseable_verdicts": sum(v["parsed"] is None for v in verdicts), "verdict_mode": args.verdict_mode,
            **({"resampled_answers": {s: n for s, (n, _) in again.items()},
                "unmarked_answers": {s: n for s, (_, n) in again.items()}} if again else {})}


def resample(side, got, args):
    """Answers in `got` (id -> text, updated in place) with no response marker, asked again with seed --seed + r
    on try r, up to --resample-tries times; try r has its own files, made from those before it, so a killed
    evaluation resumes it. Greedy answers are not asked again: every seed gives the same. -> (answers asked again,
    answers with no marker after the last try)."""
    missing, tries = [k for k, t in got.items() if tpo.split_thought(t) is None], args.resample_tries * (args.temperature > 0)
    asked, prompts = len(missing) if tries else 0, {str(p["id"]): p for p in read_jsonl(args.prompts)}
    for r in range(1, tries + 1):
        if not missing:
            break
        pfile, out = (os.path.join(args.out_dir, f"resample{r}_{x}_{side}.jsonl") for x in ("prompts", "answers"))
        write0(pfile, [prompts[k] for k in missing])
        new = answers_of(getattr(args, side), out, pfile, argparse.Namespace(**{**vars(args), "seed": args.seed + r}), 1,
                         args.temperature, dedup=True)
        got.update({k: v[0] for k, v in new.items() if v})
        missing = [k for k in missing if tpo.split_thought(got[k]) is None]
    return asked, len(missing)


def length_variants(prompts, limits, template, paraphrase):
    """Every held-out prompt asked with each word limit (the training wording and a paraphrase) and without
    one -> prompt records for sample.py, each naming its prompt, limit and wording."""
    rows = []
    for p in prompts:
        sys_ = {"system": p["system"]} if p.get("system") else {}
        for n in limits:
            for wording, t in (("instructed", template), ("paraphrased", paraphrase)):
                rows.append({"id": f"{p['id']}@{n}{'~p' if wording == 'paraphrased' else ''}", "base": str(p["id"]),
                             "limit": n, "wording": wording, "prompt": lift.instruct(p["prompt"], n, t), **sys_})
        rows.append({"id": f"{p['id']}@plain", "base": str(p["id"]), "limit": None, "wording": "plain",
                     "prompt": p["prompt"], **sys_})
    return rows


def length_report(rows, answers, n_boot, seed):
    """The length metrics of one model's answers: per wording, the violation rate (words > limit) with its
    bootstrap interval over prompts, the mean of words / limit and the Spearman correlation of limit and words;
    and of the answers without a limit, the mean word count and the share of empty answers."""
    words = {r["id"]: lift.count_words(answers[r["id"]]) for r in rows}
    out = {}
    for wording in ("instructed", "paraphrased"):
        rs = [r for r in rows if r["wording"] == wording]
        per_prompt = {}
        for r in rs:
            per_prompt.setdefault(r["base"], []).append(words[r["id"]] > r["limit"])
        rates = [float(np.mean(v)) for v in per_prompt.values()]
        rate, ci = mean_ci(rates, n_boot, seed)
        out[wording] = {"violation_rate": rate, "violation_ci95": ci,
                        "words_over_limit": round(float(np.mean([words[r["id"]] / r["limit"] for r in rs])), 3),
                        "spearman_limit_words": round(spearman([r["limit"] for r in rs], [words[r["id"]] for r in rs]), 4),
                        "per_prompt": per_prompt}
    plain = [words[r["id"]] for r in rows if r["wording"] == "plain"]
    out["plain"] = {"mean_words": round(float(np.mean(plain)), 1), "empty_rate": round(float(np.mean([w == 0 for w in plain])), 4)}
    return out


def evaluate_length(args, rank, world):
    """--metric length: violation rates of A (and B) on held-out prompts with word limits; with B, the paired
    difference A - B with its bootstrap interval. No judge is needed: word counts are arithmetic."""
    prompts = read_jsonl(args.prompts, required=("id", "prompt"), what="prompt", check=check_prompt_fields)[:args.limit or None]
    limits = [int(x) for x in args.limits.split(",")]
    rows = length_variants(prompts, limits, load_template(args.lift_template, ("max_words", "prompt")),
                           load_template(args.paraphrase_template, ("max_words", "prompt")))
    pfile = os.path.join(args.out_dir, "length_prompts.jsonl")
    write0(pfile, rows)
    sub = argparse.Namespace(**{**vars(args), "prompts": pfile, "limit": 0})
    res = {"metric": "length", "limits": limits, "prompts": len(prompts)}
    for side, model in (("a", args.a), ("b", args.b)):
        if model:
            res[side] = dict(model=model, **length_report(rows, answers(model, os.path.join(args.out_dir, f"answers_{side}.jsonl"), sub),
                                                          args.bootstrap, args.seed))
    for wording in ("instructed", "paraphrased") if args.b else ():
        a, b = res["a"][wording]["per_prompt"], res["b"][wording]["per_prompt"]
        res[f"{wording}_violation_diff"] = paired_diff([np.mean(a[k]) for k in a], [np.mean(b[k]) for k in a], args.bootstrap, args.seed)
    for side in ("a", "b"):
        for wording in ("instructed", "paraphrased"):
            res.get(side, {}).get(wording, {}).pop("per_prompt", None)
    return res


def evaluate_accuracy(args, rank, world):
    """--metric accuracy on questions with gold answers: per model, greedy accuracy, sampled pass@1 (the mean
    correctness of --samples samples), maj@k (the most-voted of those answers) and the parse rate (how often a
    final answer could be read at all: format, reported apart from correctness); with B, each difference
    A - B with a paired bootstrap interval over questions."""
    qs = reasoning.read_questions(args.prompts)[:args.limit or None]
    template = load_template(args.reasoning_template, ("prompt",))
    args.stops = template.stops  # a completion-style template (plain chat format) ends where its `#stop:` lines say
    pfile = os.path.join(args.out_dir, "reasoning_prompts.jsonl")
    write0(pfile, [dict(q, prompt=render(template, prompt=q["prompt"])) for q in qs])
    res, per = {"metric": "accuracy", "questions": len(qs), "samples": args.samples}, {}
    for side, model in (("a", args.a), ("b", args.b)):
        if not model:
            continue
        greedy = answers_of(model, os.path.join(args.out_dir, f"greedy_{side}.jsonl"), pfile, args, 1, 0.0)
        sampled = answers_of(model, os.path.join(args.out_dir, f"sampled_{side}.jsonl"), pfile, args, args.samples,
                             args.temperature)
        per[side] = {"greedy": [], "pass1": [], "maj": []}
        parsed, right = [0, 0], 0
        for q in qs:
            g = [reasoning.final_answer(t) for t in greedy[q["id"]]]
            s = [reasoning.final_answer(t) for t in sampled[q["id"]]]
            parsed[0] += sum(a is not None for a in g)
            parsed[1] += sum(a is not None for a in s)
            votes = [a for a in s if a is not None]
            # the most-voted answer; equal votes are broken by a draw seeded by the question, never by order
            top = max(votes.count(a) for a in votes) if votes else 0
            maj = random.Random(stable_seed(args.seed, q["id"])).choice(sorted({a for a in votes if votes.count(a) == top})) if votes else None
            per[side]["greedy"].append(float(g[0] == q["answer"]))
            per[side]["pass1"].append(float(np.mean([a == q["answer"] for a in s])))
            per[side]["maj"].append(float(maj == q["answer"]))
            right += sum(a == q["answer"] for a in s)
        res[side] = {"model": model, "greedy_parse_rate": round(parsed[0] / len(qs), 4),
                     "sampled_parse_rate": round(parsed[1] / (len(qs) * args.samples), 4),
                     # correctness where an answer could be read at all: quality apart from format
                     "sampled_accuracy_when_parsed": round(right / max(parsed[1], 1), 4)}
        for k, v in per[side].items():
            res[side][k], res[side][f"{k}_ci95"] = mean_ci(v, args.bootstrap, args.seed)
    if args.b:
        for k in ("greedy", "pass1", "maj"):
            res[f"{k}_diff"] = paired_diff(per["a"][k], per["b"][k], args.bootstrap, args.seed)
    return res


def evaluate_judge_accuracy(args, rank, world):
    """--metric judge-accuracy: A (and B) as pairwise judges of labelled pairs (prompt, chosen, rejected), each
    pair judged greedily in both orders; position-consistent accuracy (right in both orders 1, in one 1/2) with
    its bootstrap interval, how often the first-shown answer won, the unparsed rate; with B, the paired
    difference. Scores the Self-Taught Evaluator, and the judge of any iteration of the loop."""
    recs = read_jsonl(args.prompts, required=("prompt", "chosen", "rejected"), what="labelled pair", check=evaluator.check_pair)
    named = ["id" in r for r in recs]
    if any(named) and not all(named):  # made-up ids could collide with given ones
        i = named.index(False)
        raise SystemExit(f"{recs.where(i)}: no `id`, though other pairs have one; give every pair an id, or none "
                         "(the line numbers then serve)")
    ids = [str(r["id"]) if "id" in r else f"pair{recs.lines[i]}" for i, r in enumerate(recs)][:args.limit or None]
    recs = recs[:len(ids)]
    pfile = os.path.join(args.out_dir, "labelled_pairs.jsonl")
    write0(pfile, [{"id": i, "prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for i, r in zip(ids, recs)])
    res, per = {"metric": "judge-accuracy", "pairs": len(recs)}, {}
    for side, model in (("a", args.a), ("b", args.b)):
        if not model:
            continue
        out = os.path.join(args.out_dir, f"verdicts_{side}.jsonl")
        evaluator.main(["--step", "judge", "--model", model, "--contrast", pfile, "--out", out, "--n-judgments", "1",
                        "--temperature", "0", "--max-new-tokens", str(args.judge_max_new_tokens), "--verdict-mode",
                        args.verdict_mode, "--template", args.pairwise_template, "--seed", str(args.seed)]
                       + engine_flags(args) + (["--redo"] if args.redo else []))
        judged = {r["id"]: r for r in read_jsonl(out)}
        got = {k: r["verdicts"][0] for k, r in judged.items()}
        per[side] = [evaluator.consistent_accuracy(got[f"{i}/ab"], got[f"{i}/ba"]) for i in ids]
        accuracy, ci = mean_ci(per[side], args.bootstrap, args.seed)
        res[side] = {"model": model, "accuracy": accuracy, "accuracy_ci95": ci,
                     "first_position_rate": round(float(np.mean([v == "A" for v in got.values()])), 4),
                     "unparsed_rate": round(float(np.mean([v is None for v in got.values()])), 4)}
        if args.verdict_mode == "expected":  # the judge's own p(right letter), mean of both orders: moves before the verdicts do
            p_a = {k: r["p_a"][0] for k, r in judged.items()}
            per[side + "_p"] = [(p_a[f"{i}/ab"] + 1 - p_a[f"{i}/ba"]) / 2 for i in ids]
            per[side + "_f"] = [(p_a[f"{i}/ab"] + p_a[f"{i}/ba"]) / 2 for i in ids]  # p(first-shown letter): position bias
            for key, name in (("_p", "p_right"), ("_f", "p_first")):
                res[side][name], res[side][f"{name}_ci95"] = mean_ci(per[side + key], args.bootstrap, args.seed)
    if args.b:
        for key, name in (("", "accuracy_diff"), ("_p", "p_right_diff"), ("_f", "p_first_diff")):
            if "a" + key in per and "b" + key in per:
                res[name] = paired_diff(per["a" + key], per["b" + key], args.bootstrap, args.seed)
    return res


def answers_of(model, out, pfile, args, n, temperature, limit=None, dedup=False):
    """Every prompt's n answers from sample.py (duplicates kept unless `dedup`: votes need them)."""
    sample.main(sample.argv_for(args, model, pfile, out, n, temperature, dedup, limit))
    return {str(r["id"]): r["responses"] for r in read_jsonl(out)}


def default_out_dir(args):
    """runs/eval/<a>_vs_<b>-<key>: the key hashes the models' weights and every setting that shapes the result,
    so two models that share a folder name (every trained model is `model`) never share answers."""
    name = lambda p: os.path.basename(os.path.normpath(p)) or "model"  # noqa: E731
    fp = lambda p: model_fingerprint(p) if p else None  # noqa: E731
    ident = [args.metric, args.limits, args.samples, fp(args.a), fp(args.b), fp(args.judge),
             file_digest(args.prompts), args.limit, args.temperature, args.top_p, args.max_new_tokens, args.seed,
             file_digest(args.template), args.verdict_mode, args.judge_max_new_tokens, args.dtype, args.strip_thoughts,
             file_digest(args.thought_template) if args.strip_thoughts else None, file_digest(args.pairwise_template),
             args.system_prompt, *([args.resample_tries] if args.strip_thoughts else [])]
    key = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:10]
    return os.path.join("runs", "eval", f"{name(args.a)}_vs_{name(args.b or 'none')}-{key}")


def build_parser():
    parser = argparse.ArgumentParser(description="Pairwise win rate of checkpoint A against checkpoint B.")
    parser.add_argument("--a", required=True, help="HF folder or Hub id of the model under test")
    parser.add_argument("--b", default=None, help="HF folder or Hub id of the baseline (needed for the win rate)")
    parser.add_argument("--metric", default="winrate", choices=("winrate", "length", "accuracy", "judge-accuracy"),
                        help="winrate: A vs B judged pairwise; length: word-limit violations (LIFT); accuracy: final "
                             "answers against gold ones (IRPO, ScPO); judge-accuracy: A and B as judges of labelled pairs")
    parser.add_argument("--judge", default=None, help="HF folder or Hub id of the judge (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--prompts", default=DEFAULT_EVAL, help="held-out prompts (JSONL with id, prompt, optional system)")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N prompts (0 = all)")
    parser.add_argument("--out-dir", default=None, help="where answers, comparisons and results.json go (default: runs/eval/<a>_vs_<b>-<key of models and settings>)")
    g = parser.add_argument_group("generation")
    add_sampling_args(g, "answer", 0.7, 0.9, 512, seed="sampling and bootstrap seed")
    add_engine_args(parser, passed_on=True)
    j = parser.add_argument_group("judging")
    j.add_argument("--template", default=os.path.join(TEMPLATES, "compare.txt"), help="comparison template ({prompt}, {response_a}, {response_b})")
    j.add_argument("--verdict-mode", default="parse", choices=("parse", "expected"), help="parse `Winner: Response X`, or compare p(A), p(B)")
    j.add_argument("--judge-max-new-tokens", type=int, default=256, help="verdict length limit (greedy)")
    j.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the interval")
    j.add_argument("--export-alpaca-eval", default=None, metavar="FILE", help="write A's answers as AlpacaEval model outputs (instruction, output, generator)")
    j.add_argument("--export-arena-hard", default=None, metavar="FILE", help="write A's answers as Arena-Hard-Auto "
                   "model answers (JSONL: question_id = the prompt's id, model_id, choices[0].turns[0].content)")
    j.add_argument("--generator-name", default=None, help="`generator` field of the export (default: the --a path)")
    j.add_argument("--system-prompt", default=None,
                   help="system prompt of every held-out prompt whose record has none (ask as the loop asked its actor)")
    j.add_argument("--strip-thoughts", nargs="?", const="both", default=None, choices=("both", "a", "b"),
                   help="ask with the TPO thought prompt and judge only the response part of each answer: both models "
                        "(the flag alone), or only a or b (a TPO model against its direct-answer control)")
    j.add_argument("--resample-tries", type=int, default=3, help="--strip-thoughts: ask an answer with no response "
                   "marker again, a new seed each try, up to this many times; then it is judged as an empty answer")
    j.add_argument("--thought-template", default=os.path.join(TEMPLATES, "thought.txt"), help="the thought prompt ({prompt})")
    ja = parser.add_argument_group("--metric judge-accuracy")
    ja.add_argument("--pairwise-template", default=os.path.join(TEMPLATES, "pairwise.txt"),
                    help="the pairwise judge prompt ({prompt}, {response_a}, {response_b}), verdict [[A]] or [[B]]")
    r = parser.add_argument_group("--metric accuracy")
    r.add_argument("--samples", type=int, default=4, help="sampled answers per question (pass@1, maj@k)")
    r.add_argument("--reasoning-template", default=os.path.join(TEMPLATES, "reasoning.txt"), help="the question's prompt ({prompt})")
    m = parser.add_argument_group("--metric length")
    m.add_argument("--limits", default="10,20,40", help="word limits each prompt is asked with")
    m.add_argument("--lift-template", default=os.path.join(TEMPLATES, "lift.txt"), help="the length instruction ({max_words}, {prompt})")
    m.add_argument("--paraphrase-template", default=os.path.join(TEMPLATES, "lift_paraphrase.txt"),
                   help="the same instruction in other words (is the limit understood, or the phrase memorised?)")
    return parser


# flags only some metrics read: set to anything but their default with another metric, they would be ignored
METRIC_FLAGS = {"judge": ("winrate",), "template": ("winrate",), "export_alpaca_eval": ("winrate",), "export_arena_hard": ("winrate",),
                "generator_name": ("winrate",), "strip_thoughts": ("winrate",), "system_prompt": ("winrate",), "thought_template": ("winrate",),
                "resample_tries": ("winrate",),
                "verdict_mode": ("winrate", "judge-accuracy"), "judge_max_new_tokens": ("winrate", "judge-accuracy"),
                "pairwise_template": ("judge-accuracy",), "samples": ("accuracy",), "reasoning_template": ("accuracy",),
                "limits": ("length",), "lift_template": ("length",), "paraphrase_template": ("length",)}


def parse_args(argv=None):
    parser = build_parser()
    a = parser.parse_args(argv)
    check_flags(*[("--" + key.replace("_", "-"), getattr(a, key), a.metric in ms or getattr(a, key) == parser.get_default(key),
                   f"left out: only --metric {' / '.join(ms)} reads it, and this is --metric {a.metric}")
                  for key, ms in METRIC_FLAGS.items()])
    check_flags(("--limit", a.limit, a.limit >= 0, ">= 0 (0 = all)"), ("--bootstrap", a.bootstrap, a.bootstrap >= 1, "at least 1"),
                ("--judge-max-new-tokens", a.judge_max_new_tokens, a.judge_max_new_tokens >= 1, "at least 1"),
                ("--samples", a.samples, a.samples >= 1, "at least 1"), ("--resample-tries", a.resample_tries, a.resample_tries >= 0, ">= 0"),
                ("--b", a.b, a.b is not None or a.metric != "winrate", "given: the win rate compares A with B"),
                *sampling_rules(a), *engine_rules(a))
    try:
        limits = [int(x) for x in a.limits.split(",")]
        ok = min(limits) >= 1 and len(set(limits)) == len(limits)  # each limit once: it names its prompts
    except ValueError:
        ok = False
    check_flags(("--limits", a.limits, ok, "a comma list of distinct positive integers"))
    return a


def main(argv=None):
    return evaluate(parse_args(argv))


if __name__ == "__main__":
    main()
