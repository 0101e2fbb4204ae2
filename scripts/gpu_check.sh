#!/usr/bin/env bash
# The GPU check, ready for the day the device tool lends a GPU: one call of under 10 minutes.
#
#   device run, carry [".device"]:  source .device/setup.sh && bash scripts/gpu_check.sh
#
# Runs, each under its own time limit so that one slow part cannot eat the others:
#   1. the test suite's CUDA tests (pytest -m gpu);
#   2. bench_train at 64x: ours against the dense-matmul limit and the naive step;
#   3. bench_harvest: harvest against a bare forward of the model ($SAE_DEVICE_MODEL: blocks 0-9
#      of SmolLM2, which give the full model's activations at the hooked layer 6);
#   4. bench_peer against SAELens on the GPU, where sae_lens is importable there.
# Everything lands in $OUT (the device tool's folder; runs/gpu_check here), one log per part.
# Without CUDA it says so and exits 0, so the CPU test suite can run it.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device here; nothing to do"
  exit 0
fi
OUT=${OUT:-runs/gpu_check}
MODEL=${SAE_DEVICE_MODEL:-smollm2-135m}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c 'import torch; print(torch.cuda.get_device_name(), torch.__version__)' \
  | tee "$OUT/device.txt"

part() {  # part NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, say how it ended
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name: exit $rc"
}

part tests 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests
part bench_train 180 python3 scripts/bench_train.py --device cuda --d-in 576 --d-sae 36864 --batch 4096
part bench_harvest 90 python3 scripts/bench_harvest.py --device cuda --model "$MODEL" --tokens 65536 --batch-size 64
if python3 -c 'import sae_lens' 2>/dev/null; then
  part bench_peer 150 python3 scripts/bench_peer.py --device cuda --out "$OUT/bench_peer" --no-fp32 \
    --json "$OUT/bench_peer.json"
else
  echo "== bench_peer: skipped, sae_lens is not installed on this machine (add its wheels to .device)"
fi
