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


def words(n, w="w"):
    return " ".join([w] * n)


# (chosen words, rejected words, which side is cut) -> the copies made: (kind, chosen words, limit or (lo, hi)
# for a drawn binding limit, flipped, cut side after the copy)
@pytest.mark.parametrize("wc,wr,cut,want", [
    (2, 12, None, [("lift-loose", 2, 22, False, None), ("lift", 2, (2, 11), False, None)]),  # gap 10: both copies
    (13, 3, None, [("lift-loose", 13, 23, False, None), ("lift", 3, (3, 12), True, None)]),  # the shorter wins only when bound
    (1, 10, None, []),  # a gap of 9 words: no copy
    (4, 4, None, []),
    (20, 5, "rejected", [("lift-loose", 20, 30, False, "rejected")]),  # the shorter is cut: no binding copy (it would win)
    (5, 20, "rejected", [("lift-loose", 5, 30, False, "rejected"), ("lift", 5, (5, 19), False, "rejected")]),
    (20, 5, "chosen", [("lift", 5, (5, 19), True, "rejected")]),  # a cut chosen (not from judge.py): only rejected
    (5, 20, "chosen", []),
])
def test_augment_loose_and_binding_copies(wc, wr, cut, want):
    pair = {"id": "p", "prompt": "Q", "system": "Be brief.", "chosen": words(wc, "c"), "rejected": words(wr, "r"),
            "score_chosen": 5, "score_rejected": 1, "kind": "actor", **({f"{cut}_truncated": True} if cut else {})}
    got = lift.augment([pair], random.Random(0), T)
    assert len(got) == len(want)
    for p, (kind, wchosen, limit, flipped, cut_after) in zip(got, want):
        assert (p["kind"], lift.count_words(p["chosen"]), p["flipped"]) == (kind, wchosen, flipped)
        lo, hi = limit if isinstance(limit, tuple) else (limit, limit)
        assert lo <= p["max_words"] <= hi and p["prompt"] == f"Use at most {p['max_words']} words.\n\nQ"
        assert p["system"] == "Be brief." and p["id"] == f"p/{kind}"
        # the per-side fields follow their text: the "c" response scored 5 and is the cut one when `cut` says so
        side_c = "chosen" if p["chosen"].startswith("c") else "rejected"
        assert p[f"score_{side_c}"] == 5
        assert {s for s in ("chosen", "rejected") if p.get(f"{s}_truncated")} == ({cut_after} if cut_after else set())


def test_augment_gap_flag_and_binding_draws():
    pair = {"prompt": "Q", "chosen": words(1), "rejected": words(10)}
    assert lift.augment([pair], random.Random(0), T) == []
    assert [p["max_words"] for p in lift.augment([pair], random.Random(0), T, min_gap=9, loose_margin=3)][0] == 13
    # over many draws every binding limit in [w_short, w_long) occurs, and none outside
    seen = {lift.augment([pair], random.Random(s), T, min_gap=9)[1]["max_words"] for s in range(300)}
    assert seen == set(range(1, 10))


def test_self_pairs():
    rec = {"id": "q", "prompt": "Say something.", "system": "S", "responses": ["one", "one two three", "one two three four five", "x y z"]}
    pairs = lift.self_pairs(rec, random.Random(1), T, per_prompt=10)
    # every ordered (shorter, longer) pair of different word counts: 1<3, 1<5, 3<5 twice (two 3-word answers), 1<3
    assert len(pairs) == 5 and all(p["system"] == "S" and p["kind"] == "lift" for p in pairs)
    for p in pairs:
        wc, wr = lift.count_words(p["chosen"]), lift.count_words(p["rejected"])
        assert wc <= p["max_words"] < wr and p["prompt"].startswith(f"Use at most {p['max_words']} words.")
    assert len(lift.self_pairs(rec, random.Random(1), T, per_prompt=2)) == 2
    # a response cut at its token limit (the one-word and the five-word answers): in no pair, or only ever rejected
    cut = dict(rec, finish_reasons=["length", "stop", "length", "stop"])
    assert {(p["chosen"], p["rejected"]) for p in lift.self_pairs(cut, random.Random(1), T, per_prompt=10)} == set()
    kept = lift.self_pairs(cut, random.Random(1), T, per_prompt=10, keep_truncated=True)
    assert sorted(p["id"] for p in kept) == ["q/1/2", "q/3/2"] and all(p["rejected_truncated"] for p in kept)


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
    counts = man["stages"]["lift_pairs"]["counts"]
    assert counts["pairs_in"] > 0 and counts["lift_pairs"] == len(open(os.path.join(d, "lift_pairs.jsonl")).readlines())
    # the copies train beside the actor pairs when there are any (the tiny model's answers rarely differ by 10 words)
    assert ("lift_pairs.jsonl" in man["stages"]["train"]["counts"]["data_files"]) == (counts["lift_pairs"] > 0)


def test_no_loose_keeps_the_same_binding_copies(tmp_path):
    """--no-loose (the ablation of the loose copies) leaves out exactly the loose copies: the binding ones, their
    limits drawn as before, are the same."""
    pairs = tmp_path / "p.jsonl"
    with open(pairs, "w") as f:
        for i in range(4):
            f.write(json.dumps({"id": f"x{i}", "prompt": f"Tell me about {i}.", "chosen": "one two three",
                                "rejected": " ".join(["word"] * (14 + i))}) + "\n")
    both, binding = str(tmp_path / "both.jsonl"), str(tmp_path / "binding.jsonl")
    lift.main(["--pairs", str(pairs), "--out", both, "--seed", "3"])
    lift.main(["--pairs", str(pairs), "--out", binding, "--seed", "3", "--no-loose"])
    read = lambda p: [json.loads(line) for line in open(p)]  # noqa: E731
    assert [r["kind"] for r in read(both)] == ["lift-loose", "lift"] * 4
    assert read(binding) == [r for r in read(both) if r["kind"] == "lift"]
