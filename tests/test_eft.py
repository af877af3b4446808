"""eft.py: the agreement rule against hand-worked cases, the Open Assistant reader on a fixture written for this
project, and the stage end to end (a programmatic judge, then the tiny model with a kill and resume)."""
import json
import os

import pytest

import eft

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "oasst_trees.jsonl")


@pytest.mark.parametrize("ranks,scores,want", [
    ([0, 1, 2], [5, 3, 1], True),
    ([0, 1, 2], [5, 3, 3], False),  # different ranks, equal scores: not ordered as people ordered them
    ([0, 1, 2], [3, 5, 1], False),  # an inversion
    ([0, 0, 1], [4, 5, 1], True),  # equal ranks may score anything
    ([0, 0, 1], [4, 4, 1], True),
    ([0, 0, 1], [4, 1, 1], False),  # a tie with the worse-ranked one
    ([1, 0], [2.5, 4.0], True),  # ranks need not come sorted
    ([0, 1], [None, 1], False),  # an unparseable judgment never agrees
])
def test_agrees(ranks, scores, want):
    assert eft.agrees(ranks, scores) is want


def test_read_oasst_first_turns():
    recs, skips = eft.read_oasst(FIXTURE)
    assert [r["id"] for r in recs] == ["t-bread", "t-prime"]
    bread = recs[0]
    assert bread["prompt"] == "How do I keep bread fresh for longer?"
    assert bread["ranks"] == [0, 1, 2]  # sorted best first; the deleted reply and the second turn are left out
    assert bread["responses"][0].startswith("Keep it in a bread box")
    assert skips == {"other language": 1, "fewer than 2 ranked replies": 1}
    everything, _ = eft.read_oasst(FIXTURE, lang="")
    assert [r["id"] for r in everything] == ["t-bread", "t-prime", "t-german"]


def test_bad_trees_are_named(tmp_path):
    bad = tmp_path / "trees.jsonl"
    bad.write_text(json.dumps({"prompt": "not a message"}) + "\n")
    with pytest.raises(SystemExit, match=r"trees.jsonl:1: expected an Open Assistant tree"):
        eft.read_oasst(str(bad))
    ranked = tmp_path / "ranked.jsonl"
    ranked.write_text(json.dumps({"id": "a", "prompt": "p", "responses": ["x", "y"], "ranks": [0]}) + "\n")
    with pytest.raises(SystemExit, match=r"ranked.jsonl:1: `ranks` must be a list of finite numbers"):
        eft.read_ranked(str(ranked))


def tree(tid="t1", text="Which bread keeps longest?", ranks=(0, 1), **root):
    replies = [{"role": "assistant", "text": f"reply {k}", "rank": r} for k, r in enumerate(ranks)]
    return {**({"message_tree_id": tid} if tid else {}), "prompt": {"text": text, "lang": "en", "replies": replies, **root}}


@pytest.mark.parametrize("trees,message", [
    # every one of these used to pass the reader and fail later on eft.py's own ranked.jsonl, or not at all
    ([tree(), tree(tid=None)], r"trees.jsonl:2: no tree id"),
    ([tree(tid=None, message_id="m1"), tree("t2"), tree("m1")], r"trees.jsonl:3: duplicate tree id 'm1' \(first on line 1\)"),
    ([tree(text="  ")], r"trees.jsonl:1: the prompt's `text` is empty"),
    ([tree(ranks=(0, True))], r"trees.jsonl:1: a reply's `rank` is True"),  # bool is an int to Python, not a rank
    ([tree(ranks=(0, 1.5))], r"trees.jsonl:1: a reply's `rank` is 1.5"),
])
def test_oasst_trees_are_checked_where_the_user_wrote_them(tmp_path, trees, message):
    path = tmp_path / "trees.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in trees))
    with pytest.raises(SystemExit, match=message):
        eft.read_oasst(str(path))


def test_ranks_must_be_finite(tmp_path):
    ranked = tmp_path / "ranked.jsonl"
    ranked.write_text('{"id": "a", "prompt": "p", "responses": ["x", "y"], "ranks": [0, NaN]}\n')  # Python's json reads NaN
    with pytest.raises(SystemExit, match=r"ranked.jsonl:1: `ranks` must be a list of finite numbers"):
        eft.read_ranked(str(ranked))


def test_redo_reaches_the_judge_stage(tmp_path):
    """eft.py had no --redo, so a judge stage refused for changed settings could not be started again."""
    import prog_judges
    out = str(tmp_path / "eft")
    first = eft.main(["--oasst", FIXTURE, "--out", out, "--judge-args", "--judge-fn prog_judges:shorter"])
    other = ["--oasst", FIXTURE, "--out", out, "--judge-args", "--judge-fn prog_judges:letters"]
    with pytest.raises(SystemExit, match=r"judgments.jsonl: was started with other settings.*--redo"):
        eft.main(other)
    assert eft.main(other + ["--redo"])["prompts"] == first["prompts"] == 2
    rec = read(os.path.join(out, "judgments.jsonl"))[0]
    assert rec["scores"][0][0] == pytest.approx(prog_judges.letters(rec["prompt"], rec["responses"][0]))


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_eft_keeps_only_judgments_that_agree_with_people(tmp_path):
    """A judge that prefers short answers agrees with the people on the prime question (the short, right
    answer ranked first) and not on the bread one (the best answer is not the shortest)."""
    out = str(tmp_path / "eft")
    counts = eft.main(["--oasst", FIXTURE, "--out", out, "--judge-args", "--judge-fn prog_judges:shorter"])
    e, i = read(os.path.join(out, "eft.jsonl")), read(os.path.join(out, "ift.jsonl"))
    assert counts["agreeing_sets"] == 1 and len(e) == 2
    assert {r["id"] for r in e} == {"t-prime/0/0", "t-prime/0/1"}
    assert all("Is 91 a prime number?" in r["prompt"] and "<request>" in r["prompt"] for r in e)
    assert e[0]["completion"].endswith("Score: 4.6")  # 5 - 16 / 40 for the 16 characters of "No: 91 = 7 x 13."
    assert [(r["id"], r["completion"][:12]) for r in i] == [("t-bread", "Keep it in a"), ("t-prime", "No: 91 = 7 x")]


def test_eft_with_the_model_resumes(tmp_path, tiny_ckpt):
    """The judge stage inside eft.py is resumable like any stage: a second run judges nothing new and writes
    the same files."""
    out = str(tmp_path / "eft")
    args = ["--oasst", FIXTURE, "--out", out, "--model", tiny_ckpt, "--n-judgments", "3",
            "--judge-args", "--max-new-tokens 6 --score-mode expected --temperature 1.0"]
    first = eft.main(args)
    files = {n: open(os.path.join(out, n)).read() for n in ("judgments.jsonl", "eft.jsonl", "ift.jsonl")}
    again = eft.main(args)
    assert again == first and first["judgment_sets"] == 6  # 2 prompts x 3 judgment indices
    assert {n: open(os.path.join(out, n)).read() for n in files} == files
    assert all(len(r["judgments"]) == 3 and len(r["judgments"][0]) == 3 for r in read(os.path.join(out, "judgments.jsonl"))[:1])
