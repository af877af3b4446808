#!/usr/bin/env bash
# Training and the whole loop on a CUDA machine in one command, within BUDGET=480 s (8 minutes: the step limits
# below sum to it, and no step runs past what is left of it):
#   preflight  versions, pytest, a tiny torch.compile on the GPU, free disk (bench/preflight.py); the steps adapt
#              to what is missing (see bench/gpu.sh)
#   tests      on cuda, without stopping at a failure: log-probs and gradients against float64 (tests/test_device.py),
#              the trainer and its resume (tests/test_train_dpo.py), the loop end to end with a SIGKILL and a resume
#              that must equal an uninterrupted run (tests/test_iterate.py); every stage picks the GPU when there is
#              one. A test of 2 ranks would ask for cuda:1, so on one GPU it is left out (the CPU suite runs it);
#              without pytest only the device tests run (bench/minitest.py)
#   dpo_1b     the DPO step (train_dpo.py's packed pairs) against the two-row step on transformers, fp32 weights and
#              bf16 autocast, 3 pairs of about 2,000-token responses, ours eager, transformers, ours compiled, MFU
#              (3 pairs, not 4: if SDPA serves the packed rows' masked grouped-head attention with its math kernel,
#              as bench/shapes.py's attention report tells, 4 pairs keep about 67 GiB of attention weights)
#   dpo_3b     4 pairs on the 3B shape with activation checkpointing on both sides (without it, transformers'
#              side needs more than the 139 GiB of an H200)
#   loop_1b    one iteration of the demo preset's shape on a random 1B-shaped model with extra end tokens (so its
#              answers end and the loop makes pairs and trains), for the stage timings (bench/bench_loop.py)
# Each benchmark writes its JSON as it goes; $OUT/gpu_train.json merges them with the steps' exit codes and seconds
# after every step. Temporary files (the loop's checkpoint and run) live under one folder removed at exit.
#   OUT=/tmp/out bash bench/gpu_train.sh      SMOKE=1 bash bench/gpu_train.sh   (tiny shapes on the CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out} PY=${PYTHON:-python} NAME=gpu_train PREFIXES="dpo_ loop_"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_train.log") 2>&1
TEE=$!
if [ "${SMOKE:-0}" = 1 ]; then
  DEV=cpu SHAPE1=tiny SHAPE2=tiny PAIRS1=2 PAIRS2=2 RESP=40 LOOP=tiny LOOPARGS=--smoke NEED_GB=1 BUDGET=${BUDGET:-600}
  TESTS="tests/test_device.py"
else
  DEV=cuda SHAPE1=1b SHAPE2=3b PAIRS1=3 PAIRS2=4 RESP=1990 LOOP=1b LOOPARGS="" NEED_GB=30
  TESTS="tests/test_device.py tests/test_train_dpo.py tests/test_iterate.py"
fi
source bench/steps.sh
start
preflight
COMPILE=--compile HF=""
[ "$PF_COMPILE" != 1 ] && COMPILE="" && echo "no working torch.compile: the compiled side is left out"
[ "$PF_HF" != 1 ] && HF=--no-hf && echo "no transformers: our side only"
if [ "$PF_PYTEST" = 1 ]; then
  DESELECT=""
  if [ "$PF_GPUS" -lt 2 ] && [ "$DEV" = cuda ]; then
    echo "one GPU: tests/test_train_dpo.py::test_two_fsdp_ranks_match_one_process_and_resume left out (its second rank would ask for cuda:1)"
    DESELECT="--deselect tests/test_train_dpo.py::test_two_fsdp_ranks_match_one_process_and_resume"
  fi
  step tests 130 env TEST_DEVICE=$DEV TEST_COMPILE=$PF_COMPILE $PY -m pytest -v -p no:cacheprovider --durations=10 $DESELECT $TESTS
else
  echo "no pytest: only the device tests run (bench/minitest.py); the trainer's and the loop's tests are skipped"
  step tests 130 env TEST_DEVICE=$DEV TEST_COMPILE=$PF_COMPILE $PY bench/minitest.py tests/test_device.py
fi
DPO="--device $DEV --autocast --response-tokens $RESP --steps 3 --repeats 1 $HF"
[ "$DEV" = cpu ] && DPO="--device cpu --response-tokens $RESP --steps 1 --repeats 1 $HF"
step dpo_$SHAPE1 110 $PY bench/bench_dpo.py --shape $SHAPE1 --pairs $PAIRS1 $DPO $COMPILE --json "$OUT/dpo_$SHAPE1.json"
step dpo_${SHAPE2}_ckpt 95 $PY bench/bench_dpo.py --shape $SHAPE2 --pairs $PAIRS2 $DPO --activation-checkpointing --json "$OUT/dpo_${SHAPE2}_ckpt.json"
if [ "$PF_DISK_GB" -lt "$NEED_GB" ]; then
  skip loop_$LOOP "free disk $PF_DISK_GB GiB, under the $NEED_GB GiB its checkpoints need"
else
  step loop_$LOOP 100 $PY bench/bench_loop.py --shape $LOOP --device $DEV $LOOPARGS --json "$OUT/loop_$LOOP.json"
fi
echo "merged: $OUT/$NAME.json ($SECONDS s in all)"
exec >&- 2>&-  # close the pipe to tee and let it write the last lines
wait $TEE 2>/dev/null
