"""A run of iterate.py as a whole: what it refuses before any work, what identifies a run folder, and how a
killed or finished run is picked up again. Each test names the defect it guards against."""
import json
import math
import os
import shutil

import pytest
from conftest import STOPS, make_tiny_checkpoint, read, write_jsonl

import common
import iterate
import sample

SMALL = ["--prompts-per-iter", "3", "--n-responses", "2", "--n-judgments", "2", "--max-new-tokens", "6",
         "--judge-max-new-tokens", "4", "--meta-max-new-tokens", "3", "--eval-prompts-n", "2",
         "--eval-max-new-tokens", "4", "--lr", "1e-3"]


def sft_file(path, n=4):
    return write_jsonl(path, [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(n)])


def refuses(argv, match, run):
    """iterate.py stops with a message matching `match` before it has written anything into the run folder."""
    with pytest.raises(SystemExit, match=match):
        iterate.main(argv)
    assert not os.path.exists(run) or not os.listdir(run)


# -----------------------------------------------------------------------------
# refused at start, before any work


@pytest.mark.parametrize("case", ["missing", "empty", "blank lines", "malformed"])
def test_sft_data_that_cannot_train_is_an_error_at_start(tmp_path, tiny_ckpt, case):
    """A missing or empty --sft-data file silently skipped iteration 0 (the model was copied unchanged)."""
    data = {"missing": str(tmp_path / "nope.jsonl"), "empty": write_jsonl(tmp_path / "e.jsonl", []),
            "blank lines": write_jsonl(tmp_path / "b.jsonl", ["", " "]),
            "malformed": write_jsonl(tmp_path / "m.jsonl", [{"text": "no prompt"}])}[case]
    msg = {"missing": "no such file", "empty": "empty file", "blank lines": "empty file", "malformed": r"m.jsonl:1"}[case]
    run = str(tmp_path / "run")
    refuses(["--run-dir", run, "--model", tiny_ckpt, "--sft-data", data, *SMALL], msg, run)


def test_bad_models_and_judge_functions_are_errors_at_start(tmp_path, tiny_ckpt):
    """--judge-fn, --judge-model and --eval-judge were checked only when their stage ran, hours in."""
    run = str(tmp_path / "run")
    base = ["--run-dir", run, "--model", tiny_ckpt, *SMALL]
    refuses(base + ["--judge-fn", "no_such_module:score"], "--judge-fn", run)
    refuses(base + ["--judge-model", str(tmp_path / "typo")], "--judge-model.*no such checkpoint folder", run)
    refuses(base + ["--eval-judge", str(tmp_path / "typo")], "--eval-judge.*no such checkpoint folder", run)
    os.makedirs(tmp_path / "half")  # a folder without weights
    shutil.copy(os.path.join(tiny_ckpt, "config.json"), tmp_path / "half")
    refuses(base + ["--judge-model", str(tmp_path / "half")], "--judge-model.*no model.safetensors", run)


def test_eval_prompts_n_beyond_the_file_is_an_error_at_start(tmp_path, tiny_ckpt):
    """--eval-prompts-n larger than the prompt file raised an IndexError in sample.py, after the training."""
    run = str(tmp_path / "run")
    few = write_jsonl(tmp_path / "ev.jsonl", [{"id": "a", "prompt": "Hi."}, {"id": "b", "prompt": "Yo."}])
    refuses(["--run-dir", run, "--model", tiny_ckpt, *SMALL, "--eval-prompts", few, "--eval-prompts-n", "3"],
            r"--eval-prompts-n 3: .*ev.jsonl holds only 2", run)


def test_sample_limit_beyond_the_file_uses_all_prompts(tmp_path, tiny_ckpt):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"p{i}", "prompt": f"Say {i}."} for i in range(3)])
    sample.main(["--model", tiny_ckpt, "--prompts", prompts, "--out", str(tmp_path / "r.jsonl"), "--limit", "10",
                 "--n-responses", "1", "--max-new-tokens", "3"])
    assert [r["id"] for r in read(tmp_path / "r.jsonl")] == ["p0", "p1", "p2"]


@pytest.mark.parametrize("extra, match", [
    (["--method", "tpo", "--lift"], "--lift.*only --method meta-rewarding / self-rewarding"),
    (["--tau", "0.6"], "--tau.*only --method scpo"),
    (["--pairs-per-question", "3"], "--pairs-per-question.*only --method irpo"),
    (["--no-thoughts"], "--no-thoughts.*only --method tpo"),
    (["--other-prompt"], "--other-prompt.*only --method self-taught-evaluator"),
    (["--eval-limits", "5,10"], "--eval-limits.*only --eval-metric length"),
    (["--eval-samples", "8"], "--eval-samples.*only --eval-metric accuracy"),
])
def test_flags_of_other_methods_are_refused(tmp_path, tiny_ckpt, extra, match):
    """A method-specific flag given to a method that does not read it was silently ignored."""
    run = str(tmp_path / "run")
    refuses(["--run-dir", run, "--model", tiny_ckpt, *SMALL, *extra], match, run)


def test_preset_values_of_another_method_are_not_refused(tmp_path):
    """Only what the user typed is refused: a preset's own value for its method stays when --method changes."""
    doc = iterate.main(["--preset", "reasoning-demo", "--method", "scpo", "--run-dir", str(tmp_path / "r"), "--dry-run"])
    assert any("--tau" in s["argv"] for s in doc["iterations"][0]["stages"])


@pytest.mark.parametrize("flag", ["--rho", "--temperature", "--prompts-per-iter", "--tau"])
def test_empty_schedules_are_refused(tmp_path, tiny_ckpt, flag):
    """`--rho ""` gave an IndexError traceback."""
    run = str(tmp_path / "run")
    method = ["--method", "scpo"] if flag == "--tau" else []
    refuses(["--run-dir", run, "--model", tiny_ckpt, *SMALL, *method, flag, ""], f"{flag}: '' is invalid", run)


def test_select_val_with_one_epoch_is_refused(tmp_path, tiny_ckpt):
    """--select val --epochs 1 held prompts out of training and never used them."""
    run = str(tmp_path / "run")
    refuses(["--run-dir", run, "--model", tiny_ckpt, *SMALL, "--select", "val", "--val-prompts-n", "1", "--epochs", "1"],
            "--select: 'val' is invalid.*last with one epoch", run)


def test_judge_accuracy_of_another_method_reads_labelled_eval_prompts(tmp_path, tiny_ckpt):
    """--eval-metric judge-accuracy with Meta-Rewarding ignored --eval-prompts and crashed after training."""
    run = str(tmp_path / "run")
    refuses(["--run-dir", run, "--model", tiny_ckpt, *SMALL, "--eval-metric", "judge-accuracy"],
            "missing field 'chosen' in labelled pair", run)
    pairs = write_jsonl(tmp_path / "lab.jsonl", [{"id": f"x{i}", "prompt": f"Name a color {i}.", "chosen": "Blue.",
                                                  "rejected": "Seven."} for i in range(2)])
    doc = iterate.main(["--run-dir", run, "--model", tiny_ckpt, *SMALL, "--eval-metric", "judge-accuracy",
                        "--eval-prompts", pairs, "--dry-run"])
    ev = [s["argv"] for s in doc["iterations"][0]["stages"] if s["name"] == "evaluate"][0]
    assert ev[ev.index("--prompts") + 1] == pairs and ev[ev.index("--metric") + 1] == "judge-accuracy"


# -----------------------------------------------------------------------------
# what identifies a run folder


def test_a_run_is_its_contents_not_the_spelling_of_its_paths(tmp_path, tiny_ckpt, monkeypatch):
    """`./model` vs `model`, a trailing slash, relative vs absolute, or a moved run folder made a finished run
    refuse to resume (and suggest deleting it)."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_ckpt, "ckpt")
    argv = ["--iterations", "1", *SMALL, "--eval-prompts-n", "-1"]
    iterate.main(["--run-dir", "run", "--model", "ckpt", *argv])
    for run, model in (("./run/", "./ckpt/"), (str(tmp_path / "run"), str(tmp_path / "ckpt"))):
        timings = iterate.main(["--run-dir", run, "--model", model, *argv])
        assert {how for *_, how in timings} == {"done before"}
    os.rename("run", "moved")
    shutil.copytree("ckpt", "ckpt2")  # the same weights in another folder
    timings = iterate.main(["--run-dir", "moved", "--model", "ckpt2", *argv])
    assert {how for *_, how in timings} == {"done before"}
    make_tiny_checkpoint(tmp_path / "other", seed=5)  # other weights: another run
    with pytest.raises(SystemExit, match="other settings.*--model"):
        iterate.main(["--run-dir", "moved", "--model", str(tmp_path / "other"), *argv])


def test_adding_sft_data_to_a_run_is_refused(tmp_path, tiny_ckpt):
    """Adding --sft-data to an existing run trained iteration 0 while the later iterations stayed done on the old
    starting model."""
    run = str(tmp_path / "run")
    argv = ["--run-dir", run, "--model", tiny_ckpt, "--iterations", "1", *SMALL, "--eval-prompts-n", "-1"]
    iterate.main(argv)
    with pytest.raises(SystemExit, match="other settings.*--sft-data: None ->"):
        iterate.main(argv + ["--sft-data", sft_file(tmp_path / "sft.jsonl")])
    assert not os.path.exists(os.path.join(run, "iter0"))


def test_a_finished_run_on_a_read_only_place_says_there_is_nothing_to_do(tmp_path, tiny_ckpt, monkeypatch, capsys):
    """A finished run on a read-only location failed on its lock file instead of saying there was nothing to do."""
    run = str(tmp_path / "run")
    argv = ["--run-dir", run, "--model", tiny_ckpt, "--iterations", "1", *SMALL, "--eval-prompts-n", "-1"]
    iterate.main(argv)

    def read_only(folder):
        raise PermissionError(13, "Read-only file system", os.path.join(folder, "lock"))
    monkeypatch.setattr(iterate, "lock_folder", read_only)
    iterate.main(argv)
    assert "nothing to do" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# stages that end, stages that resume


def test_self_taught_evaluator_with_sft_data_evaluates_iteration_0(tmp_path, tiny_ckpt):
    """--method self-taught-evaluator with --sft-data crashed in iteration 0's evaluation: it read the labelled
    pairs that iteration 1 writes later."""
    run = str(tmp_path / "run")
    iterate.main(["--preset", "ste-demo", "--run-dir", run, "--model", tiny_ckpt, "--sft-data", sft_file(tmp_path / "s.jsonl"),
                  "--prompts-per-iter", "3", "--n-judgments", "1", "--max-new-tokens", "4", "--judge-max-new-tokens", "4",
                  "--eval-prompts-n", "3", "--eval-max-new-tokens", "4", "--meta-max-new-tokens", "3", "--sft-epochs", "1"])
    for t in (0, 1):
        res = json.load(open(os.path.join(run, f"iter{t}", "eval", "results.json")))
        assert res["metric"] == "judge-accuracy" and res["pairs"] == 3
    assert os.path.exists(os.path.join(run, "iter0", "eval_pairs.jsonl"))
    assert not os.path.exists(os.path.join(run, "iter1", "eval_pairs.jsonl"))


def test_select_val_killed_after_the_last_epoch_does_not_train_again(tmp_path, tiny_ckpt, monkeypatch):
    """--select val killed right after the last epoch's training retrained every epoch on the re-run and left
    an orphan model.epochN."""
    run, ckpt = str(tmp_path / "run"), make_tiny_checkpoint(tmp_path / "ckpt", seed=5, stop_chars=STOPS)
    argv = ["--run-dir", run, "--model", ckpt, "--iterations", "1", *SMALL, "--eval-prompts-n", "-1", "--n-responses",
            "3", "--max-new-tokens", "10", "--prompts-per-iter", "6", "--select", "val", "--val-prompts-n", "2",
            "--epochs", "2"]
    real = iterate.write_json

    def killed(path, obj):
        if path.endswith("select.json") and obj.get("trained") == 2:
            raise KeyboardInterrupt("killed")
        return real(path, obj)
    monkeypatch.setattr(iterate, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        iterate.main(argv)
    metrics = read(os.path.join(run, "iter1", "model.train", "metrics.jsonl"))
    monkeypatch.setattr(iterate, "write_json", real)
    iterate.main(argv)
    assert read(os.path.join(run, "iter1", "model.train", "metrics.jsonl")) == metrics  # not trained again
    leftovers = [n for n in os.listdir(os.path.join(run, "iter1")) if n.startswith("model.")]
    assert leftovers == ["model.train"]
    train = json.load(open(os.path.join(run, "iter1", "manifest.json")))["stages"]["train"]["counts"]
    assert sorted(train["val_score_by_epoch"]) == ["1", "2"] and train["select_metric"] == "winrate"


def test_an_iteration_without_pairs_is_reported_as_not_trained(tmp_path, tiny_ckpt):
    """Only iterate.py may skip a training stage, when its own stages made no pairs, and it says so."""
    run = str(tmp_path / "run")
    iterate.main(["--run-dir", run, "--model", tiny_ckpt, "--iterations", "1", *SMALL, "--eval-prompts-n", "-1",
                  "--judge-fn", "prog_judges:constant"])
    d = os.path.join(run, "iter1")
    assert os.path.getsize(os.path.join(d, "actor_pairs.jsonl")) == 0
    train = json.load(open(os.path.join(d, "manifest.json")))["stages"]["train"]["counts"]
    assert train["steps"] == 0 and "no training data" in train["skipped"]
    assert "no training data" in open(os.path.join(d, "report.md")).read()


# -----------------------------------------------------------------------------
# stage settings and JSON


def test_stage_settings_compare_what_runs(tmp_path, tiny_ckpt):
    """--dtype auto vs float32 on a CPU was flagged as a change; a missing settings file beside existing output
    resumed silently; a corrupt one gave a traceback."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"p{i}", "prompt": f"Say {i}."} for i in range(3)])
    out = str(tmp_path / "r.jsonl")
    base = ["--model", tiny_ckpt, "--prompts", prompts, "--out", out, "--n-responses", "1", "--max-new-tokens", "3"]
    sample.main(base + ["--dtype", "auto"])
    sample.main(base + ["--dtype", "float32"])  # the same computation on a CPU: resumes (nothing left to do)
    with open(common.settings_path(out), "w") as f:
        f.write("{not json")
    with pytest.raises(SystemExit, match=r"r.settings.json is unreadable.*--redo"):
        sample.main(base)
    os.remove(common.settings_path(out))
    with pytest.raises(SystemExit, match=r"r.settings.json is missing.*--redo"):
        sample.main(base)
    sample.main(base + ["--redo"])
    assert len(read(out)) == 3


def test_json_files_are_strict(tmp_path):
    """NaN was written into manifest.json and results.json, which strict JSON readers reject."""
    import numpy as np
    f = str(tmp_path / "x.json")
    common.write_json(f, {"a": float("nan"), "b": [1.5, float("inf"), {"c": np.float64("nan")}], "d": np.int64(3)})

    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")
    assert json.loads(open(f).read(), parse_constant=no_constants) == {"a": None, "b": [1.5, None, {"c": None}], "d": 3}
    assert math.isnan(float("nan"))  # (the input really held NaN)


def test_lift_copies_of_an_iteration_without_actor_pairs(tmp_path, tiny_ckpt):
    """--lift beside the judge: an iteration whose judge made no actor pairs stopped on the empty pair file."""
    run = str(tmp_path / "run")
    iterate.main(["--run-dir", run, "--model", tiny_ckpt, "--iterations", "1", *SMALL, "--eval-prompts-n", "-1",
                  "--judge-fn", "prog_judges:constant", "--lift", "--method", "self-rewarding"])
    man = json.load(open(os.path.join(run, "iter1", "manifest.json")))["stages"]
    assert man["lift_pairs"]["counts"]["lift_pairs"] == 0 and man["train"]["counts"]["steps"] == 0


def gsm8k_file(path):
    """Three questions in GSM8K's own format: no `id`, a worked `answer` with calculator marks and `#### N`."""
    return write_jsonl(path, [{"question": f"Tom has {a} pens and buys {b} more. How many pens does he have?",
                               "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} pens.\n#### {a + b}"}
                              for a, b in ((2, 3), (4, 4), (7, 1))])


def test_gsm8k_files_feed_both_verifiable_methods(tmp_path, tiny_ckpt):
    """A GSM8K file (records without `id`) was read by --method irpo but refused by --method scpo; and IRPO's
    gold worked solution did not travel with its question, so it could not join the winning set."""
    qs = gsm8k_file(tmp_path / "gsm.jsonl")
    for method in ("irpo", "scpo"):
        doc = iterate.main(["--preset", "reasoning-demo", "--method", method, "--model", tiny_ckpt, "--prompts", qs,
                            "--prompts-per-iter", "3", "--eval-prompts", qs, "--run-dir", str(tmp_path / method), "--dry-run"])
        assert sorted(doc["iterations"][0]["prompt_ids"]) == ["q1", "q2", "q3"]
    run = str(tmp_path / "run")
    iterate.main(["--preset", "reasoning-demo", "--model", tiny_ckpt, "--prompts", qs, "--prompts-per-iter", "3",
                  "--eval-prompts-n", "-1", "--n-responses", "2", "--max-new-tokens", "4", "--run-dir", run])
    prompts = read(os.path.join(run, "iter1", "prompts.jsonl"))
    assert {p["id"]: p["solution"] for p in prompts}["q1"] == "He has 2 + 3 = 5 pens.\nFinal answer: 5"
    pairs = read(os.path.join(run, "iter1", "reasoning_pairs.jsonl"))
    assert pairs and {p["chosen"] for p in pairs} <= {p["solution"] for p in prompts} | \
        {r for rec in read(os.path.join(run, "iter1", "responses.jsonl")) for r in rec["responses"]}
    assert any(p["chosen"] == p_["solution"] for p in pairs for p_ in prompts)


# -----------------------------------------------------------------------------
# the papers' recipes: iteration 0, the TPO judge, checkpoint selection by each method's own measure


def pool(path, n):
    """Questions with gold answers and worked solutions (so that IRPO pairs every question, even on a random model)."""
    return write_jsonl(path, [{"id": f"q{i:05d}", "prompt": f"What is {i} plus one?", "answer": str(i + 1),
                               "solution": f"{i} + 1 = {i + 1}.\nFinal answer: {i + 1}"} for i in range(n)])


def test_recipes_with_iteration_0_need_its_data(tmp_path):
    """--preset paper without --sft-data silently skipped the recipe's iteration 0."""
    p = pool(tmp_path / "pool.jsonl", 20_000)
    for preset in ("paper", "self-rewarding-paper"):
        argv = ["--preset", preset, "--model", "/models/x", "--prompts", p, "--run-dir", str(tmp_path / "r"), "--dry-run"]
        with pytest.raises(SystemExit, match=r"--sft-data.*eft.py.*--no-sft"):
            iterate.main(argv)
        assert [it["iteration"] for it in iterate.main(argv + ["--no-sft"])["iterations"]][0] == 1


def test_tpo_paper_needs_a_judge_model(tmp_path):
    argv = ["--preset", "tpo-paper", "--model", "/models/x", "--prompts", pool(tmp_path / "p.jsonl", 30_000),
            "--run-dir", str(tmp_path / "r"), "--dry-run"]
    with pytest.raises(SystemExit, match="--judge-model.*separate, fixed judge"):
        iterate.main(argv)
    stages = iterate.main(argv + ["--judge-model", "/models/judge"])["iterations"][0]["stages"]
    judged = [s["argv"] for s in stages if s["name"] == "judgments"][0]
    assert judged[judged.index("--model") + 1] == "/models/judge"


@pytest.mark.parametrize("preset, held", [("irpo-paper", 1000), ("scpo-paper", 500), ("tpo-paper", 200)])
def test_family_presets_choose_their_checkpoint(tmp_path, preset, held):
    """irpo-paper, scpo-paper and tpo-paper kept the last epoch; their papers choose a checkpoint on held-out data."""
    p = pool(tmp_path / "p.jsonl", 30_000)
    argv = ["--preset", preset, "--model", "/models/x", "--prompts", p, "--run-dir", str(tmp_path / "r"), "--dry-run"]
    argv += ["--judge-model", "/models/judge"] if preset == "tpo-paper" else ["--eval-prompts", p]
    it = iterate.main(argv)["iterations"][0]
    assert len(it["val_prompt_ids"]) == held and not set(it["val_prompt_ids"]) & set(it["prompt_ids"])


@pytest.mark.parametrize("method, metric", [("irpo", "accuracy"), ("lift", "length"),
                                            ("self-taught-evaluator", "judge-accuracy")])
def test_select_val_uses_the_methods_own_measure(tmp_path, method, metric):
    """Judge-free methods with --select val chose the epoch by an LLM win rate instead of their own metric."""
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", seed=5, stop_chars=STOPS)
    run = str(tmp_path / "run")
    preset = {"irpo": "reasoning-demo", "lift": "lift-demo", "self-taught-evaluator": "ste-demo"}[method]
    epochs = ["--sft-epochs", "2"] if method == "self-taught-evaluator" else ["--epochs", "2"]
    prompts = ["--prompts", pool(tmp_path / "q.jsonl", 8)] if method == "irpo" else []
    iterate.main(["--preset", preset, "--model", ckpt, "--run-dir", run, *prompts, "--prompts-per-iter", "6",
                  "--n-responses", "3", "--max-new-tokens", "8", "--eval-prompts-n", "-1", "--eval-max-new-tokens", "4",
                  "--judge-max-new-tokens", "4", "--meta-max-new-tokens", "3", "--select", "val", "--val-prompts-n", "3",
                  *epochs, "--batch-size", "2", "--micro-batch-size", "2"])
    d = os.path.join(run, "iter1")
    train = json.load(open(os.path.join(d, "manifest.json")))["stages"]["train"]["counts"]
    if train.get("steps") == 0:
        pytest.skip("the tiny model made no pairs to train on")
    assert train["select_metric"] == metric and sorted(train["val_score_by_epoch"]) == ["1", "2"]
    res = json.load(open(os.path.join(d, "select", "epoch1", "results.json")))
    assert res["metric"] == metric
    held = {p["id"] for p in read(os.path.join(d, "val_prompts.jsonl"))}
    assert len(held) == 3 and not held & {p["id"] for p in read(os.path.join(d, "prompts.jsonl"))}


def test_val_retrain_trains_again_with_the_held_out_pairs(tmp_path):
    """IRPO's way: choose the epoch on held-out questions, then train that many epochs with them included."""
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", seed=5, stop_chars=STOPS)
    run = str(tmp_path / "run")
    iterate.main(["--preset", "reasoning-demo", "--model", ckpt, "--run-dir", run, "--prompts", pool(tmp_path / "q.jsonl", 8),
                  "--prompts-per-iter", "8", "--n-responses", "3", "--max-new-tokens", "8", "--eval-prompts-n", "-1",
                  "--select", "val", "--val-prompts-n", "3", "--val-retrain", "--epochs", "2", "--batch-size", "2",
                  "--micro-batch-size", "2"])
    d = os.path.join(run, "iter1")
    held = {p["id"] for p in read(os.path.join(d, "val_prompts.jsonl"))}
    asked = {p["id"] for p in read(os.path.join(d, "prompts.jsonl"))}
    assert held <= asked and len(asked) == 8  # the held-out questions were sampled and paired too
    pairs = read(os.path.join(d, "reasoning_pairs.jsonl"))
    selection = read(os.path.join(d, "reasoning_pairs.selection.jsonl"))
    assert {p["id"].split("/")[0] for p in selection}.isdisjoint(held)
    assert len(selection) == len([p for p in pairs if p["id"].split("/")[0] not in held])
    train = json.load(open(os.path.join(d, "manifest.json")))["stages"]["train"]["counts"]
    assert train["retrained_epochs"] == train["best_epoch"] and train["examples"] == len(pairs)
    assert sorted(n for n in os.listdir(d) if n.startswith(("model", "selection_model"))) == ["model", "model.train",
                                                                                              "selection_model.train"]


def test_the_judge_is_followed_across_iterations(tmp_path, tiny_ckpt):
    """--judge-eval: each iteration scores its model as a judge of labelled pairs; the report puts the judge's
    accuracy beside the actor's win rate, from the starting model on."""
    run = str(tmp_path / "run")
    labelled = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "judge_eval.jsonl")
    iterate.main(["--run-dir", run, "--model", tiny_ckpt, "--iterations", "2", *SMALL, "--judge-eval", labelled,
                  "--verdict-mode", "expected"])
    first = json.load(open(os.path.join(run, "iter1", "judge_eval", "results.json")))
    second = json.load(open(os.path.join(run, "iter2", "judge_eval", "results.json")))
    assert first["pairs"] == second["pairs"] == 12 and "b" in first and "b" not in second
    assert 0 <= first["a"]["p_right"] <= 1
    report = open(os.path.join(run, "iter2", "report.md")).read()
    table = report[report.index("## The actor and the judge across iterations"):]
    rows = [line for line in table.splitlines() if line.startswith("| start") or line.startswith("| iteration")]
    assert [r.split(" | ")[0] for r in rows] == ["| start (M0)", "| iteration 1", "| iteration 2"]
    assert f"| iteration 2 | {json.load(open(os.path.join(run, 'iter2', 'eval', 'results.json')))['win_rate']} |" in table
    assert str(second["a"]["accuracy"]) in rows[2]
    # iteration 2's B is iteration 1's model: its answers were taken from iteration 1's evaluation, not made again
    assert read(os.path.join(run, "iter2", "eval", "answers_b.jsonl")) == read(os.path.join(run, "iter1", "eval", "answers_a.jsonl"))
