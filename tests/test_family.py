"""The sibling methods' loops as their papers run them, end to end on the tiny model: ScPO with its hotter extra
samples and questions the model writes itself inside the run, and the Self-Taught Evaluator judging its first
iteration's pairs again with each newer judge."""
import json
import os

from conftest import STOPS, make_tiny_checkpoint

import iterate
from common import model_fingerprint
from data import make_arith


def read(path):
    return [json.loads(x) for x in open(path)] if os.path.getsize(path) else []


def test_scpo_extra_samples_and_new_questions(tmp_path, monkeypatch):
    import self_instruct
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", seed=5, stop_chars=STOPS)
    qs = tmp_path / "q.jsonl"
    qs.write_text("".join(json.dumps(r) + "\n" for r in make_arith.make("small", 6, "train")))
    # a random model's requests rarely pass the word checks: accept any non-empty one, so questions are written
    monkeypatch.setattr(self_instruct, "check", lambda text, index, max_overlap: None if text else "no request found")
    run = str(tmp_path / "run")
    args = ["--run-dir", run, "--model", ckpt, "--preset", "reasoning-demo", "--method", "scpo", "--prompts", str(qs),
            "--eval-prompts", str(qs), "--prompts-per-iter", "3", "--iterations", "2", "--max-new-tokens", "8",
            "--eval-max-new-tokens", "6", "--eval-samples", "2", "--lr", "1e-3", "--tau", "0", "--n-responses", "3",
            "--extra-samples", "2", "--new-questions", "2", "--self-instruct-args", "--max-new-tokens 12 --shots 2"]
    iterate.main(args)
    for t in (1, 2):
        d = os.path.join(run, f"iter{t}")
        man = json.load(open(os.path.join(d, "manifest.json")))
        assert list(man["stages"])[:5] == ["new_prompts", "prompts", "responses", "extra_responses", "reasoning_pairs"]
        made = read(os.path.join(d, "new_prompts.jsonl"))
        prompts = read(os.path.join(d, "prompts.jsonl"))
        # the iteration asks its 3 pool questions and the 2 it wrote, in the reasoning template, marked as written
        assert len(made) == 2 and len(prompts) == 5 and [p["id"] for p in prompts[3:]] == [m["id"] for m in made]
        assert all(p.get("generated") and "Final answer" in p["prompt"] and m["prompt"] in p["prompt"]
                   for p, m in zip(prompts[3:], made))
        extra = read(os.path.join(d, "extra_responses.jsonl"))
        assert [len(r["responses"]) for r in extra] == [2] * 5 and [r["id"] for r in extra] == [p["id"] for p in prompts]
        counts = man["stages"]["reasoning_pairs"]["counts"]
        assert counts["questions"] == 5 and counts["generated_questions"] == 2 and 0 <= counts["generated_kept"] <= 2
        pairs = read(os.path.join(d, "reasoning_pairs.jsonl"))
        assert counts["rejected_extra"] == sum(p["id"].rsplit("/", 1)[1].startswith("x") for p in pairs)
        texts = {r["id"]: r for r in extra}
        for p in pairs:  # an extra sample is only ever the rejected side, and is the text it names
            q, _, c, r = p["id"].rsplit("/", 3)
            assert not c.startswith("x")
            if r.startswith("x"):
                assert p["rejected"] == texts[q]["responses"][int(r[1:])]
    assert {how for *_, how in iterate.main(args)} == {"done before"}


def test_self_taught_evaluator_rejudges_the_first_pairs(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", seed=5, stop_chars=STOPS)
    run = str(tmp_path / "run")
    args = ["--run-dir", run, "--model", ckpt, "--preset", "ste-paper", "--iterations", "2", "--prompts-per-iter", "5",
            "--max-new-tokens", "8", "--n-judgments", "2", "--judge-max-new-tokens", "6", "--meta-max-new-tokens", "6",
            "--eval-prompts-n", "4", "--eval-max-new-tokens", "6", "--verdict-mode", "expected", "--sft-lr", "1e-3",
            "--lr", "1e-3", "--sft-epochs", "1", "--batch-size", "4", "--sft-batch-size", "4", "--max-len", "256",
            "--max-rows", "32", "--dtype", "float32"]
    iterate.main(args)
    one, two = (os.path.join(run, f"iter{t}") for t in (1, 2))
    stages = list(json.load(open(os.path.join(two, "manifest.json")))["stages"])
    assert stages == ["pairwise", "select", "train", "train_dpo", "evaluate", "evaluate_modified", "report"]
    # iteration 2 judged iteration 1's labelled pairs, with iteration 1's model as the judge
    ids = lambda d: sorted(r["id"] for r in read(os.path.join(d, "pairwise.jsonl")))  # noqa: E731
    assert ids(two) == ids(one) and len(ids(one)) == 2 * len(read(os.path.join(one, "contrast.jsonl")))
    judged_by = json.load(open(os.path.join(two, "pairwise.texts.settings.json")))["model"]
    assert judged_by == model_fingerprint(os.path.join(one, "model")) != model_fingerprint(ckpt)
    # y- was written by the seed at y+'s token limit; the evaluation also scores x' pairs
    contrast_settings = json.load(open(os.path.join(one, "contrast.other_answers.settings.json")))
    assert contrast_settings["max_new_tokens"] == 8
    for name in ("eval", "eval_modified"):
        res = json.load(open(os.path.join(two, name, "results.json")))
        assert res["metric"] == "judge-accuracy" and res["pairs"] >= 1
    assert "modified request" in open(os.path.join(two, "report.md")).read()
    assert {how for *_, how in iterate.main(args)} == {"done before"}


def test_no_modified_pairs_skips_their_evaluation(tmp_path):
    """A seed that wrote no usable x' leaves eval_modified_pairs.jsonl empty: that evaluation is skipped, said
    in its counts, and the run goes on (the other evaluation still scores its pairs)."""
    empty = tmp_path / "eval_modified_pairs.jsonl"
    empty.write_text("")
    got = iterate.run_stage(None, 2, str(tmp_path), "evaluate_modified", "evaluate", ["--prompts", str(empty)], None)
    assert "made no x' pair" in got["skipped"]


def test_plain_chat_format_reaches_every_stage(tmp_path):
    """--chat-format plain and a completion-style reasoning template with its own `#stop:` line: the run asks the
    tiny model with the template text alone, stops its answers at the template's stop string, trains and
    evaluates in the same format."""
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", seed=5, stop_chars=STOPS)
    template = tmp_path / "plain.txt"
    template.write_text("#stop: \\nQ:\nQ: {prompt}\nA: Let's think step by step.")
    qs = tmp_path / "q.jsonl"
    qs.write_text("".join(json.dumps(r) + "\n" for r in make_arith.make("small", 4, "train")))
    run = str(tmp_path / "run")
    args = ["--run-dir", run, "--model", ckpt, "--preset", "reasoning-demo", "--prompts", str(qs), "--eval-prompts",
            str(qs), "--prompts-per-iter", "0", "--max-new-tokens", "8", "--eval-max-new-tokens", "6", "--eval-samples", "2",
            "--n-responses", "3", "--chat-format", "plain", "--reasoning-template", str(template), "--stop", "END"]
    doc = iterate.main(args + ["--dry-run"])
    for st in doc["iterations"][0]["stages"]:
        argv = st["argv"]
        if argv[0] in ("sample.py", "train_dpo.py", "evaluate.py"):
            assert argv[argv.index("--chat-format") + 1] == "plain", argv
    responses = next(s["argv"] for s in doc["iterations"][0]["stages"] if s["name"] == "responses")
    assert [responses[i + 1] for i, x in enumerate(responses) if x == "--stop"] == ["END", "\nQ:"]
    iterate.main(args)
    d = os.path.join(run, "iter1")
    settings = json.load(open(os.path.join(d, "responses.settings.json")))
    assert settings["chat_format"] == "plain" and settings["stop"] == ["END", "\nQ:"]
    prompt = read(os.path.join(d, "prompts.jsonl"))[0]["prompt"]
    assert prompt.startswith("Q: ") and prompt.endswith("step by step.") and "#stop" not in prompt
    assert all("\nQ:" not in x for r in read(os.path.join(d, "responses.jsonl")) for x in r["responses"])
    ev = json.load(open(os.path.join(d, "eval", "greedy_a.settings.json")))
    assert ev["chat_format"] == "plain" and ev["stop"] == ["\nQ:"]
