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
from conftest import STOPS, make_tiny_checkpoint

import iterate
from model import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--prompts-per-iter", "3", "--n-responses", "3", "--n-judgments", "2", "--max-new-tokens", "10",
         "--judge-max-new-tokens", "6", "--meta-max-new-tokens", "4", "--eval-prompts-n", "2",
         "--eval-max-new-tokens", "6", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("it") / "ckpt", seed=5, stop_chars=STOPS)


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_meta_and_self_rewarding_runs(tmp_path, ckpt):
    run = str(tmp_path / "meta")
    iterate.main(["--run-dir", run, "--model", ckpt, "--iterations", "2", *SMALL])
    for t in (1, 2):
        d = os.path.join(run, f"iter{t}")
        man = json.load(open(os.path.join(d, "manifest.json")))
        assert list(man["stages"]) == ["prompts", "responses", "judgments", "meta_judgments", "train", "evaluate",
                                      "judge_eval", "report"]
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
    assert json.load(open(os.path.join(full, "iter1", "manifest.json")))["stages"]["train"]["counts"]["steps"] > 0
    wa = Transformer.from_pretrained(os.path.join(full, "iter1", "model")).state_dict()
    wb = Transformer.from_pretrained(os.path.join(killed, "iter1", "model")).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def letter_share(path):
    texts = [t for r in read(path) for t in r["responses"]]
    chars = "".join(texts)
    return sum("a" <= c <= "z" for c in chars) / max(len(chars), 1)


def test_programmatic_judge_moves_the_property(tmp_path):
    """Learning check: a judge that prefers lowercase letters, two self-rewarding iterations of DPO, and the
    third iteration's responses (sampled by M2) hold more letters than the first's (sampled by M0)."""
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", seed=5, stop_chars=STOPS)
    run = str(tmp_path / "learn")
    iterate.main(["--run-dir", run, "--model", ckpt, "--iterations", "3", "--method", "self-rewarding",
                  "--judge-fn", "prog_judges:letters", "--prompts-per-iter", "32", "--n-responses", "6",
                  "--max-new-tokens", "16", "--lr", "2e-3", "--epochs", "4", "--eval-prompts-n", "-1",
                  "--batch-size", "4", "--micro-batch-size", "4"])
    shares = [letter_share(os.path.join(run, f"iter{t}", "responses.jsonl")) for t in (1, 2, 3)]
    # about 1,500 characters per iteration: sampling noise on a share near 0.15 is about 0.01 (seeds 0-3 of
    # the run seed gave 0.13 -> 0.17-0.23 -> 0.28-0.31)
    assert shares[0] < shares[1] < shares[2] and shares[2] > 1.5 * shares[0], shares


# -----------------------------------------------------------------------------
# The paper's recipe: the plan (dry run), iteration 0, checkpoint selection


def pool(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{i:05d}", "prompt": f"Made-up instruction number {i}."}) + "\n")
    return str(path)


def flag(argv, name):
    return argv[argv.index(name) + 1] if name in argv else None


def test_paper_preset_dry_run(tmp_path, capsys):
    """--preset paper on a pool of 20,000: four iterations of 5,000 fresh prompts (200 held out for checkpoint
    selection), the caps and rho per iteration, meta-judging in iterations 1-2 only, the DPO values; and
    --method self-rewarding differs only by the meta-judge and its pairs."""
    p = pool(tmp_path / "pool.jsonl", 20_000)
    base = ["--preset", "paper", "--model", "/models/llama3-8b", "--prompts", p, "--run-dir", str(tmp_path / "run"), "--dry-run",
            "--no-sft"]
    doc = iterate.main(base)
    json.loads(capsys.readouterr().out)  # what it printed is one JSON document
    its = doc["iterations"]
    assert [it["iteration"] for it in its] == [1, 2, 3, 4]
    seen = set()
    for it in its:
        ids = it["prompt_ids"] + it["val_prompt_ids"]
        assert len(it["prompt_ids"]) == 4800 and len(it["val_prompt_ids"]) == 200 and not seen & set(ids)
        seen |= set(ids)
    stages = [{s["name"]: s["argv"] for s in it["stages"]} for it in its]
    assert [("meta_judgments" in s) for s in stages] == [True, True, False, False]
    assert [flag(s["judgments"], "--rho") for s in stages] == ["0", "0.32", "0.32", "0.4"]
    assert [flag(s["judgments"], "--max-chosen-chars") for s in stages] == ["2500", None, None, None]
    assert [flag(s["meta_judgments"], "--max-chosen-chars") for s in stages[:2]] == ["1100", "1000"]
    for s in stages:
        train = s["train"]
        assert train[0] == "train_dpo.py" and (flag(train, "--beta"), flag(train, "--lr"), flag(train, "--epochs"),
                                               flag(train, "--batch-size")) == ("0.1", "5e-06", "10", "32")
        assert flag(s["responses"], "--n-responses") == "7" and flag(s["judgments"], "--n-judgments") == "11"
    assert [("judge_pairs.jsonl" in " ".join(s["train"])) for s in stages] == [True, True, False, False]
    assert its[1]["model_in"] == str(tmp_path / "run" / "iter1" / "model")

    sr = iterate.main(base + ["--method", "self-rewarding"])["iterations"]
    for a, b in zip(its, sr):
        assert a["prompt_ids"] == b["prompt_ids"]
        sa = {s["name"]: s["argv"] for s in a["stages"] if s["name"] != "meta_judgments"}
        sb = {s["name"]: s["argv"] for s in b["stages"]}
        sa["train"] = [x for x in sa["train"] if not x.endswith("judge_pairs.jsonl")]
        assert sa == sb
    with pytest.raises(SystemExit, match=r"19999 prompts, but 4 iteration\(s\) .* need 20000"):
        iterate.main(base[:5] + [pool(tmp_path / "small.jsonl", 19_999)] + base[6:])


def test_family_presets_dry_run(tmp_path, capsys):
    """The sibling methods' paper presets, planned: ScPO's hotter extra samples (another seed) and in-loop new
    questions, the evaluation protocols (maj@32 at T 0.8, 8-way self-consistency), Self-Rewarding's SFT decay and
    self-instruct values, and the Self-Taught Evaluator judging iteration 1's pairs again in later iterations."""
    gsm = tmp_path / "gsm8k.jsonl"  # GSM8K's own format: no id
    gsm.write_text("".join(json.dumps({"question": f"Sam has {i} apples and buys 2. How many now?",
                                       "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}) + "\n" for i in range(1200)))
    stages = lambda doc, t: {s["name"]: s["argv"] for s in doc["iterations"][t]["stages"]}  # noqa: E731
    base = ["--model", "/models/m", "--run-dir", str(tmp_path / "run"), "--dry-run"]
    doc = iterate.main(base + ["--preset", "scpo-paper", "--prompts", str(gsm), "--eval-prompts", str(gsm),
                               "--new-questions", "50"])
    for t, tau in ((0, "0.5"), (1, "0.7")):
        st = stages(doc, t)
        assert list(st)[:5] == ["new_prompts", "prompts", "responses", "extra_responses", "reasoning_pairs"]
        si = st["new_prompts"]
        assert (flag(si, "--count"), flag(si, "--shots"), flag(si, "--temperature"), flag(si, "--top-p")) == ("50", "4", "0.7", "0.9")
        assert si[0] == "self_instruct.py" and flag(si, "--template").endswith("question.txt") and flag(si, "--pool") == str(gsm)
        ex, main = st["extra_responses"], st["responses"]
        assert (flag(ex, "--n-responses"), flag(ex, "--temperature"), flag(main, "--n-responses"), flag(main, "--temperature")) == \
            ("8", "1.2", "8", "0.7")
        assert flag(ex, "--seed") != flag(main, "--seed") and "--no-dedup" in ex
        assert flag(st["reasoning_pairs"], "--extra") == flag(ex, "--out") and flag(st["reasoning_pairs"], "--tau") == tau
        assert (flag(st["evaluate"], "--samples"), flag(st["evaluate"], "--temperature")) == ("8", "0.7")
    st = stages(iterate.main(base + ["--preset", "irpo-paper", "--prompts", str(gsm), "--eval-prompts", str(gsm)]), 0)
    assert (flag(st["evaluate"], "--samples"), flag(st["evaluate"], "--temperature")) == ("32", "0.8")
    assert "extra_responses" not in st and "new_prompts" not in st
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    doc = iterate.main(base + ["--preset", "self-rewarding-paper", "--prompts", pool(tmp_path / "p.jsonl", 10),
                               "--sft-data", str(sft), "--new-prompts", "30"])
    assert flag(stages(doc, 0)["train"], "--min-lr-ratio") == "0.2" and flag(stages(doc, 1)["train"], "--min-lr-ratio") == "0.1"
    si = stages(doc, 1)["new_prompts"]
    assert (flag(si, "--shots"), flag(si, "--generated-shots"), flag(si, "--temperature"), flag(si, "--top-p")) == ("8", "2", "0.6", "0.9")
    assert flag(si, "--template").endswith("self_instruct.txt")
    doc = iterate.main(base + ["--preset", "ste-paper", "--prompts", pool(tmp_path / "p2.jsonl", 10), "--iterations", "3"])
    first, later = stages(doc, 0), stages(doc, 2)
    assert flag(first["contrast"], "--max-new-tokens") == flag(first["responses"], "--max-new-tokens")  # no length cue
    assert (flag(first["contrast"], "--temperature"), flag(first["contrast"], "--top-p")) == ("0.7", "0.9")
    assert list(later) == ["pairwise", "select", "train", "train_dpo", "evaluate", "evaluate_modified", "report"]
    assert flag(later["pairwise"], "--contrast") == str(tmp_path / "run" / "iter1" / "contrast.jsonl")
    assert flag(later["pairwise"], "--model") == str(tmp_path / "run" / "iter2" / "model") and flag(later["train"], "--model") == "/models/m"
    assert flag(later["evaluate_modified"], "--prompts") == str(tmp_path / "run" / "iter1" / "eval_modified_pairs.jsonl")
    assert doc["iterations"][2]["prompt_ids"] == [] and len(doc["iterations"][0]["prompt_ids"]) == 10
    capsys.readouterr()
    for bad in (["--preset", "irpo-paper", "--extra-samples", "4"], ["--preset", "tpo-paper", "--judge-model", "/m", "--new-prompts", "3"]):
        with pytest.raises(SystemExit, match="only --method"):
            iterate.main(base + ["--prompts", str(gsm)] + bad)


def test_stage_args_reach_their_stage_and_are_checked_first(tmp_path, ckpt):
    args = ["--run-dir", str(tmp_path / "run"), "--model", ckpt, "--dry-run", "--judge-temperature", "0.3",
            "--sample-args", "--top-k 5", "--train-args", "--loss ipo"]
    doc = iterate.main(args)
    s = {x["name"]: x["argv"] for x in doc["iterations"][0]["stages"]}
    assert flag(s["responses"], "--top-k") == "5" and flag(s["train"], "--loss") == "ipo"
    assert flag(s["judgments"], "--temperature") == "0.3" and flag(s["responses"], "--temperature") == "0.8"
    with pytest.raises(SystemExit):  # the judge's own parser rejects the typo before anything runs
        iterate.main(args + ["--judge-args", "--tempreature 2"])


def test_iteration0_sft_resumes_after_a_kill(tmp_path, ckpt):
    """--sft-data trains iteration 0 first (manifest, report); SIGKILL during its training and a re-run give
    the same weights as an uninterrupted run, and iteration 1 starts from iter0/model."""
    sft = tmp_path / "sft.jsonl"
    with open(sft, "w") as f:
        for i in range(24):
            f.write(json.dumps({"prompt": f"Say {i}.", "completion": f"{i} and nothing else, {i} again."}) + "\n")
    args = ["--model", ckpt, "--iterations", "1", *SMALL, "--eval-prompts-n", "-1", "--sft-data", str(sft),
            "--sft-epochs", "6", "--sft-batch-size", "2", "--sft-args", "--save-every 3"]
    cmd = [sys.executable, os.path.join(ROOT, "iterate.py")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    subprocess.run(cmd + ["--run-dir", full] + args, env=env, check=True, capture_output=True, timeout=600)
    man = json.load(open(os.path.join(full, "iter0", "manifest.json")))
    assert list(man["stages"]) == ["train", "judge_eval", "report"] and man["stages"]["train"]["counts"]["steps"] == 72
    assert json.load(open(os.path.join(full, "iter1", "manifest.json")))["model_in"] == os.path.join(full, "iter0", "model")
    proc = subprocess.Popen(cmd + ["--run-dir", killed] + args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = os.path.join(killed, "iter0", "model.train", "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and open(metrics).read().count("\n") >= 20:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "iteration 0 finished before it could be killed"
    subprocess.run(cmd + ["--run-dir", killed] + args, env=env, check=True, capture_output=True, timeout=600)
    for t in ("iter0", "iter1"):
        wa = Transformer.from_pretrained(os.path.join(full, t, "model")).state_dict()
        wb = Transformer.from_pretrained(os.path.join(killed, t, "model")).state_dict()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), t
    assert "## SFT" in open(os.path.join(killed, "iter0", "report.md")).read()


def test_select_val_keeps_the_best_epoch(tmp_path, ckpt):
    run = str(tmp_path / "run")
    iterate.main(["--run-dir", run, "--model", ckpt, "--iterations", "1", *SMALL, "--prompts-per-iter", "6",
                  "--eval-prompts-n", "-1", "--select", "val", "--val-prompts-n", "2", "--epochs", "3"])
    d = os.path.join(run, "iter1")
    train = json.load(open(os.path.join(d, "manifest.json")))["stages"]["train"]["counts"]
    rec = json.load(open(os.path.join(d, "select.json")))
    assert sorted(train["val_score_by_epoch"]) == ["1", "2", "3"] and rec["best"] == train["best_epoch"]
    best = max(rec["score"].values())
    assert rec["score"][str(rec["best"])] == best and all(rec["score"][str(e)] < best for e in range(1, rec["best"]))
    assert len(read(os.path.join(d, "prompts.jsonl"))) == 4 and len(read(os.path.join(d, "val_prompts.jsonl"))) == 2
    assert not [n for n in os.listdir(d) if n.startswith("model.epoch")]  # only the chosen model remains
    from common import model_fingerprint
    assert model_fingerprint(os.path.join(d, "model")) == rec["fingerprint"][str(rec["best"])]
