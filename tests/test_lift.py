"""lift.py's rules against hand-worked cases, evaluate.py's length metrics against hand counts, and the LIFT
loop end to end on the tiny model (the judge-free method and --lift beside Meta-Rewarding)."""
import json
import os
import random

import numpy as np
import pytest
from conftest import STOPS, make_tiny_checkpoint

import evaluate
import iterate
import lift

T = "Use at most {max_words} words.\n\n{prompt}"


@pytest.mark.parametrize("text,n", [
    ("", 0), ("one", 1), ("two words", 2), ("  spaced\tout\nwords  ", 3),
    ("a - b", 2),  # a lone dash is punctuation, not a word
    ("**Bold** text, and more.", 4), ("3 apples", 2), ("… ?! ##", 0), ("naïve café", 2), ("東京 タワー", 2),
])
def test_count_words(text, n):
    assert lift.count_words(text) == n


def test_violates_and_pair_under_limit():
    assert not lift.violates("one two three", 3) and lift.violates("one two three", 2)
    short, long = "a b", "a b c d e"
    assert lift.pair_under_limit(long, short, 3) == (short, long)  # only the short one keeps 3
    assert lift.pair_under_limit(short, long, 5) is None  # both keep 5: the limit decides nothing
    assert lift.pair_under_limit(short, long, 1) is None  # both break 1


def test_augment_keeps_or_flips_and_skips_equal_lengths():
    pairs = [{"prompt": "p1", "chosen": "a b", "rejected": "a b c d e", "kind": "actor"},  # chosen shorter: kept
             {"prompt": "p2", "chosen": "a b c d e f", "rejected": "a", "kind": "actor"},  # rejected shorter: flipped
             {"prompt": "p3", "chosen": "x y", "rejected": "z w", "kind": "actor"}]  # equal: no limit binds
    out = lift.augment(pairs, random.Random(0), T)
    assert out[:3] == pairs and len(out) == 5
    kept, flipped = out[3], out[4]
    assert (kept["chosen"], kept["rejected"], kept["flipped"]) == ("a b", "a b c d e", False)
    assert 2 <= kept["max_words"] < 5 and kept["prompt"] == f"Use at most {kept['max_words']} words.\n\np1"
    assert (flipped["chosen"], flipped["rejected"], flipped["flipped"]) == ("a", "a b c d e f", True)
    assert 1 <= flipped["max_words"] < 6
    # over many draws every binding limit occurs, and none outside [w_short, w_long)
    seen = {lift.augment(pairs[:1], random.Random(s), T)[1]["max_words"] for s in range(200)}
    assert seen == {2, 3, 4}


def test_self_pairs():
    rec = {"id": "q", "prompt": "Say something.", "responses": ["one", "one two three", "one two three four five", "x y z"]}
    pairs = lift.self_pairs(rec, random.Random(1), T, per_prompt=10)
    # every ordered (shorter, longer) pair of different word counts: 1<3, 1<5, 3<5 twice (two 3-word answers), 1<3
    assert len(pairs) == 5
    for p in pairs:
        wc, wr = lift.count_words(p["chosen"]), lift.count_words(p["rejected"])
        assert wc <= p["max_words"] < wr and p["prompt"].startswith(f"Use at most {p['max_words']} words.")
    assert len(lift.self_pairs(rec, random.Random(1), T, per_prompt=2)) == 2
    # a response cut at its token limit is never chosen (here: the one-word answer)
    cut = lift.self_pairs(rec, random.Random(1), T, per_prompt=10, truncated=[True, False, False, False])
    assert all(p["chosen"] != "one" for p in cut) and any(p["rejected"] == "one two three four five" for p in cut)
    # a loose limit above both: the preference decides, so the longer answer can win
    prefer_long = lambda prompt, a, b: a if len(a) > len(b) else b  # noqa: E731
    loose = [p for p in lift.self_pairs(rec, random.Random(3), T, per_prompt=1, loose=prefer_long) if p["kind"] == "lift-loose"]
    assert len(loose) == 1 and lift.count_words(loose[0]["chosen"]) >= lift.count_words(loose[0]["rejected"])
    assert loose[0]["max_words"] > lift.count_words(loose[0]["chosen"])


def test_spearman_and_length_report():
    assert evaluate.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert evaluate.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # with ties: ranks (1.5, 1.5, 3) and (1, 2, 3): Pearson of those
    want = np.corrcoef([1.5, 1.5, 3], [1, 2, 3])[0, 1]
    assert evaluate.spearman([5, 5, 9], [1, 2, 3]) == pytest.approx(want)
    rows = evaluate.length_variants([{"id": "p", "prompt": "Hi"}, {"id": "q", "prompt": "Yo"}], [2, 4], T, T)
    assert [r["id"] for r in rows] == ["p@2", "p@2~p", "p@4", "p@4~p", "p@plain", "q@2", "q@2~p", "q@4", "q@4~p", "q@plain"]
    answers = {"p@2": "a b c", "p@2~p": "a", "p@4": "a b c", "p@4~p": "a b c d e", "p@plain": "",
               "q@2": "a b", "q@2~p": "a b c", "q@4": "a b c d e", "q@4~p": "a", "q@plain": "a b c d"}
    rep = evaluate.length_report(rows, answers, n_boot=200, seed=0)
    # training wording: p violates at 2 (3 words) not at 4; q keeps 2, breaks 4 -> 2 of 4
    assert rep["instructed"]["violation_rate"] == 0.5
    assert rep["instructed"]["words_over_limit"] == pytest.approx((3 / 2 + 3 / 4 + 2 / 2 + 5 / 4) / 4)
    assert rep["paraphrased"]["violation_rate"] == 0.5  # p breaks 4 (5 words), q breaks 2 (3 words)
    assert rep["plain"] == {"mean_words": 2.0, "empty_rate": 0.5}


def test_lift_method_end_to_end(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", seed=5, stop_chars=STOPS)
    run = str(tmp_path / "run")
    iterate.main(["--run-dir", run, "--model", ckpt, "--preset", "lift-demo", "--prompts-per-iter", "6",
                  "--max-new-tokens", "24", "--eval-prompts-n", "2", "--eval-max-new-tokens", "8", "--lr", "1e-3"])
    d = os.path.join(run, "iter1")
    man = json.load(open(os.path.join(d, "manifest.json")))
    assert list(man["stages"]) == ["prompts", "responses", "lift_pairs", "train", "evaluate", "report"]
    pairs = [json.loads(x) for x in open(os.path.join(d, "lift_pairs.jsonl"))]
    assert pairs and all(p["kind"] == "lift" and lift.count_words(p["chosen"]) <= p["max_words"] < lift.count_words(p["rejected"])
                         for p in pairs)
    res = json.load(open(os.path.join(d, "eval", "results.json")))
    assert res["metric"] == "length" and set(res["a"]) == {"model", "instructed", "paraphrased", "plain"}
    assert "violations (training wording)" in open(os.path.join(d, "report.md")).read()
    # a re-run resumes: nothing left to do
    timings = iterate.main(["--run-dir", run, "--model", ckpt, "--preset", "lift-demo", "--prompts-per-iter", "6",
                            "--max-new-tokens", "24", "--eval-prompts-n", "2", "--eval-max-new-tokens", "8", "--lr", "1e-3"])
    assert {how for *_, how in timings} == {"done before"}


def test_lift_beside_meta_rewarding(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", seed=5, stop_chars=STOPS)
    run = str(tmp_path / "run")
    iterate.main(["--run-dir", run, "--model", ckpt, "--iterations", "1", "--lift", "--prompts-per-iter", "4",
                  "--n-responses", "3", "--n-judgments", "2", "--max-new-tokens", "12", "--judge-max-new-tokens", "4",
                  "--meta-max-new-tokens", "3", "--eval-prompts-n", "-1", "--lr", "1e-3"])
    d = os.path.join(run, "iter1")
    man = json.load(open(os.path.join(d, "manifest.json")))
    assert "lift_pairs" in man["stages"] and man["stages"]["lift_pairs"]["counts"]["pairs_in"] > 0
    assert "lift_pairs.jsonl" in man["stages"]["train"]["counts"]["data_files"]
