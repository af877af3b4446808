"""
The Self-Taught Evaluator (Wang et al. 2024): a judge improved without labels. For a request x and the model's
answer y+, a worse answer y- is made on purpose: the answer to a related but different request x' that the model
writes itself (or, for models too small to write x', --other-prompt: the answer to another request of the pool).
So y+ is better for x by construction. The model judges (x, y+, y-) pairwise in both orders, reasoning first and
a `[[A]]` / `[[B]]` verdict last; the judgments whose verdict matches the known label are kept, with as many A as
B labels, and the judge is fine-tuned on them (SFT; the correct vs wrong judgments of one prompt also make DPO
pairs). Iterations start again from the seed model, with the labels of the newest judge.

    python evaluator.py --step contrast --responses runs/x/iter1/responses.jsonl --out runs/x/iter1/contrast.jsonl --other-prompt
    python evaluator.py --step judge --contrast runs/x/iter1/contrast.jsonl --out runs/x/iter1/pairwise.jsonl --n-judgments 4
    python evaluator.py --step select --judged runs/x/iter1/pairwise.jsonl --out runs/x/iter1/ste_sft.jsonl
    python iterate.py --preset ste-demo --run-dir runs/ste          # the loop on the embedded model

Judge quality is pairwise accuracy on labelled pairs, counted position-consistently (right in both orders = 1,
in one = 1/2): `evaluate.py --metric judge-accuracy --prompts pairs.jsonl` (any prompt/chosen/rejected file).
"""
import argparse
import math
import os
import random
import re

import judge
import sample
from common import (TEMPLATES, check_flags, check_prompt_fields, init_distributed, load_template, print0, read_jsonl, render,
                    stable_seed, write0)
from presets import schedule
from sample import engine_flags

VERDICT = re.compile(r"\[\[\s*([AB])\s*\]\]")
VERDICT_MARK = re.compile(r"(?:verdict\s*[:：]\s*)?\[\[", re.IGNORECASE)

# -----------------------------------------------------------------------------
# The rules


def parse_pairwise(text):
    """"A" or "B": the last `[[A]]` / `[[B]]` of a judgment; None when there is none, or when both letters
    appear (an echo of the instructions, or a judge that changed its mind and left both)."""
    found = [m.group(1) for m in VERDICT.finditer(text)]
    if not found or len(set(found)) > 1:
        return None
    return found[-1]


def balance(items, rng):
    """Keep as many items labelled "A" as "B" (a random subset of the larger side), so that a judge trained on
    them cannot gain by preferring one position."""
    a = [x for x in items if x["label"] == "A"]
    b = [x for x in items if x["label"] == "B"]
    n = min(len(a), len(b))
    keep = rng.sample(a, n) + rng.sample(b, n)
    return sorted(keep, key=lambda x: x["id"])


def consistent_accuracy(first, second):
    """Position-consistent pairwise accuracy of one labelled pair: `first` the verdict with the better answer
    shown as A (right = "A"), `second` with it shown as B (right = "B"): 1 if right both times, 1/2 once, 0."""
    return ((first == "A") + (second == "B")) / 2


def other_prompt_pairs(records, seed):
    """--other-prompt contrast pairs: y- of each record is the first response of the next record, in a shuffled
    cyclic order, that answers another request and differs from the record's own y+ (an answer identical to y+,
    or one to the same request, is no worse than it). -> (pairs, how many records had no such partner)."""
    first, n = [r["responses"][0] for r in records], len(records)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    place = {i: k for k, i in enumerate(order)}
    pairs = []
    for i, r in enumerate(records):
        later = (order[(place[i] + j) % n] for j in range(1, n))
        other = next((m for m in later if first[m] != first[i] and records[m]["prompt"] != r["prompt"]), None)
        if other is not None:
            pairs.append({"id": str(r["id"]), "prompt": r["prompt"], "chosen": first[i], "rejected": first[other],
                          "how": "other prompt"})
    return pairs, n - len(pairs)


def sigmoid(x):
    """1 / (1 + e^-x) for any x, inf included: e is only ever raised to a power <= 0, so nothing overflows."""
    if x >= 0:
        return 1 / (1 + math.exp(-x))
    e = math.exp(x)
    return e / (1 + e)


def letter(logp_a, logp_b, temperature, seed):
    """The verdict letter from the judge's own log-probabilities of A and B: the likelier one at temperature 0,
    else drawn from softmax(logp / temperature) over the two, as the judge would if it wrote the letter itself
    (a judge that prefers one position 80:20 still says the other one a fifth of the time)."""
    if temperature <= 0:
        return "A" if logp_a > logp_b else "B" if logp_b > logp_a else None
    p_b = sigmoid((logp_b - logp_a) / temperature)  # a tiny temperature makes the ratio huge: stable form
    return "B" if random.Random(seed).random() < p_b else "A"


def check_pair(rec):
    """A labelled pair: a non-empty prompt and two different answers (the same text twice has no better side)."""
    problem = check_prompt_fields(rec)
    if problem or not all(isinstance(rec[k], str) for k in ("chosen", "rejected")):
        return problem or "`chosen` and `rejected` must be strings"
    return "`chosen` and `rejected` are the same text: neither is better" if rec["chosen"] == rec["rejected"] else None


def read_stage_input(path, what, required, check=None):
    """The records a step before wrote; a file it left empty (it made none) is no records, said plainly, so
    that the steps after it pass through with nothing to do instead of failing on every re-run."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        print0(f"{path}: no {what}s (the step that wrote it made none); nothing to do")
        return []
    return read_jsonl(path, required=required, what=what, check=check)


def orders(pair):
    """The two presentations of a labelled pair: (suffix, answer A, answer B, the right verdict)."""
    return (("ab", pair["chosen"], pair["rejected"], "A"), ("ba", pair["rejected"], pair["chosen"], "B"))


# -----------------------------------------------------------------------------
# The steps


def step_contrast(args):
    """The labelled pairs (x, y+, y-) -> (pairs, records without a pair by reason: no_request, the model wrote no
    usable x'; no_answer, its answer to x' is empty; same_text, y- would be y+ itself, and nothing in it is worse;
    no_partner, --other-prompt found no answer to another request that differs from y+)."""
    recs = read_jsonl(args.responses, required=("id", "prompt", "responses"), what="responses record",
                      check=judge.check_responses_record)
    if args.other_prompt:
        if len(recs) < 2:
            raise SystemExit(f"{args.responses}: --other-prompt needs at least 2 records (y- is the answer to another "
                             f"request), and it holds {len(recs)}")
        pairs, alone = other_prompt_pairs(recs, args.seed)
        return pairs, {"no_partner": alone}
    # the model writes x' for each request, then answers it: two resumable generation stages
    import self_instruct
    work = os.path.splitext(args.out)[0]
    t = load_template(args.contrast_template, ("prompt",))
    write0(f"{work}.requests.jsonl", [{"id": str(r["id"]), "prompt": render(t, prompt=r["prompt"])} for r in recs])
    sample.main(sample.argv_for(args, args.model, f"{work}.requests.jsonl", f"{work}.new_requests.jsonl"))
    new = {str(r["id"]): self_instruct.parse_request(r["responses"][0]) for r in read_jsonl(f"{work}.new_requests.jsonl")}
    # an x' that only repeats x would make y- an answer to the same request
    asked = [r for r in recs if new.get(str(r["id"])) and new[str(r["id"])] != r["prompt"].strip()]
    other = {}
    if asked:  # (sample.py refuses an empty prompt file)
        write0(f"{work}.other.jsonl", [{"id": str(r["id"]), "prompt": new[str(r["id"])]} for r in asked])
        sample.main(sample.argv_for(args, args.model, f"{work}.other.jsonl", f"{work}.other_answers.jsonl"))
        other = {str(r["id"]): r["responses"][0] for r in read_jsonl(f"{work}.other_answers.jsonl")}
    answered = [r for r in asked if other.get(str(r["id"]))]
    pairs = [{"id": str(r["id"]), "prompt": r["prompt"], "chosen": r["responses"][0], "rejected": other[str(r["id"])],
              "other_prompt": new[str(r["id"])], "how": "modified prompt"}
             for r in answered if other[str(r["id"])] != r["responses"][0]]
    return pairs, {"no_request": len(recs) - len(asked), "no_answer": len(asked) - len(answered),
                   "same_text": len(answered) - len(pairs)}


def step_judge(args):
    """Pairwise judgments of every labelled pair in both orders (sample.py does the generation, resumably),
    each judgment's verdict parsed or, in expected mode, the likelier of A and B after `Verdict: [[`."""
    pairs = read_stage_input(args.contrast, "labelled pair", ("id", "prompt", "chosen", "rejected"), check_pair)
    if not pairs:
        return []
    t = load_template(args.template, ("prompt", "response_a", "response_b"))
    work = os.path.splitext(args.out)[0]
    rows = [{"id": f"{p['id']}/{o}", "prompt": render(t, prompt=p["prompt"], response_a=a, response_b=b), "label": right}
            for p in pairs for o, a, b, right in orders(p)]
    write0(f"{work}.prompts.jsonl", rows)
    # expected mode: the letters' log-probs after `Verdict: [[`, read where each judgment ends
    probe = (lambda tok: judge.make_probe(tok, VERDICT_MARK, judge.probe_candidates(tok, "Verdict: [[", ["A", "B"]))) \
        if args.verdict_mode == "expected" else None
    sample.main(sample.argv_for(args, args.model, f"{work}.prompts.jsonl", f"{work}.texts.jsonl", args.n_judgments, dedup=False),
                probe=probe)
    judged = read_jsonl(f"{work}.texts.jsonl")
    out = []
    for rec in judged:
        texts = rec["responses"]
        verdicts = [parse_pairwise(x) for x in texts]
        if args.verdict_mode == "expected":
            lps = rec["probes"]
            verdicts = [letter(a, b, args.temperature, stable_seed(args.seed, f"{rec['id']}/{k}")) for k, (a, b) in enumerate(lps)]
            p_a = [sigmoid(a - b) for a, b in lps]  # p(A) among the two letters
            # the verdict the judgment ends with, written out, so a model trained on it learns the format too
            texts = [judge.cut_at_last(x, VERDICT_MARK) + (f"\nVerdict: [[{v}]]" if v else "") for x, v in zip(texts, verdicts)]
        out.append({"id": rec["id"], "prompt": rec["prompt"], "label": rec["label"], "judgments": texts,
                    "verdicts": verdicts, "finish_reasons": rec["finish_reasons"],
                    **({"verdict_written": True, "p_a": [round(x, 6) for x in p_a]} if args.verdict_mode == "expected" else {})})
    return out


def step_select(args):
    """Rejection sampling: per prompt (a pair in one order) the first judgment whose verdict is the label and
    that ended (on its own, or in expected mode with its verdict written out after the cut); labels balanced.
    -> SFT records; the DPO pairs (a right and a wrong judgment of one prompt) go to <out root>.pairs.jsonl."""
    judged = read_stage_input(args.judged, "pairwise record", ("id", "prompt", "label", "judgments", "verdicts"))
    right, pairs = [], []
    for rec in judged:
        ended = [rec.get("verdict_written") or f != "length" for f in rec["finish_reasons"]]
        ok = [k for k, v in enumerate(rec["verdicts"]) if v == rec["label"] and ended[k]]
        bad = [k for k, v in enumerate(rec["verdicts"]) if v != rec["label"]]
        if ok:
            right.append({"id": rec["id"], "prompt": rec["prompt"], "completion": rec["judgments"][ok[0]],
                          "label": rec["label"], "kind": "ste"})
            if bad:
                pairs.append({"id": rec["id"], "prompt": rec["prompt"], "chosen": rec["judgments"][ok[0]],
                              "rejected": rec["judgments"][bad[0]], "label": rec["label"], "kind": "ste"})
    rng = random.Random(stable_seed(args.seed, "balance"))
    return balance(right, rng), balance(pairs, rng), len(right)


def build_parser():
    p = argparse.ArgumentParser(description="Self-Taught Evaluator: contrasting pairs, pairwise judgments, selection.")
    p.add_argument("--step", required=True, choices=("contrast", "judge", "select"), help="which step")
    p.add_argument("--model", default=None, help="HF folder or Hub id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="the file this step writes")
    p.add_argument("--responses", help="contrast: responses.jsonl (y+ = each record's first response)")
    p.add_argument("--other-prompt", action="store_true", help="contrast: y- is the answer to another request of the pool")
    p.add_argument("--contrast-template", default=os.path.join(TEMPLATES, "contrast.txt"), help="contrast: writes x' ({prompt})")
    p.add_argument("--contrast", help="judge: the labelled pairs (prompt, chosen, rejected)")
    p.add_argument("--template", default=os.path.join(TEMPLATES, "pairwise.txt"), help="judge: ({prompt}, {response_a}, {response_b})")
    p.add_argument("--n-judgments", type=int, default=4, help="judge: judgments per pair and order")
    p.add_argument("--verdict-mode", default="parse", choices=("parse", "expected"),
                   help="judge: parse [[A]]/[[B]], or read the letter after `Verdict: [[` from its probabilities (small models)")
    p.add_argument("--judged", help="select: the judge step's output")
    sample.add_sampling_args(p, "judgment, x' and y-", 0.8, 1.0, 256, seed="seed (pairing, sampling, balancing)",
                             limit="length limit of what is generated (give y- the limit y+ had)")
    sample.add_engine_args(p, passed_on=True)
    return p


def parse_args(argv=None):
    a = build_parser().parse_args(argv)
    need = {"contrast": a.responses, "judge": a.contrast, "select": a.judged}[a.step]
    check_flags((f"--step {a.step}", a.step, need is not None, "given its input (--responses, --contrast or --judged)"),
                ("--n-judgments", a.n_judgments, a.n_judgments >= 1, "at least 1"), *sample.sampling_rules(a),
                *sample.engine_rules(a))
    return a


def main(argv=None):
    args = parse_args(argv)
    init_distributed()
    if args.step == "contrast":
        out, dropped = step_contrast(args)
        counts = {"pairs": len(out), **dropped}
        if not out:  # an empty file, not an error: the steps after pass through it, as the loop's other pair stages do
            print0(f"evaluator contrast | no pair from {args.responses} (records without one: {dropped}); {args.out} is "
                   "empty and the judge and select steps have nothing to do")
    elif args.step == "judge":
        out = step_judge(args)
        verdicts = [(v, r["label"]) for r in out for v in r["verdicts"]]
        counts = {"prompts": len(out), "judgments": len(verdicts), "unparsed": sum(v is None for v, _ in verdicts),
                  "right": sum(v == lab for v, lab in verdicts), "first_position": sum(v == "A" for v, _ in verdicts)}
    else:
        out, dpo, right = step_select(args)
        counts = {"right_prompts": right, "sft_records": len(out), "dpo_pairs": len(dpo)}
        write0(os.path.splitext(args.out)[0] + ".pairs.jsonl", dpo)
    write0(args.out, out)
    print(f"evaluator {args.step} | " + " | ".join(f"{k} {v}" for k, v in counts.items()), flush=True)
    return counts


# -----------------------------------------------------------------------------
# The stages in iterate.py's plan


def loop_stages(args, t, f, seed, model_in):
    """The Self-Taught Evaluator: in iteration 1 the labelled pairs (x, y+, y-), made once, by the seed model, y- with
    the same sampling and token limit as y+ (no length cue), and the held-out labelled pairs every iteration is
    scored on; in every iteration the newest judge's verdicts on iteration 1's pairs in both orders, the right ones
    (labels balanced) as SFT data for the seed."""
    d = os.path.dirname(f("x"))
    first = os.path.join(args.run, "iter1")
    stages = eval_pair_stages(args, d) if t == 1 and not args.sft_data else []
    if args.select == "val" and t == 1:  # the epoch is chosen by judge accuracy on pairs made from held-out prompts
        stages += labelled_pair_stages(args, d, f("val_prompts.jsonl"), "val", 0)
    contrast = ["--other-prompt"] if args.other_prompt else ["--model", model_in, "--temperature", schedule(args.temperature, 1),
                                                            "--top-p", str(args.top_p), "--max-new-tokens", str(args.max_new_tokens)] + engine_flags(args)
    if t == 1:
        stages.append(("contrast", "evaluator", ["--step", "contrast", "--responses", f("responses.jsonl"), "--out",
                                                 f("contrast.jsonl"), "--seed", seed] + contrast))
    stages += [("pairwise", "evaluator", ["--step", "judge", "--model", model_in, "--contrast", os.path.join(first, "contrast.jsonl"),
                                        "--out", f("pairwise.jsonl"), "--n-judgments", str(args.n_judgments),
                                        "--verdict-mode", args.verdict_mode, "--temperature", schedule(args.judge_temperature, t),
                                        "--top-p", str(args.judge_top_p),
                                        "--max-new-tokens", str(args.judge_max_new_tokens), "--seed", seed] + engine_flags(args)),
               ("select", "evaluator", ["--step", "select", "--judged", f("pairwise.jsonl"), "--out", f("ste_sft.jsonl"),
                                      "--seed", seed])]
    return stages, [f("ste_sft.jsonl")]


def eval_pair_stages(args, d):
    """The Self-Taught Evaluator's held-out labelled pairs, made once in the run's first iteration (0 or 1) and
    scored by every iteration's evaluation: the seed's answers to the evaluation prompts, each paired with the
    answer to another of them."""
    if args.method != "self-taught-evaluator" or args.eval_prompts_n < 0:
        return []
    stages = labelled_pair_stages(args, d, args.eval_prompts, "eval", args.eval_prompts_n)
    if not args.other_prompt:  # also the harder pairs: y- the seed's answer to its own modified request x'
        stages.append(("eval_modified_pairs", "evaluator", [
            "--step", "contrast", "--model", args.model, "--responses", os.path.join(d, "eval_answers.jsonl"), "--out",
            os.path.join(d, "eval_modified_pairs.jsonl"), "--temperature", schedule(args.temperature, 1), "--top-p",
            str(args.top_p), "--max-new-tokens", str(args.eval_max_new_tokens), "--seed", str(args.seed * 1000 + 1)] + engine_flags(args)))
    return stages


def labelled_pair_stages(args, d, prompts, name, limit):
    """Labelled pairs for judge accuracy: the seed's answers to `prompts`, each paired with the answer to another
    of them (<name>_answers.jsonl, <name>_pairs.jsonl in d)."""
    f, seed = lambda x: os.path.join(d, f"{name}_{x}.jsonl"), str(args.seed * 1000 + 1)  # noqa: E731
    return [(f"{name}_answers", "sample", ["--model", args.model, "--prompts", prompts, "--limit", str(limit), "--out",
                                         f("answers"), "--n-responses", "1", "--temperature", schedule(args.temperature, 1), "--top-p", str(args.top_p),
                                         "--max-new-tokens", str(args.eval_max_new_tokens), "--seed", seed] + engine_flags(args)),
            (f"{name}_pairs", "evaluator", ["--step", "contrast", "--other-prompt", "--responses", f("answers"),
                                          "--out", f("pairs"), "--seed", seed])]


if __name__ == "__main__":
    main()
