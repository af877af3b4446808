"""
Thought Preference Optimization (TPO, Wu et al. 2024, "Thinking LLMs"): the actor writes its thoughts and then
its response after two fixed markers; the judge sees only the response; the pairs are the whole outputs,
thoughts included, so the model learns which thoughts lead to good responses. An output whose markers cannot be
split is used as a rejected one. Length control: score = z(judge score) - rho z(response length), z-scores
over the prompt's samples. An output cut at its token limit is never chosen: with --truncated drop (the default)
it takes part in nothing (not even the z-scores), with keep it may be the rejected one (`rejected_truncated`).
Pairs carry the system prompt the outputs were sampled with.

    python tpo.py --step split --responses runs/x/iter1/responses.jsonl --out runs/x/iter1/split.jsonl
    python judge.py --responses runs/x/iter1/split.jsonl --out runs/x/iter1/judgments.jsonl ...   # responses only
    python tpo.py --step pairs --judgments runs/x/iter1/judgments.jsonl --out runs/x/iter1/tpo_pairs.jsonl --rho 0.5
    python iterate.py --method tpo --model DIR --judge-model JUDGE ...     # the loop (--no-thoughts: its control)

The actor's prompt is the request inside `data/templates/thought.txt`; the split records keep the request as
`prompt` (what the judge is shown) and the actor's prompt as `thought_prompt` (what the pairs train on).
"""
import argparse
import math
import os

from common import check_flags, finite, read_jsonl, write_jsonl
from lift import check_responses, count_words, cut_of
import judge
from presets import schedule

THOUGHT, RESPONSE = "Here is my thought process:", "Here is my response:"

# -----------------------------------------------------------------------------
# The rules


def split_thought(text, thought_marker=THOUGHT, response_marker=RESPONSE):
    """(thought, response) of an output, or None when the response marker is missing or nothing follows it.
    The last response marker counts (a model may quote the markers while thinking); the thought is what lies
    between the thought marker (if any) and it."""
    at = text.rfind(response_marker)
    if at < 0:
        return None
    response = text[at + len(response_marker):].strip()
    if not response:
        return None
    thought = text[:at]
    t = thought.find(thought_marker)
    return (thought[t + len(thought_marker):] if t >= 0 else thought).strip(), response


def zscores(xs):
    """(x - mean) / std over the list (population std); all zeros when the values do not vary."""
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))
    return [0.0] * len(xs) if sd == 0 else [(x - m) / sd for x in xs]


def tpo_pair(scores, lengths, splittable, rho, truncated=None, keep_truncated=False):
    """(chosen, rejected) indices of one prompt's outputs, or None. Among the splittable outputs with a score,
    each gets z(score) - rho z(length of its response); chosen = the highest, rejected = an unsplittable output
    when there is one (the first), else the lowest. A cut output (truncated[i]) is never chosen; it is left out
    of everything unless `keep_truncated`."""
    cut = truncated or [False] * len(scores)
    present = [i for i in range(len(scores)) if keep_truncated or not cut[i]]
    ok = [i for i in present if splittable[i] and scores[i] is not None]
    if not ok:
        return None
    z = dict(zip(ok, [a - rho * b for a, b in zip(zscores([scores[i] for i in ok]), zscores([lengths[i] for i in ok]))]))
    whole = [i for i in ok if not cut[i]]
    if not whole:
        return None
    chosen = max(whole, key=lambda i: (z[i], -i))
    broken = [i for i in present if not splittable[i]]
    rejected = broken[0] if broken else min(ok, key=lambda i: (z[i], i))
    if rejected == chosen or (not broken and z[rejected] == z[chosen]):
        return None
    return chosen, rejected


# -----------------------------------------------------------------------------
# The two steps around the judge


def split_records(records, thoughts=True):
    """Responses records -> the judge's input: `responses` = the response parts ("" when unsplittable),
    `outputs` = the whole outputs, `splittable`, `prompt` = the request, `thought_prompt` = the actor's prompt."""
    out = []
    for rec in records:
        parts = [split_thought(t) if thoughts else ("", t) for t in rec["responses"]]
        out.append({**rec, "prompt": rec.get("request", rec["prompt"]), "thought_prompt": rec["prompt"],
                    "outputs": rec["responses"], "responses": [p[1] if p else "" for p in parts],
                    "splittable": [p is not None for p in parts]})
    return out


def make_pairs(records, rho, keep_truncated=False):
    """-> (pairs, counts). The counts give the mean words (count_words) of the chosen and the rejected response
    parts, what --rho is tuned on (the paper keeps chosen ones no longer on average); a rejected output with no
    response part, rejected whatever --rho, is left out of its mean (None when nothing is left)."""
    pairs, skipped, words = [], 0, ([], [])
    for rec in records:
        cut = cut_of(rec)
        got = tpo_pair(rec["score"], [len(r) for r in rec["responses"]], rec["splittable"], rho, cut, keep_truncated)
        if got is None:
            skipped += 1
            continue
        c, r = got
        words[0].append(count_words(rec["responses"][c]))
        words[1].extend([count_words(rec["responses"][r])] if rec["splittable"][r] else [])
        pairs.append({"id": rec["id"], "prompt": rec["thought_prompt"], **({"system": rec["system"]} if rec.get("system") else {}),
                      "chosen": rec["outputs"][c], "rejected": rec["outputs"][r], "score_chosen": rec["score"][c],
                      "score_rejected": rec["score"][r], "kind": "tpo", **({"rejected_truncated": True} if cut[r] else {})})
    mean = lambda xs: round(sum(xs) / len(xs), 1) if xs else None  # noqa: E731
    return pairs, {"tpo_pairs": len(pairs), "prompts_without_pairs": skipped,
                   "mean_chosen_words": mean(words[0]), "mean_rejected_words": mean(words[1])}


def check_actor(rec):
    if rec.get("request") is not None and (not isinstance(rec["request"], str) or not rec["request"].strip()):
        return "`request` must be a non-empty string"
    return check_responses(rec)


def check_judged(rec):
    """A judged split record: one whole output, split flag and score (a number, or null when unjudged) per response."""
    problem = check_responses(rec)
    if problem:
        return problem
    n = len(rec["responses"])
    for key, ok, what in (("outputs", lambda x: isinstance(x, str), "strings"),
                          ("splittable", lambda x: isinstance(x, bool), "true/false values"),
                          ("score", lambda x: x is None or (finite(x) and not isinstance(x, bool)), "numbers or nulls")):
        if not isinstance(rec[key], list) or len(rec[key]) != n or not all(ok(x) for x in rec[key]):
            return f"`{key}` must be a list of {what}, one per response"
    if not isinstance(rec.get("thought_prompt"), str) or not rec["thought_prompt"].strip():
        return "`thought_prompt` must be a non-empty string (the records of tpo.py --step split, judged)"
    return None


def build_parser():
    p = argparse.ArgumentParser(description="TPO: split thoughts from responses for the judge; pairs of whole outputs.")
    p.add_argument("--step", required=True, choices=("split", "pairs"), help="before the judge (split) or after it (pairs)")
    p.add_argument("--responses", help="--step split: responses.jsonl of the actor")
    p.add_argument("--judgments", help="--step pairs: judgments.jsonl of the split records")
    p.add_argument("--out", required=True, help="the file to write")
    p.add_argument("--rho", type=float, default=0.0, help="length control: z(score) - rho z(length), rho in [0, 0.5] in the paper")
    p.add_argument("--no-thoughts", dest="thoughts", action="store_false", help="outputs are plain responses (the control)")
    p.add_argument("--truncated", default="drop", choices=("drop", "keep"),
                   help="--step pairs: outputs cut at their token limit in no pair (drop), or only ever rejected (keep)")
    return p


def parse_args(argv=None):
    a = build_parser().parse_args(argv)
    check_flags(("--rho", a.rho, finite(a.rho) and a.rho >= 0, ">= 0"),
                ("--responses", a.responses, a.step != "split" or a.responses, "given with --step split"),
                ("--judgments", a.judgments, a.step != "pairs" or a.judgments, "given with --step pairs"))
    return a


def main(argv=None):
    args = parse_args(argv)
    if args.step == "split":
        recs = split_records(read_jsonl(args.responses, required=("id", "prompt", "responses"), what="responses record",
                                        check=check_actor), args.thoughts)
        counts = {"records": len(recs), "outputs": sum(len(r["outputs"]) for r in recs),
                  "unsplittable": sum(not s for r in recs for s in r["splittable"])}
    else:
        recs, counts = make_pairs(read_jsonl(args.judgments, required=("id", "score", "splittable", "outputs"),
                                             what="judged TPO record", check=check_judged), args.rho, args.truncated == "keep")
    if int(os.environ.get("RANK", 0)) == 0:
        write_jsonl(args.out, recs)
    print(f"tpo {args.step} | " + " | ".join(f"{k} {v}" for k, v in counts.items()), flush=True)
    return counts


# -----------------------------------------------------------------------------
# The stages in iterate.py's plan


def loop_stages(args, t, f, seed, model_in):
    """TPO: split each output into thought and response, judge the responses only, pair the whole outputs."""
    return [("split", "tpo", ["--step", "split", "--responses", f("responses.jsonl"), "--out", f("split.jsonl")]
             + ([] if args.thoughts else ["--no-thoughts"])),
            ("judgments", "judge", judge.loop_argv(args, t, f, seed, model_in, f("split.jsonl"), pairs=False)),
            ("tpo_pairs", "tpo", ["--step", "pairs", "--judgments", f("judgments.jsonl"), "--out", f("tpo_pairs.jsonl"),
                                "--rho", schedule(args.rho, t), "--truncated", args.truncated])], [f("tpo_pairs.jsonl")]


if __name__ == "__main__":
    main()
