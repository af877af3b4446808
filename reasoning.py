"""
Verifiable-reward pairs on the same loop: Iterative Reasoning Preference Optimization (IRPO, Pang et al. 2024:
correct vs wrong final answers against a gold answer) and Self-Consistency Preference Optimization (ScPO,
Prasad et al. 2024: the most-voted vs the least-voted final answer, no gold needed). Both train with
DPO + NLL (train_dpo.py --nll-coef 1); ScPO weights each pair by its vote margin.

    python reasoning.py --responses runs/x/iter1/responses.jsonl --out runs/x/iter1/reasoning_pairs.jsonl --method irpo
    python reasoning.py --responses r.jsonl --out pairs.jsonl --method scpo --tau 0.5
    python iterate.py --preset reasoning-demo --method irpo --run-dir runs/irpo   # the loop on arithmetic problems

The responses must carry each question's `answer` (sample.py keeps every field of a prompt record) for IRPO;
ScPO ignores it except to report how often the vote was right. As in the IRPO paper, a question's gold worked
solution (`solution`: GSM8K's own, read by `read_questions`) joins the correct samples as a possible winner,
so a question none of whose samples is right still gives pairs (`--no-gold-solution`: samples only).
`<out root>.answers.jsonl` holds, per question, each response's extracted answer, whether it is correct and the
votes.
"""
import argparse
import math
import os
import random
import re

from common import check_flags, finite, read_jsonl, stable_seed, write_jsonl
from lift import check_responses, cut_of
from presets import actor_argv, schedule

# -----------------------------------------------------------------------------
# Final answers

MARKERS = re.compile(r"final\s+answer\s*(?:is)?\s*[:：]?|the\s+answer\s+is\s*[:：]?|####", re.IGNORECASE)
NUMBER = re.compile(r"[-+]?\$?\s*\d[\d,]*(?:\.\d+)?")


def normalize(value):
    """A final answer as a comparable string: numbers lose thousands separators, currency signs, trailing
    zeros and a trailing period (`$1,000.` -> `1000`, `42.0` -> `42`); other text is stripped and lowercased."""
    v = value.strip().strip("*").strip()
    v = re.sub(r"[.\s]+$", "", v)
    m = NUMBER.fullmatch(v) or NUMBER.fullmatch(v.replace(" ", ""))
    if m:
        num = v.replace("$", "").replace(",", "").replace(" ", "")
        if "." in num:
            num = num.rstrip("0").rstrip(".")
        num = num.lstrip("+")
        return "0" if num in ("-0", "") else num
    return v.lower() or None


def final_answer(text):
    """The final answer of a solution, normalised, or None: the content of the last `\\boxed{...}` if it comes
    after the last marker, else what follows the last `Final answer:` / `The final answer is` / `####` on
    its line (its first number when there is one)."""
    boxed = [m for m in re.finditer(r"\\boxed\{", text)]
    marks = list(MARKERS.finditer(text))
    if boxed and (not marks or boxed[-1].start() > marks[-1].start()):
        start, depth, i = boxed[-1].end(), 1, boxed[-1].end()
        while i < len(text) and depth:  # braces may nest: \boxed{\frac{1}{2}}
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        return normalize(text[start:i - 1]) if depth == 0 else None
    if not marks:
        return None
    rest = text[marks[-1].end():].split("\n", 1)[0].strip()
    num = NUMBER.search(rest)
    if num:
        return normalize(num.group(0))
    return normalize(rest) if rest else None


# -----------------------------------------------------------------------------
# The pair rules


def irpo_pairs(correct, k):
    """IRPO's pairs: walk the correct indices W and the wrong ones L together, each restarting at its start when
    it runs out: pair j = (W[j % |W|], L[j % |L|]) for j < k. None when either side is empty."""
    W = [i for i, c in enumerate(correct) if c]
    L = [i for i, c in enumerate(correct) if not c]
    if not W or not L:
        return []
    return [(W[j % len(W)], L[j % len(L)]) for j in range(k)]


def scpo_pair(answers, tau, rng, cut=None, extra=()):
    """ScPO's pair: votes count equal answers (an unparseable response, None, has 0 votes and is never chosen);
    chosen = a response of the most-voted answer, rejected = a response with the fewest votes; weight
    (V+ - V-) / k with k = len(answers). None when V+ < tau * k or V+ == V- (nothing to prefer). Ties between
    answers, and the response picked within one, are drawn with `rng`, never by length or position. A response
    cut at its token limit (cut[i]) still votes but is never the chosen one. `extra`: answers of more samples
    (drawn hotter) that do not vote but may be the rejected one, by their answer's votes among the k: index
    len(answers) + j is extra[j]."""
    k = len(answers)
    votes = {}
    for a in answers:
        if a is not None:
            votes[a] = votes.get(a, 0) + 1
    if not votes:
        return None
    v_top = max(votes.values())
    votes_of = [votes.get(a, 0) if a is not None else 0 for a in list(answers) + list(extra)]
    v_low = min(votes_of)
    if v_top < tau * k or v_top == v_low:
        return None
    best = rng.choice(sorted(a for a, v in votes.items() if v == v_top))
    whole = [i for i, a in enumerate(answers) if a == best and not (cut and cut[i])]
    if not whole:
        return None
    chosen = rng.choice(whole)
    rejected = rng.choice([i for i, v in enumerate(votes_of) if v == v_low])
    return chosen, rejected, (v_top - v_low) / k


# -----------------------------------------------------------------------------
# Data with gold answers


def gold_answer(value):
    """A gold `answer` (a string, a finite number, or a GSM8K solution ending in `#### N`) as a normalised final
    answer, or None when it holds none."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):  # JSON's NaN and Infinity answer nothing
        return None
    text = str(value)
    return final_answer(text) if "####" in text else normalize(text)


def gsm8k_solution(text, gold):
    """GSM8K's worked solution in the reasoning template's format: its calculator annotations (`<<48/2=24>>`)
    removed and its `#### N` line written as `Final answer: N`."""
    steps = re.sub(r"<<[^>]*>>", "", text.rsplit("####", 1)[0]).strip()
    return f"{steps}\nFinal answer: {gold}" if steps else f"Final answer: {gold}"


def check_gold(rec, need_answer):
    """The answer fields of a question or responses record: `answer` (required when `need_answer`), and an
    optional `solution` whose final answer must be the gold one (it is trained on as a correct solution)."""
    if rec.get("answer") is None:
        return "needs an `answer` (a string or a number): IRPO checks solutions against it" if need_answer else None
    gold = gold_answer(rec["answer"])
    if gold is None:
        return f"no final answer in `answer` ({str(rec['answer'])[:60]!r}): give a string or a finite number"
    sol = rec.get("solution")
    if sol is not None and (not isinstance(sol, str) or final_answer(sol) != gold):
        return f"`solution` must be a string ending in `Final answer: {gold}` (the gold answer)"
    return None


def read_questions(path, gold=True):
    """Questions: our `id`, `prompt`, `answer` records (optional `system`, `solution`), or GSM8K's `question`,
    `answer` (a worked solution ending in `#### <number>`: the number becomes the answer, the solution in our
    format the `solution`). `gold=False` (ScPO) makes the answer optional; one given is still checked.
    -> [{id, prompt, answer?, system?, solution?}], ids `q<line>` where the file has none."""
    def check(rec):
        q = rec.get("prompt", rec.get("question"))
        if not isinstance(q, str) or not q.strip():
            return "needs a non-empty string `prompt` (or GSM8K's `question`)"
        if rec.get("system") is not None and not isinstance(rec["system"], str):
            return "`system` must be a string"
        return check_gold(rec, gold)
    recs = read_jsonl(path, required=(), what="question", check=check)
    out = []
    for i, rec in enumerate(recs):
        q = {"id": str(rec.get("id", f"q{recs.lines[i]}")), "prompt": rec.get("prompt", rec.get("question")),
             **({"system": rec["system"]} if rec.get("system") else {})}
        if rec.get("answer") is not None:
            q["answer"], text = gold_answer(rec["answer"]), str(rec["answer"])
            solution = rec.get("solution") or (gsm8k_solution(text, q["answer"]) if "####" in text else None)
            q.update({"solution": solution} if solution else {})
        out.append(q)
    return out


# -----------------------------------------------------------------------------
# The stage


def build_parser():
    p = argparse.ArgumentParser(description="IRPO or ScPO preference pairs from sampled solutions.")
    p.add_argument("--responses", required=True, help="responses.jsonl whose records carry `answer` (IRPO)")
    p.add_argument("--out", required=True, help="the pair file to write")
    p.add_argument("--method", required=True, choices=("irpo", "scpo"), help="correct vs wrong (gold), or a vote")
    p.add_argument("--pairs-per-question", type=int, default=10, help="IRPO: pairs per question (K)")
    p.add_argument("--tau", type=float, default=0.5, help="ScPO: keep a question when its top answer has >= tau * k votes")
    p.add_argument("--truncated", default="drop", choices=("drop", "keep"),
                   help="a solution cut at its token limit: left out (drop), or only ever rejected (keep)")
    p.add_argument("--no-gold-solution", dest="gold_solution", action="store_false",
                   help="IRPO: leave a question's gold `solution` out of the winners (samples only)")
    p.add_argument("--extra", default=None, help="ScPO: responses.jsonl of more samples of the same questions (hotter): "
                   "they do not vote, but may be the rejected side when their answer has the fewest votes")
    p.add_argument("--seed", type=int, default=0, help="seed of ScPO's tie breaks")
    return p


def parse_args(argv=None):
    a = build_parser().parse_args(argv)
    check_flags(("--pairs-per-question", a.pairs_per_question, a.pairs_per_question >= 1, "at least 1"),
                ("--tau", a.tau, finite(a.tau) and 0 <= a.tau <= 1, "in [0, 1]"))
    return a


def question_pairs(rec, args, extra=None):
    """(answer record, pairs) of one question; `extra` (ScPO): {id: responses record of more samples}. A solution cut at its token limit is never the winner; with
    --truncated drop it takes part in no pair at all. IRPO's winners include the gold `solution` when there is one."""
    texts, cut = list(rec["responses"]), cut_of(rec)
    use = [i for i in range(len(texts)) if not (cut[i] and args.truncated == "drop")]
    answers = [final_answer(t) for t in texts]
    gold = gold_answer(rec["answer"]) if rec.get("answer") is not None else None
    correct = [a is not None and a == gold for a in answers] if gold is not None else None
    info = {"id": rec["id"], "answer": gold, "answers": answers, "correct": correct, "truncated": cut}
    pairs = []
    if args.method == "irpo":
        use = [i for i in use if not (cut[i] and correct[i])]  # a cut right answer is neither winner nor loser
        if args.gold_solution and rec.get("solution"):  # checked on reading: its final answer is the gold one
            texts, cut, correct, use = texts + [rec["solution"]], cut + [False], correct + [True], use + [len(texts)]
        pairs = [(use[w], use[l], 1.0) for w, l in irpo_pairs([correct[i] for i in use], args.pairs_per_question)]
    else:  # --extra: more samples of the question, candidates for the rejected side only (index k + j: `x<j>`)
        more = {"responses": []} if extra is None else extra.get(str(rec["id"]))
        if more is None:
            raise SystemExit(f"{args.extra}: no record for question {rec['id']} of {args.responses}")
        xcut = cut_of(more)
        xuse = [j for j in range(len(more["responses"])) if not (xcut[j] and args.truncated == "drop")]
        rng = random.Random(stable_seed(args.seed, rec["id"]))
        got = scpo_pair([answers[i] for i in use], args.tau, rng, [cut[i] for i in use],
                        [final_answer(more["responses"][j]) for j in xuse])
        texts, cut = texts + more["responses"], cut + xcut
        if got:
            r = got[1]
            pairs = [(use[got[0]], use[r] if r < len(use) else len(rec["responses"]) + xuse[r - len(use)], got[2])]
        info["votes"] = {a: answers.count(a) for a in set(answers) if a is not None}
        info.update({"extra_answers": [final_answer(x) for x in more["responses"]]} if extra is not None else {})
    # IRPO's cycling repeats a pair when a side has few members (its weight in training, by design): the pair's
    # index keeps the ids unique; the gold solution's index is `gold`, an extra sample's `x<j>`
    k = len(rec["responses"])
    name = lambda i: str(i) if i < k else ("gold" if args.method == "irpo" else f"x{i - k}")  # noqa: E731
    out = [{"id": f"{rec['id']}/{j}/{name(c)}/{name(r)}", "prompt": rec["prompt"], **({"system": rec["system"]} if rec.get("system") else {}),
            "chosen": texts[c], "rejected": texts[r], "weight": round(w, 6), "kind": args.method,
            **({"chosen_correct": correct[c], "rejected_correct": correct[r] if r < len(correct) else
                final_answer(texts[r]) == gold} if correct else {}),
            **({"chosen_gold": True} if name(c) == "gold" else {}),
            **({"rejected_truncated": True} if cut[r] else {})} for j, (c, r, w) in enumerate(pairs)]
    return info, out


def main(argv=None):
    args = parse_args(argv)
    records = read_jsonl(args.responses, required=("id", "prompt", "responses"), what="responses record",
                         check=lambda rec: check_responses(rec) or check_gold(rec, args.method == "irpo"))
    extra = None
    if args.extra:
        if args.method != "scpo":
            raise SystemExit("--extra: only --method scpo uses more samples (as rejected candidates)")
        extra = {str(r["id"]): r for r in read_jsonl(args.extra, required=("id", "responses"), what="responses record",
                                                      check=check_responses)}
    infos, pairs = [], []
    for rec in records:
        info, got = question_pairs(rec, args, extra)
        infos.append(info)
        pairs += got
    answered = [a for i in infos for a in i["answers"]]
    kept = {p["id"].rsplit("/", 3)[0] for p in pairs}
    made = [str(r["id"]) for r in records if r.get("generated")]  # --new-prompts: kept only where the vote passes
    counts = {"questions": len(infos), "questions_kept": len(kept), "pairs": len(pairs),
              **({"generated_questions": len(made), "generated_kept": len(kept.intersection(made))} if made else {}),
              **({"rejected_extra": sum(p["id"].rsplit("/", 1)[1].startswith("x") for p in pairs)} if extra is not None else {}),
              "parse_rate": round(sum(a is not None for a in answered) / max(len(answered), 1), 4),
              **({"gold_solution_pairs": sum("chosen_gold" in p for p in pairs)} if args.method == "irpo" else {})}
    if all(i["correct"] is not None for i in infos):
        flat = [c for i in infos for c in i["correct"]]
        counts["sample_accuracy"] = round(sum(flat) / max(len(flat), 1), 4)
        if pairs:  # how often the chosen side is right, minus how often the rejected side is (1.0 for IRPO)
            counts["accuracy_margin"] = round(sum(p["chosen_correct"] - p["rejected_correct"] for p in pairs) / len(pairs), 4)
    if int(os.environ.get("RANK", 0)) == 0:
        write_jsonl(args.out, pairs)
        write_jsonl(os.path.splitext(args.out)[0] + ".answers.jsonl", infos)
    print(f"{args.method} | " + " | ".join(f"{k} {v}" for k, v in counts.items()), flush=True)
    return counts


# -----------------------------------------------------------------------------
# The stages in iterate.py's plan


def loop_stages(args, t, f, seed, model_in):
    """IRPO and ScPO: the verifier (gold answers) or the vote in place of the judges; ScPO's --extra-samples
    (hotter, another seed) first."""
    argv = ["--responses", f("responses.jsonl"), "--out", f("reasoning_pairs.jsonl"), "--method", args.method,
            "--pairs-per-question", str(args.pairs_per_question), "--tau", schedule(args.tau, t),
            "--truncated", args.truncated, "--seed", seed] + ([] if args.gold_solution else ["--no-gold-solution"])
    if not args.extra_samples:
        return [("reasoning_pairs", "reasoning", argv)], [f("reasoning_pairs.jsonl")]
    extra = actor_argv(args, t, f, str(10 ** 9 + int(seed)), model_in, "extra_responses.jsonl", args.extra_samples,
                       args.extra_temperature)
    return [("extra_responses", "sample", extra), ("reasoning_pairs", "reasoning", argv + ["--extra", f("extra_responses.jsonl")])], \
        [f("reasoning_pairs.jsonl")]


if __name__ == "__main__":
    main()
