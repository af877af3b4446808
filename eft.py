"""
Evaluation Fine-Tuning (EFT) data, Self-Rewarding's way: the judge's seed skill. The model judges responses
that people have ranked, with the same rubric template as the loop's judge; the judgments whose scores order
a prompt's responses the way the people ranked them become SFT targets (prompt = the full judge prompt,
completion = the judgment). As in Self-Rewarding, the prompts are split in two (--eft-share, --seed): only the
EFT side is judged; of the other side the top-ranked reply of each prompt becomes instruction fine-tuning (IFT)
data. Both files are what `iterate.py --sft-data` trains iteration 0 on.

    python eft.py --oasst 2023-04-12_oasst_ready.trees.jsonl --model DIR --out runs/eft --n-judgments 4
    python eft.py --ranked ranked.jsonl --out runs/eft                     # our format: id, prompt, responses, ranks
    torchrun --nproc_per_node 8 eft.py --oasst trees.jsonl --model DIR --out runs/eft
    python iterate.py --preset paper --model DIR --sft-data runs/eft/eft.jsonl runs/eft/ift.jsonl ...

Writes <out>/ranked.jsonl (the EFT side as responses records), <out>/judgments.jsonl (the judge stage, resumable),
<out>/eft.jsonl and <out>/ift.jsonl. A judgment set is kept when every two responses of different rank are
strictly ordered by its scores (a better rank, a higher score); responses of equal rank may score anything.
"""
import argparse
import os
import random
from collections import Counter

import judge
from common import barrier, check_flags, finite, init_distributed, load_template, print0, read_jsonl, strict_json, write_jsonl

# -----------------------------------------------------------------------------
# The rules


def agrees(ranks, scores):
    """Do `scores` order the responses as `ranks` do (rank 0 is the best)? Every pair of different rank must be
    strictly ordered the same way; equal ranks may score anything; a missing score never agrees."""
    if any(s is None for s in scores):
        return False
    pairs = [(i, j) for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j]]
    return all(scores[i] > scores[j] for i, j in pairs)


def eft_records(rec, judge_template, rubric):
    """The EFT targets of one judged record: for each judgment index j whose set of scores (the j-th judgment of
    every response) agrees with the ranks, every response's judge prompt with its j-th judgment. A set with a
    judgment cut at its token limit is left out: a truncated text is never a target."""
    out, K = [], len(rec["responses"])
    finish = rec.get("judgment_finish")
    for j in range(len(rec["judgments"][0])):
        scores = [rec["scores"][k][j] for k in range(K)]
        if not agrees(rec["ranks"], scores) or (finish and any(finish[k][j] == "length" for k in range(K))):
            continue
        out += [{"id": f"{rec['id']}/{j}/{k}", "prompt": judge.judge_prompt(judge_template, rubric, rec["prompt"],
                                                                             rec["responses"][k]),
                 "completion": rec["judgments"][k][j], "score": scores[k], "kind": "eft"} for k in range(K)]
    return out


def ift_record(rec):
    """The best-ranked reply of a prompt (the first of several equally best) as an SFT record."""
    best = min(range(len(rec["ranks"])), key=lambda k: (rec["ranks"][k], k))
    return {"id": rec["id"], "prompt": rec["prompt"], "completion": rec["responses"][best], "kind": "ift"}


def split_prompts(records, share, seed):
    """(EFT records, IFT records), disjoint by prompt text: the distinct texts, sorted and shuffled by `seed`; the
    first round(share x their number) of them, at least one, go to EFT. Records sharing a text stay together."""
    texts = sorted({r["prompt"] for r in records})
    random.Random(seed).shuffle(texts)
    eft = set(texts[:max(1, round(share * len(texts)))])
    return [r for r in records if r["prompt"] in eft], [r for r in records if r["prompt"] not in eft]


def rebalance(records, seed):
    """--rebalance: the records of the most common score (rounded to a whole number) are thinned to as many as
    the second most common score has, a draw seeded by `seed`; the rest keep their order. One score alone, or a
    tie for the most, changes nothing."""
    key = lambda r: round(r["score"]) if finite(r["score"]) else None  # noqa: E731
    common = Counter(map(key, records)).most_common(2) or [(None, 0)]  # one score: its own second, nothing to thin
    top = [i for i, r in enumerate(records) if key(r) == common[0][0]]
    drop = set(random.Random(seed).sample(top, common[0][1] - common[-1][1]))
    return [r for i, r in enumerate(records) if i not in drop]


# -----------------------------------------------------------------------------
# Readers


def check_ranked(rec):
    problem = judge.check_responses_record(rec)
    if problem:
        return problem
    r = rec["ranks"]
    if not isinstance(r, list) or len(r) != len(rec["responses"]) or not all(finite(x) and not isinstance(x, bool) for x in r):
        return "`ranks` must be a list of finite numbers, one per response (0 = best)"
    if len(r) < 2:
        return "needs at least 2 ranked responses"
    return None


def read_ranked(path):
    return [{k: rec[k] for k in ("id", "prompt", "responses", "ranks")}
            for rec in read_jsonl(path, required=("id", "prompt", "responses", "ranks"), what="ranked record",
                                  check=check_ranked)]


def tree_id(tree):
    return tree.get("message_tree_id") or tree["prompt"].get("message_id")


def check_tree(tree):
    """An Open Assistant tree, as far as read_oasst reads it; a message or None."""
    root = tree.get("prompt")
    if not isinstance(root, dict) or not isinstance(root.get("text"), str) or not isinstance(root.get("replies", []), list):
        return "expected an Open Assistant tree: `prompt` a message with `text` and `replies`"
    rid = tree_id(tree)
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or not str(rid).strip():
        return "no tree id: give `message_tree_id`, or `message_id` in its `prompt`"
    if not root["text"].strip():
        return "the prompt's `text` is empty"
    for r in root.get("replies", []):
        if not isinstance(r, dict):
            return "every reply in `prompt.replies` must be a message (a JSON object)"
        if r.get("rank") is not None and (not isinstance(r["rank"], int) or isinstance(r["rank"], bool)):
            return f"a reply's `rank` is {r['rank']!r}: it must be a whole number (0 = best), or null when unranked"
    return None


def read_oasst(path, lang="en"):
    """The first turn of each tree of an Open Assistant `trees` export (one conversation tree per line): the
    root prompt and its ranked assistant replies, best first. Unranked and deleted replies are left out, and a
    tree with fewer than two ranked replies has nothing to order. -> (records, skip counts)."""
    trees = read_jsonl(path, required=("prompt",), what="Open Assistant tree", check=check_tree)
    out, skips, seen = [], {"other language": 0, "fewer than 2 ranked replies": 0}, {}
    for i, tree in enumerate(trees):
        root, rid = tree["prompt"], str(tree_id(tree))
        if rid in seen:  # the id of every later record (judgments, EFT targets): two trees cannot share one
            raise SystemExit(f"{trees.where(i)}: duplicate tree id {rid!r} (first on line {seen[rid]})")
        seen[rid] = trees.lines[i]
        if lang and root.get("lang") != lang:
            skips["other language"] += 1
            continue
        replies = [r for r in root.get("replies", []) if r.get("role") == "assistant" and isinstance(r.get("rank"), int)
                   and not r.get("deleted") and isinstance(r.get("text"), str)]
        if len(replies) < 2:
            skips["fewer than 2 ranked replies"] += 1
            continue
        replies.sort(key=lambda r: r["rank"])
        out.append({"id": rid, "prompt": root["text"], "responses": [r["text"] for r in replies],
                    "ranks": [r["rank"] for r in replies]})
    return out, skips


# -----------------------------------------------------------------------------
# The stage


def build_parser():
    p = argparse.ArgumentParser(description="EFT (and IFT) SFT data from human-ranked responses, judged by the model.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ranked", help="JSONL with id, prompt, responses, ranks (0 = best; ties allowed)")
    src.add_argument("--oasst", help="an Open Assistant trees export (JSONL, one conversation tree per line)")
    p.add_argument("--lang", default="en", help="--oasst: keep trees whose prompt has this language ('' = all)")
    p.add_argument("--out", required=True, help="folder for ranked.jsonl, judgments.jsonl, eft.jsonl, ift.jsonl")
    p.add_argument("--model", default=None, help="the judging model, HF folder or Hub id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--n-judgments", type=int, default=3, help="judgments per response (each index j is one candidate set)")
    p.add_argument("--judge-args", default="", help="more judge.py flags, e.g. \"--score-mode expected --temperature 0.7\"")
    p.add_argument("--redo", action="store_true", help="judge again from scratch instead of resuming earlier judgments")
    p.add_argument("--eft-share", type=float, default=0.5, help="share of the distinct prompts judged for EFT; the rest are IFT")
    p.add_argument("--rebalance", action="store_true", help="thin the EFT records of the most common (rounded) score "
                   "to the count of the second most common, drawn by --seed (Self-Rewarding down-sampled its top score)")
    p.add_argument("--seed", type=int, default=0, help="the draw of the EFT / IFT split and of --rebalance")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    check_flags(("--eft-share", args.eft_share, 0 < args.eft_share <= 1, "in (0, 1]"))
    args.judge_argv = judge_argv(args)
    judge.parse_args(args.judge_argv)  # the judge's own checks, before any work
    return args


def judge_argv(args):
    import shlex
    model = ["--model", args.model] if args.model else []
    return model + ["--responses", os.path.join(args.out, "ranked.jsonl"), "--out", os.path.join(args.out, "judgments.jsonl"),
                    "--n-judgments", str(args.n_judgments)] + shlex.split(args.judge_args) + (["--redo"] if args.redo else [])


def main(argv=None):
    args = parse_args(argv)
    rank, world, _ = init_distributed()
    if rank == 0:
        ranked, skips = read_oasst(args.oasst, args.lang) if args.oasst else (read_ranked(args.ranked), {})
        if not ranked:
            raise SystemExit(f"{args.oasst or args.ranked}: no prompt with 2+ ranked responses ({skips})")
        sides = split_prompts(ranked, args.eft_share, args.seed)
        os.makedirs(args.out, exist_ok=True)
        write_jsonl(os.path.join(args.out, "ranked.jsonl"), sides[0])
        write_jsonl(os.path.join(args.out, "ift.jsonl"), [ift_record(rec) for rec in sides[1]])
        print0(f"{len(ranked)} prompts with ranked responses: {len(sides[0])} EFT, {len(sides[1])} IFT | skipped {skips}")
    barrier(world)
    judge.main(args.judge_argv)
    jargs = judge.parse_args(args.judge_argv)
    if rank == 0:
        template, rubric = load_template(jargs.template, ()), load_template(jargs.rubric, ()).strip()
        judged = read_jsonl(os.path.join(args.out, "judgments.jsonl"))
        eft = [r for rec in judged for r in eft_records(rec, template, rubric)]
        sets = sum(len(rec["judgments"][0]) for rec in judged)
        kept, agreeing = len({r["id"].rsplit("/", 1)[0] for r in eft}), len(eft)
        eft = rebalance(eft, args.seed) if args.rebalance else eft
        write_jsonl(os.path.join(args.out, "eft.jsonl"), strict_json(eft))  # a judge's score may be NaN
        counts = {"prompts": len(ranked), "eft_prompts": len(judged), "judgment_sets": sets, "agreeing_sets": kept,
                  "eft": len(eft), "rebalanced_away": agreeing - len(eft), "ift": len(sides[1])}
        print0("eft | " + " | ".join(f"{k} {v}" for k, v in counts.items()) + f" | {args.out}")
    barrier(world)
    return counts if rank == 0 else {}


if __name__ == "__main__":
    main()
