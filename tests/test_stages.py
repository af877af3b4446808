"""The stage scripts end to end on a tiny random checkpoint: file formats of DESIGN.md section 4, bad input,
kill-and-resume. (A random model writes no parseable scores: the counts and the expected modes cover it.)"""
import json
import os

import pytest

import judge
import meta_judge
import sample


def write_prompts(path, n=4):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"Question number {i}: what is {i} plus {i}?"}) + "\n")
    return str(path)


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_sample_judge_meta_judge_files(tmp_path, tiny_ckpt):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = str(tmp_path / "responses.jsonl")
    counts = sample.main(["--model", tiny_ckpt, "--prompts", prompts, "--out", out, "--n", "3",
                          "--max-new-tokens", "12", "--temperature", "1.0", "--no-dedup"])
    recs = read(out)
    assert [r["id"] for r in recs] == ["p0", "p1", "p2", "p3"] and counts["samples"] == 12
    for r in recs:
        assert len(r["responses"]) == 3 and r["seed"] == 0 and r["temperature"] == 1.0 and r["model"] == tiny_ckpt
    assert not [f for f in os.listdir(tmp_path) if ".rank" in f]  # shards merged away

    # parse mode: a random model writes no scores -> every judgment counted as a failure, no pairs
    j_out, pairs = str(tmp_path / "judgments.jsonl"), str(tmp_path / "actor_pairs.jsonl")
    s = judge.main(["--model", tiny_ckpt, "--responses", out, "--out", j_out, "--n", "2", "--max-new-tokens", "8",
                    "--pairs", pairs])
    assert s["judgments"] == 24 and s["parse_failures"] == 24 and s["actor_pairs"] == 0
    assert s["actor_pair_skips"] == {"too few scored responses": 4}
    jr = read(j_out)
    assert all(len(r["judgments"]) == 3 and all(len(j) == 2 for j in r["judgments"]) for r in jr)
    assert all(x is None for r in jr for ss in r["scores"] for x in ss) and read(pairs) == []

    # expected mode: every judgment gets a score in [0, 5]; pairs follow the scores
    je = str(tmp_path / "judgments_e.jsonl")
    s = judge.main(["--model", tiny_ckpt, "--responses", out, "--out", je, "--n", "2", "--max-new-tokens", "8",
                    "--pairs", pairs, "--score-mode", "expected"])
    jr = read(je)
    for r in jr:
        assert r["score_mode"] == "expected"
        for ss, mean in zip(r["scores"], r["score"]):
            assert all(0 <= x <= 5 for x in ss) and mean == pytest.approx(sum(ss) / len(ss))
    ap = read(pairs)
    assert len(ap) == s["actor_pairs"] > 0
    for p in ap:
        assert p["kind"] == "actor" and p["score_chosen"] > p["score_rejected"]
        assert set(p) >= {"id", "prompt", "chosen", "rejected", "score_chosen", "score_rejected"}

    # meta-judge on the expected-mode judgments: battles in both orders, Elo per judgment, judge pairs
    m_out, jp = str(tmp_path / "meta.jsonl"), str(tmp_path / "judge_pairs.jsonl")
    s = meta_judge.main(["--model", tiny_ckpt, "--judgments", je, "--out", m_out, "--pairs", jp,
                         "--max-new-tokens", "6", "--verdict-mode", "expected"])
    mr = read(m_out)
    assert len(mr) == 4 and s["battles"] == 4 * 2  # 2 valid judgments -> 2 ordered battles per record
    for r in mr:
        orders = {(b["first"], b["second"]) for b in r["battles"]}
        assert orders == {(0, 1), (1, 0)} and len(r["elo"]) == 2 and abs(sum(r["bt"])) < 1e-6
    for p in read(jp):
        assert p["kind"] == "judge" and "<request>" in p["prompt"] and p["chosen"] != p["rejected"]
    assert s["judge_pairs"] == len(read(jp))


@pytest.mark.parametrize("lines,message", [
    (['{"id": "a", "prompt": "x"}', '{"id": "b", "prompt": '], "prompts.jsonl:2: malformed JSON"),
    (['{"id": "a", "prompt": "x"}', '{"id": "b"}'], "prompts.jsonl:2: missing field 'prompt'"),
    (['{"id": "a", "prompt": "x"}', '{"id": "a", "prompt": "y"}'], "prompts.jsonl:2: duplicate id 'a' \\(first on line 1\\)"),
    ([], "prompts.jsonl: empty file"),
    (['["a list"]'], "prompts.jsonl:1: expected a JSON object"),
    (['{"id": "a", "prompt": ""}'], "prompts.jsonl:1: `prompt` must be a non-empty string"),
    (['{"id": "a", "prompt": "' + "long " * 1000 + '"}'], "prompts.jsonl:1: prompt is 50.. tokens"),
])
def test_bad_prompts_name_file_and_line(tmp_path, tiny_ckpt, lines, message):
    p = tmp_path / "prompts.jsonl"
    p.write_text("\n".join(lines) + ("\n" if lines else ""))
    with pytest.raises(SystemExit, match=message):
        sample.main(["--model", tiny_ckpt, "--prompts", str(p), "--out", str(tmp_path / "r.jsonl"),
                     "--max-new-tokens", "3600"])


def test_killed_stage_resumes_exactly(tmp_path, tiny_ckpt):
    """A shard cut mid-record (SIGKILL during a write) is repaired; the re-run writes each id once and the
    result equals an uninterrupted run, record for record (sampling depends on seed and id only)."""
    prompts = write_prompts(tmp_path / "prompts.jsonl", n=6)
    args = ["--model", tiny_ckpt, "--prompts", prompts, "--n", "2", "--max-new-tokens", "10", "--temperature", "1.0"]
    full = str(tmp_path / "full.jsonl")
    sample.main(args + ["--out", full])
    killed = str(tmp_path / "killed.jsonl")
    recs = read(full)
    with open(sample.shard_path(killed, 0), "w") as f:  # two records done, a third half written
        for r in (recs[3], recs[0]):
            f.write(json.dumps(r) + "\n")
        f.write(json.dumps(recs[1])[:40])
    counts = sample.main(args + ["--out", killed])
    assert counts["samples"] == 4 * 2  # only the four missing prompts were generated
    assert read(killed) == recs
