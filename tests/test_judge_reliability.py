"""Faults found by trying to break the judges' side (the Self-Taught Evaluator, evaluate.py, self-instruct): each
test names the defect it guards against. The tiny random checkpoints keep them fast."""
import json
import math

import pytest
from conftest import make_tiny_checkpoint

import evaluate
import evaluator
import self_instruct


def write_jsonl(path, recs):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs))
    return str(path)


def strict_load(path):
    """JSON as a strict reader takes it: NaN and the infinities are not JSON."""
    def refuse(name):
        raise ValueError(f"{path}: {name} is not JSON")
    with open(path, encoding="utf-8") as f:
        return json.loads(f.read(), parse_constant=refuse)


# -----------------------------------------------------------------------------
# the Self-Taught Evaluator


@pytest.fixture(scope="module")
def mute_ckpt(tmp_path_factory):
    """A checkpoint whose every byte token ends a generation: it writes nothing, so never a request x'."""
    from tokenizers import pre_tokenizers
    stops = "".join(pre_tokenizers.ByteLevel.alphabet())
    return make_tiny_checkpoint(tmp_path_factory.mktemp("mute") / "ckpt", seed=5, stop_chars=stops)


def test_no_contrast_pair_passes_through_every_step_on_every_run(tmp_path, mute_ckpt):
    """A model that wrote no usable x' left an empty prompt file that sample.py refused, and the judge step failed
    on the empty contrast file, on every re-run. Now the drops are counted and the steps after pass through."""
    resp = write_jsonl(tmp_path / "responses.jsonl", [{"id": f"q{i}", "prompt": f"Say {i}.", "responses": [f"a{i}"]}
                                                      for i in range(3)])
    steps = [["--step", "contrast", "--responses", resp, "--out", str(tmp_path / "contrast.jsonl"), "--model", mute_ckpt],
             ["--step", "judge", "--contrast", str(tmp_path / "contrast.jsonl"), "--out", str(tmp_path / "pairwise.jsonl"),
              "--model", mute_ckpt, "--verdict-mode", "expected"],
             ["--step", "select", "--judged", str(tmp_path / "pairwise.jsonl"), "--out", str(tmp_path / "sft.jsonl")]]
    want = [{"pairs": 0, "no_request": 3, "no_answer": 0, "same_text": 0},
            {"prompts": 0, "judgments": 0, "unparsed": 0, "right": 0, "first_position": 0},
            {"right_prompts": 0, "sft_records": 0, "dpo_pairs": 0}]
    for _ in range(2):
        assert [evaluator.main(argv) for argv in steps] == want
        assert all((tmp_path / f).read_text() == "" for f in ("contrast.jsonl", "pairwise.jsonl", "sft.jsonl", "sft.pairs.jsonl"))


def test_other_prompt_needs_two_records(tmp_path):
    """With one record, --other-prompt paired its answer with itself."""
    resp = write_jsonl(tmp_path / "responses.jsonl", [{"id": "q0", "prompt": "Say 0.", "responses": ["a0"]}])
    with pytest.raises(SystemExit, match=r"responses.jsonl: --other-prompt needs at least 2 records.*holds 1"):
        evaluator.main(["--step", "contrast", "--other-prompt", "--responses", resp, "--out", str(tmp_path / "c.jsonl")])


# -----------------------------------------------------------------------------
# evaluate.py: the user's labelled pairs and flags, checked before any model is loaded


PAIR = {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}


@pytest.mark.parametrize("recs,message", [
    ([dict(PAIR, id="x"), PAIR], r"pairs.jsonl:2: no `id`, though other pairs have one"),  # a made-up id could clash
    ([dict(PAIR, id="x"), dict(PAIR, id="x")], r"pairs.jsonl:2: duplicate id 'x'"),
    ([dict(PAIR, rejected="Blue.")], r"pairs.jsonl:1: `chosen` and `rejected` are the same text"),
    ([dict(PAIR, chosen=["Blue."])], r"pairs.jsonl:1: `chosen` and `rejected` must be strings"),
    ([dict(PAIR, prompt=" ")], r"pairs.jsonl:1: `prompt` must be a non-empty string"),
])
def test_labelled_pairs_are_checked_in_the_users_file(tmp_path, recs, message):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", recs)
    with pytest.raises(SystemExit, match=message):
        evaluate.main(["--a", str(tmp_path / "no-model"), "--metric", "judge-accuracy", "--prompts", pairs,
                       "--out-dir", str(tmp_path / "ev")])


@pytest.mark.parametrize("argv,message", [
    # a flag another metric reads was silently ignored
    (["--metric", "accuracy", "--strip-thoughts"], r"--strip-thoughts: 'both' is invalid .*only --metric winrate"),
    (["--metric", "length", "--strip-thoughts", "a"], r"--strip-thoughts: 'a'.*this is --metric length"),
    (["--metric", "length", "--export-alpaca-eval", "out.json"], r"--export-alpaca-eval: .*only --metric winrate"),
    (["--metric", "accuracy", "--limits", "5"], r"--limits: .*only --metric length"),
    (["--metric", "judge-accuracy", "--lift-template", "t.txt"], r"--lift-template: .*only --metric length"),
    (["--metric", "winrate", "--b", "B", "--samples", "8"], r"--samples: .*only --metric accuracy"),
    (["--metric", "length", "--reasoning-template", "t.txt"], r"--reasoning-template: .*only --metric accuracy"),
    (["--metric", "accuracy", "--verdict-mode", "expected"], r"--verdict-mode: .*only --metric winrate / judge-accuracy"),
    (["--metric", "length", "--limits", "10,10"], r"--limits: '10,10' is invalid \(must be a comma list of distinct"),
])
def test_flags_of_another_metric_are_refused(argv, message):
    with pytest.raises(SystemExit, match=message):
        evaluate.parse_args(["--a", "A"] + argv)


@pytest.mark.parametrize("argv", [
    ["--metric", "length", "--samples", "4", "--limits", "5"],  # --samples at its default
    # what iterate.py passes for each metric
    ["--b", "B", "--judge", "J", "--verdict-mode", "expected", "--judge-max-new-tokens", "32", "--strip-thoughts"],
    ["--metric", "judge-accuracy", "--b", "B", "--verdict-mode", "expected", "--judge-max-new-tokens", "32"],
    ["--metric", "accuracy", "--samples", "1", "--reasoning-template", "t.txt"],
    ["--metric", "length", "--limits", "10,20,40"],
])
def test_flags_of_the_metric_or_at_their_default_are_accepted(argv):
    evaluate.parse_args(["--a", "A", "--max-new-tokens", "48", "--max-rows", "8", "--dtype", "float32"] + argv)


# -----------------------------------------------------------------------------
# evaluate.py runs


def test_redo_reaches_the_nested_judge_stage(tmp_path, tiny_ckpt):
    """evaluate.py --metric judge-accuracy --redo stayed refused: the judge step it runs never got --redo."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [dict(PAIR, id=f"x{i}", prompt=f"Name colour {i}.") for i in range(2)])
    base = ["--a", tiny_ckpt, "--metric", "judge-accuracy", "--prompts", pairs, "--out-dir", str(tmp_path / "ev")]
    evaluate.main(base + ["--judge-max-new-tokens", "3"])
    with pytest.raises(SystemExit, match=r"verdicts_a.texts.jsonl: was started with other settings.*--redo"):
        evaluate.main(base + ["--judge-max-new-tokens", "4"])
    assert evaluate.main(base + ["--judge-max-new-tokens", "4", "--redo"])["pairs"] == 2


def test_judge_accuracy_passes_its_engine_flags_down(tmp_path, tiny_ckpt):
    """--metric judge-accuracy ignored --dtype (and --max-rows): the judge step it runs never got them."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [dict(PAIR, id="x")])
    evaluate.main(["--a", tiny_ckpt, "--metric", "judge-accuracy", "--prompts", pairs, "--out-dir", str(tmp_path / "ev"),
                   "--judge-max-new-tokens", "3", "--dtype", "bfloat16", "--max-rows", "1"])
    assert json.loads((tmp_path / "ev" / "verdicts_a.texts.settings.json").read_text())["dtype"] == "torch.bfloat16"


@pytest.mark.parametrize("metric,extra,count", [
    ("winrate", ["--b", "CKPT", "--judge", "CKPT", "--judge-max-new-tokens", "3"], "prompts"),
    ("length", ["--limits", "10"], "prompts"),  # one limit: the Spearman correlation of limit and words is undefined
    ("accuracy", ["--samples", "2"], "questions"),
    ("judge-accuracy", ["--judge-max-new-tokens", "3"], "pairs"),
])
def test_a_limit_beyond_the_file_and_strict_results(tmp_path, tiny_ckpt, metric, extra, count):
    """Every metric with --limit larger than the file, and results.json in strict JSON even where a statistic
    is undefined (it used to be written as NaN, which strict JSON readers refuse)."""
    recs = [dict(PAIR, id=f"x{i}", prompt=f"What is {i} + 1?", answer=str(i + 1)) for i in range(2)]
    argv = ["--a", tiny_ckpt, "--metric", metric, "--prompts", write_jsonl(tmp_path / "data.jsonl", recs), "--limit", "50",
            "--max-new-tokens", "4", "--bootstrap", "50", "--out-dir", str(tmp_path / "ev")]
    res = evaluate.main(argv + [tiny_ckpt if x == "CKPT" else x for x in extra])
    saved = strict_load(tmp_path / "ev" / "results.json")
    assert res[count] == saved[count] == 2
    if metric == "length":
        assert math.isnan(res["a"]["instructed"]["spearman_limit_words"])
        assert saved["a"]["instructed"]["spearman_limit_words"] is None


# -----------------------------------------------------------------------------
# self-instruct


def test_self_instruct_refuses_output_of_unknown_settings_and_redo_starts_over(tmp_path, tiny_ckpt):
    """self_instruct.py took --redo and ignored it, and resumed any earlier output, whatever made it."""
    pool = write_jsonl(tmp_path / "pool.jsonl", [{"id": f"p{i}", "prompt": f"Write a poem about the number {i}."} for i in range(3)])
    out = tmp_path / "new.jsonl"
    write_jsonl(out, [{"id": "si-0-00000", "prompt": "An old prompt that another run wrote.", "call": 0}])
    argv = ["--model", tiny_ckpt, "--pool", pool, "--out", str(out), "--count", "1", "--max-calls", "1", "--batch", "1",
            "--max-new-tokens", "4"]
    with pytest.raises(SystemExit, match=r"new.jsonl: holds records but its settings file .* is missing.*--redo"):
        self_instruct.main(argv)
    assert self_instruct.main(argv + ["--redo"])["calls"] == 1
    assert "An old prompt" not in out.read_text()
