"""The stage scripts end to end on a tiny random checkpoint: the file formats of the README, bad input,
kill-and-resume. (A random model writes no parseable scores: the counts and the expected modes cover it.)"""
import json
import os

import pytest

import common
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
    counts = sample.main(["--model", tiny_ckpt, "--prompts", prompts, "--out", out, "--n-responses", "3",
                          "--max-new-tokens", "12", "--temperature", "1.0", "--no-dedup"])
    recs = read(out)
    assert [r["id"] for r in recs] == ["p0", "p1", "p2", "p3"] and counts["samples"] == 12
    for r in recs:
        assert len(r["responses"]) == 3 and r["seed"] == 0 and r["temperature"] == 1.0 and r["model"] == tiny_ckpt
    assert not [f for f in os.listdir(tmp_path) if ".rank" in f]  # shards merged away

    # parse mode: a random model writes no scores -> every judgment counted as a failure, no pairs
    j_out, pairs = str(tmp_path / "judgments.jsonl"), str(tmp_path / "actor_pairs.jsonl")
    s = judge.main(["--model", tiny_ckpt, "--responses", out, "--out", j_out, "--n-judgments", "2", "--max-new-tokens", "8",
                    "--pairs", pairs])
    assert s["judgments"] == 24 and s["parse_failures"] == 24 and s["actor_pairs"] == 0
    assert s["actor_pair_skips"] == {"too few scored responses": 4}
    jr = read(j_out)
    assert all(len(r["judgments"]) == 3 and all(len(j) == 2 for j in r["judgments"]) for r in jr)
    assert all(x is None for r in jr for ss in r["scores"] for x in ss) and read(pairs) == []

    # expected mode: every judgment gets a score in [0, 5]; pairs follow the scores
    je = str(tmp_path / "judgments_e.jsonl")
    s = judge.main(["--model", tiny_ckpt, "--responses", out, "--out", je, "--n-judgments", "2", "--max-new-tokens", "8",
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
                         "--max-new-tokens", "6", "--verdict-mode", "expected", "--truncated", "keep"])
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
    args = ["--model", tiny_ckpt, "--prompts", prompts, "--n-responses", "2", "--max-new-tokens", "10", "--temperature", "1.0"]
    full = str(tmp_path / "full.jsonl")
    sample.main(args + ["--out", full])
    killed = str(tmp_path / "killed.jsonl")
    recs = read(full)
    import shutil
    shutil.copy(common.settings_path(full), common.settings_path(killed))  # written when the killed run started
    with open(common.shard_path(killed, 0), "w") as f:  # two records done, a third half written
        for r in (recs[3], recs[0]):
            f.write(json.dumps(r) + "\n")
        f.write(json.dumps(recs[1])[:40])
    counts = sample.main(args + ["--out", killed])
    assert counts["samples"] == 4 * 2  # only the four missing prompts were generated
    assert read(killed) == recs


# -----------------------------------------------------------------------------
# self-instruct

import self_instruct  # noqa: E402


@pytest.mark.parametrize("text,want", [
    ("Request: Write a poem about rain.", "Write a poem about rain."),
    ("Sure! Here is one.\n**Request:** Explain how tides work.", "Explain how tides work."),
    ("Request 9: \"Plan a picnic for four.\"", "Plan a picnic for four."),
    ("1. Describe your favourite city.", "Describe your favourite city."),
    ("New task: List three uses of vinegar.\nRequest: Name two rivers in Asia.", "Name two rivers in Asia."),
    ("", None),
    ("Request:", None),
])
def test_parse_request(text, want):
    assert self_instruct.parse_request(text) == want


def test_overlap_and_checks():
    idx = self_instruct.OverlapIndex()
    idx.add("Write a short poem about the sea at night.")
    assert idx.max_overlap("Write a short poem about the sea at dawn.") == pytest.approx(6 / 7)
    assert idx.max_overlap("Explain how a refrigerator keeps food cold.") == 0.0
    assert self_instruct.check("Write a short poem about the sea at night, please", idx, 0.5) == "overlaps a known prompt"
    assert self_instruct.check("Hi there", idx, 0.5) == "too short"
    assert self_instruct.check(None, idx, 0.5) == "no request found"
    assert self_instruct.check("Some basic rules to keep in mind:", idx, 0.5) == "a lead-in, not a request"
    assert self_instruct.check("Explain how a refrigerator keeps food cold.", idx, 0.5) is None


def test_self_instruct_runs_and_resumes(tmp_path, tiny_ckpt, monkeypatch):
    """A random model writes random requests; with the word checks relaxed, it must produce the count
    asked for, with fresh ids, and a re-run asking for more continues after the last accepted call."""
    pool = write_prompts(tmp_path / "pool.jsonl", n=5)
    monkeypatch.setattr(self_instruct, "check", lambda text, index, max_overlap: None if text else "no request found")
    out = str(tmp_path / "new.jsonl")
    args = ["--model", tiny_ckpt, "--pool", pool, "--out", out, "--max-new-tokens", "12", "--temperature", "1.0",
            "--batch", "4"]
    first = self_instruct.main(args + ["--count", "3"])
    recs = read(out)
    assert first["accepted"] == 3 and [r["id"] for r in recs] == ["si-0-00000", "si-0-00001", "si-0-00002"]
    self_instruct.main(args + ["--count", "5"])
    more = read(out)
    assert more[:3] == recs and len(more) == 5 and more[3]["call"] > recs[-1]["call"]
    # the same 5 as a single uninterrupted run
    out2 = str(tmp_path / "new2.jsonl")
    self_instruct.main(["--model", tiny_ckpt, "--pool", pool, "--out", out2, "--max-new-tokens", "12",
                        "--temperature", "1.0", "--batch", "4", "--count", "5"])
    assert [r["prompt"] for r in read(out2)] == [r["prompt"] for r in more]


def test_self_instruct_generated_shots_and_gsm8k_pool(tmp_path, tiny_ckpt, monkeypatch):
    """--generated-shots 2 of --shots 3: each call shows 1 pool prompt and 2 prompts written before its batch
    (fewer while fewer exist); a GSM8K file (`question`, no id) is a pool as it is."""
    pool = tmp_path / "gsm8k.jsonl"
    pool.write_text("".join(json.dumps({"question": f"Pool question number {i} about apples?", "answer": "#### 1"}) + "\n"
                            for i in range(4)))
    shown, made = [], iter(range(100))

    def fake_complete(model, requests, **kw):  # every call writes a new, distinct request
        from sample import Completion
        shown.extend(tok.decode(r.prompt) for r in requests)
        texts = [f"Request: Written question number {next(made)} about pears?" for _ in requests]
        return [[Completion(tokens=tok.encode(text), finish_reason="stop", text=text)] for text in texts]
    from common import load_model
    _, tok, _ = load_model(tiny_ckpt, "cpu")
    monkeypatch.setattr(self_instruct, "complete", fake_complete)
    self_instruct.main(["--model", tiny_ckpt, "--pool", str(pool), "--out", str(tmp_path / "q.jsonl"), "--count", "6",
                        "--shots", "3", "--generated-shots", "2", "--batch", "2"])
    per_call = [(text.count("Request: Pool"), text.count("Request: Written")) for text in shown]
    # batches of 2: calls 0-1 see nothing written yet, calls 2-3 see the 2 of batch 0, later calls more
    assert per_call == [(3, 0), (3, 0), (1, 2), (1, 2), (1, 2), (1, 2)]
    with pytest.raises(SystemExit, match="--generated-shots"):
        self_instruct.parse_args(["--pool", "p", "--out", "o", "--shots", "2", "--generated-shots", "3"])


def test_stages_under_torchrun_match_one_process(tmp_path, tiny_ckpt):
    """2 ranks split the prompts, write shards, and rank 0 merges them in input order: the files equal a
    single process's (sampling depends on seed and id only; scores to within float noise)."""
    import subprocess
    import sys
    prompts = write_prompts(tmp_path / "prompts.jsonl", n=5)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    driver = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_stage_driver.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, driver, tiny_ckpt, prompts, str(one)], env=env, check=True, capture_output=True, timeout=600)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", driver,
                        tiny_ckpt, prompts, str(two)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not [f for f in os.listdir(two) if ".rank" in f]  # shards merged and removed
    for name in ("responses.jsonl", "judgments.jsonl", "meta.jsonl"):
        a, b = read(one / name), read(two / name)
        assert [x["id"] for x in a] == [x["id"] for x in b] == [f"p{i}" for i in range(5)]
        for x, y in zip(a, b):
            if name == "judgments.jsonl":
                assert x["judgments"] == y["judgments"]
                assert x["scores"] == [pytest.approx(s, abs=1e-3) for s in y["scores"]]
            elif name == "meta.jsonl":
                assert [bt["verdict"] for bt in x["battles"]] == [bt["verdict"] for bt in y["battles"]]
                assert [bt["winner"] for bt in x["battles"]] == [bt["winner"] for bt in y["battles"]]
            else:
                assert x == y
    assert len(read(one / "actor_pairs.jsonl")) == len(read(two / "actor_pairs.jsonl"))
