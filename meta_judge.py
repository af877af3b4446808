"""
Meta-judge: the model compares its own judgments pairwise; position-debiased battles give each judgment a
Bradley-Terry (Elo) rating, and the best vs worst judgment of a response becomes a judge preference pair
(the Meta-Rewarding step).

    python meta_judge.py --judgments runs/x/iter1/judgments.jsonl --out runs/x/iter1/meta_judgments.jsonl \
        --pairs runs/x/iter1/judge_pairs.jsonl
    python meta_judge.py --model DIR --judgments j.jsonl --out m.jsonl --pairs jp.jsonl --max-chosen-chars 1000
    torchrun --nproc_per_node 8 meta_judge.py --model DIR --judgments j.jsonl --out m.jsonl --pairs jp.jsonl

The battles are written as they finish (resumable); the position weights are taken over the whole stage,
so the Elo ratings and the pairs are computed once every battle is in.
"""
import argparse
import itertools
import math
import os
import re
import shlex

import numpy as np

from common import (TEMPLATES, ShardWriter, barrier, check_flags, finish_stage, init_distributed, load_model, load_template,
                    print0, read_jsonl, render, stable_seed, start_stage, write_jsonl)
import judge
import lift
from judge import add_judge_args, check_responses_record, judge_prompt, make_probe, probe_candidates
from presets import in_schedule, schedule
from sample import (Request, add_engine_args, add_sampling_args, common_prefix, engine_flags, engine_rules, sampling_rules,
                    stage_generate, stage_settings)

# -----------------------------------------------------------------------------
# Verdicts, position bias, Bradley-Terry

WINNER = re.compile(r"winner\s*\**\s*[:：]\s*\**\s*\[?\s*(?:the\s+)?(?:judge?ment|evaluation|response|answer)?\s*\**\s*"
                    r"\(?([AB])\)?\s*\]?(?![A-Za-z0-9])", re.IGNORECASE)
WINNER_MARK = re.compile(r"winner\s*\**\s*[:：]", re.IGNORECASE)
CONFLICT = re.compile(r"^\W*?(?:and|or|&|/|,|\|)\s*(?:(?:judge?ment|evaluation|response|answer)\s+)?\(?[AB]\b", re.IGNORECASE)


def parse_winner(text):
    """"A" or "B" from the last `Winner: Judgement A|B` of a verdict (Judgment/Judgement, and Response/Answer
    for evaluate.py; markdown, brackets as in `Winner: [Judgement B]` and a bare letter tolerated), or None when
    there is none or its line names both (an echo of the instructions, `[Judgement A | Judgement B]`)."""
    marks = list(WINNER_MARK.finditer(text))
    if not marks:
        return None
    m = WINNER.match(text, marks[-1].start())
    if not m:
        return None
    line = text[text.rfind("\n", 0, m.start()) + 1:].split("\n", 1)[0]
    if len({w.group(1).upper() for w in WINNER.finditer(line)}) > 1 or CONFLICT.match(text[m.end():].split("\n", 1)[0]):
        return None
    return m.group(1).upper()


def first_won(b):
    """How much the judgment shown first won a battle: 1 or 0 for a parsed verdict, None for an unparseable
    one (a tie: no weight either way), or with soft verdicts (expected mode) the judge's probability that
    the first-shown judgment is the better one, p(A) / (p(A) + p(B))."""
    if b.get("p_first") is not None:
        return b["p_first"]
    return {"A": 1.0, "B": 0.0}.get(b["winner"])


def position_weights(battles):
    """(omega1, omega2) from the stage's battles: w1 wins by the judgment shown first, w2 second (with soft
    verdicts, sums of probabilities).

    A first-position win weighs w2/(w1+w2) and a second-position win w1/(w1+w2), so the favoured position
    counts less. Without any decisive battle both weigh 0.5."""
    won = [x for x in map(first_won, battles) if x is not None]
    w1, w2 = sum(won), sum(1 - x for x in won)
    if w1 + w2 == 0:
        return 0.5, 0.5
    return w2 / (w1 + w2), w1 / (w1 + w2)


def battle_matrix(battles, ids, omega1, omega2):
    """B[m][n] = omega1 [m beat n shown first] + omega2 [m beat n shown second], summed over battles; with
    soft verdicts the indicators are the probabilities of winning."""
    index = {j: k for k, j in enumerate(ids)}
    B = np.zeros((len(ids), len(ids)))
    for b in battles:
        x = first_won(b)
        if x is None:
            continue
        first, second = index[b["first"]], index[b["second"]]
        B[first, second] += omega1 * x
        B[second, first] += omega2 * (1 - x)
    return B


def bradley_terry(B, prior=0.01, tol=1e-10, max_iter=200):
    """Ratings e maximising sum_mn (B[m][n] + prior) log sigmoid(e_m - e_n) over m != n, mean fixed at 0.

    The tiny symmetric `prior` (a fraction of a battle won each way by every pair) keeps the maximum finite
    when a judgment never wins or never loses, and the problem strictly concave. Newton's method on the
    centred ratings, with step halving as a safeguard.
    """
    K = len(B)
    if K < 2:
        return np.zeros(K)
    W = np.asarray(B, dtype=np.float64) + prior * (1 - np.eye(K))
    np.fill_diagonal(W, 0.0)
    N = W + W.T  # games between m and n

    def loglik(e):
        d = e[:, None] - e[None, :]
        return float((W * -np.logaddexp(0.0, -d)).sum())

    e = np.zeros(K)
    ll = loglik(e)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(e[:, None] - e[None, :])))  # p[m, n] = P(m beats n)
        grad = (W * (1 - p)).sum(1) - (W.T * p).sum(1)
        H = N * p * (1 - p)  # negative Hessian: Laplacian of the game graph weighted by p(1-p)
        H = np.diag(H.sum(1)) - H
        step = np.linalg.solve(H + np.ones((K, K)) / K, grad)  # the ones term pins the free mean
        t = 1.0
        while t > 1e-8:
            new = e + t * step
            new -= new.mean()
            new_ll = loglik(new)
            if new_ll >= ll - 1e-12:
                break
            t /= 2
        converged = np.abs(new - e).max() < tol
        e, ll = new, new_ll
        if converged:
            break
    return e


def to_elo(e):
    """Bradley-Terry ratings in natural units -> the familiar Elo scale (1000 + 400 e / ln 10)."""
    return [round(1000 + 400 * x / math.log(10), 3) for x in e]


def pick_response(scores):
    """Index of the response whose valid judgment scores vary most (at least 2 valid; lowest index on
    ties), or None."""
    best, best_var = None, -1.0
    for k, ss in enumerate(scores):
        valid = [s for s in ss if s is not None]
        if len(valid) < 2:
            continue
        var = float(np.var(valid))
        if var > best_var + 1e-12:
            best, best_var = k, var
    return best


def make_judge_pair(rec, max_chosen_chars=None, truncated=None):
    """The judge pair of one meta-judged record -> (pair fields, None) or (None, skip reason). A judgment cut at
    its token limit (truncated[j] for judgment j) is never the chosen one."""
    ids, elo = rec["judgment_indices"], rec["elo"]
    whole = [k for k in range(len(ids)) if not (truncated and truncated[ids[k]])]
    if not whole:
        return None, "only truncated judgments"
    hi = max(whole, key=lambda k: (elo[k], -k))
    lo = min(range(len(ids)), key=lambda k: (elo[k], k))
    if elo[hi] - elo[lo] < 1e-6:
        return None, "elo tie"
    chosen, rejected = rec["judgments"][ids[hi]], rec["judgments"][ids[lo]]
    if chosen.strip() == rejected.strip():
        return None, "identical judgments"
    if max_chosen_chars is not None and len(chosen) > max_chosen_chars:
        return None, "chosen judgment over length cap"
    return {"chosen": chosen, "rejected": rejected, "chosen_index": ids[hi], "rejected_index": ids[lo],
            **({"rejected_truncated": True} if truncated and truncated[ids[lo]] else {})}, None


# -----------------------------------------------------------------------------
# The stage


def check_judgments_record(rec):
    problem = check_responses_record(rec)
    if problem:
        return problem
    J, S = rec["judgments"], rec["scores"]
    if not isinstance(J, list) or not all(isinstance(js, list) and all(isinstance(x, str) for x in js) for js in J):
        return "`judgments` must be lists of strings (one list per response)"
    ok = lambda x: x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))  # noqa: E731
    if not isinstance(S, list) or not all(isinstance(ss, list) and all(ok(x) for x in ss) for ss in S):
        return "`scores` must hold numbers or null (one list per response)"
    if len(J) != len(rec["responses"]) or len(S) != len(J) or any(len(a) != len(b) for a, b in zip(J, S)):
        return "`scores` and `judgments` must have the same shape (one list per response, one entry per judgment)"
    F = rec.get("judgment_finish")
    if F is not None and (not isinstance(F, list) or len(F) != len(J) or any(
            not isinstance(f, list) or len(f) != len(j) for f, j in zip(F, J))):
        return "`judgment_finish` must have the shape of `judgments`"
    return None


def run_meta_judge(args, model, tok, rank, world):
    records = read_jsonl(args.judgments, required=("id", "prompt", "responses", "judgments", "scores"),
                         what="judgments record", check=check_judgments_record)
    order = [str(r["id"]) for r in records]
    template = load_template(args.meta_template, ("rubric", "prompt", "response", "judgment_a", "judgment_b"))
    judge_template = load_template(args.template, ("rubric", "prompt", "response"))  # fail now, not after the battles
    rubric = load_template(args.rubric, ()).strip()
    keep = ("verdict_mode", "temperature", "top_p", "max_new_tokens", "seed", "dtype", "chat_format")
    done = start_stage(args.out, stage_settings(args, args.model_path, ("judgments", "meta_template", "rubric"), keep),
                       args.redo, rank, world)
    expect = probe_candidates(tok, "Winner: Judgement", ["A", "B"]) if args.verdict_mode == "expected" else None
    mine = [k for k, rec in enumerate(records) if str(rec["id"]) not in done and k % world == rank]
    requests, owner, plans, skipped = plan_battles(args, [(k, records[k]) for k in mine], tok, template, rubric,
                                                   model.args.max_seq_len, make_probe(tok, WINNER_MARK, expect) if expect else {})
    print0(f"{len(records)} records, {len(done)} already meta-judged, {len(requests)} battles on rank {rank}")
    writer = ShardWriter(args.out, rank)
    for k, plan in plans.items():  # records with a response but no pair of judgments to compare
        if not plan["orders"]:
            writer.write(meta_record(records[k], plan, []))

    stats = {}
    for q, comps in stage_generate(model, requests, args, rank, "meta-judge", "battle", stats):
        k, m, n = owner[q]
        text = comps[0].text
        plan = plans[k]
        plan["verdicts"][(m, n)] = {"first": m, "second": n, "verdict": text, "parsed": parse_winner(text)}
        if expect:
            plan["verdicts"][(m, n)]["logp_ab"] = comps[0].probe
        if len(plan["verdicts"]) == len(plan["orders"]):
            battles = [plan["verdicts"][o] for o in plan["orders"]]
            decide(battles)
            writer.write(meta_record(records[k], plans.pop(k), battles))
    writer.close()
    merged = finish_stage(args.out, order, rank, world)
    if rank != 0:
        barrier(world)
        return {}
    summary = rate_and_pair(args, merged, records, judge_template, rubric)
    summary.update(skips=skipped, seconds=stats["seconds"], tokens_per_s=stats["tokens_per_s"])
    print0("meta-judge | " + " | ".join(f"{k} {v}" for k, v in summary.items()))
    barrier(world)  # the Elo ratings and pairs are on disk before any rank moves on
    return summary


def plan_battles(args, records, tok, template, rubric, max_seq_len, probe):
    """The battles of these (index, record)s: for each, every ordered pair of the valid judgments of its most
    disputed response, as one request each -> (requests, owner of each request, plan per record, skips)."""
    requests, owner, plans, skipped = [], [], {}, {}
    for k, rec in records:
        scores = rec["scores"]
        if args.truncated == "drop" and rec.get("judgment_finish"):  # a cut judgment takes part in no battle
            scores = [[None if f == "length" else s for s, f in zip(ss, fs)] for ss, fs in zip(scores, rec["judgment_finish"])]
        resp = pick_response(scores)
        if resp is None:
            skipped["no response with 2+ valid judgments"] = skipped.get("no response with 2+ valid judgments", 0) + 1
            continue
        valid = [j for j, s in enumerate(scores[resp]) if s is not None]
        judgments = rec["judgments"][resp]
        orders = list(itertools.permutations(valid, 2))
        prompts = [tok.encode_prompt(render(template, rubric=rubric, prompt=rec["prompt"].strip(),
                                            response=rec["responses"][resp].strip(),
                                            judgment_a=judgments[m].strip(), judgment_b=judgments[n].strip()))
                   for m, n in orders]
        shared = common_prefix(prompts) if prompts else 0  # rubric, question and answer: prefilled once
        plans[k] = {"response_index": resp, "judgment_indices": valid, "orders": orders, "verdicts": {}}
        for (m, n), ids in zip(orders, prompts):
            if len(ids) + args.max_new_tokens + probe.get("probe_room", 0) > max_seq_len:
                raise SystemExit(f"{args.judgments}: record {rec['id']!r}: meta-judge prompt of {len(ids)} tokens + "
                                 f"--max-new-tokens exceeds the context ({max_seq_len})")
            requests.append(Request(ids, n=1, temperature=args.temperature, top_p=args.top_p,
                                    max_new_tokens=args.max_new_tokens, stop_ids=tuple(tok.stop_ids),
                                    stop_strings=tuple(args.stop) + template.stops, decode=tok.decode,
                                    seed=stable_seed(args.seed, f"{rec['id']}/{m}/{n}"), shared_prefix=shared, **probe))
            owner.append((k, m, n))
    return requests, owner, plans, skipped


def decide(battles):
    """Each battle's winner: its parsed verdict, or in expected mode (`logp_ab`: the judge's log-probs of A and B
    after `Winner: Judgement`, read while the verdict was generated) the soft verdict `p_first` = p(A) / (p(A) +
    p(B)) that the position weights and the battle matrix use, and the likelier letter as `winner` (the counts)."""
    for b in battles:
        if "logp_ab" not in b:
            b["winner"] = b["parsed"]
            continue
        a, b_ = b["logp_ab"]
        b["logp_ab"] = [round(a, 4), round(b_, 4)]
        b["p_first"] = round(1 / (1 + math.exp(min(b_ - a, 700.0))), 6)
        b["winner"] = "A" if a > b_ else "B" if b_ > a else None


def meta_record(rec, plan, battles):
    return {"id": rec["id"], "prompt": rec["prompt"], "response_index": plan["response_index"],
            "judgment_indices": plan["judgment_indices"], "battles": battles}


def rate_and_pair(args, merged, records, template, rubric):
    """Stage-wide position weights, Elo per record, judge pairs (their prompt rendered from the judge
    `template` and `rubric`); rewrites the stage output with the Elo."""
    battles = [b for rec in merged for b in rec["battles"]]
    omega1, omega2 = position_weights(battles)
    by_id = {str(r["id"]): r for r in records}
    pairs, skips = [], {}
    for rec in merged:
        ids = rec["judgment_indices"]
        e = bradley_terry(battle_matrix(rec["battles"], ids, omega1, omega2)) if ids else np.zeros(0)
        rec["bt"] = [round(float(x), 6) for x in e]
        rec["elo"] = to_elo(e)
        rec["omega"] = [round(omega1, 6), round(omega2, 6)]
        src = by_id[str(rec["id"])]
        if len(ids) < 2:
            skips["fewer than 2 judgments"] = skips.get("fewer than 2 judgments", 0) + 1
            continue
        rec["judgments"] = src["judgments"][rec["response_index"]]
        cut = [f == "length" for f in src["judgment_finish"][rec["response_index"]]] if src.get("judgment_finish") else None
        pair, why = make_judge_pair(rec, args.max_chosen_chars, cut)
        del rec["judgments"]
        if pair is None:
            skips[why] = skips.get(why, 0) + 1
            continue
        prompt = judge_prompt(template, rubric, src["prompt"], src["responses"][rec["response_index"]])
        pairs.append({"id": rec["id"], "prompt": prompt, **pair, "response_index": rec["response_index"], "kind": "judge"})
    write_jsonl(args.out, merged)
    if args.pairs:
        write_jsonl(args.pairs, pairs)
    decisive = sum(b["winner"] is not None for b in battles)
    return {"records": len(merged), "battles": len(battles),
            "unparseable_rate": round(sum(b["parsed"] is None for b in battles) / max(len(battles), 1), 4),
            "first_position_win_rate": round(sum(b["winner"] == "A" for b in battles) / max(decisive, 1), 4),
            **({"mean_p_first": round(float(np.mean([b["p_first"] for b in battles])), 4)} if battles and "p_first" in battles[0] else {}),
            "omega1": round(omega1, 4), "omega2": round(omega2, 4), "judge_pairs": len(pairs), "pair_skips": skips}


def build_parser():
    parser = argparse.ArgumentParser(description="Meta-judge battles between judgments; Elo; judge pairs.")
    parser.add_argument("--model", default=None, help="HF checkpoint folder or Hub id (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--judgments", required=True, help="judgments.jsonl from judge.py")
    parser.add_argument("--out", required=True, help="meta_judgments.jsonl to write (resumed if present)")
    parser.add_argument("--pairs", default=None, help="also write judge preference pairs here")
    g = add_judge_args(parser)
    g.add_argument("--meta-template", default=os.path.join(TEMPLATES, "meta_judge.txt"),
                   help="meta-judge template ({rubric}, {prompt}, {response}, {judgment_a}, {judgment_b})")
    g.add_argument("--verdict-mode", default="parse", choices=("parse", "expected"),
                   help="parse `Winner: Judgement X`, or compare p(A) and p(B) after `Winner: Judgement`")
    add_sampling_args(g, "verdict", 0.8, 0.95, 256)
    g.add_argument("--max-chosen-chars", type=int, default=None, help="skip judge pairs whose chosen judgment is longer (paper: about 1000)")
    g.add_argument("--truncated", default="drop", choices=("drop", "keep"),
                   help="judgments cut at their token limit: in no battle (drop), or never the chosen one (keep)")
    add_engine_args(parser)
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    check_flags(("--max-chosen-chars", args.max_chosen_chars, args.max_chosen_chars is None or args.max_chosen_chars >= 1,
                 "at least 1"), *sampling_rules(args), *engine_rules(args))
    return args


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = init_distributed()
    model, tok, args.model_path = load_model(args.model, device, args.dtype, args.chat_format)
    return run_meta_judge(args, model, tok, rank, world)


# -----------------------------------------------------------------------------
# The stages in iterate.py's plan


def loop_stages(args, t, f, seed, model_in):
    """Meta-Rewarding and Self-Rewarding: the judge, the meta-judge where its pairs train, LIFT copies with --lift."""
    stages = [("judgments", "judge", judge.loop_argv(args, t, f, seed, model_in, f("responses.jsonl")))]
    data = [f("actor_pairs.jsonl")]
    # the meta-judge runs only where its pairs are trained on: it is the costliest stage (N(N-1) battles)
    if args.method == "meta-rewarding" and in_schedule(args.judge_pairs_iters, t):
        cap = schedule(args.max_chosen_judgment_chars, t)
        stages.append(("meta_judgments", "meta_judge", [
            "--model", args.judge_model or model_in, "--judgments", f("judgments.jsonl"), "--out", f("meta_judgments.jsonl"),
            "--pairs", f("judge_pairs.jsonl"), "--verdict-mode", args.verdict_mode,
            "--temperature", schedule(args.judge_temperature, t), "--top-p", str(args.judge_top_p),
            "--max-new-tokens", str(args.meta_max_new_tokens), "--truncated", args.truncated, "--seed", seed]
            + (["--max-chosen-chars", cap] if cap != "0" else []) + engine_flags(args) + shlex.split(args.meta_judge_args or "")))
        data.append(f("judge_pairs.jsonl"))
    if args.lift:  # actor pairs 10+ words apart also with a loose limit (preference kept) and a binding one (shorter wins)
        stages.append(lift.copy_stage(args, f, seed))
        data.append(f("lift_pairs.jsonl"))
    return stages, data


if __name__ == "__main__":
    main()
