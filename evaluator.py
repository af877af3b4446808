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

import torch

import sample
from common import (TEMPLATES, barrier, check_flags, init_distributed, load_model, load_template, read_jsonl, render,
                    stable_seed, write_jsonl)

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
    """--other-prompt contrast pairs: y- of each record is the first response to the next record in a shuffled
    order (a derangement, so never its own)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    nxt = {order[k]: order[(k + 1) % len(order)] for k in range(len(order))}
    return [{"id": str(r["id"]), "prompt": r["prompt"], "chosen": r["responses"][0],
             "rejected": records[nxt[i]]["responses"][0], "how": "other prompt"} for i, r in enumerate(records)]


def letter(logp_a, logp_b, temperature, seed):
    """The verdict letter from the judge's own log-probabilities of A and B: the likelier one at temperature 0,
    else drawn from softmax(logp / temperature) over the two, as the judge would if it wrote the letter itself
    (a judge that prefers one position 80:20 still says the other one a fifth of the time)."""
    if temperature <= 0:
        return "A" if logp_a > logp_b else "B" if logp_b > logp_a else None
    p_b = 1 / (1 + math.exp((logp_a - logp_b) / temperature))
    return "B" if random.Random(seed).random() < p_b else "A"


def write0(path, recs):
    """Rank 0 writes a derived file; every rank waits for it (the next step reads it on all of them)."""
    if int(os.environ.get("RANK", 0)) == 0:
        write_jsonl(path, recs)
    barrier(int(os.environ.get("WORLD_SIZE", 1)))


def orders(pair):
    """The two presentations of a labelled pair: (suffix, answer A, answer B, the right verdict)."""
    return (("ab", pair["chosen"], pair["rejected"], "A"), ("ba", pair["rejected"], pair["chosen"], "B"))


# -----------------------------------------------------------------------------
# The steps


def step_contrast(args):
    recs = read_jsonl(args.responses, required=("id", "prompt", "responses"), what="responses record")
    if args.other_prompt:
        return other_prompt_pairs(recs, args.seed)
    # the model writes x' for each request, then answers it: two resumable generation stages
    import self_instruct
    work = os.path.splitext(args.out)[0]
    t = load_template(args.contrast_template, ("prompt",))
    write0(f"{work}.requests.jsonl", [{"id": str(r["id"]), "prompt": render(t, prompt=r["prompt"])} for r in recs])
    gen = lambda src, out: sample.main(["--prompts", src, "--out", out, "--n-responses", "1", "--temperature",  # noqa: E731
                                        str(args.temperature), "--max-new-tokens", str(args.max_new_tokens),
                                        "--seed", str(args.seed)] + (["--model", args.model] if args.model else []))
    gen(f"{work}.requests.jsonl", f"{work}.new_requests.jsonl")
    new = {str(r["id"]): self_instruct.parse_request(r["responses"][0]) for r in read_jsonl(f"{work}.new_requests.jsonl")}
    asked = [r for r in recs if new.get(str(r["id"]))]
    write0(f"{work}.other.jsonl", [{"id": str(r["id"]), "prompt": new[str(r["id"])]} for r in asked])
    gen(f"{work}.other.jsonl", f"{work}.other_answers.jsonl")
    other = {str(r["id"]): r["responses"][0] for r in read_jsonl(f"{work}.other_answers.jsonl")}
    return [{"id": str(r["id"]), "prompt": r["prompt"], "chosen": r["responses"][0], "rejected": other[str(r["id"])],
             "other_prompt": new[str(r["id"])], "how": "modified prompt"} for r in asked if other.get(str(r["id"]))]


def step_judge(args):
    """Pairwise judgments of every labelled pair in both orders (sample.py does the generation, resumably),
    each judgment's verdict parsed or, in expected mode, the likelier of A and B after `Verdict: [[`."""
    pairs = read_jsonl(args.contrast, required=("id", "prompt", "chosen", "rejected"), what="labelled pair")
    t = load_template(args.template, ("prompt", "response_a", "response_b"))
    work = os.path.splitext(args.out)[0]
    rows = [{"id": f"{p['id']}/{o}", "prompt": render(t, prompt=p["prompt"], response_a=a, response_b=b), "label": right}
            for p in pairs for o, a, b, right in orders(p)]
    write0(f"{work}.prompts.jsonl", rows)
    sample.main(["--prompts", f"{work}.prompts.jsonl", "--out", f"{work}.texts.jsonl", "--n-responses", str(args.n_judgments),
                 "--no-dedup", "--temperature", str(args.temperature), "--max-new-tokens", str(args.max_new_tokens),
                 "--seed", str(args.seed)] + (["--model", args.model] if args.model else []))
    judged = read_jsonl(f"{work}.texts.jsonl")
    if args.verdict_mode == "expected":
        import judge
        model, tok, _ = load_model(args.model, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        expect = judge.probe_candidates(tok, "Verdict: [[", ["A", "B"])
    out = []
    for rec in judged:
        texts = rec["responses"]
        verdicts = [parse_pairwise(x) for x in texts]
        if args.verdict_mode == "expected":
            lps = judge.probe_logprobs(model, tok, [tok.encode_prompt(rec["prompt"])] * len(texts), texts, VERDICT_MARK,
                                       expect).tolist()
            verdicts = [letter(a, b, args.temperature, stable_seed(args.seed, f"{rec['id']}/{k}")) for k, (a, b) in enumerate(lps)]
            p_a = [1 / (1 + math.exp(b - a)) for a, b in lps]  # p(A) among the two letters
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
    judged = read_jsonl(args.judged, required=("id", "prompt", "label", "judgments", "verdicts"), what="pairwise record")
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
    p.add_argument("--model", default=None, help="HF folder (default: the embedded SmolLM2-135M-Instruct)")
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
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (judgments, x', y-)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="length limit of what is generated")
    p.add_argument("--seed", type=int, default=0, help="seed (pairing, sampling, balancing)")
    return p


def parse_args(argv=None):
    a = build_parser().parse_args(argv)
    need = {"contrast": a.responses, "judge": a.contrast, "select": a.judged}[a.step]
    check_flags((f"--step {a.step}", a.step, need is not None, "given its input (--responses, --contrast or --judged)"),
                ("--n-judgments", a.n_judgments, a.n_judgments >= 1, "at least 1"),
                ("--max-new-tokens", a.max_new_tokens, a.max_new_tokens >= 1, "at least 1"))
    return a


def main(argv=None):
    args = parse_args(argv)
    init_distributed()
    if args.step == "contrast":
        out = step_contrast(args)
        counts = {"pairs": len(out)}
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


if __name__ == "__main__":
    main()
