"""reasoning.py's rules against hand-worked tables, the arithmetic generator's splits, the gold-answer readers,
evaluate.py's accuracy metric, and IRPO and ScPO end to end on the tiny model."""
import json
import os
import random

import pytest
from conftest import STOPS, make_tiny_checkpoint

import iterate
import reasoning
from data import make_arith


@pytest.mark.parametrize("text,want", [
    ("2 + 3 = 5.\nFinal answer: 5", "5"),
    ("Final answer: 1,000", "1000"), ("Final Answer: $5", "5"), ("final answer: 42.0", "42"), ("Final answer: 7.", "7"),
    ("Final answer: 3.50", "3.5"), ("Final answer: -4", "-4"), ("Final answer: **12**", "12"),
    ("The final answer is 18 apples.", "18"), ("so the answer is 9. 4 + 5 = 9", "9"),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
    ("We get \\boxed{15}.", "15"), ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("Final answer: 3\n...wait, redo.\nFinal answer: 4", "4"),  # the last one counts
    ("Final answer: 3 ... and then \\boxed{8}", "8"),  # a box after the marker is the later answer
    ("\\boxed{8} so Final answer: 9", "9"),
    ("4 + 5 = 9", None), ("", None), ("Final answer:", None), ("\\boxed{7", None),
])
def test_final_answer(text, want):
    assert reasoning.final_answer(text) == want


@pytest.mark.parametrize("correct,k,want", [
    ([True, False, True, False, False], 4, [(0, 1), (2, 3), (0, 4), (2, 1)]),  # both sides cycle
    ([True, False], 3, [(0, 1), (0, 1), (0, 1)]),  # one pair repeated: the paper's rule
    ([False, True, True, True], 2, [(1, 0), (2, 0)]),
    ([True, True], 3, []), ([False, False], 3, []), ([], 2, []),
])
def test_irpo_pairs(correct, k, want):
    assert reasoning.irpo_pairs(correct, k) == want


def test_scpo_pair():
    rng = lambda: random.Random(0)  # noqa: E731
    # 8 samples: "5" x5, "6" x2, None x1 -> chosen a "5", rejected the unparseable one (0 votes), w = (5 - 0) / 8
    answers = ["5", "5", "6", "5", None, "5", "6", "5"]
    c, r, w = reasoning.scpo_pair(answers, 0.5, rng())
    assert answers[c] == "5" and r == 4 and w == pytest.approx(5 / 8)
    # without the unparseable one: rejected is a "6" (2 votes), w = 3/8
    c, r, w = reasoning.scpo_pair(["5", "5", "6", "5", "5", "6", "5", "5"], 0.5, rng())
    assert r in (2, 5) and w == pytest.approx((6 - 2) / 8)
    assert reasoning.scpo_pair(["1", "2", "3", "4"], 0.5, rng()) is None  # top 1 vote < 0.5 * 4
    assert reasoning.scpo_pair(["1", "1", "2", "2"], 0.5, rng()) is None  # V+ == V-: nothing to prefer
    assert reasoning.scpo_pair([None, None], 0.0, rng()) is None
    # a cut response votes but is never chosen
    assert reasoning.scpo_pair(["5", "5", "6"], 0.5, rng(), cut=[True, True, False]) is None
    # ties between answers are drawn, not taken by position: both top answers win under some seed
    tied = ["a", "a", "b", "b", "c"]
    tops = {tied[reasoning.scpo_pair(tied, 0.4, random.Random(s))[0]] for s in range(40)}
    assert tops == {"a", "b"}


def test_arith_splits_are_disjoint_and_seeded():
    train = make_arith.make("small", 117, "train")
    test = make_arith.make("small", 28, "test")
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert make_arith.make("small", 10, "test") == test[:10]  # the same draws every time
    for r in train[:20]:
        a, op, b = r["prompt"].removeprefix("What is ").rstrip("?").split(" ")
        assert int(r["answer"]) == (int(a) + int(b) if op == "+" else int(a) * int(b))


def test_read_questions_ours_and_gsm8k(tmp_path):
    ours = tmp_path / "ours.jsonl"
    ours.write_text(json.dumps({"id": "a", "prompt": "What is 2 + 2?", "answer": 4}) + "\n")
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "Tom has 3...", "answer": "He has 3 + 4 = 7.\n#### 7"}) + "\n"
                   + json.dumps({"question": "Cost?", "answer": "It costs $1,200 in all.\n#### 1,200"}) + "\n")
    assert reasoning.read_questions(str(ours)) == [{"id": "a", "prompt": "What is 2 + 2?", "answer": "4"}]
    assert [q["answer"] for q in reasoning.read_questions(str(gsm))] == ["7", "1200"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "no number #### "}) + "\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: no final answer"):
        reasoning.read_questions(str(bad))


def write_questions(path, n=6):
    recs = make_arith.make("small", n, "train")
    with open(path, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.mark.parametrize("method", ["irpo", "scpo"])
def test_verifiable_methods_end_to_end(tmp_path, method):
    """The tiny model on arithmetic: the pair stage replaces the judges, DPO + NLL trains, accuracy evaluates;
    a re-run finds everything done."""
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", seed=5, stop_chars=STOPS)
    qs, ev = write_questions(tmp_path / "q.jsonl"), write_questions(tmp_path / "ev.jsonl", 3)
    args = ["--run-dir", str(tmp_path / "run"), "--model", ckpt, "--preset", "reasoning-demo", "--method", method,
            "--prompts", qs, "--eval-prompts", ev, "--max-new-tokens", "8", "--eval-max-new-tokens", "6",
            "--eval-samples", "2", "--lr", "1e-3", "--tau", "0", "--prompts-per-iter", "0"]
    iterate.main(args)
    d = os.path.join(tmp_path, "run", "iter1")
    man = json.load(open(os.path.join(d, "manifest.json")))
    assert list(man["stages"]) == ["prompts", "responses", "reasoning_pairs", "train", "evaluate", "report"]
    rec = json.loads(open(os.path.join(d, "responses.jsonl")).readline())
    assert "answer" in rec and len(rec["responses"]) == 6 and "Final answer" in rec["prompt"]  # gold kept, no dedup
    counts = man["stages"]["reasoning_pairs"]["counts"]
    assert counts["questions"] == 6 and 0 <= counts["parse_rate"] <= 1
    res = json.load(open(os.path.join(d, "eval", "results.json")))
    assert res["metric"] == "accuracy" and {"greedy", "pass1", "maj", "sampled_parse_rate"} <= set(res["a"])
    assert "greedy_diff" in res and "## Evaluation: final answers" in open(os.path.join(d, "report.md")).read()
    assert {how for *_, how in iterate.main(args)} == {"done before"}
