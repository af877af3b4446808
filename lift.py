"""
Length-instructed preference pairs (LIFT-DPO, Yuan et al. 2024, "Following Length Constraints in Instructions"):
a prompt carries a word limit, and of two responses the one that keeps the limit wins, so the model learns to
follow the instruction rather than to be merely short. The benchmark is the violation rate: how often an
answer has more words than its limit.

    python lift.py --responses runs/x/iter1/responses.jsonl --out runs/x/iter1/lift_pairs.jsonl   # judge-free pairs
    python lift.py --pairs runs/x/iter1/actor_pairs.jsonl --out runs/x/iter1/lift_pairs.jsonl      # augment pairs
    python iterate.py --preset lift-demo --run-dir runs/lift        # the judge-free loop on the embedded model
    python iterate.py --lift ...                                    # Meta-Rewarding's actor pairs plus their LIFT copies

Two sources of pairs:
- `--pairs` (a preference pair file, e.g. the judge's actor pairs): the paper's augmentation. A pair whose
  responses differ by at least --min-gap words (10) gets two copies: a loose one, limit = the longer response's
  words + --loose-margin (10), which both keep, so the original preference stands; and a binding one, a limit
  between the two word counts, which only the shorter keeps, so the shorter wins. Closer pairs get no copy.
  Without the loose copies a limit in a training prompt would always mean "the shorter wins".
- `--responses` (judge-free): two responses of a prompt with different word counts and a binding limit between
  them; the shorter is chosen. Nothing says which response is better, so there is no preference for a loose
  limit to keep: these pairs are binding only.

Words are counted by `count_words`: whitespace-separated tokens holding a letter or a digit. A response cut at
its token limit is never chosen, and its `<side>_truncated` flag follows it to whichever side it lands on.
The instruction is a template (`data/templates/lift.txt`, with `{max_words}` and `{prompt}`); evaluation
also asks with a paraphrase (`lift_paraphrase.txt`) to see whether the model learned the words or the idea.
"""
import argparse
import shlex
import os
import random
import re

from common import TEMPLATES, check_flags, check_prompt_fields, load_template, read_jsonl, render, write_jsonl

WORD = re.compile(r"\S+")
HAS_ALNUM = re.compile(r"[^\W_]", re.UNICODE)  # a letter or a digit, in any script

# -----------------------------------------------------------------------------
# The rules


def count_words(text):
    """Words of a text: its whitespace-separated tokens that hold a letter or a digit (a lone "-" or "**" is
    formatting, not a word). Scripts written without spaces (Chinese, Japanese) count a run of text as one word."""
    return sum(1 for w in WORD.findall(text) if HAS_ALNUM.search(w))


def violates(text, max_words):
    return count_words(text) > max_words


def instruct(prompt, max_words, template):
    """The length-instructed prompt: the template filled with the limit and the original prompt."""
    return render(template, max_words=str(max_words), prompt=prompt.strip())


def pair_under_limit(a, b, max_words):
    """Which of two responses wins under a word limit: (winner, loser), or None when neither or both keep it
    (both keeping it leaves the original preference, which the caller has already)."""
    ka, kb = not violates(a, max_words), not violates(b, max_words)
    if ka == kb:
        return None
    return (a, b) if ka else (b, a)


def swap_sides(pair):
    """The pair with chosen and rejected exchanged; every per-side field (`chosen_truncated`, `score_rejected`,
    ...) is renamed with its text, so it describes the same response afterwards."""
    def other(key):
        return key.replace("chosen", "\0").replace("rejected", "chosen").replace("\0", "rejected")
    return {other(k): v for k, v in pair.items()}


def augment(pairs, rng, template, min_gap=10, loose_margin=10):
    """LIFT's length-instructed copies of preference pairs (dicts with `prompt`, `chosen`, `rejected`): for each
    pair whose word counts differ by at least `min_gap`, a loose copy (limit = the longer's count +
    `loose_margin`: both keep it, the original preference stands) and a binding copy (a limit N drawn uniformly
    with w_short <= N < w_long: only the shorter keeps it and is chosen; the paper's draw of N is not published,
    this one is ours). A copy whose chosen side would be a cut response (`chosen_truncated`) is not made. Copies
    carry every field of their pair (system prompt, scores, flags, each on its text's side), `max_words`, `kind`
    (lift-loose, lift), `flipped` (the original rejected response is chosen) and an id of their own."""
    out = []
    for p in pairs:
        wc, wr = count_words(p["chosen"]), count_words(p["rejected"])
        if abs(wc - wr) < min_gap:
            continue
        binding = rng.randint(min(wc, wr), max(wc, wr) - 1)
        shorter_first = p if wc < wr else swap_sides(p)
        for q, n, kind in ((p, max(wc, wr) + loose_margin, "lift-loose"), (shorter_first, binding, "lift")):
            if q.get("chosen_truncated"):  # a response that never ended is never the one to imitate
                continue
            out.append({**q, **({"id": f"{p['id']}/{kind}"} if "id" in p else {}),
                        "prompt": instruct(p["prompt"], n, template), "max_words": n, "kind": kind,
                        "flipped": q["chosen"] != p["chosen"]})
    return out


def self_pairs(record, rng, template, per_prompt=2, keep_truncated=False):
    """Judge-free pairs from one responses record: up to `per_prompt` pairs of responses with different word
    counts, each with a binding limit N between them (w_short <= N < w_long); the shorter one is chosen. A
    response cut at its token limit is never chosen; it is in no pair unless `keep_truncated`, then only ever
    rejected."""
    texts, cut = record["responses"], cut_of(record)
    words = [count_words(t) for t in texts]
    candidates = [(i, j) for i in range(len(texts)) for j in range(len(texts))  # i shorter (and whole), j longer
                  if words[i] < words[j] and not cut[i] and (keep_truncated or not cut[j])]
    rng.shuffle(candidates)
    pairs = []
    for i, j in candidates[:per_prompt]:
        n = rng.randint(words[i], words[j] - 1)
        pairs.append({"id": f"{record['id']}/{i}/{j}", "prompt": instruct(record["prompt"], n, template),
                      **({"system": record["system"]} if record.get("system") else {}),
                      "chosen": texts[i], "rejected": texts[j], "max_words": n, "kind": "lift",
                      **({"rejected_truncated": True} if cut[j] else {})})
    return pairs


# -----------------------------------------------------------------------------
# Input records (the checks read_jsonl runs on each line; shared with tpo.py and reasoning.py)


def check_responses(rec):
    """A responses record as sample.py writes it: a prompt, a non-empty list of string responses and, if given,
    one string finish reason per response."""
    rs, fr = rec.get("responses"), rec.get("finish_reasons")
    if not isinstance(rs, list) or not rs or not all(isinstance(x, str) for x in rs):
        return "`responses` must be a non-empty list of strings"
    if fr is not None and not (isinstance(fr, list) and len(fr) == len(rs) and all(isinstance(x, str) for x in fr)):
        return f"`finish_reasons` must be a list of {len(rs)} strings, one per response"
    return check_prompt_fields(rec)


def cut_of(record):
    """Per response: did it stop at its token limit (finish reason "length") rather than end on its own?"""
    return [f == "length" for f in record.get("finish_reasons") or ["stop"] * len(record["responses"])]


def check_pair(rec):
    for key in ("chosen", "rejected"):
        if not isinstance(rec[key], str):
            return f"`{key}` must be a string"
        if not isinstance(rec.get(f"{key}_truncated", False), bool):
            return f"`{key}_truncated` must be true or false"
    return check_prompt_fields(rec)


# -----------------------------------------------------------------------------
# The stage: a pair file from a responses file or from a pair file


def build_parser():
    p = argparse.ArgumentParser(description="Length-instructed preference pairs (LIFT).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--responses", help="responses.jsonl: judge-free pairs (binding limits only) from each prompt's responses")
    src.add_argument("--pairs", help="a preference pair file: a loose and a binding length-instructed copy of each pair")
    p.add_argument("--out", required=True, help="the pair file to write")
    p.add_argument("--template", default=os.path.join(TEMPLATES, "lift.txt"), help="length instruction ({max_words}, {prompt})")
    p.add_argument("--per-prompt", type=int, default=2, help="--responses: pairs per prompt")
    p.add_argument("--min-gap", type=int, default=10, help="--pairs: fewest words by which a pair's responses differ to get copies")
    p.add_argument("--no-loose", action="store_true", help="--pairs: binding copies only (an ablation of the loose ones)")
    p.add_argument("--loose-margin", type=int, default=10, help="--pairs: the loose copy's limit is the longer response's words plus this")
    p.add_argument("--truncated", default="drop", choices=("drop", "keep"),
                   help="--responses: responses cut at their token limit in no pair (drop), or only ever rejected (keep); "
                        "--pairs: a cut response is never made the chosen one either way")
    p.add_argument("--seed", type=int, default=0, help="seed of the limits drawn")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    check_flags(("--per-prompt", args.per_prompt, args.per_prompt >= 1, "at least 1"),
                ("--min-gap", args.min_gap, args.min_gap >= 1, "at least 1"),
                ("--loose-margin", args.loose_margin, args.loose_margin >= 0, ">= 0"))
    return args


def main(argv=None):
    args = parse_args(argv)
    template = load_template(args.template, ("max_words", "prompt"))
    rng = random.Random(args.seed)
    if args.pairs:
        # an iteration whose judge made no pairs leaves an empty pair file: it has no copies either
        empty = os.path.isfile(args.pairs) and os.path.getsize(args.pairs) == 0
        pairs = [] if empty else read_jsonl(args.pairs, required=("prompt", "chosen", "rejected"), what="pair", check=check_pair)
        out = augment(pairs, rng, template, args.min_gap, args.loose_margin)  # the originals are in their own file
        if args.no_loose:  # the ablation: binding copies only (the same ones: the limits were drawn as before)
            out = [p for p in out if p["kind"] != "lift-loose"]
        counts = {"pairs_in": len(pairs), "lift_pairs": len(out), "loose": sum(p["kind"] == "lift-loose" for p in out),
                  "flipped": sum(p["flipped"] for p in out)}
    else:
        out, skipped = [], 0
        for rec in read_jsonl(args.responses, required=("id", "prompt", "responses"), what="responses record",
                              check=check_responses):
            got = self_pairs(rec, rng, template, args.per_prompt, args.truncated == "keep")
            skipped += not got
            out += got
        counts = {"lift_pairs": len(out), "prompts_without_pairs": skipped}
    if int(os.environ.get("RANK", 0)) == 0:
        write_jsonl(args.out, out)
    print(f"lift | {' | '.join(f'{k} {v}' for k, v in counts.items())} | {args.out}", flush=True)
    return counts


# -----------------------------------------------------------------------------
# The stages in iterate.py's plan


def loop_stages(args, t, f, seed, model_in):
    """Judge-free LIFT: length-instructed pairs straight from the responses."""
    return [("lift_pairs", "lift", ["--responses", f("responses.jsonl"), "--out", f("lift_pairs.jsonl"), "--per-prompt",
                                  str(args.lift_per_prompt), "--truncated", args.truncated, "--seed", seed])], [f("lift_pairs.jsonl")]


def copy_stage(args, f, seed):
    """With iterate.py --lift: the actor pairs' length-instructed copies, a loose and a binding one each
    (--lift-args passes more of this script's flags)."""
    return ("lift_pairs", "lift", ["--pairs", f("actor_pairs.jsonl"), "--out", f("lift_pairs.jsonl"), "--seed", seed]
            + shlex.split(args.lift_args or ""))


if __name__ == "__main__":
    main()
