"""Hub ids as models: a fake Hugging Face cache laid out as huggingface_hub writes it (refs/main -> snapshots/<commit>/),
read offline; a local folder of the same name wins; a cache miss is one clear line."""
import json
import os
import shutil

import pytest
from conftest import STOPS, make_tiny_checkpoint

import common
import evaluate
import sample

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A cache holding the tiny model as `org/tiny-model`, with the Hub unreachable (HF_HUB_OFFLINE)."""
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", seed=5, stop_chars=STOPS)
    repo = tmp_path / "cache" / "models--org--tiny-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(ckpt, repo / "snapshots" / COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return str(repo / "snapshots" / COMMIT)


def test_hub_id_is_read_from_the_cache_offline(hub, tmp_path):
    assert os.path.samefile(common.resolve_model("org/tiny-model"), hub)
    common.check_model_dir("org/tiny-model", "--model")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "hello"}) + "\n")
    sample.main(["--model", "org/tiny-model", "--prompts", str(prompts), "--out", str(tmp_path / "hub.jsonl"),
                 "--n-responses", "1", "--temperature", "0", "--max-new-tokens", "5"])
    sample.main(["--model", hub, "--prompts", str(prompts), "--out", str(tmp_path / "local.jsonl"),
                 "--n-responses", "1", "--temperature", "0", "--max-new-tokens", "5"])
    assert (tmp_path / "hub.jsonl").read_text() == (tmp_path / "local.jsonl").read_text()  # the same model
    res = evaluate.main(["--a", "org/tiny-model", "--metric", "length", "--prompts", str(prompts), "--limits", "5",
                         "--max-new-tokens", "4", "--out-dir", str(tmp_path / "ev")])
    assert res["a"]["plain"]["empty_rate"] is not None


def test_local_folder_wins_and_misses_are_one_line(hub, tmp_path):
    local = tmp_path / "org" / "tiny-model"  # a folder named like the id, relative to the working directory
    local.mkdir(parents=True)
    assert common.resolve_model("org/tiny-model") == "org/tiny-model"
    assert common.resolve_model("runs/x/iter1/model") == "runs/x/iter1/model"  # a path, never a Hub id
    shutil.rmtree(tmp_path / "org")
    with pytest.raises(SystemExit) as e:
        common.resolve_model("org/other-model", "--judge-model")
    msg = str(e.value)
    assert msg.startswith("--judge-model org/other-model: org/other-model is not in the Hub cache") and "\n" not in msg


def test_iterate_takes_a_hub_id(hub, tmp_path):
    import iterate
    from data import make_arith
    qs = tmp_path / "q.jsonl"
    qs.write_text("".join(json.dumps(r) + "\n" for r in make_arith.make("small", 3, "train")))
    iterate.main(["--run-dir", str(tmp_path / "run"), "--model", "org/tiny-model", "--preset", "reasoning-demo",
                  "--prompts", str(qs), "--eval-prompts", str(qs), "--prompts-per-iter", "0", "--max-new-tokens", "6",
                  "--eval-max-new-tokens", "4", "--eval-samples", "1", "--n-responses", "2"])
    man = json.load(open(tmp_path / "run" / "iter1" / "manifest.json"))
    assert os.path.samefile(man["model_in"], hub) and man["stages"]["report"]["done"]
