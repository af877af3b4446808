"""tpo.py and evaluator.py: their rules against hand-worked tables, and both methods end to end on the tiny
model (files, manifest, resume)."""
import json
import math
import os
import random

import pytest
from conftest import STOPS, make_tiny_checkpoint

import evaluator
import iterate
import tpo

T, R = tpo.THOUGHT, tpo.RESPONSE


@pytest.mark.parametrize("text,want", [
    (f"{T} think about it.\n{R} The answer.", ("think about it.", "The answer.")),
    (f"{R} Straight to it.", ("", "Straight to it.")),  # no thoughts is allowed; no response is not
    (f"Some preamble {T} a\n{R} b", ("a", "b")),
    (f"{T} I will write '{R}' and then answer.\n{R} Done.", (f"I will write '{R}' and then answer.", "Done.")),  # the last marker
    (f"{T} only thoughts, never an answer", None),
    (f"{T} x\n{R}   \n", None),  # an empty response
    ("No markers at all.", None),
])
def test_split_thought(text, want):
    assert tpo.split_thought(text) == want


def test_zscores():
    assert tpo.zscores([1.0, 1.0, 1.0]) == [0.0, 0.0, 0.0]
    assert tpo.zscores([1.0, 3.0]) == pytest.approx([-1.0, 1.0])
    z = tpo.zscores([2.0, 4.0, 9.0])
    assert sum(z) == pytest.approx(0.0) and sum(x * x for x in z) / 3 == pytest.approx(1.0)


def test_tpo_pair_length_control_and_unsplittable():
    # scores 4, 5, 3; response lengths 10, 100, 10: without length control the 5 wins
    scores, lengths, ok = [4.0, 5.0, 3.0], [10, 100, 10], [True, True, True]
    assert tpo.tpo_pair(scores, lengths, ok, rho=0.0) == (1, 2)
    # z(scores) = (0, 1.22, -1.22), z(lengths) = (-0.71, 1.41, -0.71) (population std). At rho 0.5 the totals are
    # (0.35, 0.52, -0.87): the long one still wins; at rho 1.0 they are (0.71, -0.19, -0.52): the first wins and the
    # third, short but poorly scored, stays the rejected one
    assert tpo.tpo_pair(scores, lengths, ok, rho=0.5) == (1, 2)
    assert tpo.tpo_pair(scores, lengths, ok, rho=1.0) == (0, 2)
    # scores (3, 4, 5): at rho 0 the lowest is rejected; at rho 1 the totals are (-0.51, -1.41, 1.93) and the long
    # middle one is
    assert tpo.tpo_pair([3.0, 4.0, 5.0], lengths, ok, rho=0.0) == (2, 0)
    assert tpo.tpo_pair([3.0, 4.0, 5.0], lengths, ok, rho=1.0) == (2, 1)
    # an unsplittable output is the rejected one, whatever its score
    assert tpo.tpo_pair([4.0, 5.0, 0.0], lengths, [True, True, False], rho=0.0) == (1, 2)
    assert tpo.tpo_pair([5.0, 1.0, 2.0], lengths, [True, False, True], rho=0.0) == (0, 1)
    # a cut output is never chosen; nothing to prefer when all scores tie
    assert tpo.tpo_pair(scores, lengths, ok, rho=0.0, truncated=[False, True, False]) == (0, 2)
    assert tpo.tpo_pair([3.0, 3.0], [5, 5], [True, True], rho=0.0) is None
    assert tpo.tpo_pair([None, 2.0], [5, 5], [True, False], rho=0.0) is None


@pytest.mark.parametrize("text,want", [
    ("A is more helpful.\n[[A]]", "A"), ("Reasons...\nVerdict: [[B]]", "B"), ("[[ b ]]", None),
    ("First [[A]], then on reflection [[A]]", "A"),
    ("Reply [[A]] or [[B]] at the end.", None),  # both letters: an echo of the instruction
    ("A is better.", None), ("", None),
])
def test_parse_pairwise(text, want):
    assert evaluator.parse_pairwise(text) == want


def test_balance_and_consistent_accuracy():
    items = [{"id": f"{k}", "label": "A"} for k in range(5)] + [{"id": f"b{k}", "label": "B"} for k in range(2)]
    kept = evaluator.balance(items, random.Random(0))
    assert sorted(x["label"] for x in kept) == ["A", "A", "B", "B"]
    assert evaluator.balance(items[:5], random.Random(0)) == []  # no B at all: nothing balanced to keep
    table = {("A", "B"): 1.0, ("A", "A"): 0.5, ("B", "B"): 0.5, ("B", "A"): 0.0, (None, "B"): 0.5, (None, None): 0.0}
    for (first, second), want in table.items():
        assert evaluator.consistent_accuracy(first, second) == want


def test_other_prompt_pairs_never_pair_a_record_with_itself():
    recs = [{"id": str(i), "prompt": f"p{i}", "responses": [f"a{i}"]} for i in range(7)]
    pairs, alone = evaluator.other_prompt_pairs(recs, seed=3)
    assert [p["chosen"] for p in pairs] == [f"a{i}" for i in range(7)] and alone == 0
    assert all(p["rejected"] != p["chosen"] for p in pairs) and sorted(p["rejected"] for p in pairs) == sorted(p["chosen"] for p in pairs)


@pytest.mark.parametrize("answers,prompts,want", [
    # (y+ of each record, its prompt) -> the pairs made; an answer equal to y+ (or one to the same request) is no y-
    (["same", "same", "other"], ["p0", "p1", "p2"], [("same", "other"), ("same", "other"), ("other", "same")]),
    (["same", "same", "same"], ["p0", "p1", "p2"], []),
    (["a0", "a1"], ["p", "p"], []),  # one request asked twice: neither answer is worse for it
    (["a0", "a1"], ["p0", "p1"], [("a0", "a1"), ("a1", "a0")]),
])
def test_other_prompt_pairs_never_pair_an_answer_with_its_own_text(answers, prompts, want):
    recs = [{"id": str(i), "prompt": p, "responses": [a]} for i, (a, p) in enumerate(zip(answers, prompts))]
    for seed in range(5):
        pairs, alone = evaluator.other_prompt_pairs(recs, seed)
        assert sorted((p["chosen"], p["rejected"]) for p in pairs) == sorted(want) and alone == len(recs) - len(want)


@pytest.mark.parametrize("x,want", [
    (0.0, 0.5), (math.log(4), 0.8), (-math.log(4), 0.2), (800.0, 1.0), (-800.0, 0.0), (5e3, 1.0), (-5e3, 0.0),
    (math.inf, 1.0), (-math.inf, 0.0),
])
def test_sigmoid_never_overflows(x, want):
    assert evaluator.sigmoid(x) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("logp_a,logp_b,temperature,want", [
    (0.0, -5.0, 1e-3, "A"),  # a gap of 5 at temperature 1e-3 is e^5000 to 1: math.exp used to overflow here
    (-5.0, 0.0, 1e-3, "B"),
    (0.0, -1e6, 1e-300, "A"), (-700.0, 0.0, 1e-300, "B"),
    (-1.0, -2.0, 0.0, "A"), (-2.0, -1.0, 0.0, "B"), (-1.0, -1.0, 0.0, None),  # greedy; a tie has no verdict
])
def test_letter_at_extreme_temperatures(logp_a, logp_b, temperature, want):
    assert {evaluator.letter(logp_a, logp_b, temperature, seed) for seed in range(50)} == {want}


@pytest.mark.parametrize("temperature,p_b", [(1.0, 0.2), (2.0, 1 / 3)])  # softmax(log(0.8, 0.2) / T)
def test_letter_draws_at_the_judges_odds(temperature, p_b):
    n = 4000
    said_b = sum(evaluator.letter(math.log(0.8), math.log(0.2), temperature, seed) == "B" for seed in range(n)) / n
    assert said_b == pytest.approx(p_b, abs=4 * math.sqrt(p_b * (1 - p_b) / n))


def test_tpo_end_to_end(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", seed=5, stop_chars=STOPS)
    run = str(tmp_path / "run")
    args = ["--run-dir", run, "--model", ckpt, "--method", "tpo", "--iterations", "1", "--prompts-per-iter", "4",
            "--n-responses", "3", "--n-judgments", "2", "--max-new-tokens", "10", "--judge-max-new-tokens", "4",
            "--eval-prompts-n", "2", "--eval-max-new-tokens", "6", "--meta-max-new-tokens", "3", "--lr", "1e-3"]
    iterate.main(args)
    d = os.path.join(run, "iter1")
    man = json.load(open(os.path.join(d, "manifest.json")))
    assert list(man["stages"]) == ["prompts", "responses", "split", "judgments", "tpo_pairs", "train", "evaluate",
                                      "judge_eval", "report"]
    p = json.loads(open(os.path.join(d, "prompts.jsonl")).readline())
    assert T in p["prompt"] and p["request"] in p["prompt"] and T not in p["request"]
    split = [json.loads(x) for x in open(os.path.join(d, "split.jsonl"))]
    # a random model never writes the markers: every output is unsplittable, and the judge saw empty responses
    assert all(not any(r["splittable"]) and set(r["responses"]) == {""} for r in split)
    assert man["stages"]["tpo_pairs"]["counts"]["tpo_pairs"] == 0 and man["stages"]["train"]["counts"]["steps"] == 0
    assert {how for *_, how in iterate.main(args)} == {"done before"}


def test_self_taught_evaluator_end_to_end(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", seed=5, stop_chars=STOPS)
    run = str(tmp_path / "run")
    args = ["--run-dir", run, "--model", ckpt, "--preset", "ste-demo", "--prompts-per-iter", "6", "--max-new-tokens", "8",
            "--judge-max-new-tokens", "6", "--meta-max-new-tokens", "6", "--eval-prompts-n", "3", "--eval-max-new-tokens", "6",
            "--n-judgments", "4", "--sft-lr", "1e-3", "--ste-dpo", "--lr", "1e-3"]
    iterate.main(args)
    d = os.path.join(run, "iter1")
    man = json.load(open(os.path.join(d, "manifest.json")))
    assert list(man["stages"]) == ["prompts", "responses", "eval_answers", "eval_pairs", "contrast", "pairwise", "select",
                                   "train", "train_dpo", "evaluate", "report"]
    # SFT from the seed into sft_model, then DPO + NLL from it (or, without right-vs-wrong pairs, a copy of it)
    dpo_pairs = os.path.join(d, "ste_sft.pairs.jsonl")
    assert os.path.exists(os.path.join(d, "sft_model", "model.safetensors")) and os.path.exists(os.path.join(d, "model", "model.safetensors"))
    assert (man["stages"]["train_dpo"]["counts"]["steps"] > 0) == (os.path.getsize(dpo_pairs) > 0)
    judged = [json.loads(x) for x in open(os.path.join(d, "pairwise.jsonl"))]
    assert len(judged) == 12 and {r["label"] for r in judged} == {"A", "B"}  # 6 pairs x 2 orders
    assert all(v in ("A", "B") and r["judgments"][k].endswith(f"Verdict: [[{v}]]")
               for r in judged for k, v in enumerate(r["verdicts"]))  # expected mode writes its verdict out
    sft = [json.loads(x) for x in open(os.path.join(d, "ste_sft.jsonl"))] if os.path.getsize(os.path.join(d, "ste_sft.jsonl")) else []
    assert sum(r["label"] == "A" for r in sft) == sum(r["label"] == "B" for r in sft)
    res = json.load(open(os.path.join(d, "eval", "results.json")))
    assert res["metric"] == "judge-accuracy" and res["pairs"] == 3 and 0 <= res["a"]["accuracy"] <= 1
    # expected mode: p(right letter) and p(first-shown letter) from the stored p(A) of each order, worked out here
    for side in ("a", "b"):
        p_a = {r["id"]: r["p_a"][0] for r in map(json.loads, open(os.path.join(d, "eval", f"verdicts_{side}.jsonl")))}
        pairs = sorted({k.split("/")[0] for k in p_a})
        right = sum((p_a[f"{i}/ab"] + 1 - p_a[f"{i}/ba"]) / 2 for i in pairs) / len(pairs)
        first = sum(p_a.values()) / len(p_a)
        assert res[side]["p_right"] == pytest.approx(right, abs=1e-4) and res[side]["p_first"] == pytest.approx(first, abs=1e-4)
        acc = sum(((p_a[f"{i}/ab"] > 0.5) + (p_a[f"{i}/ba"] < 0.5)) / 2 for i in pairs) / len(pairs)
        assert res[side]["accuracy"] == pytest.approx(acc, abs=1e-4)  # greedy verdicts are the likelier letter
    assert {how for *_, how in iterate.main(args)} == {"done before"}


SEEN = []


def words_judge(prompt, response):
    """A judge function for the stage test: records what it is shown; more words score higher (up to 5)."""
    SEEN.append((prompt, response))
    return min(5.0, float(len(response.split())))


def test_tpo_stages_judge_sees_responses_and_pairs_keep_thoughts(tmp_path):
    # the split step, a judge shown only the response parts, and pairs made of whole outputs under the thought prompt
    outs = [f"{T} long careful thought here.\n{R} one two three four", f"{T} hmm.\n{R} one", f"{T} I never answer"]
    recs = [{"id": "q1", "prompt": "THINK: Say words.", "request": "Say words.", "responses": outs}]
    resp, split, judged, pairs = (str(tmp_path / f) for f in ("r.jsonl", "s.jsonl", "j.jsonl", "p.jsonl"))
    with open(resp, "w") as f:
        f.write(json.dumps(recs[0]) + "\n")
    assert tpo.main(["--step", "split", "--responses", resp, "--out", split]) == {"records": 1, "outputs": 3, "unsplittable": 1}
    import judge
    SEEN.clear()
    judge.main(["--responses", split, "--out", judged, "--judge-fn", "test_tpo_evaluator:words_judge"])
    assert ("Say words.", "one two three four") in SEEN and ("Say words.", "one") in SEEN
    assert all(T not in r and R not in r and "THINK" not in p for p, r in SEEN)
    # the chosen response has 4 words; the rejected output has no response part, so no rejected mean
    assert tpo.main(["--step", "pairs", "--judgments", judged, "--out", pairs]) == {
        "tpo_pairs": 1, "prompts_without_pairs": 0, "mean_chosen_words": 4.0, "mean_rejected_words": None}
    (pair,) = [json.loads(x) for x in open(pairs)]
    # the best response wins with its thoughts; the output without a response marker is the rejected one
    assert pair["prompt"] == "THINK: Say words." and pair["chosen"] == outs[0] and pair["rejected"] == outs[2]


def test_pair_counts_give_the_mean_words_of_the_responses(tmp_path):
    def rec(i, responses, scores, splittable):
        return {"id": i, "thought_prompt": "THINK: q", "responses": responses, "score": scores, "splittable": splittable,
                "outputs": [f"{T} a long thought that is never counted\n{R} {r}" for r in responses]}
    recs = [rec("1", ["**Note:** one two - three", "one two"], [5.0, 1.0], [True, True]),  # 4 words (not "-") vs 2
            rec("2", ["alpha beta", ""], [4.0, None], [True, False]),  # 2 words; the rejected has no response
            rec("3", ["x y z", "x y z"], [3.0, 3.0], [True, True]),  # a tie: no pair
            rec("4", ["a b c d e f g h", "a b c d e f"], [2.0, 4.0], [True, True])]  # 6 words chosen, 8 rejected
    pairs, counts = tpo.make_pairs(recs, rho=0.0)
    assert counts == {"tpo_pairs": 3, "prompts_without_pairs": 1, "mean_chosen_words": 4.0, "mean_rejected_words": 5.0}
    # the iteration's report says them in words; unknown means n/a
    import report
    for words, line in (((4.0, 5.0), "TPO pairs: chosen responses 4.0 words on average, rejected 5.0"),
                        ((None, None), "TPO pairs: chosen responses n/a words on average, rejected n/a")):
        c = dict(counts, mean_chosen_words=words[0], mean_rejected_words=words[1])
        report.write_report(str(tmp_path), 1, {"method": "tpo", "stages": {"tpo_pairs": {"seconds": 0.1, "counts": c}}})
        assert line in open(tmp_path / "report.md").read()


def test_thought_template_keeps_the_markers_and_asks_for_detail():
    from common import TEMPLATES, load_template, render
    text = load_template(os.path.join(TEMPLATES, "thought.txt"), ("prompt",))
    assert f'"{T}"' in text and f'"{R}"' in text and text.index(T) < text.index(R)
    assert "detail" in text and "Say hi." in render(text, prompt="Say hi.")


def test_select_keeps_right_ended_judgments_balanced(tmp_path):
    def rec(i, label, verdicts, finish, **kw):
        return {"id": i, "prompt": f"p{i}", "label": label, "judgments": [f"{i} j{k}" for k in range(len(verdicts))],
                "verdicts": verdicts, "finish_reasons": finish, **kw}
    judged = [rec("1/ab", "A", ["A", "B"], ["stop", "stop"]),      # right first: SFT + a DPO pair (j0 over j1)
              rec("2/ab", "A", ["A", "A"], ["length", "stop"]),    # the cut one is passed over: j1
              rec("3/ba", "B", ["A", "B"], ["stop", "length"]),    # right only when cut: nothing (parse mode)
              rec("4/ba", "B", ["A", "B"], ["stop", "length"], verdict_written=True),  # expected mode: the verdict ended it
              rec("5/ab", "A", [None, "B"], ["stop", "stop"])]     # never right
    path = tmp_path / "pairwise.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in judged))
    counts = evaluator.main(["--step", "select", "--judged", str(path), "--out", str(tmp_path / "sft.jsonl")])
    assert counts == {"right_prompts": 3, "sft_records": 2, "dpo_pairs": 2}  # 2 A-right, 1 B-right: one of each kept
    sft = [json.loads(x) for x in open(tmp_path / "sft.jsonl")]
    assert sorted(r["label"] for r in sft) == ["A", "B"] and "4/ba j1" in [r["completion"] for r in sft]
    assert {r["completion"] for r in sft if r["label"] == "A"} <= {"1/ab j0", "2/ab j1"}
    pairs = [json.loads(x) for x in open(tmp_path / "sft.pairs.jsonl")]
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {("1/ab j0", "1/ab j1"), ("4/ba j1", "4/ba j0")}


def test_strip_thoughts_for_one_side(tmp_path, monkeypatch):
    # a TPO model (A, asked to think) against its direct-answer control (B, asked plainly)
    import evaluate
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", seed=5, stop_chars=STOPS)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Say {i}."}) + "\n" for i in range(2)))
    base = ["--a", ckpt, "--b", ckpt, "--judge", ckpt, "--prompts", str(prompts), "--max-new-tokens", "6",
            "--judge-max-new-tokens", "4", "--verdict-mode", "expected"]
    res = evaluate.main(base + ["--out-dir", str(tmp_path / "e"), "--strip-thoughts", "a"])
    asked = {side: [json.loads(x)["prompt"] for x in open(tmp_path / "e" / f"answers_{side}.jsonl")] for side in "ab"}
    assert all(T in p and "Say" in p for p in asked["a"]) and asked["b"] == ["Say 0.", "Say 1."]
    assert res["prompts"] == 2
    # the default output folder tells the settings apart
    monkeypatch.chdir(tmp_path)
    dirs = {evaluate.default_out_dir(evaluate.parse_args(base + extra)) for extra in ([], ["--strip-thoughts"], ["--strip-thoughts", "b"])}
    assert len(dirs) == 3
