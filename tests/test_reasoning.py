"""reasoning.py's rules against hand-worked tables, the arithmetic generator's splits, the gold-answer readers,
evaluate.py's accuracy metric, and IRPO and ScPO end to end on the tiny model."""
import json
import os
import random
import re

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


# ScPO's hotter extra samples: they never vote, but the fewest-voted answer may be one of theirs (index k + j)
@pytest.mark.parametrize("answers,extra,want_r,want_w", [
    (["5", "5", "5", "6"], ["7", "5"], {4}, 3 / 4),  # "7" has 0 votes among the 4: rejected, w = (3 - 0) / 4
    (["5", "5", "5", "5"], ["5", "9"], {5}, 1.0),  # unanimous 4: no pair without the extras, with them one
    (["5", "5", "5", "5"], ["5", "5"], None, None),  # every extra agrees: nothing to reject
    (["5", "5", "5", "6"], ["6", "5"], {3, 4}, 2 / 4),  # a "6" with 1 vote: in the main samples or among the extras
    (["5", "5", "6", "6"], ["9"], None, None),  # V+ = 2 < tau * k = 3 whatever the extras say
])
def test_scpo_extra_samples_only_reject(answers, extra, want_r, want_w):
    picks = {reasoning.scpo_pair(answers, 0.75, random.Random(s), extra=extra) for s in range(30)}
    if want_r is None:
        assert picks == {None}
        return
    assert {answers[c] for c, _, _ in picks} == {"5"} and {r for _, r, _ in picks} == want_r
    assert all(w == pytest.approx(want_w) for *_, w in picks)


def test_scpo_extra_file(tmp_path):
    """reasoning.py --extra: the pair's rejected side can be an extra sample, named x<j> in the pair id; a
    question with no extra record is an error naming the file."""
    main = {"id": "q", "prompt": "2 + 2?", "responses": ["Final answer: 4"] * 3, "finish_reasons": ["stop"] * 3}
    more = {"id": "q", "prompt": "2 + 2?", "responses": ["Final answer: 4", "Final answer: 5"], "finish_reasons": ["stop"] * 2}
    for name, rec in (("r.jsonl", main), ("x.jsonl", more)):
        (tmp_path / name).write_text(json.dumps(rec) + "\n")
    argv = ["--responses", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "p.jsonl"), "--method", "scpo"]
    assert reasoning.main(argv)["pairs"] == 0  # unanimous: nothing to reject
    counts = reasoning.main(argv + ["--extra", str(tmp_path / "x.jsonl")])
    pair = json.loads((tmp_path / "p.jsonl").read_text())
    assert counts["rejected_extra"] == 1 and pair["id"].endswith("/x1") and pair["rejected"] == "Final answer: 5"
    assert pair["weight"] == 1.0 and pair["chosen"] == "Final answer: 4"
    (tmp_path / "x.jsonl").write_text(json.dumps(dict(more, id="other")) + "\n")
    with pytest.raises(SystemExit, match="x.jsonl: no record for question q"):
        reasoning.main(argv + ["--extra", str(tmp_path / "x.jsonl")])


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUM_OR_PRODUCT = re.compile(r"What is (\d+) (\+|times) (\d+)\?")


def committed_problems(name):
    """The committed file's problems as (operation, smaller operand, larger operand), read from the question
    text here, with each answer checked by hand arithmetic."""
    out = []
    for line in open(os.path.join(ROOT, "data", name)):
        rec = json.loads(line)
        a, op, b = SUM_OR_PRODUCT.fullmatch(rec["prompt"]).groups()
        a, b = int(a), int(b)
        assert int(rec["answer"]) == (a + b if op == "+" else a * b), rec
        out.append((op, min(a, b), max(a, b)))
    return out


def test_committed_arith_test_problems_are_never_trained_on():
    train, test = committed_problems("arith_train.jsonl"), committed_problems("arith_test.jsonl")
    assert not set(test) & set(train)  # not even as the commutative twin (3 + 4 against 4 + 3)
    # nor inside the few-shot prompt every question is asked with: its worked examples are not test problems
    import re
    shots = open(os.path.join(ROOT, "data", "templates", "reasoning_fewshot.txt")).read()
    shown = {(op, min(int(a), int(b)), max(int(a), int(b))) for a, op, b in re.findall(r"(\d+) ([+]|times) (\d+)", shots)}
    assert shown and not shown & set(test)
    assert len(set(test)) == len(test) >= 20  # one question per held-out problem, enough of them to measure
    assert {op for op, *_ in test} == {"+", "times"}


STORY_NUMBERS = {"story-add": re.compile(r"\w+ has (\d+) (\w+) and gets (\d+) more\..*"),
                 "story-sub": re.compile(r"\w+ had (\d+) (\w+) and gave (\d+) of them away\..*")}


@pytest.mark.parametrize("family", ["story-add", "story-sub"])
def test_arith_story_split_ignores_names_and_things(family):
    def problems(split, n):
        got = set()
        for r in make_arith.make(family, n, split):
            a, _, b = STORY_NUMBERS[family].fullmatch(r["prompt"]).groups()
            a, b = int(a), int(b)
            got.add((min(a, b), max(a, b)) if family == "story-add" else (a, b))  # subtraction keeps its order
        return got
    assert not problems("test", 40) & problems("train", 150)


def test_arith_draws_and_flags():
    test = make_arith.make("small", 24, "test")
    assert make_arith.make("small", 10, "test") == test[:10]  # the same draws every time
    # the 24 held-out problems written both ways (a double such as 5 times 5 only one way): no more questions
    most = sum(1 if a == b else 2 for _, a, b in committed_problems("arith_test.jsonl"))
    assert len(make_arith.make("small", most, "test")) == most
    with pytest.raises(SystemExit, match=f"has only {most} distinct questions"):
        make_arith.make("small", most + 1, "test")
    for argv, msg in ((["--n", "0"], "--n: 0 is invalid"), (["--n", "-5"], "--n: -5 is invalid"),
                      (["--n", "3", "--out", "/no/such/folder/x.jsonl"], "not a file in an existing folder")):
        with pytest.raises(SystemExit, match=msg):
            make_arith.main(argv)


def test_read_questions_ours_and_gsm8k(tmp_path):
    ours = tmp_path / "ours.jsonl"
    ours.write_text(json.dumps({"id": "a", "prompt": "What is 2 + 2?", "answer": 4, "system": "S"}) + "\n"
                    + json.dumps({"id": "b", "prompt": "What is 3 + 4?", "answer": "7", "solution": "3 + 4 = 7.\nFinal answer: 7"}) + "\n")
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "Tom has 3...", "answer": "He has 3 + 4 = <<3+4=7>>7.\n#### 7"}) + "\n"
                   + json.dumps({"question": "Cost?", "answer": "It costs $1,200 in all.\n#### 1,200"}) + "\n")
    assert reasoning.read_questions(str(ours)) == [
        {"id": "a", "prompt": "What is 2 + 2?", "answer": "4", "system": "S"},
        {"id": "b", "prompt": "What is 3 + 4?", "answer": "7", "solution": "3 + 4 = 7.\nFinal answer: 7"}]
    assert reasoning.read_questions(str(gsm)) == [
        {"id": "q1", "prompt": "Tom has 3...", "answer": "7", "solution": "He has 3 + 4 = 7.\nFinal answer: 7"},
        {"id": "q2", "prompt": "Cost?", "answer": "1200", "solution": "It costs $1,200 in all.\nFinal answer: 1200"}]
    # ScPO needs no gold answer: a question without one is read, one with a broken one is still refused
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"question": "How many?"}) + "\n")
    assert reasoning.read_questions(str(bare), gold=False) == [{"id": "q1", "prompt": "How many?"}]
    for rec, gold, msg in (({"question": "q", "answer": "no number #### "}, False, r"bad.jsonl:1: no final answer"),
                           ({"question": "q"}, True, r"bad.jsonl:1: needs an `answer`"),
                           ({"question": "q", "answer": float("nan")}, True, r"bad.jsonl:1: no final answer"),
                           ({"question": "q", "answer": True}, True, r"bad.jsonl:1: no final answer"),
                           ({"prompt": "q", "answer": 7, "solution": "Final answer: 8"}, True, r"bad.jsonl:1: `solution` must"),
                           ({"prompt": "", "answer": 7}, True, r"bad.jsonl:1: needs a non-empty string `prompt`")):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(rec) + "\n")
        with pytest.raises(SystemExit, match=msg):
            reasoning.read_questions(str(bad), gold=gold)


# IRPO with the gold solution among the winners: (sample answers, K, gold solution on) -> pairs as (chosen,
# rejected) indices, "gold" for the solution; W and L cycle as in test_irpo_pairs
@pytest.mark.parametrize("answers,k,use_gold,want", [
    (["3", "4"], 3, True, [("gold", "0"), ("gold", "1"), ("gold", "0")]),  # no sample right: the solution still teaches
    (["3", "4"], 3, False, []),
    (["7", "5"], 3, True, [("0", "1"), ("gold", "1"), ("0", "1")]),
    (["7", "7"], 2, True, []),  # nothing wrong to reject
])
def test_irpo_gold_solution_joins_the_winners(answers, k, use_gold, want):
    rec = {"id": "q", "prompt": "What is 3 + 4?", "answer": "7", "solution": "3 + 4 = 7.\nFinal answer: 7",
           "responses": [f"Final answer: {a}" for a in answers]}
    argv = ["--responses", "r", "--out", "o", "--method", "irpo", "--pairs-per-question", str(k)]
    _, pairs = reasoning.question_pairs(rec, reasoning.parse_args(argv + ([] if use_gold else ["--no-gold-solution"])))
    assert [tuple(p["id"].split("/")[2:]) for p in pairs] == want
    assert all(p["chosen"] == rec["solution"] and p["chosen_gold"] for p in pairs if p["id"].split("/")[2] == "gold")


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
            "--eval-samples", "2", "--lr", "1e-3", "--prompts-per-iter", "0"] + (["--tau", "0"] if method == "scpo" else [])
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
