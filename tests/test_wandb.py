"""--wandb (optional Weights & Biases logging): never imported without the flag; with it, train_dpo.py copies
every metrics.jsonl record and iterate.py each stage's counts, checked against a fake wandb module (and, where the
real package is installed, one offline run)."""
import glob
import json
import os
import subprocess
import sys
import types

import pytest
from conftest import STOPS, make_tiny_checkpoint, write_jsonl
from test_train_dpo import metrics, write_pairs

import iterate
import train_dpo
from data import make_arith

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeRun:
    def __init__(self, calls, kw):
        self.calls, self.kw, self.logs, self.finished = calls, kw, [], False

    def log(self, data, step=None):
        self.logs.append((dict(data), step))

    def finish(self):
        self.finished = True


def fake_wandb(monkeypatch):
    runs = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: runs.append(FakeRun(runs, kw)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return runs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("wandb")
    return make_tiny_checkpoint(d / "ckpt", seed=3), write_pairs(d / "pairs.jsonl"), d


def train(setup, name, *extra):
    ckpt, pairs, d = setup
    out = str(d / name)
    train_dpo.main(["--model", ckpt, "--pairs", pairs, "--out", out, "--lr", "1e-3", "--epochs", "1",
                    "--batch-size", "4", "--micro-batch-size", "2", *extra])
    return out


def test_without_the_flag_wandb_is_never_imported(setup, tmp_path):
    ckpt, pairs, _ = setup
    code = ("import sys, train_dpo; train_dpo.main(sys.argv[1:]); "
            "assert 'wandb' not in sys.modules, 'wandb imported'; print('NO-WANDB')")
    r = subprocess.run([sys.executable, "-c", code, "--model", ckpt, "--pairs", pairs, "--out", str(tmp_path / "m"),
                        "--epochs", "1", "--batch-size", "4", "--micro-batch-size", "2"],
                       cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0 and "NO-WANDB" in r.stdout, r.stderr[-2000:]


def test_train_dpo_logs_every_metrics_record(setup, monkeypatch):
    runs = fake_wandb(monkeypatch)
    out = train(setup, "logged", "--wandb", "proj", "--wandb-group", "grp", "--wandb-name", "nm")
    (run,) = runs
    assert {k: run.kw[k] for k in ("project", "group", "name")} == {"project": "proj", "group": "grp", "name": "nm"}
    assert run.kw["config"]["lr"] == 1e-3 and run.kw["config"]["batch_size"] == 4
    recs = metrics(out)  # the file is the source of truth; W&B holds the same records, step by step
    assert len(recs) == 2
    assert [d for d, _ in run.logs] == recs and [s for _, s in run.logs] == [r["step"] for r in recs]
    assert run.finished


def test_resumed_run_logs_only_its_own_steps(setup, monkeypatch):
    runs = fake_wandb(monkeypatch)
    out = train(setup, "resumed", "--wandb", "p", "--stop-after", "1")
    train(setup, "resumed", "--wandb", "p", "--resume")
    first, second = runs
    assert [s for _, s in first.logs] == [1] and [s for _, s in second.logs] == [2]
    assert [d for r in runs for d, _ in r.logs] == metrics(out) and first.finished and second.finished


def test_missing_package_is_a_one_line_exit(setup, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(SystemExit, match="pip install wandb"):
        train(setup, "missing", "--wandb", "p")


def test_iterate_logs_stage_counts_per_iteration(tmp_path, monkeypatch):
    runs = fake_wandb(monkeypatch)
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", seed=5, stop_chars=STOPS)
    qs = tmp_path / "q.jsonl"
    qs.write_text("".join(json.dumps(r) + "\n" for r in make_arith.make("small", 4, "train")))
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"Say {i}.", "completion": f"{i}."} for i in range(4)])
    run = str(tmp_path / "myrun")
    args = ["--run-dir", run, "--model", ckpt, "--preset", "reasoning-demo", "--prompts", str(qs), "--eval-prompts",
            str(qs), "--prompts-per-iter", "0", "--max-new-tokens", "8", "--eval-max-new-tokens", "6", "--eval-samples", "2",
            "--n-responses", "3", "--sft-data", sft, "--sft-batch-size", "2", "--iterations"]
    doc = iterate.main(args + ["2", "--dry-run", "--wandb", "proj"])
    train_argv = next(s["argv"] for s in doc["iterations"][1]["stages"] if s["name"] == "train")
    assert train_argv[-6:] == ["--wandb", "proj", "--wandb-group", "myrun", "--wandb-name", "iter1-train"]
    iterate.main(args + ["2", "--wandb", "proj"])
    assert "wandb" not in json.load(open(os.path.join(run, "run.json")))
    iters = [r for r in runs if "-" not in r.kw["name"]]
    assert [r.kw["name"] for r in iters] == ["iter0", "iter1", "iter2"] and all(r.finished for r in runs)
    assert all(r.kw["project"] == "proj" and r.kw["group"] == "myrun" for r in runs)
    for t, r in enumerate(iters):
        stages = json.load(open(os.path.join(run, f"iter{t}", "manifest.json")))["stages"]
        logged = {k: v for d, _ in r.logs for k, v in d.items()}
        want = {f"{name}/{k}": v for name, x in stages.items() for k, v in dict(x["counts"], seconds=x["seconds"]).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
        assert logged == want and len(r.logs) == len(stages)
        assert logged["train/steps"] == stages["train"]["counts"]["steps"]
    trains = [r for r in runs if r.kw["name"].endswith("-train")]
    # iteration 0 always trains (on --sft-data): its stage logged its steps, as in its metrics.jsonl, to its own run
    assert [d for r in trains if r.kw["name"] == "iter0-train" for d, _ in r.logs] == \
        metrics(os.path.join(run, "iter0", "model")) != []
    # more iterations with the flag removed: the run's settings are the same, so it is not refused
    iterate.main(args + ["3"])


@pytest.mark.filterwarnings("ignore")
def test_real_wandb_offline(setup, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(setup, "offline", "--wandb", "proj", "--wandb-name", "offline-test")
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*")), os.listdir(tmp_path)
