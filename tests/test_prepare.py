"""data/prepare.py: each dataset's published format (small fixtures in tests/data/prepare/) converted with --from and
checked against hand-written records and the project's own readers; the Hub path against a fake offline Hub cache."""
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from data import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "data", "prepare")
OASST_FILE = "2023-04-12_oasst_ready.trees.jsonl.gz"
COMMIT = "fdf72ae0827c1cda404aff25b6603abec9e3399b"


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def gz_copy(src, dst):
    with open(src, "rb") as f, gzip.open(dst, "wb") as g:
        g.write(f.read())
    return str(dst)


def run(args, capsys):
    prepare.main([str(a) for a in args])
    return capsys.readouterr().out


def hub_file(cache, repo, filename, src, gz=False):
    """Put `src` into a Hub cache laid out as huggingface_hub writes it (refs/main -> snapshots/<commit>/<file>)."""
    folder = os.path.join(cache, "datasets--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
    with open(os.path.join(folder, "refs", "main"), "w") as f:
        f.write(COMMIT)
    dst = os.path.join(folder, "snapshots", COMMIT, filename)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    gz_copy(src, dst) if gz else shutil.copy(src, dst)


# -----------------------------------------------------------------------------
# --from: each published format


def test_oasst_trees_from_the_published_gzip(tmp_path, capsys):
    out = tmp_path / "trees.jsonl"
    said = run(["oasst", "--from", gz_copy(os.path.join(FIX, "oasst_ready.trees.jsonl"), tmp_path / OASST_FILE),
                "--out", out], capsys)
    trees = read(os.path.join(FIX, "oasst_ready.trees.jsonl"))  # lines 3 (deleted prompt) and 4 (line 1 again) go
    assert read(out) == [trees[0], trees[1], trees[4]]
    assert "wrote 3 records" in said and "1 deleted or empty prompt" in said and "1 duplicate" in said
    import eft
    records, skips = eft.read_oasst(str(out))
    assert records == [{"id": "6ab24d72-0181-4594-a9cd-deaf170242fb", "prompt": "How do I keep bread fresh for longer?",
                        "responses": ["Keep it in a paper bag at room temperature and freeze what you will not eat within two days.",
                                      "Wrap it in a clean cotton cloth.", "The fridge is the best place for it."],
                        "ranks": [0, 1, 2]}]
    assert skips == {"other language": 1, "fewer than 2 ranked replies": 1}
    assert len(eft.read_oasst(str(out), lang="")[0]) == 2  # the German tree, when every language is kept


GSM8K = [
    {"id": "gsm8k-train-0", "prompt": "A baker makes 24 muffins in the morning and half as many in the afternoon. How many "
     "muffins does she make in all?", "answer": "36",
     "solution": "In the afternoon she makes 24/2 = 12 muffins.\nIn all she makes 24+12 = 36 muffins.\nFinal answer: 36"},
    {"id": "gsm8k-train-1", "prompt": "A town has 800 houses and builds 400 more. How many houses does it have now?",
     "answer": "1200", "solution": "It has 800+400 = 1,200 houses.\nFinal answer: 1200"},
    {"id": "gsm8k-train-2", "prompt": "Sam had 10 marbles and lost 3 of them. How many marbles does Sam have left?",
     "answer": "7", "solution": "Sam has 10-3 = 7 marbles left.\nFinal answer: 7"},
]


def test_gsm8k_from_the_github_jsonl(tmp_path, capsys):
    out = tmp_path / "gsm8k.jsonl"
    assert "gsm8k: wrote 3 records" in run(["gsm8k", "--from", os.path.join(FIX, "gsm8k_train.jsonl"), "--out", out], capsys)
    assert read(out) == GSM8K
    import reasoning
    assert reasoning.read_questions(str(out)) == GSM8K  # gold answers and solutions pass check_gold as they are
    raw = reasoning.read_questions(os.path.join(FIX, "gsm8k_train.jsonl"))  # the reader's own view of GSM8K's format
    assert [{k: q[k] for k in ("prompt", "answer", "solution")} for q in raw] == \
           [{k: q[k] for k in ("prompt", "answer", "solution")} for q in GSM8K]
    run(["gsm8k", "--split", "test", "--from", gz_copy(os.path.join(FIX, "gsm8k_train.jsonl"), tmp_path / "t.jsonl.gz"),
         "--out", out], capsys)
    assert [q["id"] for q in read(out)] == ["gsm8k-test-0", "gsm8k-test-1", "gsm8k-test-2"]


def test_alpaca_eval_from_the_published_json_list(tmp_path, capsys):
    out = tmp_path / "alpaca.jsonl"
    assert "wrote 4 records" in run(["alpaca-eval", "--from", os.path.join(FIX, "alpaca_eval.json"), "--out", out], capsys)
    assert read(out) == [
        {"id": "alpaca_eval-0", "prompt": "What are the names of some famous actors that started their careers on Broadway?",
         "dataset": "helpful_base"},
        {"id": "alpaca_eval-1", "prompt": "How do I make a classic French omelette?\n", "dataset": "koala"},
        {"id": "alpaca_eval-2", "prompt": "Écris un court poème sur la mer.", "dataset": "oasst"},
        {"id": "alpaca_eval-3", "prompt": "Give three tips for staying healthy.", "dataset": "selfinstruct"}]
    # evaluate.py reads them as prompts and exports {"instruction": prompt, ...}: AlpacaEval's own instructions, verbatim
    from common import check_prompt_fields, read_jsonl
    prompts = read_jsonl(str(out), required=("id", "prompt"), what="prompt", check=check_prompt_fields)
    with open(os.path.join(FIX, "alpaca_eval.json"), encoding="utf-8") as f:
        assert [p["prompt"] for p in prompts] == [r["instruction"] for r in json.load(f)]


def test_ultrafeedback_prompts_from_the_source_jsonl_files(tmp_path, capsys):
    out = tmp_path / "uf.jsonl"
    said = run(["ultrafeedback-prompts", "--from", os.path.join(FIX, "ultrafeedback", "evol_instruct.jsonl"),
                os.path.join(FIX, "ultrafeedback", "flan.jsonl"), "--out", out], capsys)
    uid = lambda text: "uf-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]  # noqa: E731
    assert read(out) == [
        {"id": uid("Write a haiku about autumn leaves."), "prompt": "Write a haiku about autumn leaves.", "source": "evol_instruct"},
        {"id": uid("Explain recursion to a child."), "prompt": "Explain recursion to a child.", "source": "evol_instruct"},
        {"id": uid("Translate 'good morning' into French."), "prompt": "Translate 'good morning' into French.",
         "source": "flan_v2_cot"}]
    assert "wrote 3 records" in said and "1 duplicate" in said and "1 empty prompt" in said


# -----------------------------------------------------------------------------
# Bad input, atomic output


@pytest.mark.parametrize("name, text, message", [
    ("gsm8k", '{"question": "q", "answer": "#### 3"}\n{"question": "q2", "answer": "3"\n', ":2: not a JSON line"),
    ("gsm8k", '{"question": "q", "answer": "#### 3"}\n{"question": "q2", "answer": "no marker"}\n',
     ":2: expected a GSM8K record"),
    ("oasst", '{"message_tree_id": "t", "prompt": "just text"}\n', ":1: expected an Open Assistant tree"),
    ("ultrafeedback-prompts", '["a list"]\n', ":1: expected an UltraFeedback record"),
])
def test_bad_input_names_the_file_and_line_and_leaves_out_alone(tmp_path, name, text, message):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(text)
    out.write_text("earlier\n")
    with pytest.raises(SystemExit) as e:
        prepare.main([name, "--from", str(src), "--out", str(out)])
    assert str(e.value).startswith(str(src)) and message in str(e.value)
    assert out.read_text() == "earlier\n" and sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"]  # no temp file left


def test_alpaca_eval_json_must_be_a_list(tmp_path):
    src = tmp_path / "alpaca_eval.json"
    src.write_text('{"instruction": "one record, not a list"}')
    with pytest.raises(SystemExit, match="expected a JSON list"):
        prepare.main(["alpaca-eval", "--from", str(src), "--out", str(tmp_path / "o.jsonl")])
    with pytest.raises(SystemExit, match="no such file"):
        prepare.main(["alpaca-eval", "--from", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o.jsonl")])


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is not None, reason="pyarrow is installed")
def test_parquet_without_pyarrow_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:  # checked before any download
        prepare.main(["gsm8k", "--split", "test", "--out", str(tmp_path / "o.jsonl")])
    assert "pip install pyarrow" in str(e.value) and "--from" in str(e.value) and "test.jsonl" in str(e.value)
    (tmp_path / "train.parquet").write_bytes(b"PAR1")
    with pytest.raises(SystemExit, match="pip install pyarrow"):
        prepare.main(["gsm8k", "--from", str(tmp_path / "train.parquet"), "--out", str(tmp_path / "o.jsonl")])


def test_split_is_for_gsm8k_only(tmp_path):
    with pytest.raises(SystemExit):
        prepare.main(["oasst", "--split", "test", "--out", str(tmp_path / "o.jsonl")])


# -----------------------------------------------------------------------------
# The Hub path, offline against a fake cache


def test_hub_path_reads_the_cache_offline(tmp_path, monkeypatch, capsys):
    hub_file(str(tmp_path / "hub"), "OpenAssistant/oasst1", OASST_FILE, os.path.join(FIX, "oasst_ready.trees.jsonl"), gz=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "trees.jsonl"
    assert "oasst: wrote 3 records" in run(["oasst", "--out", out], capsys)  # in this process: env read at call time
    assert [t["message_tree_id"] for t in read(out)] == ["6ab24d72-0181-4594-a9cd-deaf170242fb",
                                                         "7bc35e83-1292-4605-b0de-efb0281353ac",
                                                         "9de57a05-34b4-4827-92f0-a1d24a35759e"]
    os.remove(out)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "data", "prepare.py"), "oasst", "--out", str(out)],
                          capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(read(out)) == 3


def test_hub_path_under_hf_home(tmp_path, monkeypatch, capsys):
    hub_file(str(tmp_path / "home" / "hub"), "tatsu-lab/alpaca_eval", "alpaca_eval.json", os.path.join(FIX, "alpaca_eval.json"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "alpaca.jsonl"
    assert "alpaca-eval: wrote 4 records" in run(["alpaca-eval", "--out", out], capsys)
    assert read(out)[2] == {"id": "alpaca_eval-2", "prompt": "Écris un court poème sur la mer.", "dataset": "oasst"}


def test_offline_cache_miss_is_one_clear_line(tmp_path, monkeypatch):
    hub_file(str(tmp_path / "hub"), "OpenAssistant/oasst1", OASST_FILE, os.path.join(FIX, "oasst_ready.trees.jsonl"), gz=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        prepare.main(["ultrafeedback-prompts", "--out", str(tmp_path / "uf.jsonl")])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("ultrafeedback-prompts: openbmb/UltraFeedback/evol_instruct.jsonl is not in "
                                              "the Hub cache") and "--from FILE" in msg
    assert not os.path.exists(tmp_path / "uf.jsonl")


def test_without_huggingface_hub_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(SystemExit) as e:
        prepare.main(["alpaca-eval", "--out", str(tmp_path / "o.jsonl")])
    assert "pip install huggingface_hub" in str(e.value) and "--from FILE" in str(e.value)


def test_hub_parquet_with_pyarrow(tmp_path, monkeypatch, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    src = tmp_path / "test.parquet"  # the Hub's gsm8k columns: question, answer
    pq.write_table(pa.Table.from_pylist(read(os.path.join(FIX, "gsm8k_train.jsonl"))), str(src))
    hub_file(str(tmp_path / "hub"), "openai/gsm8k", "main/test-00000-of-00001.parquet", str(src))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "gsm8k.jsonl"
    assert "gsm8k: wrote 3 records" in run(["gsm8k", "--split", "test", "--out", out], capsys)
    assert read(out) == [{**q, "id": q["id"].replace("train", "test")} for q in GSM8K]


def test_arena_hard_questions_and_the_answer_export(tmp_path, capsys, tiny_ckpt):
    """Arena-Hard-Auto's question.jsonl -> prompts whose ids are its question ids; evaluate.py --export-arena-hard
    writes A's answers back as its model_answer lines (question_id, model_id, choices[0].turns[0].content)."""
    out = tmp_path / "arena.jsonl"
    assert "wrote 2 records" in run(["arena-hard", "--from", os.path.join(FIX, "arena_hard_question.jsonl"), "--out", out], capsys)
    assert read(out) == [
        {"id": "328c149ed45a41c0b9d6f14659e63599", "prompt": "Use ABC notation to write a melody in the style of a folk tune.",
         "category": "arena-hard-v0.1"},
        {"id": "b43c07656ead4150b360294ee932b410", "category": "arena-hard-v0.1",
         "prompt": "SOLVE THIS IN C++ : There are three cards with letters a, b, c placed in a row."}]
    import evaluate
    answers = tmp_path / "model_answer" / "mine.jsonl"
    evaluate.main(["--a", tiny_ckpt, "--b", tiny_ckpt, "--judge", tiny_ckpt, "--prompts", str(out), "--max-new-tokens", "4",
                   "--judge-max-new-tokens", "4", "--out-dir", str(tmp_path / "ev"), "--export-arena-hard", str(answers),
                   "--generator-name", "mine"])
    got = read(answers)
    made = {json.loads(x)["id"]: json.loads(x)["responses"][0] for x in open(tmp_path / "ev" / "answers_a.jsonl")}
    assert [r["question_id"] for r in got] == ["328c149ed45a41c0b9d6f14659e63599", "b43c07656ead4150b360294ee932b410"]
    for r in got:
        assert r["model_id"] == "mine" and isinstance(r["answer_id"], str) and isinstance(r["tstamp"], float)
        assert r["choices"] == [{"index": 0, "turns": [{"content": made[r["question_id"]]}]}]
