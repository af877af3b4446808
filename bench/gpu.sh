#!/usr/bin/env bash
# The generation engine on a CUDA machine in one command, within BUDGET=480 s (8 minutes: the step limits below
# sum to it, and no step runs past what is left of it):
#   preflight  versions, pytest, a tiny torch.compile on the GPU, free disk (bench/preflight.py); what is missing
#              is printed, and the steps adapt: no compile, eager only; no pytest, bench/minitest.py runs the
#              device tests; no transformers, our side only
#   tests      the device tests on cuda: fp32 and bf16 decoding, packed DPO log-probs and gradients against float64,
#              the compiled decode, device placement
#   syncs      host syncs per decode step, by line, counted by CUDA itself (bench/host_syncs.py)
#   decode_1b  batch-1 decode: eager, transformers, compiled, compiled with CUDA graphs, as shares of the roofline
#   sample_1b  generation against transformers at a paper iteration's scale (actor and judge workloads)
#   sample_8b  the actor workload on the 8B shape, 128 prompts x 7 samples x 512 tokens
#   decode_8b  batch-1 decode on the 8B shape: eager, transformers, compiled
# Models are made on the GPU from a seed (no checkpoint on disk; the transformers side holds the same tensors).
# Each benchmark writes its JSON as it goes; $OUT/gpu.json merges them with the steps' exit codes and seconds after
# every step, so whatever a session gets back is readable. Temporary files live under one folder removed at exit.
# The tokenizer: `python bench/shapes.py` writes checkpoints/tokenizer where the model package is missing.
#   OUT=/tmp/out bash bench/gpu.sh            SMOKE=1 bash bench/gpu.sh   (tiny shapes on the CPU: the script's own check)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out} PY=${PYTHON:-python} NAME=gpu PREFIXES="sample_ decode_ host_syncs"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.log") 2>&1
TEE=$!
if [ "${SMOKE:-0}" = 1 ]; then
  DEV=cpu BIG=tiny SMALL=tiny SCALE="--max-prompts 2 --new-tokens 8" BIGSCALE="--max-prompts 2 --new-tokens 8" NEW=16 BUDGET=${BUDGET:-600}
  MODES_SMALL=eager,transformers,default MODES_BIG=eager,transformers
else
  DEV=cuda BIG=8b SMALL=1b SCALE=--gpu-scale BIGSCALE="--gpu-scale --max-prompts 128" NEW=256
  MODES_SMALL=eager,transformers,default,reduce-overhead MODES_BIG=eager,transformers,default
fi
source bench/steps.sh
start
preflight
if [ "$PF_COMPILE" != 1 ]; then
  echo "no working torch.compile: compiled modes left out"
  MODES_SMALL=eager,transformers MODES_BIG=eager,transformers
fi
SIDES=ours,transformers
if [ "$PF_HF" != 1 ]; then
  echo "no transformers: our side only"
  MODES_SMALL=${MODES_SMALL/transformers,/} MODES_BIG=${MODES_BIG/transformers,/} SIDES=ours
fi
if [ "$PF_PYTEST" = 1 ]; then
  step tests 65 env TEST_DEVICE=$DEV TEST_COMPILE=$PF_COMPILE $PY -m pytest -v -p no:cacheprovider tests/test_device.py tests/test_placement.py
else
  echo "no pytest: the device tests run through bench/minitest.py"
  step tests 65 env TEST_DEVICE=$DEV TEST_COMPILE=$PF_COMPILE $PY bench/minitest.py tests/test_device.py tests/test_placement.py
fi
step syncs 20 $PY bench/host_syncs.py --device $DEV --json "$OUT/host_syncs.json"
step decode_$SMALL 75 $PY bench/bench_decode.py --shape $SMALL --device $DEV --new-tokens $NEW --modes $MODES_SMALL --json "$OUT/decode_$SMALL.json"
step sample_$SMALL 115 $PY bench/bench_sample.py --shape $SMALL $SCALE --sides $SIDES --device $DEV --json "$OUT/sample_$SMALL.json"
step sample_${BIG}_actor 85 $PY bench/bench_sample.py --shape $BIG $BIGSCALE --workload actor --sides $SIDES --device $DEV --json "$OUT/sample_${BIG}_actor.json"
step decode_${BIG}_big 75 $PY bench/bench_decode.py --shape $BIG --device $DEV --new-tokens $NEW --modes $MODES_BIG --json "$OUT/decode_${BIG}_big.json"
echo "merged: $OUT/$NAME.json ($SECONDS s in all)"
exec >&- 2>&-  # close the pipe to tee and let it write the last lines
wait $TEE 2>/dev/null
