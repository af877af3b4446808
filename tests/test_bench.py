"""The benchmarks' own machinery, on the CPU: what a GPU session must bring back on its first try. The roofline's
byte count worked by hand, the JSON of a run killed or out of time, the preflight's findings, the tests without
pytest, the step runner's limits and clean-up, warm-ups on the timed shapes, and a random model whose answers end."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import init_weights, tiny_args

from model import Transformer
from sample import Request, complete, plan_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_dpo  # noqa: E402
import bench_sample  # noqa: E402
import harness  # noqa: E402
import host_syncs  # noqa: E402
import shapes  # noqa: E402

PY = sys.executable
HIDE_PYTEST = "import sys, runpy; sys.modules['pytest'] = None; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


def env(tmp_path, **kw):
    return dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path), **kw)


# -----------------------------------------------------------------------------
# What the JSON says


@pytest.mark.parametrize("tied", [True, False])
def test_decode_bytes_count_a_tied_embedding_once_and_leave_out_an_untied_table(tied):
    """The roofline's denominator counted every state_dict tensor: a tied embedding twice, an untied table whole,
    though a decode step reads one row of it. Worked by hand for the tiny shape (vocab 97, dim 32, 4 query heads and
    2 key/value heads of 8, hidden 64, 2 layers, fp32)."""
    model = Transformer(tiny_args(tie_embeddings=tied))
    layer = 32 * 32 + 2 * (32 * 16) + 32 * 32 + 3 * (32 * 64) + 2 * 32  # wq, wk + wv, wo, w1 w3 w2, two norms = 9280
    head = 97 * 32  # the output matrix, read whole each step (tied: it is the embedding table)
    row = 32  # the looked-up row of the embedding
    want = 4 * (2 * layer + 32 + head + row)  # + the final norm
    assert want == 86912
    assert shapes.decode_step_bytes(model) == want  # the same for both: the head is read once either way
    assert sum(t.numel() * t.element_size() for t in model.state_dict().values()) == 4 * (2 * layer + 32 + 2 * head)
    assert shapes.kv_bytes_per_position(model) == 2 * 2 * 2 * 8 * 4  # keys and values, 2 layers, 2 heads of 8
    assert shapes.matmul_params(model) == 2 * layer + 32 + head  # a lookup is no matmul; the head is


def test_device_spec_table():
    h200, h100, pcie, a100, t4 = (shapes.device_spec(n) for n in (
        "NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB", "Tesla T4"))
    assert (h200["bandwidth_gb_s"], h200["peak_bf16_tflops"]) == (4800, 989)
    assert (h100["bandwidth_gb_s"], h100["peak_bf16_tflops"]) == (3350, 989)
    assert (pcie["bandwidth_gb_s"], pcie["peak_bf16_tflops"]) == (2000, 756)
    assert (a100["bandwidth_gb_s"], a100["peak_bf16_tflops"]) == (2039, 312)
    assert t4["matched"] == "unknown" and t4["bandwidth_gb_s"] is None and t4["peak_bf16_tflops"] is None
    e = shapes.environment("cpu")
    assert e["torch"] == torch.__version__ and "transformers" in e and "triton" in e


def test_transformers_side_holds_the_same_tensors_and_computes_the_same_logits():
    pytest.importorskip("transformers")
    for tied in (True, False):
        model = init_weights(Transformer(tiny_args(tie_embeddings=tied, vocab_size=300)), std=0.1, seed=1).eval()
        hf = shapes.hf_model(model)
        assert hf.model.embed_tokens.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
        assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tied  # one Parameter when tied: one gradient
        tokens = torch.randint(0, 300, (2, 11))
        with torch.no_grad():
            assert torch.allclose(hf(input_ids=tokens).logits.float(), model(tokens), atol=1e-5)


# -----------------------------------------------------------------------------
# Partial results


def test_parts_record_results_failures_and_the_time_limit(tmp_path):
    path = str(tmp_path / "r.json")
    res = harness.Results(path, harness.deadline_from(2.0), shape="tiny")
    seen = {}

    def first():
        seen["during"] = json.load(open(path))["modes"]["a"]  # the file says which part is running
        return {"tok_s": 1.0}

    assert res.part(("modes", "a"), first, min_seconds=0.1)["tok_s"] == 1.0
    assert seen["during"] == {"status": harness.RUNNING}
    assert res.part(("modes", "b"), lambda: 1 / 0, min_seconds=0.1) is None  # a failure is recorded, the next part runs
    assert res.part(("modes", "c"), lambda: time.sleep(5) or {"tok_s": 2.0}, min_seconds=0.1) is None  # stopped at the deadline
    assert res.part(("modes", "d"), lambda: {"tok_s": 3.0}) is None  # under 5 s left: not run
    got = json.load(open(path))
    assert got["shape"] == "tiny" and got["modes"]["a"]["tok_s"] == 1.0
    assert got["modes"]["b"]["error"].startswith("ZeroDivisionError")
    assert got["modes"]["c"]["error"].startswith("time limit: stopped after")
    assert got["modes"]["d"]["error"].startswith("not run: the time limit was reached")


def test_a_decode_run_killed_during_a_compile_keeps_what_it_measured(tmp_path):
    """SIGTERM (what `timeout` sends) while the compiled mode compiles: the eager figures are in the JSON and
    the compiled mode says it was killed. Before, the JSON was written once at the very end."""
    path = tmp_path / "decode.json"
    proc = subprocess.Popen([PY, os.path.join(ROOT, "bench", "bench_decode.py"), "--shape", "tiny", "--device", "cpu",
                             "--new-tokens", "4", "--modes", "eager,default", "--json", str(path)], env=env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and json.load(open(path)).get("modes", {}).get("default", {}).get("status"):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    assert proc.wait(60) != 0, "the run ended before it could be stopped in its compile"
    got = json.load(open(path))
    assert got["modes"]["eager"]["tok_s"] > 0 and got["roofline"]["weight_bytes_read"] > 0
    assert got["modes"]["default"]["error"].startswith("killed")
    assert got["env"]["torch"] == torch.__version__


def test_dpo_sides_are_recorded_one_by_one(tmp_path, monkeypatch):
    """A side that fails (out of memory) is recorded and the other sides still count; the ratio needs both."""
    calls = []

    def fake(args, side, timeout):
        calls.append(side)
        if side == "transformers":
            return {"error": "out of memory: CUDA out of memory"}
        return {"tokens_per_s": 10.0, "pairs_per_s": 1.0, "peak_mib": 5.0, "pair_tokens": 40,
                "mean_sequence_tokens": 12.0, "matmul_params": 100}

    monkeypatch.setattr(bench_dpo, "run_side", fake)
    path = str(tmp_path / "dpo.json")
    bench_dpo.main(["--shape", "tiny", "--device", "cpu", "--repeats", "2", "--compile", "--json", path])
    got = json.load(open(path))
    assert calls == ["ours", "transformers", "ours-compiled"] * 2  # alternating, compiled last
    assert got["runs"]["transformers"]["1"]["error"].startswith("out of memory")
    assert set(got["best"]) == {"ours", "ours-compiled"} and "ours_vs_transformers" not in got
    assert got["counted"].startswith("pair tokens")


# -----------------------------------------------------------------------------
# Timed regions: warm-ups on the timed shapes


def test_the_warm_up_plans_the_timed_cache():
    """A compiled step has static shapes (all rows, slots and positions); the warm-up ran 2 prompts x 8 tokens, so
    the timed run compiled again inside its timing. The warm-up's 2 tokens with the rest as planned room give the
    timed run's plan exactly."""
    prompts = [[5] * 7, [6] * 30, [7] * 12]
    for share in (True, False):
        warm = plan_cache(bench_sample.ours_requests(prompts, 4, 2, share, room=62), 12, 1 << 20)
        timed = plan_cache(bench_sample.ours_requests(prompts, 4, 64, share), 12, 1 << 20)
        assert warm == timed


def test_nothing_compiles_inside_the_timed_generation(monkeypatch):
    from torch._dynamo.utils import counters
    model = init_weights(Transformer(tiny_args()), seed=2).eval()
    graphs = []
    real = bench_sample.complete

    def counting(*a, **kw):
        out = real(*a, **kw)
        graphs.append(counters["stats"]["unique_graphs"])
        return out

    monkeypatch.setattr(bench_sample, "complete", counting)
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10]]
    bench_sample.run_ours(model, prompts, 2, 6, compile=True)
    warm, timed = graphs
    assert timed == warm  # the timed call found its graph compiled


def test_host_syncs_are_counted_per_decode_step_by_line():
    # at least the one read a step needs (the sampled tokens, which tell the host which rows stop)
    tolist = torch.Tensor.tolist
    out = host_syncs.count("cpu", rows=4, new_tokens=8)
    assert torch.Tensor.tolist is tolist  # the counting patch is undone
    assert out["decode_steps"] == 7 and out["steady_steps"] == 5  # the first token comes from the prefill
    reads = {k: n for k, n in out["events_per_step"].items() if k.startswith("host reads") and "sample.py:" in k}
    assert reads and all(n == int(n) for n in out["events_per_step"].values())  # every steady step alike
    assert out["total_per_step"] >= 1 and out["cuda_syncs_per_step"] is None


# -----------------------------------------------------------------------------
# Preflight, tests without pytest, the step runner


def test_preflight_says_what_is_missing_and_writes_the_findings(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([PY, "-c", HIDE_PYTEST, os.path.join(ROOT, "bench", "preflight.py"), "--device", "cpu",
                        "--out", str(out), "--compile-timeout", "0", "--need-disk-gb", "1e9"],
                       env=env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"torch {torch.__version__}" in r.stdout
    assert "MISSING: pytest" in r.stdout and "MISSING: free disk" in r.stdout
    found = dict(line.split("=") for line in open(out / "preflight.env").read().split())
    assert found["PF_PYTEST"] == "0" and found["PF_COMPILE"] == "0" and int(found["PF_DISK_GB"]) > 0
    info = json.load(open(out / "preflight.json"))
    assert info["torch"] == torch.__version__ and info["compile"] == {"ok": None, "how": "not checked"}
    assert any("pytest" in m for m in info["missing"])


def test_tests_run_without_pytest(tmp_path):
    (tmp_path / "test_sample_case.py").write_text(
        "import pytest\n\n@pytest.mark.parametrize('x', [1, 2])\ndef test_even(x):\n    assert x % 2 == 0\n\n"
        "@pytest.mark.skipif(True, reason='never')\ndef test_skipped():\n    pass\n\n"
        "def test_raises(monkeypatch, tmp_path):\n    monkeypatch.setenv('X_MINI', '1')\n"
        "    with pytest.raises(ValueError, match='bad'):\n        raise ValueError('bad input')\n")
    r = subprocess.run([PY, "-c", HIDE_PYTEST, os.path.join(ROOT, "bench", "minitest.py"), str(tmp_path / "test_sample_case.py"),
                        os.path.join(ROOT, "tests", "test_placement.py")], env=env(tmp_path), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1  # one case fails
    assert "test_even[1] FAILED" in r.stdout and "test_even[2] PASSED" in r.stdout and "test_skipped SKIPPED (never)" in r.stdout
    assert "without pytest: 6 passed, 1 failed, 1 skipped" in r.stdout, r.stdout[-2000:]


STEPS_SCRIPT = """
set -uo pipefail
OUT=$1 PY=$2 NAME=t PREFIXES="x_" BUDGET=${BUDGET:-60}
source bench/steps.sh
start
echo "$TMPDIR" > "$OUT/tmpdir"
step slow 2 sh -c 'touch "$TMPDIR/big"; sleep 10'
step ok 5 sh -c 'echo "{\\"v\\": 1}" > "$0/x_a.json"' "$OUT"
step late 30 sleep 5
"""


def test_steps_keep_their_limits_and_leave_no_temporary_files(tmp_path):
    """A step past its limit is stopped and recorded, the merged JSON follows every step, a step never runs past the
    budget, and the script's temporary folder is gone when it ends."""
    out = tmp_path / "out"
    script = tmp_path / "s.sh"
    script.write_text(STEPS_SCRIPT)
    r = subprocess.run(["bash", str(script), str(out), PY], cwd=ROOT, env=env(tmp_path, BUDGET="24"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    merged = json.load(open(out / "t.json"))
    assert merged["steps"]["slow"]["exit_code"] == 124 and merged["steps"]["ok"]["exit_code"] == 0
    assert merged["steps"]["late"]["exit_code"] == "skipped: the budget of 24 s is spent" or \
        merged["steps"]["late"]["limit"] <= 24
    assert merged["x_a"] == {"v": 1}
    tmp = open(out / "tmpdir").read().strip()
    assert tmp.startswith(str(tmp_path)) and not os.path.exists(tmp)


def test_a_script_stopped_by_sigterm_removes_its_temporary_folder(tmp_path):
    out = tmp_path / "out"
    script = tmp_path / "s.sh"
    script.write_text(STEPS_SCRIPT)
    proc = subprocess.Popen(["bash", str(script), str(out), PY], cwd=ROOT, env=env(tmp_path, BUDGET="60"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 30
    while time.time() < deadline and not (out / "tmpdir").exists():
        time.sleep(0.05)
    tmp = open(out / "tmpdir").read().strip()
    while time.time() < deadline and not os.path.exists(os.path.join(tmp, "big")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # as `timeout` and the device tool stop a script: its whole group
    proc.wait(30)
    assert not os.path.exists(tmp)


# -----------------------------------------------------------------------------
# A random model for the loop


def test_a_random_model_with_extra_end_tokens_ends_its_answers(tmp_path):
    """Without end tokens a random model's answers all run to their limit, and a cut answer never wins a pair:
    the loop made no pairs and trained nothing. Every 32nd id as an end token ends most answers of 64 tokens."""
    from tokenizer import Tokenizer
    plain = shapes.random_checkpoint("tiny", str(tmp_path / "plain"), "cpu", torch.float32)
    stops = shapes.random_checkpoint("tiny", str(tmp_path / "stops"), "cpu", torch.float32, stop_every=32)
    ended = {}
    for name, path in (("plain", plain), ("stops", stops)):
        tok = Tokenizer.from_pretrained(path)
        model = Transformer.from_pretrained(path).eval()
        reqs = [Request(tok.encode_prompt(f"Question {i}?"), n=4, temperature=0.8, top_p=0.95, max_new_tokens=64,
                        stop_ids=tuple(tok.stop_ids), seed=i) for i in range(4)]
        ended[name] = sum(c.finish_reason == "stop" for r in complete(model, reqs, max_rows=16) for c in r)
    assert len(Tokenizer.from_pretrained(stops).stop_ids) > 1500
    assert ended["plain"] <= 1 and ended["stops"] >= 12, ended


def test_decode_step_shares_of_the_matmul_peak():
    # worked by hand: 2 x 4 rows x 1e9 params in 0.5 s = 16 GFLOP/s, 2 x 2 x 1e9 in 0.1 s = 40; both 12e9 in 0.6 s = 20
    d = bench_sample.step_shares([(4, 0.5), (2, 0.1)], params=1e9, peak_gflop_s=100.0)
    assert (d["share"], d["share_min"], d["share_max"], d["gflop_s"]) == (0.2, 0.16, 0.4, 20.0)
    assert (d["decode_steps"], d["mean_step_ms"], d["decode_seconds"]) == (2, 300.0, 0.6)
    peak = bench_sample.matmul_peak("cpu", torch.float32, n=256, tries=1)
    assert peak["gflop_s"] == max(peak["by_kernel"].values()) > 0 and peak["kernel"] in peak["by_kernel"]
