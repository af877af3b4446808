"""The sibling methods' pair stages (lift.py, tpo.py, reasoning.py) as programs: malformed input records are
refused naming file and line, every pair keeps the system prompt its responses were sampled with, and a cut
output is never chosen (TPO's --truncated drop|keep)."""
import json
import re

import pytest

import lift
import reasoning
import tpo

T, R = tpo.THOUGHT, tpo.RESPONSE


def write(path, recs):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs))
    return str(path)


GOOD = {"id": "a", "prompt": "What is 3 + 4?", "answer": "7", "responses": ["Final answer: 7"], "finish_reasons": ["stop"]}
JUDGED = {"id": "a", "prompt": "Say words.", "thought_prompt": "THINK: Say words.", "responses": ["one", ""],
          "outputs": [f"{R} one", "no marker"], "splittable": [True, False], "score": [3.0, None]}


# (script, its argv before the file, a bad second record, what the message says)
@pytest.mark.parametrize("script,argv,bad,msg", [
    (reasoning, ["--method", "irpo", "--responses"], dict(GOOD, id="b", responses="Final answer: 7"), "`responses` must be a non-empty list"),
    (reasoning, ["--method", "irpo", "--responses"], dict(GOOD, id="b", responses=[7]), "`responses` must be a non-empty list"),
    (reasoning, ["--method", "irpo", "--responses"], dict(GOOD, id="b", finish_reasons=["stop", "stop"]), "`finish_reasons` must be a list of 1"),
    (reasoning, ["--method", "irpo", "--responses"], '{"id": "b", "prompt": "q", "answer": NaN, "responses": ["Final answer: 7"]}', "no final answer"),
    (reasoning, ["--method", "irpo", "--responses"], {k: v for k, v in GOOD.items() if k != "answer"} | {"id": "b"}, "needs an `answer`"),
    (reasoning, ["--method", "scpo", "--responses"], dict(GOOD, id="b", answer=[7]), "no final answer"),
    (reasoning, ["--method", "irpo", "--responses"], dict(GOOD, id="b", solution="Final answer: 8"), "`solution` must"),
    (reasoning, ["--method", "scpo", "--responses"], dict(GOOD, id="b", system=3), "`system` must be a string"),
    (lift, ["--responses"], dict(GOOD, id="b", responses=None), "`responses` must be a non-empty list"),
    (lift, ["--responses"], dict(GOOD, id="b", finish_reasons="stop"), "`finish_reasons` must be a list"),
    (lift, ["--pairs"], {"prompt": "q", "chosen": "a", "rejected": 3}, "`rejected` must be a string"),
    (lift, ["--pairs"], {"prompt": "q", "chosen": "a", "rejected": "b", "rejected_truncated": "yes"}, "`rejected_truncated` must be"),
    (lift, ["--pairs"], {"prompt": None, "chosen": "a", "rejected": "b"}, "`prompt` must be a non-empty string"),
    (tpo, ["--step", "split", "--responses"], dict(GOOD, id="b", responses=[None]), "`responses` must be a non-empty list"),
    (tpo, ["--step", "split", "--responses"], dict(GOOD, id="b", request=5), "`request` must be"),
    (tpo, ["--step", "pairs", "--judgments"], dict(JUDGED, id="b", score=["high", 1.0]), "`score` must be a list of numbers or nulls"),
    (tpo, ["--step", "pairs", "--judgments"], dict(JUDGED, id="b", score=[1.0]), "`score` must be a list"),
    (tpo, ["--step", "pairs", "--judgments"], dict(JUDGED, id="b", splittable=[1, 0]), "`splittable` must be a list"),
    (tpo, ["--step", "pairs", "--judgments"], dict(JUDGED, id="b", outputs=["x"]), "`outputs` must be a list"),
    (tpo, ["--step", "pairs", "--judgments"], dict(JUDGED, id="b", thought_prompt=None), "`thought_prompt` must be"),
])
def test_bad_records_name_file_and_line(tmp_path, script, argv, bad, msg):
    first = {"prompt": "q", "chosen": "a", "rejected": "b"} if "--pairs" in argv else JUDGED if "--judgments" in argv else GOOD
    path = write(tmp_path / "in.jsonl", [first, bad])
    with pytest.raises(SystemExit, match=rf"in.jsonl:2: {re.escape(msg)}"):
        script.main(argv + [path, "--out", str(tmp_path / "out.jsonl")])


def read(path):
    return [json.loads(x) for x in open(path)]


def test_pairs_keep_the_system_prompt(tmp_path):
    out = str(tmp_path / "out.jsonl")
    # lift --responses: two answers of 1 and 3 words
    lift.main(["--responses", write(tmp_path / "r.jsonl", [{"id": "a", "prompt": "Hi", "system": "Be kind.",
                                                               "responses": ["one", "one two three"]}]), "--out", out])
    assert [p["system"] for p in read(out)] == ["Be kind."]
    # lift --pairs: a pair 1 vs 11 words gives a loose and a binding copy
    lift.main(["--pairs", write(tmp_path / "p.jsonl", [{"id": "a", "prompt": "Hi", "system": "Be kind.", "chosen": "x",
                                                        "rejected": " ".join(["y"] * 11)}]), "--out", out])
    assert [(p["kind"], p["system"]) for p in read(out)] == [("lift-loose", "Be kind."), ("lift", "Be kind.")]
    # tpo --step pairs
    tpo.main(["--step", "pairs", "--judgments", write(tmp_path / "j.jsonl", [dict(JUDGED, system="Be kind.")]), "--out", out])
    assert [p["system"] for p in read(out)] == ["Be kind."]


# scores, response lengths, splittable, cut -> the pair under --truncated drop and keep ((chosen, rejected) or None);
# lengths are equal (rho 0 anyway) so the z-scores are those of the scores alone
@pytest.mark.parametrize("scores,splittable,cut,drop,keep", [
    ([4.0, 5.0, 3.0], [True] * 3, [False, False, True], (1, 0), (1, 2)),  # drop: the cut low one is not the loser
    ([4.0, 5.0, 3.0], [True] * 3, [False, True, False], (0, 2), (0, 2)),  # the cut best one is never chosen
    ([4.0, 5.0, None], [True, True, False], [False, False, True], (1, 0), (1, 2)),  # a cut unsplittable output
    ([4.0, 5.0], [True, True], [True, False], None, (1, 0)),  # drop leaves one output: nothing to prefer
])
def test_tpo_truncated_drop_and_keep(scores, splittable, cut, drop, keep):
    lengths = [10] * len(scores)
    assert tpo.tpo_pair(scores, lengths, splittable, 0.0, cut) == drop
    assert tpo.tpo_pair(scores, lengths, splittable, 0.0, cut, keep_truncated=True) == keep


def test_tpo_truncated_flag(tmp_path):
    rec = dict(JUDGED, responses=["one", "two words", "a b c"], outputs=[f"{R} one", f"{R} two words", f"{R} a b c"],
               splittable=[True] * 3, score=[4.0, 5.0, 3.0], finish_reasons=["stop", "stop", "length"])
    path, out = write(tmp_path / "j.jsonl", [rec]), str(tmp_path / "out.jsonl")
    tpo.main(["--step", "pairs", "--judgments", path, "--out", out])
    assert [(p["chosen"], p["rejected"], p.get("rejected_truncated")) for p in read(out)] == [(f"{R} two words", f"{R} one", None)]
    tpo.main(["--step", "pairs", "--judgments", path, "--out", out, "--truncated", "keep"])
    assert [(p["chosen"], p["rejected"], p.get("rejected_truncated")) for p in read(out)] == [(f"{R} two words", f"{R} a b c", True)]


def test_lift_pairs_never_choose_a_cut_response(tmp_path):
    # a reply cut at its token limit in a script without spaces is one "word": shorter than the whole 12-word
    # answer, so a binding limit would make it the chosen one
    cjk = "東京タワーは高いです。それから"
    pairs = [{"id": "a", "prompt": "Describe Tokyo.", "chosen": " ".join(["word"] * 12), "rejected": cjk, "rejected_truncated": True}]
    out = str(tmp_path / "out.jsonl")
    lift.main(["--pairs", write(tmp_path / "p.jsonl", pairs), "--out", out])
    got = read(out)
    assert got and all(p["chosen"] != cjk and p.get("rejected_truncated") == (p["rejected"] == cjk) for p in got)
    assert not any(p.get("chosen_truncated") for p in got)
