"""
Self-instruct: the model writes new prompts few-shot from a pool of examples (Self-Rewarding's first step).
Each call shows `--shots` prompts drawn from the pool and the prompts accepted so far; the new request is
parsed out of the reply, cleaned, and kept only if its word-trigram overlap with every known prompt is at
most `--max-overlap`.

    python self_instruct.py --pool data/prompts.jsonl --out runs/x/new_prompts.jsonl --count 200
    python self_instruct.py --model DIR --pool data/prompts.jsonl --out new.jsonl --count 5000 --shots 8 \
        --generated-shots 2 --temperature 0.6 --top-p 0.9        # Self-Rewarding's values: 6 seed + 2 written examples
    python self_instruct.py --pool gsm8k_train.jsonl --template data/templates/question.txt --out q.jsonl --count 500 \
        --shots 4 --temperature 0.7 --top-p 0.9                  # ScPO's new questions (GSM8K's files are read as is)

Resumable: accepted prompts are appended as they come, each with the call that produced it; a re-run
continues from the call after the last accepted one and decides exactly as an uninterrupted run would. A re-run
with other settings is refused, naming what changed (--redo starts over); a larger --count continues. Under
torchrun (iterate.py --new-prompts) rank 0 writes every prompt while the other ranks wait.
"""
import argparse
import os
import random
import re
import time

from common import (TEMPLATES, ShardWriter, barrier, check_flags, done_records, init_distributed, load_model,
                    load_template, merge_shards, read_jsonl, render, stable_seed, start_stage)
from sample import Request, add_engine_args, add_sampling_args, complete, stage_settings

LABEL = re.compile(r"^\s*(?:\*\*)?\s*(?:new\s+)?(?:request|task|instruction|prompt)\s*\d*\s*(?:\*\*)?\s*[:：]\s*(?:\*\*)?\s*", re.I)
BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")


def parse_request(text):
    """The new request in a reply: the text after the last `Request:` label, else the first non-empty line;
    bullets, numbering and surrounding quotes removed. None when nothing is left."""
    lines = [line for line in text.splitlines() if line.strip()]
    labelled = [line for line in lines if LABEL.match(line)]
    line = LABEL.sub("", labelled[-1]) if labelled else (lines[0] if lines else "")
    line = BULLET.sub("", line).strip().strip('"“”\'` ').strip()
    return line or None


def words(text):
    return re.findall(r"[a-z0-9']+", text.lower())


def ngrams(text, n=3):
    w = words(text)
    n = min(n, len(w)) or 1
    return {tuple(w[i:i + n]) for i in range(max(len(w) - n + 1, 0))}


class OverlapIndex:
    """Known prompts' word trigrams, for the share of a candidate's trigrams found in any one known prompt."""

    def __init__(self):
        self.by_gram, self.n = {}, 0

    def add(self, text):
        for g in ngrams(text):
            self.by_gram.setdefault(g, set()).add(self.n)
        self.n += 1

    def max_overlap(self, text):
        grams = ngrams(text)
        if not grams:
            return 1.0
        hits = {}
        for g in grams:
            for i in self.by_gram.get(g, ()):
                hits[i] = hits.get(i, 0) + 1
        return max(hits.values(), default=0) / len(grams)


def check(text, index, max_overlap, min_words=4, max_words=200):
    """None if the candidate is acceptable, else the reason it is rejected."""
    if text is None:
        return "no request found"
    n = len(words(text))
    if n < min_words:
        return "too short"
    if n > max_words:
        return "too long"
    if text.rstrip().endswith(":"):
        return "a lead-in, not a request"
    if index.max_overlap(text) > max_overlap:
        return "overlaps a known prompt"
    return None


def build_parser():
    parser = argparse.ArgumentParser(description="Write new prompts few-shot from a pool (self-instruct).")
    parser.add_argument("--model", default=None, help="HF checkpoint folder or Hub id (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--pool", required=True, help="example prompts (JSONL id, prompt)")
    parser.add_argument("--out", required=True, help="JSONL of new prompts (appended; resumed if present)")
    parser.add_argument("--count", type=int, default=100, help="new prompts wanted")
    parser.add_argument("--shots", type=int, default=8, help="example prompts shown per call")
    parser.add_argument("--generated-shots", type=int, default=0,
                        help="of the --shots, how many are prompts written in this run (the rest from the pool; fewer "
                             "while fewer exist); 0: all drawn from pool and written prompts together")
    parser.add_argument("--max-overlap", type=float, default=0.5, help="largest word-trigram overlap with a known prompt")
    parser.add_argument("--max-calls", type=int, default=0, help="give up after this many calls (default 10 x --count)")
    parser.add_argument("--batch", type=int, default=32, help="calls generated together")
    parser.add_argument("--template", default=os.path.join(TEMPLATES, "self_instruct.txt"), help="template with {examples}")
    add_sampling_args(parser, "reply", 1.0, 0.95, 96, seed="seed of the example draws and sampling")
    parser.add_argument("--id-prefix", default="si", help="ids are <prefix>-<seed>-<number>")
    add_engine_args(parser)
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    check_flags(("--count", args.count, args.count >= 1, "at least 1"), ("--shots", args.shots, args.shots >= 1, "at least 1"),
                ("--generated-shots", args.generated_shots, 0 <= args.generated_shots <= args.shots, "in [0, --shots]"),
                ("--batch", args.batch, args.batch >= 1, "at least 1"))
    return args


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = init_distributed()
    if rank > 0:  # each call depends on the prompts accepted before it: rank 0 writes them all, the others wait
        barrier(world)
        return {}
    # our prompt records, or questions as GSM8K's files give them (`question`, no id)
    pool = [p.get("prompt", p.get("question")) for p in read_jsonl(args.pool, required=(), what="prompt", check=lambda p: None
            if isinstance(p.get("prompt", p.get("question")), str) else "needs a string `prompt` (or GSM8K's `question`)")]
    template = load_template(args.template, ("examples",))
    model, tok, path = load_model(args.model, device, args.dtype, args.chat_format)
    # what decides each call (not --count or --max-calls: asking for more continues a run); --redo starts over
    keep = ("shots", "generated_shots", "max_overlap", "batch", "temperature", "top_p", "max_new_tokens", "seed", "id_prefix", "dtype", "chat_format")
    start_stage(args.out, stage_settings(args, path, ("pool", "template"), keep), args.redo, 0, 1)
    done = sorted(done_records(args.out), key=lambda r: r["call"])
    accepted = [(r["prompt"], r["call"]) for r in done]
    index = OverlapIndex()
    for p in pool + [p for p, _ in accepted]:
        index.add(p)
    call = done[-1]["call"] + 1 if done else 0
    max_calls = args.max_calls or 10 * args.count
    writer = ShardWriter(args.out, 0)
    rejected, t0 = {}, time.time()
    from tqdm import tqdm
    bar = tqdm(total=args.count, initial=min(len(accepted), args.count), desc="self-instruct", unit="prompt")
    while len(accepted) < args.count and call < max_calls:
        # batches are aligned to multiples of --batch and a call's examples come from the prompts accepted
        # before its batch began, so a resumed run draws exactly the examples an uninterrupted one would
        start = call - call % args.batch
        calls = list(range(call, min(start + args.batch, max_calls)))
        known = pool + [p for p, c in accepted if c < start]
        requests = []
        for c in calls:
            rng = random.Random(stable_seed(args.seed, c))
            shots = rng.sample(known, min(args.shots, len(known)))
            if args.generated_shots:  # that many of the prompts written so far (while there are), the rest from the pool
                made = known[len(pool):]
                mine = rng.sample(made, min(args.generated_shots, len(made)))
                shots = rng.sample(pool, min(args.shots - len(mine), len(pool))) + mine
            examples = "\n".join(f"Request: {s}" for s in shots)
            requests.append(Request(tok.encode_prompt(render(template, examples=examples)), n=1,
                                    temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                    stop_ids=tuple(tok.stop_ids), stop_strings=tuple(args.stop) + template.stops,
                                    decode=tok.decode, seed=stable_seed(args.seed, f"call{c}")))
        outs = complete(model, requests, max_rows=args.max_rows, max_cache_tokens=args.max_cache_tokens)
        for c, comps in zip(calls, outs):  # in call order, so a resumed run decides exactly as this one
            text = parse_request(comps[0].text)
            why = check(text, index, args.max_overlap)
            if why is None and len(accepted) < args.count:
                rec = {"id": f"{args.id_prefix}-{args.seed}-{len(accepted):05d}", "prompt": text, "call": c}
                writer.write(rec)
                accepted.append((text, c))
                index.add(text)
                bar.update(1)
            elif why is not None:
                rejected[why] = rejected.get(why, 0) + 1
        call = calls[-1] + 1
    bar.close()
    writer.close()
    merge_shards(args.out, [])
    barrier(world)
    print(f"self-instruct | accepted {len(accepted)} of {args.count} wanted | calls {call} | rejected {rejected} | "
          f"{time.time() - t0:.1f}s")
    return {"accepted": len(accepted), "calls": call, "rejected": rejected}


if __name__ == "__main__":
    main()
