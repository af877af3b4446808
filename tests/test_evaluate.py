"""evaluate.py's statistics: the outcome of a two-order comparison, the win rate, its bootstrap interval and
the length-controlled win rate, against tables, closed forms and the invariances the method must have."""
import math

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
