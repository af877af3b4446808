"""
LLM-as-a-Judge: the model scores its own responses with the additive 5-point rubric, and each prompt's
responses become an actor preference pair with length control.

    python judge.py --responses runs/x/iter1/responses.jsonl --out runs/x/iter1/judgments.jsonl --n-judgments 3
    python judge.py --model DIR --responses r.jsonl --out j.jsonl --n-judgments 11 --pairs actor_pairs.jsonl --rho 0.32
    python judge.py --score-mode expected ...      # probability-weighted score after "Score: " (small models)
    torchrun --nproc_per_node 8 judge.py --model DIR --responses r.jsonl --out j.jsonl --n-judgments 11

Score modes: `parse` (the paper) takes the last `Score: <points>` of each judgment, drops unparseable ones
and counts them; `expected` cuts each judgment before its final `Score:` (if any), appends `Score: ` and
scores sum_d d * p(d) / sum_d p(d) over the tokens 0..5, so every judgment gets a score.
"""
import argparse
import math
import os
import re

from common import (TEMPLATES, ShardWriter, barrier, check_flags, check_prompt_fields, finish_stage, finite, init_distributed,
                    load_function, load_model, load_template, print0, read_jsonl, render, stable_seed, start_stage, write_jsonl)
from sample import (Request, add_engine_args, add_sampling_args, common_prefix, engine_flags, engine_rules, sampling_rules,
                    stage_generate, stage_settings)
import shlex

from presets import schedule

def judge_prompt(template, rubric, prompt, response):
    return render(template, rubric=rubric.strip(), prompt=prompt.strip(), response=response.strip())


# -----------------------------------------------------------------------------
# Parsing and scoring

# `Score:` with optional markdown around it: "Score: 4", "**Score:** 4", "score: 4.5", "Final score: 4/5"
SCORE_MARK = re.compile(r"score\s*\**\s*[:：]\s*\**\s*", re.IGNORECASE)
SCORE_VALUE = re.compile(r"(\d+(?:\.\d+)?)(?:\s*\**\s*(?:/|out\s+of)\s*(\d+(?:\.\d+)?))?")
AMBIGUOUS_TAIL = re.compile(r"\s*(?:or|to|and|-|–|—|,|\.\d)\s*\d|[A-Za-z0-9]")


def parse_score(text):
    """The last `Score: <points>` of a judgment's generated text as a float in [0, 5], or None.

    None for: no score, a score outside [0, 5], another scale ("4/10"), or a form that names two
    numbers ("3 or 4", "3-4", "3,5"). Never given the prompt: callers pass generated text only.
    """
    marks = list(SCORE_MARK.finditer(text))
    if not marks:
        return None
    # two different scores on the final score's line ("Score: 3 ... Score: 4") cannot be resolved
    line_start = text.rfind("\n", 0, marks[-1].start()) + 1
    on_line = {SCORE_VALUE.match(text, m.end()).group(1) for m in marks if m.start() >= line_start
               and SCORE_VALUE.match(text, m.end())}
    if len({float(v) for v in on_line}) > 1:
        return None
    rest = text[marks[-1].end():].split("\n", 1)[0]
    m = SCORE_VALUE.match(rest)
    if not m:
        return None
    value, scale = float(m.group(1)), m.group(2)
    if scale is not None and float(scale) != 5:
        return None
    if AMBIGUOUS_TAIL.match(rest[m.end():]):
        return None
    return value if 0 <= value <= 5 else None


def cut_at_last(text, mark):
    """The text before the last match of `mark` (the whole text when there is none), right-stripped."""
    found = list(mark.finditer(text))
    return (text[:found[-1].start()] if found else text).rstrip(" \t*#\n")


def probe_candidates(tok, probe, options):
    """Token ids of `options` right after `probe`, each a single token, e.g. probe "Score:", options 0..5.

    Tries `probe + " "` followed by the bare option first (tokenizers that split a space off digits), then
    `probe` followed by " option", then the option right after `probe` (`[[A`). Returns (probe text to
    append, candidate ids)."""
    for head, sep in ((probe + " ", ""), (probe, " "), (probe, "")):
        base = tok.encode(head)
        ids = []
        for opt in options:
            full = tok.encode(head + sep + opt)
            if full[:len(base)] != base or len(full) != len(base) + 1:
                break
            ids.append(full[-1])
        else:
            return head, ids
    raise SystemExit(f"{tok.path}: the tokenizer cannot express {options} as single tokens after {probe!r}; "
                     "use the parse score mode")


def make_probe(tok, mark, expect):
    """The Request fields that read the expected modes' distribution while the sample is generated (see
    sample.Request.probe): after the sample cut before its own last `mark` (if any), a newline and the probe's
    head (e.g. `Score: `), as the sample's own tokens up to the cut plus the tokens of the rest of that text, so
    nothing before it is computed twice."""
    head, ids = expect

    def probe(tokens):
        cut = cut_at_last(tok.decode(tokens), mark)
        keep = len(tokens)  # the most tokens whose text is a prefix of the cut text
        while keep and not cut.startswith(tok.decode(tokens[:keep])):
            keep -= 1
        return keep, tok.encode(cut[len(tok.decode(tokens[:keep])):] + "\n" + head)
    # what follows the kept tokens is less than a token's text (a few for a character cut in its bytes)
    return {"probe": probe, "probe_ids": tuple(ids), "probe_room": len(tok.encode("\n" + head)) + 16}


def expected_value(logps, values):
    """sum_d v_d p_d / sum_d p_d from log-probs over the candidates, and the mass they hold."""
    m = max(logps)
    w = [math.exp(lp - m) for lp in logps]
    z = sum(w)
    return sum(v * x for v, x in zip(values, w)) / z, math.exp(m) * z


def mean_or_none(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


# -----------------------------------------------------------------------------
# Actor pairs with length control


def select_actor_pair(responses, scores, rho, max_chosen_chars=None, truncated=None, keep_truncated=False):
    """Length-controlled pair -> ((chosen, rejected) indices, None) or (None, reason).

    chosen = the shortest response scoring >= (1-rho) S_max + rho S_min; rejected = the longest scoring
    <= (1-rho) S_min + rho S_max. rho = 0 is best vs worst. Lengths in characters; ties broken by score,
    then by index. A response that stopped at its token limit (truncated[i]) is never chosen: by default it
    takes part in no pair; with keep_truncated it counts for S_max, S_min and may be the rejected one.
    """
    cut = truncated or [False] * len(responses)
    scored = [(i, s) for i, s in enumerate(scores) if s is not None and (keep_truncated or not cut[i])]
    if len(scored) < 2:
        return None, "too few scored responses"
    s_max, s_min = max(s for _, s in scored), min(s for _, s in scored)
    if s_max == s_min:
        return None, "tie"
    eps = 1e-9  # thresholds are computed in floating point; S_max itself must pass its own threshold
    hi, lo = (1 - rho) * s_max + rho * s_min, (1 - rho) * s_min + rho * s_max
    top = [i for i, s in scored if s >= hi - eps and not cut[i]]
    if not top:
        return None, "only truncated responses score high enough"
    chosen = min(top, key=lambda i: (len(responses[i]), -scores[i], i))
    rejected = max((i for i, s in scored if s <= lo + eps), key=lambda i: (len(responses[i]), -scores[i], -i))
    if chosen == rejected:
        return None, "chosen is rejected"
    if max_chosen_chars is not None and len(responses[chosen]) > max_chosen_chars:
        return None, "chosen over length cap"
    return (chosen, rejected), None


def make_actor_pairs(records, rho, max_chosen_chars=None, keep_truncated=False):
    """One pair per record where the rule gives one; returns (pairs, skip counts)."""
    pairs, skips = [], {}
    for rec in records:
        cut = [f == "length" for f in rec.get("finish_reasons", [])] or None
        pair, why = select_actor_pair(rec["responses"], rec["score"], rho, max_chosen_chars, cut, keep_truncated)
        if pair is None:
            skips[why] = skips.get(why, 0) + 1
            continue
        c, r = pair
        pairs.append({"id": rec["id"], "prompt": rec["prompt"], **({"system": rec["system"]} if rec.get("system") else {}),
                      "chosen": rec["responses"][c], "rejected": rec["responses"][r],
                      "score_chosen": rec["score"][c], "score_rejected": rec["score"][r], "kind": "actor",
                      **({"rejected_truncated": True} if cut and cut[r] else {})})
    return pairs, skips


# -----------------------------------------------------------------------------
# The stage


def check_responses_record(rec):
    problem = check_prompt_fields(rec)
    if problem:
        return problem
    rs = rec["responses"]
    if not isinstance(rs, list) or not rs or not all(isinstance(x, str) for x in rs):
        return "`responses` must be a non-empty list of strings"
    return None


def run_judge(args, model, tok, rank, world):
    """Judge every response of every record; returns the stage counts."""
    records = read_jsonl(args.responses, required=("id", "prompt", "responses"), what="responses record",
                         check=check_responses_record)
    order = [str(r["id"]) for r in records]
    template = load_template(args.template, ("rubric", "prompt", "response"))
    rubric = load_template(args.rubric, ())
    keep = ("n", "score_mode", "temperature", "top_p", "max_new_tokens", "seed", "dtype", "chat_format")
    done = start_stage(args.out, stage_settings(args, args.model_path, ("responses", "template", "rubric"), keep,
                                                **({"judge_fn": args.judge_fn} if args.judge_fn else {})), args.redo, rank, world)
    todo = [r for k, r in enumerate(records) if str(r["id"]) not in done and k % world == rank]
    if args.judge_fn:
        return run_programmatic_judge(args, records, todo, order, rank, world)
    expect = probe_candidates(tok, "Score:", [str(d) for d in range(6)]) if args.score_mode == "expected" else None
    probe = make_probe(tok, SCORE_MARK, expect) if expect else {}
    requests, owner = [], []  # one request per response: owner[q] = (record index, response index)
    for ri, rec in enumerate(todo):
        prompts = [tok.encode_prompt(judge_prompt(template, rubric, rec["prompt"], r)) for r in rec["responses"]]
        shared = common_prefix(prompts)  # the rubric and question: prefilled once for the K responses
        for k, ids in enumerate(prompts):
            if len(ids) + args.max_new_tokens + probe.get("probe_room", 0) > model.args.max_seq_len:
                raise SystemExit(f"{args.responses}: record {rec['id']!r} response {k}: judge prompt of {len(ids)} "
                                 f"tokens + --max-new-tokens exceeds the context ({model.args.max_seq_len})")
            requests.append(Request(ids, n=args.n, temperature=args.temperature, top_p=args.top_p,
                                    max_new_tokens=args.max_new_tokens, stop_ids=tuple(tok.stop_ids),
                                    stop_strings=tuple(args.stop) + template.stops, decode=tok.decode,
                                    seed=stable_seed(args.seed, f"{rec['id']}/{k}"), shared_prefix=shared, **probe))
            owner.append((ri, k))
    print0(f"{len(records)} records, {len(done)} already judged, {len(todo)} on rank {rank}, "
           f"{len(requests) * args.n} judgments to write")

    writer, stats = ShardWriter(args.out, rank), {}
    got = {}  # record index -> {response index: its judgments}, until every response of the record is judged
    for q, comps in stage_generate(model, requests, args, rank, "judge", "judgment", stats):
        ri, k = owner[q]
        got.setdefault(ri, {})[k] = comps
        if len(got[ri]) == len(todo[ri]["responses"]):
            by_k = [got[ri][k] for k in range(len(todo[ri]["responses"]))]
            del got[ri]
            out = judged_record(todo[ri], [[c.text for c in cs] for cs in by_k], args,
                                [[c.probe for c in cs] for cs in by_k] if expect else None)
            writer.write(dict(out, judgment_finish=[[c.finish_reason for c in cs] for cs in by_k]))
    writer.close()
    return finish_judge_stage(args, order, rank, world, seconds=stats["seconds"], tokens_per_s=stats["tokens_per_s"])


def judged_record(rec, judgments, args, probes=None):
    """The judgments record of one prompt: its K x N judgments, their parsed scores and the scores used
    (parsed, or in expected mode the mean digit under p(digit) after `Score: `: `probes`, K x N log-probs of the
    digits 0..5 read during generation), and each response's mean."""
    parsed = [[parse_score(t) for t in ts] for ts in judgments]
    out = dict(rec, judgments=judgments, scores=parsed, score_mode=args.score_mode, parsed_scores=parsed)
    if probes is not None:
        pairs = [[expected_value(lp, range(6)) for lp in lps] for lps in probes]
        out["scores"] = [[round(v, 4) for v, _ in ps] for ps in pairs]
        out["digit_mass"] = [[round(m, 4) for _, m in ps] for ps in pairs]
    out["score"] = [mean_or_none(ss) for ss in out["scores"]]
    out["judge"] = {"model": args.model_path, "n": args.n, "temperature": args.temperature, "top_p": args.top_p,
                    "template": os.path.relpath(args.template, os.path.dirname(TEMPLATES)), "seed": args.seed}
    return out


def finish_judge_stage(args, order, rank, world, **extra):
    """Merge the shards; rank 0 summarises, writes the actor pairs and prints the summary line."""
    merged = finish_stage(args.out, order, rank, world)
    if rank != 0:
        barrier(world)
        return {}
    summary = summarize_judgments(merged)
    summary.update(truncated_responses=sum(f == "length" for r in merged for f in r.get("finish_reasons", [])),
                   truncated=args.truncated)
    summary.update(extra)
    if args.pairs:
        pairs, skips = make_actor_pairs(merged, args.rho, args.max_chosen_chars, args.truncated == "keep")
        write_jsonl(args.pairs, pairs)
        summary.update(actor_pairs=len(pairs), actor_pair_skips=skips, rho=args.rho,
                       mean_chosen_chars=round(_mean([len(p["chosen"]) for p in pairs]), 1),
                       mean_rejected_chars=round(_mean([len(p["rejected"]) for p in pairs]), 1))
    print0("judge | " + " | ".join(f"{k} {v}" for k, v in summary.items()))
    barrier(world)  # the pairs are on disk before any rank moves on
    return summary


def run_programmatic_judge(args, records, todo, order, rank, world):
    """Score each response with a Python function f(prompt, response) -> float in [0, 5] instead of the
    model: for ablations and for tests of the loop's learning signal."""
    fn = load_function(args.judge_fn)
    writer = ShardWriter(args.out, rank)
    for rec in todo:
        scores = [float(fn(rec["prompt"], resp)) for resp in rec["responses"]]
        bad = [s for s in scores if not 0 <= s <= 5]  # NaN fails this too
        if bad:
            raise SystemExit(f"--judge-fn {args.judge_fn}: scored {bad[0]} for record {rec['id']!r}, outside [0, 5]")
        out = dict(rec, judgments=[[f"Programmatic judge {args.judge_fn}.\nScore: {s}"] for s in scores],
                   scores=[[s] for s in scores], score=scores, score_mode="programmatic",
                   parsed_scores=[[s] for s in scores], judge={"function": args.judge_fn})
        writer.write(out)
    writer.close()
    return finish_judge_stage(args, order, rank, world)


def summarize_judgments(records):
    judgments = sum(len(j) for r in records for j in r["judgments"])
    failures = sum(p is None for r in records for ps in r["parsed_scores"] for p in ps)
    scores = [s for r in records for s in r["score"] if s is not None]
    return {"records": len(records), "judgments": judgments, "parse_failures": failures,
            "parse_failure_rate": round(failures / max(judgments, 1), 4),
            "unscored_responses": sum(s is None for r in records for s in r["score"]),
            "mean_score": round(_mean(scores), 4), "score_mode": records[0]["score_mode"] if records else None}


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def add_judge_args(parser):
    g = parser.add_argument_group("judge")
    g.add_argument("--template", default=os.path.join(TEMPLATES, "judge.txt"), help="judge prompt template ({rubric}, {prompt}, {response})")
    g.add_argument("--rubric", default=os.path.join(TEMPLATES, "rubric.txt"), help="rubric text inserted as {rubric}")
    return g


def build_parser():
    parser = argparse.ArgumentParser(description="Score responses with the model as its own judge; make actor pairs.")
    parser.add_argument("--model", default=None, help="HF checkpoint folder or Hub id (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--responses", required=True, help="responses.jsonl from sample.py")
    parser.add_argument("--out", required=True, help="judgments.jsonl to write (resumed if present)")
    parser.add_argument("--pairs", default=None, help="also write actor preference pairs here")
    g = add_judge_args(parser)
    g.add_argument("--n-judgments", dest="n", type=int, default=3, help="judgments per response (N; paper 11 for Meta-Rewarding)")
    g.add_argument("--score-mode", default="parse", choices=("parse", "expected"), help="how a judgment becomes a score")
    g.add_argument("--judge-fn", default=None, metavar="MODULE:FUNC", help="score with a Python function f(prompt, response) instead of the model (ablations)")
    add_sampling_args(g, "judgment", 0.8, 0.95, 256)
    p = parser.add_argument_group("actor pairs")
    p.add_argument("--rho", type=float, default=0.0, help="length control in [0, 1] (0 = best vs worst)")
    p.add_argument("--max-chosen-chars", type=int, default=None, help="drop pairs whose chosen response is longer")
    p.add_argument("--truncated", default="drop", choices=("drop", "keep"),
                   help="responses cut at their token limit: in no pair (drop), or only ever rejected (keep)")
    add_engine_args(parser)
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    check_flags(("--rho", args.rho, finite(args.rho) and 0 <= args.rho <= 1, "in [0, 1]"),
                ("--n-judgments", args.n, args.n >= 1, "at least 1"),
                ("--max-chosen-chars", args.max_chosen_chars, args.max_chosen_chars is None or args.max_chosen_chars >= 1,
                 "at least 1"), *sampling_rules(args), *engine_rules(args))
    return args


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = init_distributed()
    if args.judge_fn:  # no model needed
        args.model_path = None
        return run_judge(args, None, None, rank, world)
    model, tok, args.model_path = load_model(args.model, device, args.dtype, args.chat_format)
    return run_judge(args, model, tok, rank, world)


# -----------------------------------------------------------------------------
# The stage in iterate.py's plan


def loop_argv(args, t, f, seed, model_in, responses, pairs=True):
    """judge.py's command line in iteration t of iterate.py (f: a file of the iteration's folder)."""
    cap = schedule(args.max_chosen_chars, t)
    return (["--model", args.judge_model or model_in, "--responses", responses, "--out", f("judgments.jsonl")]
            + (["--pairs", f("actor_pairs.jsonl"), "--rho", schedule(args.rho, t)] if pairs else [])
            + ["--n-judgments", str(args.n_judgments), "--score-mode", args.score_mode,
               "--temperature", schedule(args.judge_temperature, t), "--top-p", str(args.judge_top_p),
               "--max-new-tokens", str(args.judge_max_new_tokens), "--truncated", args.truncated, "--seed", seed]
            + (["--max-chosen-chars", cap] if cap != "0" and pairs else []) + (["--judge-fn", args.judge_fn] if args.judge_fn else [])
            + engine_flags(args) + shlex.split(args.judge_args or ""))


if __name__ == "__main__":
    main()
