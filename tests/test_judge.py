"""judge.py and meta_judge.py: parsers (tables), the actor pair rule (hand-worked), Bradley-Terry
(closed form and recovery of known strengths), position weights, and an end-to-end run on a tiny model."""
import math

import numpy as np
import pytest

from judge import parse_score, select_actor_pair, expected_value, cut_at_last, make_probe, SCORE_MARK
from meta_judge import bradley_terry, battle_matrix, parse_winner, pick_response, position_weights, make_judge_pair

SCORE_CASES = [
    ("The answer is relevant and complete.\nScore: 4", 4.0),
    ("Score: 5", 5.0),
    ("**Score:** 4", 4.0),
    ("Score: **3**", 3.0),
    ("score: 4.5", 4.5),
    ("Score: 4/5", 4.0),
    ("Score: 4 / 5", 4.0),
    ("Score: 4.5/5", 4.5),
    ("Score: 3 out of 5", 3.0),
    ("Final score: 2", 2.0),
    ("### Score: 1", 1.0),
    ("Score:0", 0.0),
    ("Score: 5.0", 5.0),
    ("Score: 4.", 4.0),
    ("Score: 4 points", 4.0),
    ("Score: 2 (the answer is thin)", 2.0),
    ("First I thought Score: 2, but on reflection\nScore: 3", 3.0),  # the last one wins
    ("SCORE: 1\n\nThat is all.", 1.0),  # text after the score line is fine
    ("Score: 6", None),  # out of range
    ("Score: -1", None),
    ("Score: 4/10", None),  # another scale
    ("Score: 8 out of 10", None),
    ("Score: four", None),
    ("Score: <points>", None),  # the template echoed
    ("Score: 3 or 4", None),  # two numbers
    ("Score: 3-4", None),
    ("Score: 3,5", None),
    ("Score: 3 Score: 4", None),  # conflicting forms on one line
    ("The score is 4", None),  # no `Score:` marker
    ("", None),
    ("Score: 1e3", None),
    # real outputs of the embedded SmolLM2-135M-Instruct judging its own answers
    ("90", None),
    ("The answer to the above question is: \n\nThe capital of France is Paris.", None),
    ("Sure, I'd be happy to provide a justifiable explanation, but to achieve the highest score, I must complete "
     "100 points.", None),
    ("A quick reminder of why this is important is to maintain a positive approach to all of your responses.", None),
]


@pytest.mark.parametrize("text,want", SCORE_CASES)
def test_parse_score(text, want):
    assert parse_score(text) == want


WINNER_CASES = [
    ("A is more careful.\nWinner: Judgement A", "A"),
    ("Winner: Judgment B", "B"),
    ("**Winner:** Judgement A", "A"),
    ("Winner: **Judgment B**", "B"),
    ("winner: judgement b.", "B"),
    ("Winner: A", "A"),
    ("Winner: Judgement (B)", "B"),
    ("Winner: Evaluation A", "A"),
    ("Winner: Judgement A\n...on second thought\nWinner: Judgement B", "B"),  # last verdict wins
    ("Winner: Judgement A and Judgement B", None),
    ("Winner: Judgement A or B", None),
    ("Winner: both", None),
    ("Winner: tie", None),
    ("Judgement A is better.", None),  # no marker
    ("Winner: Judgement C", None),
    ("Winner: [Judgement B]", "B"),  # the paper's own output form
    ("**Winner:** [Judgment A]", "A"),
    ("Winner: [Judgement A | Judgement B]", None),  # an echo of the instruction's placeholder
    ("Winner: [Judgement A/B]", None),
    ("Winner: Judgement Apple", None),
    ("", None),
    # real output of the embedded model: it echoed the instruction line, which names both
    ('Compare the two evaluations in a few sentences. The last line of what you write must be exactly '
     '"Winner: Judgement A" or "Winner: Judgement B".', None),
    ('Judgement A: "Cutting Edge Research: Changing Human Intelligence"\nJudgement B: "Leverage Your Brain: The '
     'Benefits of a Clear-Minded Brain"', None),
]


@pytest.mark.parametrize("text,want", WINNER_CASES)
def test_parse_winner(text, want):
    assert parse_winner(text) == want


# -----------------------------------------------------------------------------
# Actor pairs: hand-worked cases. Responses by length: a=1, bb=2, ccc=3, dddd=4, eeeee=5 characters.

R = ["a", "bb", "ccc", "dddd", "eeeee"]


def test_rho_zero_is_best_vs_worst():
    # scores 1..5: S_max 5 (eeeee), S_min 1 (a)
    assert select_actor_pair(R, [1, 2, 3, 4, 5], 0.0) == ((4, 0), None)


def test_rho_032_prefers_short_chosen_and_long_rejected():
    # S_max 4.5, S_min 1: chosen threshold 0.68*4.5 + 0.32*1 = 3.38 -> {bb 4.0, dddd 4.5}, shortest bb;
    # rejected threshold 0.68*1 + 0.32*4.5 = 2.12 -> {a 1.0, eeeee 2.0}, longest eeeee
    assert select_actor_pair(R, [1.0, 4.0, 3.0, 4.5, 2.0], 0.32) == ((1, 4), None)


def test_rho_one_is_shortest_vs_longest():
    assert select_actor_pair(R, [5, 1, 2, 3, 4], 1.0) == ((0, 4), None)


def test_ties_and_missing_scores():
    assert select_actor_pair(R, [3, 3, 3, 3, 3], 0.0) == (None, "tie")
    assert select_actor_pair(R, [None, 2, None, None, None], 0.0) == (None, "too few scored responses")
    # None scores are ignored: best of the rest is dddd (4), worst bb (2)
    assert select_actor_pair(R, [None, 2, None, 4, None], 0.0) == ((3, 1), None)
    # equal lengths among qualifying responses: the higher-scored chosen, the lower-scored rejected
    assert select_actor_pair(["xx", "yy", "zz"], [5, 5, 1], 0.0) == ((0, 2), None)


def test_length_cap_and_same_response():
    assert select_actor_pair(R, [1, 2, 3, 4, 5], 0.0, max_chosen_chars=4) == (None, "chosen over length cap")
    # rho 0.6: thresholds cross (chosen >= 2.6, rejected <= 3.4); "bb" (3) is the shortest of {aaa, bb}
    # and the longest of {bb, c}
    assert select_actor_pair(["aaa", "bb", "c"], [5, 3, 1], 0.6) == (None, "chosen is rejected")


def test_expected_value_and_cut():
    lps = [math.log(p) for p in (0.1, 0.1, 0.1, 0.1, 0.2, 0.4)]
    v, mass = expected_value(lps, range(6))
    assert v == pytest.approx((0.1 * (0 + 1 + 2 + 3) + 0.2 * 4 + 0.4 * 5) / 1.0)
    assert mass == pytest.approx(1.0)
    v, mass = expected_value([math.log(0.05), math.log(0.15)], [0, 5])  # renormalised over the candidates
    assert v == pytest.approx(3.75) and mass == pytest.approx(0.2)
    assert cut_at_last("Good answer.\n**Score:** 4", SCORE_MARK) == "Good answer."
    assert cut_at_last("No score given", SCORE_MARK) == "No score given"


# -----------------------------------------------------------------------------
# Position weights, battle matrix, Bradley-Terry


def test_position_weights_hand_counts():
    battles = [{"winner": "A"}] * 3 + [{"winner": "B"}] * 1 + [{"winner": None}] * 5
    assert position_weights(battles) == (0.25, 0.75)  # w1 = 3, w2 = 1
    assert position_weights([{"winner": None}]) == (0.5, 0.5)


def test_battle_matrix():
    battles = [{"first": 0, "second": 2, "winner": "A"},  # 0 beats 2 shown first
               {"first": 2, "second": 0, "winner": "B"},  # 0 beats 2 shown second
               {"first": 2, "second": 5, "winner": "A"},
               {"first": 5, "second": 2, "winner": None}]
    B = battle_matrix(battles, [0, 2, 5], 0.3, 0.7)
    assert np.allclose(B, [[0, 1.0, 0], [0, 0, 0.3], [0, 0, 0]])


def test_soft_verdicts_hand_worked():
    """Expected mode: a battle counts by the judge's probability that the first-shown judgment is better. A judge
    that prefers the first position (p 0.9 and 0.7 for judgment 0 shown first and second) still ranks 0 above 1."""
    battles = [{"first": 0, "second": 1, "winner": "A", "p_first": 0.9},
               {"first": 1, "second": 0, "winner": "A", "p_first": 0.7}]
    w1, w2 = 0.9 + 0.7, 0.1 + 0.3
    omega1, omega2 = position_weights(battles)
    assert (omega1, omega2) == pytest.approx((w2 / 2, w1 / 2))  # (0.2, 0.8)
    B = battle_matrix(battles, [0, 1], omega1, omega2)
    # B[0][1] = omega1 * 0.9 (won shown first) + omega2 * 0.3 (won shown second) = 0.18 + 0.24
    # B[1][0] = omega1 * 0.7 + omega2 * 0.1 = 0.14 + 0.08
    assert np.allclose(B, [[0, 0.42], [0.22, 0]])
    e = bradley_terry(B, prior=0.0)
    assert e[0] - e[1] == pytest.approx(np.log(0.42 / 0.22), abs=1e-8)  # two players: the log odds of the games
    # parsed verdicts are the same rule with 0/1 indicators: argmax verdicts here would cancel out (omega1 = 0)
    hard = [dict(b, p_first=None) for b in battles]
    assert position_weights(hard) == (0.0, 1.0) and np.allclose(battle_matrix(hard, [0, 1], 0.0, 1.0), 0)


def test_bradley_terry_two_players_closed_form():
    # with prior eps on each off-diagonal cell: sigma(e0 - e1) = (a + eps) / (a + b + 2 eps)
    for a, b in [(3.0, 1.0), (0.7, 0.2), (5.0, 0.0)]:
        e = bradley_terry(np.array([[0.0, a], [b, 0.0]]), prior=0.01)
        assert e[0] + e[1] == pytest.approx(0.0, abs=1e-12)
        assert e[0] - e[1] == pytest.approx(math.log((a + 0.01) / (b + 0.01)), abs=1e-8)


def test_bradley_terry_recovers_known_strengths():
    rng = np.random.default_rng(0)
    true = np.array([1.5, 0.5, 0.0, -0.5, -1.5])
    K = len(true)
    B = np.zeros((K, K))
    for m in range(K):
        for n in range(K):
            if m != n:
                p = 1 / (1 + math.exp(-(true[m] - true[n])))
                B[m, n] = rng.binomial(4000, p)
    e = bradley_terry(B, prior=0.01)
    assert np.abs(e - (true - true.mean())).max() < 0.05
    assert list(np.argsort(-e)) == [0, 1, 2, 3, 4]


def test_bradley_terry_never_winning_player_stays_finite():
    B = np.array([[0, 3, 2], [1, 0, 2], [0, 0, 0]], dtype=float)  # player 2 never wins
    e = bradley_terry(B)
    assert np.all(np.isfinite(e)) and e[2] == e.min() and abs(e.sum()) < 1e-9
    # gradient of the prior-augmented likelihood is zero at the solution
    W = B + 0.01 * (1 - np.eye(3))
    p = 1 / (1 + np.exp(-(e[:, None] - e[None, :])))
    grad = (W * (1 - p)).sum(1) - (W.T * p).sum(1)
    assert np.abs(grad).max() < 1e-8


def test_pick_response_highest_variance():
    assert pick_response([[1, 1, 1], [1, 5, None], [2, 4, 3]]) == 1
    assert pick_response([[1, None], [None, None]]) is None
    assert pick_response([[2, 4], [1, 3]]) == 0  # equal variance: lowest index


def test_judge_pair_skips():
    rec = {"judgment_indices": [0, 2, 3], "elo": [1010.0, 990.0, 1000.0], "judgments": ["x", "y", "z", "w"]}
    pair, _ = make_judge_pair(rec)
    assert (pair["chosen"], pair["rejected"]) == ("x", "z")
    assert make_judge_pair(dict(rec, elo=[1000.0] * 3)) == (None, "elo tie")
    assert make_judge_pair(dict(rec, judgments=["same", "y", "same", "w"])) == (None, "identical judgments")
    assert make_judge_pair(rec, max_chosen_chars=0) == (None, "chosen judgment over length cap")


def test_truncated_responses_are_never_chosen():
    """A response cut at its token limit: in no pair (drop, the default), or only ever the rejected one (keep)."""
    scores = [1, 2, 3, 4, 5]
    best_cut, worst_cut = [False] * 4 + [True], [True] + [False] * 4
    # drop: the rest decide; best vs worst among them is dddd (4) vs a (1)
    assert select_actor_pair(R, scores, 0.0, truncated=best_cut) == ((3, 0), None)
    # keep: the cut eeeee still sets S_max = 5, and nothing else reaches it
    assert select_actor_pair(R, scores, 0.0, truncated=best_cut, keep_truncated=True) == \
        (None, "only truncated responses score high enough")
    # a cut worst response: rejected under keep, left out under drop (then bb, 2, is the worst)
    assert select_actor_pair(R, scores, 0.0, truncated=worst_cut, keep_truncated=True) == ((4, 0), None)
    assert select_actor_pair(R, scores, 0.0, truncated=worst_cut) == ((4, 1), None)
    from judge import make_actor_pairs
    rec = {"id": "q", "prompt": "p", "responses": R, "score": scores, "finish_reasons": ["length"] + ["stop"] * 4}
    (pair,), _ = make_actor_pairs([rec], 0.0, keep_truncated=True)
    assert pair["rejected"] == "a" and pair["rejected_truncated"] is True
    (pair,), _ = make_actor_pairs([rec], 0.0)
    assert pair["rejected"] == "bb" and "rejected_truncated" not in pair


def test_truncated_judgments_are_never_chosen():
    rec = {"judgment_indices": [0, 2, 3], "elo": [1010.0, 990.0, 1000.0], "judgments": ["x", "y", "z", "w"]}
    pair, _ = make_judge_pair(rec, truncated=[True, False, False, False])  # the best-rated judgment was cut
    assert (pair["chosen"], pair["rejected"]) == ("w", "z")
    pair, _ = make_judge_pair(rec, truncated=[False, False, True, False])  # the worst one was cut: still rejected
    assert (pair["chosen"], pair["rejected"], pair["rejected_truncated"]) == ("x", "z", True)
    assert make_judge_pair(rec, truncated=[True, True, True, True]) == (None, "only truncated judgments")


@pytest.mark.parametrize("text", [
    "Clear and correct.",  # nothing to cut: the whole judgment, then the probe
    "Clear and correct.\n\n",  # trailing newlines go (cut_at_last strips them)
    "Good answer.\nScore: 4",  # the judgment's own score is cut off, the probe asks again
    "**Score:** 3 ... on reflection, better.\nScore: 5 points",  # the last mark counts
    "Très bien, élégant.\nScore: 2",  # characters of several bytes before the cut
    "",  # an empty judgment (the first token was a stop)
])
def test_probe_feeds_the_cut_text_then_the_head(text, tiny_ckpt):
    """What the expected mode reads the digit after: the judgment up to its last `Score:`, a newline and
    `Score: `, fed as the judgment's own tokens up to the cut and the tokens of the rest."""
    from tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(tiny_ckpt)
    fields = make_probe(tok, SCORE_MARK, ("Score: ", [tok.encode(str(d))[0] for d in range(6)]))
    tokens = tok.encode(text)
    keep, suffix = fields["probe"](tokens)
    assert 0 <= keep <= len(tokens) and len(suffix) <= fields["probe_room"]
    assert tok.decode(tokens[:keep]) + tok.decode(suffix) == cut_at_last(text, SCORE_MARK) + "\nScore: "
