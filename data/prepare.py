"""
The public datasets of the papers' settings, fetched from the Hugging Face Hub and written in this project's formats.

    python data/prepare.py oasst --out data/oasst_trees.jsonl               # for eft.py --oasst
    python data/prepare.py gsm8k --split test --out data/gsm8k_test.jsonl   # the Hub's parquet needs pyarrow, or:
    python data/prepare.py gsm8k --split test --from test.jsonl --out data/gsm8k_test.jsonl   # GSM8K's GitHub JSONL
    python data/prepare.py alpaca-eval --out data/alpaca_eval.jsonl         # for evaluate.py --prompts
    python data/prepare.py arena-hard --out data/arena_hard.jsonl           # its 500 questions, ids = question_id
    python data/prepare.py ultrafeedback-prompts --out data/ultrafeedback_prompts.jsonl

huggingface_hub (optional) downloads, with its cache, token and HF_HUB_OFFLINE; `--from FILE ...` converts local copies
in the published format instead (.gz read as such). oasst: the "ready" trees as published, one a line, less those
with a deleted or empty prompt or a repeated tree id. gsm8k: id, prompt, answer (the number after ####), solution
(GSM8K's, without its calculator notes, ending `Final answer: N`). alpaca-eval: id, prompt (the instruction verbatim:
AlpacaEval matches answers on it), dataset. arena-hard: id (its question_id, which --export-arena-hard writes back),
prompt (the first turn), category. ultrafeedback-prompts: id (a hash of the prompt), prompt, source, from
openbmb/UltraFeedback's six JSONL files (or rows with a `prompt`), each prompt once (exact text after stripping).
"""
import argparse
import gzip
import hashlib
import importlib.util
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import hub_fetch  # noqa: E402


def oasst(row, i, split):
    root = row.get("prompt", False)
    if root is not None and not isinstance(root, dict):
        return None
    if not root or not isinstance(root.get("text"), str) or not root["text"].strip() or root.get("deleted"):
        return "deleted or empty prompt"
    tid = row.get("message_tree_id") or root.get("message_id")
    return (str(tid), row) if tid else "no tree id"


def gsm8k(row, i, split):
    q, a = row.get("question"), row.get("answer")
    if not isinstance(q, str) or not isinstance(a, str) or "####" not in a:
        return None
    steps, gold = a.rsplit("####", 1)
    gold = gold.strip().replace(",", "")  # 1,200 -> 1200
    steps = re.sub(r"<<[^>]*>>", "", steps).strip()  # the calculator notes: <<48/2=24>>
    rec = {"id": f"gsm8k-{split}-{i}", "prompt": q, "answer": gold, "solution": f"{steps}\nFinal answer: {gold}".lstrip()}
    return (rec["id"], rec) if q.strip() and gold else "empty question or answer"


def alpaca_eval(row, i, split):
    text = row.get("instruction")
    if not isinstance(text, str):
        return None
    rec = {"id": f"alpaca_eval-{i}", "prompt": text, "dataset": row.get("dataset")}
    return (rec["id"], rec) if text.strip() else "empty instruction"


def ultrafeedback(row, i, split):
    text = row.get("instruction", row.get("prompt"))
    if not isinstance(text, str):
        return None
    key = hashlib.sha256(text.strip().encode("utf-8")).hexdigest()[:16]
    source = {"source": row["source"]} if row.get("source") else {}
    return (key, {"id": f"uf-{key}", "prompt": text.strip(), **source}) if text.strip() else "empty prompt"


def arena_hard(row, i, split):
    turns = row.get("turns")
    if not isinstance(row.get("question_id"), str) or not isinstance(turns, list) or not turns \
            or not isinstance(turns[0], dict) or not isinstance(turns[0].get("content"), str):
        return None
    rec = {"id": row["question_id"], "prompt": turns[0]["content"], **({"category": row["category"]} if row.get("category") else {})}
    return (rec["id"], rec) if rec["prompt"].strip() else "empty question"


UF_FILES = [f"{s}.jsonl" for s in ("evol_instruct", "false_qa", "flan", "sharegpt", "truthful_qa", "ultrachat")]
PARQUET = ("is parquet, which needs pyarrow: `pip install pyarrow`, or pass --from a JSONL copy (GSM8K: "
           "grade_school_math/data/train.jsonl or test.jsonl of github.com/openai/grade-school-math)")
SOURCES = {  # name: Hub dataset repo, its files (per split for gsm8k), converter, the record shape it expects
    "oasst": ("OpenAssistant/oasst1", ["2023-04-12_oasst_ready.trees.jsonl.gz"], oasst,
              'an Open Assistant tree {"message_tree_id", "prompt": {"text", "replies", ...}}'),
    "gsm8k": ("openai/gsm8k", {s: [f"main/{s}-00000-of-00001.parquet"] for s in ("train", "test")}, gsm8k,
              'a GSM8K record {"question", "answer": "worked solution ... #### N"}'),
    "alpaca-eval": ("tatsu-lab/alpaca_eval", ["alpaca_eval.json"], alpaca_eval,
                    'an AlpacaEval record {"instruction", "output", "generator", "dataset"}'),
    "arena-hard": ("lmarena-ai/arena-hard-auto", ["data/arena-hard-v0.1/question.jsonl"], arena_hard,
                   'an Arena-Hard question {"question_id", "category", "turns": [{"content"}]}'),
    "ultrafeedback-prompts": ("openbmb/UltraFeedback", UF_FILES, ultrafeedback,
                              'an UltraFeedback record {"source", "instruction", "completions", ...}')}


def fetch(name, repo, filename):
    """One file of a Hub dataset repo, from the cache or downloaded; a one-line error saying what to do otherwise."""
    return hub_fetch(repo, "dataset", filename, what=name, hint=f"or pass --from FILE, a local copy of {repo}/{filename}")


def rows(path):
    """(where, record) for each record of a JSONL (.gz too), JSON-list or parquet file."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such file")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SystemExit(f"{path} {PARQUET}") from None
        yield from ((f"{path}: row {i + 1}", r) for i, r in enumerate(pq.read_table(path).to_pylist()))
        return
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            if path.endswith(".json"):
                data = json.load(f)
                if not isinstance(data, list):
                    raise SystemExit(f"{path}: expected a JSON list of records, got {type(data).__name__}")
                yield from ((f"{path}: item {i + 1}", r) for i, r in enumerate(data))
            for n, line in enumerate(f, 1):  # a .json file is read by now: nothing left
                try:
                    yield from [(f"{path}:{n}", json.loads(line.decode("utf-8")))] if line.strip() else []
                except ValueError as e:  # malformed JSON or not UTF-8
                    raise SystemExit(f"{path}:{n}: not a JSON line ({e})") from None
    except (ValueError, OSError, EOFError) as e:  # a malformed .json, a broken .gz
        raise SystemExit(f"{path}: cannot be read ({type(e).__name__}: {e})") from None


def main(argv=None):
    p = argparse.ArgumentParser(description="Fetch a public dataset and write it in this project's formats.")
    p.add_argument("name", choices=sorted(SOURCES))
    p.add_argument("--out", required=True, help="the JSONL file to write")
    p.add_argument("--split", choices=("train", "test"), default=None, help="gsm8k: the split (default train)")
    p.add_argument("--from", dest="sources", nargs="+", metavar="FILE", help="convert local copies instead of fetching")
    args = p.parse_args(argv)
    if args.split and args.name != "gsm8k":
        p.error("--split applies to gsm8k only")
    split, (repo, files, convert, shape) = args.split or "train", SOURCES[args.name]
    files = files[split] if isinstance(files, dict) else files
    if not args.sources and files[0].endswith(".parquet") and not importlib.util.find_spec("pyarrow"):
        raise SystemExit(f"{args.name}: the Hub copy ({repo}/{files[0]}) {PARQUET}")
    paths = args.sources or [fetch(args.name, repo, f) for f in files]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp, seen, skips = f"{args.out}.tmp-{os.getpid()}", set(), {}  # written whole, then renamed into place
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for i, (where, row) in enumerate(wr for path in paths for wr in rows(path)):
                got = convert(row, i, split) if isinstance(row, dict) else None
                if got is None:
                    raise SystemExit(f"{where}: expected {shape}")
                reason = got if isinstance(got, str) else "duplicate" if got[0] in seen else None
                if reason:
                    skips[reason] = skips.get(reason, 0) + 1
                    continue
                seen.add(got[0])
                f.write(json.dumps(got[1], ensure_ascii=False) + "\n")
        if not seen:
            raise SystemExit(f"{args.name}: nothing to write from {', '.join(paths)}")
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(skips.items()))
    print(f"{args.name}: wrote {len(seen)} records to {args.out}" + (f"; skipped {skipped}" if skipped else ""))
    return len(seen)


if __name__ == "__main__":
    main()
