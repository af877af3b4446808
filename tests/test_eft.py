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
    counts = eft.main(["--oasst", FIXTURE, "--out", out, "--judge-args", "--judge-fn prog_judges:shorter", "--eft-share", "1"])
    e, i = read(os.path.join(out, "eft.jsonl")), read(os.path.join(out, "ift.jsonl"))
    assert counts["agreeing_sets"] == 1 and len(e) == 2 and i == [] and counts["ift"] == 0  # every prompt went to EFT
    assert {r["id"] for r in e} == {"t-prime/0/0", "t-prime/0/1"}
    assert all("Is 91 a prime number?" in r["prompt"] and "<request>" in r["prompt"] for r in e)
    assert e[0]["completion"].endswith("Score: 4.6")  # 5 - 16 / 40 for the 16 characters of "No: 91 = 7 x 13."


def test_eft_with_the_model_resumes(tmp_path, tiny_ckpt):
    """The judge stage inside eft.py is resumable like any stage: a second run judges nothing new and writes
    the same files."""
    out = str(tmp_path / "eft")
    args = ["--oasst", FIXTURE, "--out", out, "--model", tiny_ckpt, "--n-judgments", "3", "--eft-share", "1",
            "--judge-args", "--max-new-tokens 6 --score-mode expected --temperature 1.0"]
    first = eft.main(args)
    files = {n: open(os.path.join(out, n)).read() for n in ("judgments.jsonl", "eft.jsonl", "ift.jsonl")}
    again = eft.main(args)
    assert again == first and first["judgment_sets"] == 6  # 2 prompts x 3 judgment indices
    assert {n: open(os.path.join(out, n)).read() for n in files} == files
    assert all(len(r["judgments"]) == 3 and len(r["judgments"][0]) == 3 for r in read(os.path.join(out, "judgments.jsonl"))[:1])


@pytest.mark.parametrize("share,n_eft", [(0.5, 2), (0.3, 1), (0.1, 1), (0.6, 2), (0.9, 4), (1.0, 4)])
def test_split_prompts_by_text(share, n_eft):
    """4 distinct texts (5 records, "a" twice): round(share x 4) of them, at least one, go to EFT, each text with
    all its records; the two sides share no text, and a seed gives the same split every time."""
    recs = [{"id": str(k), "prompt": t} for k, t in enumerate("abacd")]
    e, i = eft.split_prompts(recs, share, seed=3)
    texts = {r["prompt"] for r in e}
    assert len(texts) == n_eft and not texts & {r["prompt"] for r in i} and len(e) + len(i) == 5
    assert len(e) == n_eft + ("a" in texts)
    assert eft.split_prompts(recs, share, seed=3) == (e, i)


def test_split_prompts_follows_the_seed():
    recs = [{"id": str(k), "prompt": f"prompt {k}"} for k in range(20)]
    splits = {tuple(r["id"] for r in eft.split_prompts(recs, 0.5, seed)[0]) for seed in range(5)}
    assert len(splits) > 1 and all(len(s) == 10 for s in splits)


@pytest.mark.parametrize("scores,want", [
    ([5, 5, 5, 5, 4, 4, 3], {5: 2, 4: 2, 3: 1}),  # the 5s (4 of them) thinned to the 2 of the 4s
    ([4.4, 4.2, 3.9, 5.0, 2.0], {4: 1, 5: 1, 2: 1}),  # scores count by their whole number: three 4s, thinned to 1
    ([1, 5, 5, 5, 5, 5, 2, 2, 2], {1: 1, 5: 3, 2: 3}),
    ([3, 3, 2, 2], {3: 2, 2: 2}),  # a tie for the most: nothing to thin
    ([5, 5, 5], {5: 3}),  # one score: nothing to thin
    ([], {}),
])
def test_rebalance_table(scores, want):
    recs = [{"id": str(k), "score": s} for k, s in enumerate(scores)]
    got = eft.rebalance(recs, seed=0)
    counts = {}
    for r in got:
        counts[round(r["score"])] = counts.get(round(r["score"]), 0) + 1
    assert counts == want
    assert [r["id"] for r in got] == sorted((r["id"] for r in got), key=int)  # what is kept keeps its order
    assert eft.rebalance(recs, seed=0) == got


def test_rebalance_draws_by_the_seed():
    recs = [{"id": str(k), "score": 5 if k < 8 else 3} for k in range(10)]
    kept = {tuple(r["id"] for r in eft.rebalance(recs, seed) if r["score"] == 5) for seed in range(6)}
    assert len(kept) > 1 and all(len(k) == 2 for k in kept)


def test_eft_and_ift_prompts_are_disjoint(tmp_path):
    """7 records, 6 distinct texts (two ids ask the same): half the texts are judged for EFT, the others' best
    replies are IFT; no request is on both sides. The judge prefers short answers: each EFT set scores 5 ("ok"),
    3 and 3 (80 and 81 characters), so it agrees with ranks 0, 1, 1, and --rebalance thins the 3s to the 5s."""
    texts = ["Name a fruit.", "Name a colour.", "Name a river.", "Name a fruit.", "Name a city.", "Name a tree.", "Name a bird."]
    ranked = tmp_path / "ranked.jsonl"
    ranked.write_text("".join(json.dumps({"id": f"p{k}", "prompt": t, "responses": ["ok", "y" * 80, "z" * 81], "ranks": [0, 1, 1]})
                              + "\n" for k, t in enumerate(texts)))
    out = str(tmp_path / "eft")
    counts = eft.main(["--ranked", str(ranked), "--out", out, "--n-judgments", "1", "--rebalance",
                       "--judge-args", "--judge-fn prog_judges:shorter"])
    e, i, judged = (read(os.path.join(out, f)) for f in ("eft.jsonl", "ift.jsonl", "ranked.jsonl"))
    eft_texts, ift_texts = {r["prompt"] for r in judged}, {r["prompt"] for r in i}
    assert len(eft_texts) == 3 and len(ift_texts) == 3 and not eft_texts & ift_texts
    assert not any(t in r["prompt"] for t in ift_texts for r in e)  # no IFT request inside an EFT judge prompt
    n = counts["eft_prompts"]  # 3, or 4 when the fruit question (twice) is on the EFT side
    assert n == len(judged) and n + counts["ift"] == 7 and len(i) == counts["ift"]
    assert counts["agreeing_sets"] == n and counts["rebalanced_away"] == n and len(e) == counts["eft"] == 2 * n
    assert sum(r["score"] == pytest.approx(4.95) for r in e) == n and sum(round(r["score"]) == 3 for r in e) == n
    assert all(r["completion"] == "ok" for r in i)
