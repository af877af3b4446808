#!/usr/bin/env bash
# The generation engine on a CUDA machine, in one command (about 8 minutes on one H100/H200):
#   1. the device tests on cuda (fp32 and bf16 greedy decoding against float64, batch independence, compiled
#      decode equal to eager, log-probs and gradients, the placement test);
#   2. generation tokens/s against transformers `generate` at a paper iteration's scale, 1B- and 8B-shaped;
#   3. batch-1 decode: eager, compiled, compiled with CUDA graphs, and transformers, as a share of the
#      memory-bandwidth roofline, 1B- and 8B-shaped.
# Every step has its own time limit and a failed one does not stop the rest. Writes $OUT/gpu.log and one JSON
# per benchmark, merged into $OUT/gpu.json. Random-initialised models with the embedded tokenizer: run
# `python bench/shapes.py` first where the tokenizer package is missing and carry checkpoints/tokenizer.
#   OUT=/tmp/out bash bench/gpu.sh            SMOKE=1 bash bench/gpu.sh   (tiny shapes on the CPU: the script's own check)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
PY=${PYTHON:-python}
mkdir -p "$OUT"
if [ "${SMOKE:-0}" = 1 ]; then DEV=cpu; BIG=tiny; SMALL=tiny; SCALE=""; NEW=16; COMPILE=""
else DEV=cuda; BIG=8b; SMALL=1b; SCALE=--gpu-scale; NEW=256; COMPILE=--compile; fi
source bench/steps.sh
{
  $PY -c "import torch, sys; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
  step tests 120 env TEST_DEVICE=$DEV $PY -m pytest -q tests/test_device.py tests/test_placement.py
  step sample_$SMALL 150 $PY bench/bench_sample.py --shape $SMALL $SCALE $COMPILE --device $DEV --json "$OUT/sample_$SMALL.json"
  step sample_$BIG 150 $PY bench/bench_sample.py --shape $BIG $SCALE --workload actor --max-prompts 128 --device $DEV --json "$OUT/sample_${BIG}_actor.json"
  step decode_$SMALL 60 $PY bench/bench_decode.py --shape $SMALL --device $DEV --new-tokens $NEW --json "$OUT/decode_$SMALL.json"
  step decode_$BIG 120 $PY bench/bench_decode.py --shape $BIG --device $DEV --new-tokens $NEW --json "$OUT/decode_${BIG}_big.json"
} 2>&1 | tee "$OUT/gpu.log"
merge "$OUT" gpu sample_ decode_
