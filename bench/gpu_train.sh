#!/usr/bin/env bash
# Training and the whole loop on a CUDA machine, in one command (about 8 minutes on one H100/H200):
#   1. the training tests on cuda: log-probs and gradients against float64 (tests/test_device.py), the trainer
#      and its resume (tests/test_train_dpo.py), the loop end to end with a SIGKILL and a resume that must equal
#      an uninterrupted run (tests/test_iterate.py); every stage picks the GPU when there is one;
#   2. the DPO step against the same step on transformers, fp32 weights with bf16 autocast, sequences of about
#      2,048 tokens, compiled blocks, with MFU; 1B- and 3B-shaped;
#   3. one iteration of the demo preset's shape on the 1B-shaped model, for the stage timings.
# Each step has its own limit and a failed one does not stop the rest. Writes $OUT/gpu_train.log, one JSON per
# benchmark and $OUT/gpu_train.json. Carry checkpoints/tokenizer (`python bench/shapes.py` writes it).
#   OUT=/tmp/out bash bench/gpu_train.sh      SMOKE=1 bash bench/gpu_train.sh   (tiny shapes on the CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
PY=${PYTHON:-python}
mkdir -p "$OUT"
if [ "${SMOKE:-0}" = 1 ]; then
  DEV=cpu; SHAPES="tiny"; PAIRS=2; RESP=120; EXTRA=""; TESTS="tests/test_device.py"; LOOP=tiny
else
  DEV=cuda; SHAPES="1b 3b"; PAIRS=4; RESP=1990; EXTRA="--autocast --compile"; LOOP=1b
  TESTS="tests/test_device.py tests/test_train_dpo.py tests/test_iterate.py"
fi
source bench/steps.sh
{
  $PY -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
  step tests 240 env TEST_DEVICE=$DEV $PY -m pytest -q -x $TESTS
  for s in $SHAPES; do
    step dpo_$s 120 $PY bench/bench_dpo.py --shape $s --device $DEV --pairs $PAIRS --response-tokens $RESP --steps 3 \
      --repeats 1 $EXTRA --json "$OUT/dpo_$s.json"
  done
  step loop_$LOOP 150 $PY - "$OUT" "$LOOP" "$DEV" <<'PY'
import json, os, subprocess, sys, tempfile, time
sys.path.insert(0, "bench")
import torch, shapes
out, shape, dev = sys.argv[1:4]
ckpt = shapes.random_checkpoint(shape, tempfile.mkdtemp(), dev, torch.bfloat16 if dev == "cuda" else torch.float32)
run = tempfile.mkdtemp()
t0 = time.time()
subprocess.run([sys.executable, "iterate.py", "--run-dir", run, "--model", ckpt, "--iterations", "1"]
               + (["--prompts-per-iter", "4", "--max-new-tokens", "16", "--judge-max-new-tokens", "16", "--meta-max-new-tokens", "8",
                   "--eval-prompts-n", "2", "--eval-max-new-tokens", "8"] if dev == "cpu" else []), check=True)
man = json.load(open(os.path.join(run, "iter1", "manifest.json")))
fig = {"shape": shape, "device": dev, "seconds": round(time.time() - t0, 1),
       "stages": {k: v.get("seconds") for k, v in man["stages"].items()}}
json.dump(fig, open(os.path.join(out, f"loop_{shape}.json"), "w"), indent=1)
print(fig)
PY
} 2>&1 | tee "$OUT/gpu_train.log"
merge "$OUT" gpu_train dpo_ loop_
