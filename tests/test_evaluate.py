"""evaluate.py's statistics: the outcome of a two-order comparison, the win rate, its bootstrap interval and
the length-controlled win rate, against tables, closed forms and the invariances the method must have."""
import math
import os

import numpy as np
import pytest

from evaluate import bootstrap_ci, length_controlled_win_rate, outcome, soft_score, win_rate


@pytest.mark.parametrize("first_a,first_b,want", [
    ("A", "B", 1),  # A won when shown first, and when shown second (letter B)
    ("B", "A", -1),  # B won in both orders
    ("A", "A", 0),  # the first-shown answer won both times: position, not quality; a tie
    ("B", "B", 0),  # the second-shown answer won both times
    (None, "B", 0), ("A", None, 0), (None, None, 0),  # an unparseable verdict can only make a tie
])
def test_outcome_table(first_a, first_b, want):
    assert outcome(first_a, first_b) == want


def test_win_rate_counts_ties_as_half():
    assert win_rate([1, 1, 0, -1]) == pytest.approx((2 + 0.5) / 4)
    assert win_rate([0, 0, 0]) == 0.5 and win_rate([1]) == 1.0 and win_rate([-1, -1]) == 0.0


@pytest.mark.parametrize("value,rate", [(1, 1.0), (0, 0.5), (-1, 0.0)])
def test_bootstrap_of_constant_outcomes_is_a_point(value, rate):
    """Every resample of constant outcomes has the same mean: the interval is that point."""
    assert bootstrap_ci([value] * 25, n_boot=500) == (pytest.approx(rate), pytest.approx(rate))


def test_bootstrap_interval_matches_the_normal_approximation():
    """400 prompts, 60% wins and 40% losses: the percentile interval is close to p +- 1.96 sqrt(p(1-p)/n)."""
    outcomes = [1] * 240 + [-1] * 160
    lo, hi = bootstrap_ci(outcomes, n_boot=4000, seed=1)
    half = 1.96 * math.sqrt(0.6 * 0.4 / 400)
    assert lo < 0.6 < hi
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)


def test_length_controlled_rate_without_length_differences_is_the_win_rate():
    rng = np.random.default_rng(0)
    outcomes = rng.choice([-1, 0, 1], size=200, p=[0.3, 0.2, 0.5]).tolist()
    same = [100] * 200
    assert length_controlled_win_rate(outcomes, same, same) == pytest.approx(win_rate(outcomes), abs=1e-3)


def test_length_controlled_rate_invariances():
    rng = np.random.default_rng(1)
    n = 400
    # A's answers run longer, and the judge prefers whichever answer is longer (no quality difference)
    la, lb = rng.integers(200, 900, n), rng.integers(50, 600, n)
    p_win = 1 / (1 + np.exp(-(la - lb) / 150))
    outcomes = np.where(rng.random(n) < p_win, 1, -1).tolist()
    lc = length_controlled_win_rate(outcomes, la, lb)
    # swapping the roles of A and B mirrors the rate
    assert length_controlled_win_rate([-o for o in outcomes], lb, la) == pytest.approx(1 - lc, abs=1e-6)
    # a change of unit (characters vs words, say) changes nothing: the fit sees length differences / their std
    assert length_controlled_win_rate(outcomes, 3 * la, 3 * lb) == pytest.approx(lc, abs=1e-9)
    # the raw rate credits A for being longer; read at equal length, the edge is gone
    assert win_rate(outcomes) > 0.7 and abs(lc - 0.5) < 0.1


def test_length_controlled_rate_keeps_a_quality_edge():
    """A wins 80% of prompts whatever the lengths: controlling for length must not erase that."""
    rng = np.random.default_rng(2)
    n = 400
    la, lb = rng.integers(50, 800, n), rng.integers(50, 800, n)
    outcomes = np.where(rng.random(n) < 0.8, 1, -1).tolist()
    assert length_controlled_win_rate(outcomes, la, lb) == pytest.approx(win_rate(outcomes), abs=0.05)


def test_soft_score_averages_both_orders():
    """Expected mode: A's score is p(A better) in each order, averaged. A judge that always says "first" with
    p 0.8 scores every pair 0.5 however it is asked; a residual preference for A shows above 0.5."""
    lg = lambda p: [math.log(p), math.log(1 - p)]  # noqa: E731  log-probs of the letters A and B
    rec = lambda p1, p2: {"a_first": {"logp_ab": lg(p1)}, "b_first": {"logp_ab": lg(p2)}}  # noqa: E731
    assert soft_score(rec(0.8, 0.8)) == pytest.approx(0.5)  # position only
    assert soft_score(rec(0.9, 0.7)) == pytest.approx((0.9 + 0.3) / 2)  # A shown second still wins 0.3 of the mass
    assert soft_score(rec(1.0 - 1e-12, 1e-12)) == pytest.approx(1.0)


T, R = "Here is my thought process:", "Here is my response:"
MARKED = {("q0", 0), ("q1", 1), ("q2", 2)}  # (prompt, seed) whose answer reaches its response marker


def test_answers_without_a_response_marker_are_resampled(tmp_path, monkeypatch, tiny_ckpt):
    """A sampler (in place of the model) that answers q0 at seed 0, q1 at seed 1, q2 at seed 2 and q3 never: each
    try asks only what still has no marker, with the next seed; what never gets one is judged as empty."""
    import json

    import evaluate
    import sample
    from conftest import read, write_jsonl
    calls = []

    def fake_sample(argv):
        a = sample.parse_args(argv)
        asked = read(a.prompts)
        calls.append((a.seed, [p["id"] for p in asked]))
        text = lambda i: f"{T} hmm\n{R} {i} at seed {a.seed}" if (i, a.seed) in MARKED else f"{T} thinking about {i}"  # noqa: E731
        write_jsonl(a.out, [{"id": p["id"], "prompt": p["prompt"], "responses": [text(p["id"])]} for p in asked])

    monkeypatch.setattr(sample, "main", fake_sample)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"q{k}", "prompt": f"Say {k}."} for k in range(4)])
    for tries, a_calls, kept, resampled, unmarked in (
            (3, [(0, ["q0", "q1", "q2", "q3"]), (1, ["q1", "q2", "q3"]), (2, ["q2", "q3"]), (3, ["q3"])],
             ["q0 at seed 0", "q1 at seed 1", "q2 at seed 2", ""], 3, 1),
            (1, [(0, ["q0", "q1", "q2", "q3"]), (1, ["q1", "q2", "q3"])], ["q0 at seed 0", "q1 at seed 1", "", ""], 3, 2),
            (0, [(0, ["q0", "q1", "q2", "q3"])], ["q0 at seed 0", "", "", ""], 0, 3)):
        calls.clear()
        out = tmp_path / f"tries{tries}"
        res = evaluate.main(["--a", tiny_ckpt, "--b", tiny_ckpt, "--judge", tiny_ckpt, "--prompts", prompts, "--out-dir", str(out),
                             "--strip-thoughts", "a", "--resample-tries", str(tries), "--judge-max-new-tokens", "2",
                             "--export-alpaca-eval", str(out / "a.json")])
        assert calls == [a_calls[0], (0, ["q0", "q1", "q2", "q3"])] + a_calls[1:]  # A, B (once, at seed 0), A's tries
        assert [x["output"] for x in json.load(open(out / "a.json"))] == kept
        assert res["resampled_answers"] == {"a": resampled} and res["unmarked_answers"] == {"a": unmarked}
        assert f"resampled {{'a': {resampled}}}, no response after all tries {{'a': {unmarked}}}" in evaluate.summary_line(res)
    calls.clear()  # greedy answers: a new seed would give the same, so none is asked again
    res = evaluate.main(["--a", tiny_ckpt, "--b", tiny_ckpt, "--judge", tiny_ckpt, "--prompts", prompts, "--out-dir",
                         str(tmp_path / "greedy"), "--strip-thoughts", "a", "--temperature", "0", "--judge-max-new-tokens", "2"])
    assert len(calls) == 2 and res["resampled_answers"] == {"a": 0} and res["unmarked_answers"] == {"a": 3}


def test_resampling_resumes_after_a_kill(tmp_path, monkeypatch, tiny_ckpt):
    """The tiny random model never writes the markers: both sides' 2 answers are asked again 3 times. A kill in
    B's second try, after its first prompt, leaves 1 + 2 answers to sample on the re-run, and the same result."""
    import evaluate
    import sample
    from conftest import read, write_jsonl
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"q{k}", "prompt": f"Say {k}."} for k in range(2)])
    out = tmp_path / "e"
    argv = ["--a", tiny_ckpt, "--b", tiny_ckpt, "--judge", tiny_ckpt, "--prompts", prompts, "--out-dir", str(out),
            "--strip-thoughts", "--max-new-tokens", "4", "--judge-max-new-tokens", "2"]
    first = evaluate.main(argv)
    assert first["resampled_answers"] == first["unmarked_answers"] == {"a": 2, "b": 2}
    for r in (1, 2, 3):
        for side in "ab":
            assert [x["id"] for x in read(out / f"resample{r}_answers_{side}.jsonl")] == ["q0", "q1"]
    seeds = [x["seed"] for x in read(out / "resample2_answers_b.jsonl")]
    assert seeds == [2, 2]
    part = open(out / "resample2_answers_b.jsonl").readline()
    (out / "resample2_answers_b.jsonl").write_text(part)
    for name in ("resample3_answers_b.jsonl", "resample3_prompts_b.jsonl", "comparisons.jsonl", "results.json"):
        os.remove(out / name)
    sampled, real = [], sample.generate
    monkeypatch.setattr(sample, "generate", lambda model, requests, **kw: (sampled.extend(requests), real(model, requests, **kw))[1])
    again = evaluate.main(argv)
    assert len(sampled) == 3
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in first.items() if k != "seconds"}
    assert [x["id"] for x in read(out / "resample2_answers_b.jsonl")] == ["q0", "q1"]  # no duplicate
    sampled.clear()
    evaluate.main(argv)
    assert sampled == []
