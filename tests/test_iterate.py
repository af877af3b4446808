"""iterate.py end to end on a tiny random checkpoint: the files and manifest of each iteration, kill and
resume against an uninterrupted run, and a learning check with a programmatic judge."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import make_tiny_checkpoint

import iterate
from model import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--prompts-per-iter", "3", "--n-responses", "3", "--n-judgments", "2", "--max-new-tokens", "10",
         "--judge-max-new-tokens", "6", "--meta-max-new-tokens", "4", "--eval-prompts-n", "2",
         "--eval-max-new-tokens", "6", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("it") / "ckpt", seed=5)


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_meta_and_self_rewarding_runs(tmp_path, ckpt):
    run = str(tmp_path / "meta")
    iterate.main(["--run-dir", run, "--model", ckpt, "--iterations", "2", *SMALL])
    for t in (1, 2):
        d = os.path.join(run, f"iter{t}")
        man = json.load(open(os.path.join(d, "manifest.json")))
        assert list(man["stages"]) == ["prompts", "responses", "judgments", "meta_judgments", "train", "evaluate", "report"]
        assert all(s["done"] for s in man["stages"].values())
        assert man["model_in"] == (ckpt if t == 1 else os.path.join(run, "iter1", "model"))
        for f in ("prompts.jsonl", "responses.jsonl", "judgments.jsonl", "actor_pairs.jsonl", "meta_judgments.jsonl",
                  "judge_pairs.jsonl", "report.md", "model/config.json", "model/model.safetensors", "eval/results.json"):
            assert os.path.exists(os.path.join(d, f)), f
        assert len(read(os.path.join(d, "prompts.jsonl"))) == 3
        assert all(len(r["responses"]) <= 3 for r in read(os.path.join(d, "responses.jsonl")))
        assert "## DPO" in open(os.path.join(d, "report.md")).read()
    # the two iterations used different prompts (the pool is walked, not re-sampled)
    p1 = {r["id"] for r in read(os.path.join(run, "iter1", "prompts.jsonl"))}
    p2 = {r["id"] for r in read(os.path.join(run, "iter2", "prompts.jsonl"))}
    assert not p1 & p2
    # a finished run re-run does nothing
    timings = iterate.main(["--run-dir", run, "--model", ckpt, "--iterations", "2", *SMALL])
    assert {how for *_, how in timings} == {"done before"}

    run = str(tmp_path / "self")
    iterate.main(["--run-dir", run, "--model", ckpt, "--iterations", "1", "--method", "self-rewarding", *SMALL])
    man = json.load(open(os.path.join(run, "iter1", "manifest.json")))
    assert "meta_judgments" not in man["stages"] and man["stages"]["train"]["done"]
    assert not os.path.exists(os.path.join(run, "iter1", "meta_judgments.jsonl"))


def strip_paths(rec):
    """Records name the model folder they came from; runs in different folders differ only there."""
    rec = dict(rec)
    rec.pop("model", None)
    if isinstance(rec.get("judge"), dict):
        rec["judge"] = {k: v for k, v in rec["judge"].items() if k != "model"}
    return rec


def test_killed_run_resumes_to_the_same_result(tmp_path, ckpt):
    """SIGKILL in the middle of the judge stage, re-run the same command: every file equals an
    uninterrupted run's, and so do the trained weights."""
    args = ["--model", ckpt, "--iterations", "1", "--max-rows", "2", *SMALL, "--prompts-per-iter", "8",
            "--judge-max-new-tokens", "24"]
    cmd = [sys.executable, os.path.join(ROOT, "iterate.py")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    subprocess.run(cmd + ["--run-dir", full] + args, env=env, check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(cmd + ["--run-dir", killed] + args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard = os.path.join(killed, "iter1", "judgments.rank0.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(shard) and open(shard).read().count("\n") >= 1:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed mid-stage"
    partial = open(shard).read().count("\n")
    assert 1 <= partial < 8
    subprocess.run(cmd + ["--run-dir", killed] + args, env=env, check=True, capture_output=True, timeout=600)
    for f in ("responses.jsonl", "judgments.jsonl", "actor_pairs.jsonl", "meta_judgments.jsonl", "judge_pairs.jsonl"):
        a = [strip_paths(r) for r in read(os.path.join(full, "iter1", f))]
        b = [strip_paths(r) for r in read(os.path.join(killed, "iter1", f))]
        assert a == b, f
    wa = Transformer.from_pretrained(os.path.join(full, "iter1", "model")).state_dict()
    wb = Transformer.from_pretrained(os.path.join(killed, "iter1", "model")).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def letter_share(path):
    texts = [t for r in read(path) for t in r["responses"]]
    chars = "".join(texts)
    return sum("a" <= c <= "z" for c in chars) / max(len(chars), 1)


def test_programmatic_judge_moves_the_property(tmp_path, ckpt):
    """Learning check: a judge that prefers lowercase letters, two self-rewarding iterations of DPO, and the
    third iteration's responses (sampled by M2) hold more letters than the first's (sampled by M0)."""
    run = str(tmp_path / "learn")
    iterate.main(["--run-dir", run, "--model", ckpt, "--iterations", "3", "--method", "self-rewarding",
                  "--judge-fn", "prog_judges:letters", "--prompts-per-iter", "16", "--n-responses", "4",
                  "--max-new-tokens", "16", "--lr", "2e-3", "--epochs", "3", "--eval-prompts-n", "-1",
                  "--batch-size", "4", "--micro-batch-size", "4"])
    shares = [letter_share(os.path.join(run, f"iter{t}", "responses.jsonl")) for t in (1, 2, 3)]
    # about 850 characters per iteration: sampling noise on a share near 0.1 is about 0.01
    assert shares[0] < shares[1] < shares[2] and shares[2] > 1.5 * shares[0], shares
