"""
Length-instructed preference pairs (LIFT-DPO, Yuan et al. 2024, "Following Length Constraints in Instructions"):
a prompt carries a word limit, and of two responses the one that keeps the limit wins, so the model learns to
follow the instruction rather than to be merely short. The benchmark is the violation rate: how often an
answer has more words than its limit.

    python lift.py --responses runs/x/iter1/responses.jsonl --out runs/x/iter1/lift_pairs.jsonl   # judge-free pairs
    python lift.py --pairs runs/x/iter1/actor_pairs.jsonl --out runs/x/iter1/lift_pairs.jsonl      # augment pairs
    python iterate.py --preset lift-demo --run-dir runs/lift        # the judge-free loop on the embedded model
    python iterate.py --lift ...                                    # Meta-Rewarding's actor pairs plus their LIFT copies

The instruction is a template (`data/templates/lift.txt`, with `{max_words}` and `{prompt}`); evaluation
also asks with a paraphrase (`lift_paraphrase.txt`) to see whether the model learned the words or the idea.
"""
import argparse
import os
import random
import re

from common import TEMPLATES, check_flags, load_template, read_jsonl, render, write_jsonl

WORD = re.compile(r"\S+")
HAS_ALNUM = re.compile(r"[^\W_]", re.UNICODE)  # a letter or a digit, in any script

# -----------------------------------------------------------------------------
# The rules


def count_words(text):
    """Words of a text: its whitespace-separated tokens that hold a letter or a digit (a lone "-" or "**" is
    formatting, not a word)."""
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


def augment(pairs, rng, template):
    """The original pairs and, for each, a length-instructed copy: a limit N drawn uniformly among the word
    counts that bind (at least the shorter response's, below the longer one's), so exactly one response keeps
    it. The copy keeps the pair's order when the chosen one is the shorter and flips it when the rejected one
    is; a pair of equal word counts gets no copy. (The paper's exact sampling of N is not published; this is
    ours.) Pairs are dicts with `prompt`, `chosen`, `rejected`; copies also carry `max_words`."""
    out = list(pairs)
    for p in pairs:
        wc, wr = count_words(p["chosen"]), count_words(p["rejected"])
        if wc == wr:
            continue
        n = rng.randint(min(wc, wr), max(wc, wr) - 1)
        won = pair_under_limit(p["chosen"], p["rejected"], n)
        assert won is not None, (wc, wr, n)  # a binding limit separates them by construction
        out.append({**{k: v for k, v in p.items() if k not in ("prompt", "chosen", "rejected")},
                    "prompt": instruct(p["prompt"], n, template), "chosen": won[0], "rejected": won[1],
                    "max_words": n, "kind": "lift", "flipped": won[0] != p["chosen"]})
    return out


def self_pairs(record, rng, template, per_prompt=2, truncated=None, loose=None):
    """Judge-free pairs from one responses record: up to `per_prompt` pairs of responses with different word
    counts, each with a limit N between them (w_short <= N < w_long); the shorter one is chosen. A response
    cut at its token limit (truncated[i]) is never chosen. With `loose` (a function (prompt, a, b) -> the
    preferred of a and b, or None), one more pair has a limit above both responses, and the preference
    decides, so that "shorter" is not always the answer."""
    texts = record["responses"]
    cut = truncated or [False] * len(texts)
    words = [count_words(t) for t in texts]
    candidates = [(i, j) for i in range(len(texts)) for j in range(len(texts))
                  if words[i] < words[j] and not cut[i]]  # i shorter (and whole), j longer
    rng.shuffle(candidates)
    pairs = []
    for i, j in candidates[:per_prompt]:
        n = rng.randint(words[i], words[j] - 1)
        pairs.append({"id": f"{record['id']}/{i}/{j}", "prompt": instruct(record["prompt"], n, template),
                      "chosen": texts[i], "rejected": texts[j], "max_words": n, "kind": "lift",
                      **({"rejected_truncated": True} if cut[j] else {})})
    if loose is not None:
        whole = [i for i in range(len(texts)) if not cut[i]]
        if len(whole) >= 2:
            i, j = rng.sample(whole, 2)
            better = loose(record["prompt"], texts[i], texts[j])
            if better is not None:
                worse = texts[j] if better == texts[i] else texts[i]
                n = max(words[i], words[j]) + rng.randint(1, max(words[i], words[j]) + 1)
                pairs.append({"id": f"{record['id']}/loose", "prompt": instruct(record["prompt"], n, template),
                              "chosen": better, "rejected": worse, "max_words": n, "kind": "lift-loose"})
    return pairs


# -----------------------------------------------------------------------------
# The stage: a pair file from a responses file or from a pair file


def build_parser():
    p = argparse.ArgumentParser(description="Length-instructed preference pairs (LIFT).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--responses", help="responses.jsonl: judge-free pairs from each prompt's responses")
    src.add_argument("--pairs", help="a pair file: each pair plus its length-instructed copy")
    p.add_argument("--out", required=True, help="the pair file to write")
    p.add_argument("--template", default=os.path.join(TEMPLATES, "lift.txt"), help="length instruction ({max_words}, {prompt})")
    p.add_argument("--per-prompt", type=int, default=2, help="--responses: pairs per prompt")
    p.add_argument("--truncated", default="drop", choices=("drop", "keep"),
                   help="responses cut at their token limit: in no pair (drop), or only ever rejected (keep)")
    p.add_argument("--seed", type=int, default=0, help="seed of the limits drawn")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    check_flags(("--per-prompt", args.per_prompt, args.per_prompt >= 1, "at least 1"))
    return args


def main(argv=None):
    args = parse_args(argv)
    template = load_template(args.template, ("max_words", "prompt"))
    rng = random.Random(args.seed)
    if args.pairs:
        pairs = [dict(p) for p in read_jsonl(args.pairs, required=("prompt", "chosen", "rejected"), what="pair")]
        out = augment(pairs, rng, template)[len(pairs):]  # the originals are in their own file already
        counts = {"pairs_in": len(pairs), "lift_pairs": len(out), "flipped": sum(p["flipped"] for p in out)}
    else:
        out, skipped = [], 0
        for rec in read_jsonl(args.responses, required=("id", "prompt", "responses"), what="responses record"):
            cut = [f == "length" for f in rec.get("finish_reasons", [])] or None
            if cut and args.truncated == "drop":
                keep = [k for k, c in enumerate(cut) if not c]
                rec = dict(rec, responses=[rec["responses"][k] for k in keep])
                cut = None
            got = self_pairs(rec, rng, template, args.per_prompt, cut)
            skipped += not got
            out += got
        counts = {"lift_pairs": len(out), "prompts_without_pairs": skipped}
    if int(os.environ.get("RANK", 0)) == 0:
        write_jsonl(args.out, out)
    print(f"lift | {' | '.join(f'{k} {v}' for k, v in counts.items())} | {args.out}", flush=True)
    return counts


if __name__ == "__main__":
    main()
