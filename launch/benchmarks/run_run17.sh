#!/bin/bash
# Run 17 (2026-11-26), on a 2-GPU machine: every CUDA test of the offloader (the data-parallel one over
# NCCL included), then the fp16 step-time check of the default path (OPT-1.3B and 6.7B, 1x2048 and
# 16x256) after the slot-release change of run 16.
#   run (device tool), kind nvidia-h100-x2, carry [".whl"]:  bash launch/benchmarks/run_run17.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/zo2_run17}
mkdir -p "$OUT/run17"
OUT=$OUT/run17 MODELS="opt-1.3b opt-6.7b" NO_HALF=1 TIMELINE_MODEL=none PER_MODEL_S=170 \
  bash launch/benchmarks/run_offload_gpu.sh
tar czf "$OUT/run17.tgz" -C "$OUT" run17 && rm -rf "$OUT/run17"
