#!/bin/bash
# Run 7 (one device call): CUDA tests, then the memory and step-time measurements of the offloader after
# the lean loss, the shared perturbation scratch and the next-step prefetch. Carry [".whl"].
#   run (device tool): bash launch/benchmarks/run_run7.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/zo2_run7}
export OUT
export TESTS="tests/test_offload.py tests/test_perturb.py tests/test_loss.py"
# The 13B memory target: depth 0 and 1, with what is alive at the peak.
MODELS=opt-13b NO_IN_GPU=opt-13b NO_HALF=1 DEPTHS="0 1" STEPS=3 WARMUP=1 MEM_TRACE_MODEL=opt-13b \
  bash launch/benchmarks/run_offload_gpu.sh
mv "$OUT/offload_log.txt" "$OUT/log_13b.txt"
# The 1.3B step: in-GPU baseline, depth 1 (profile + timeline) and depth 4.
SKIP_TESTS=1 MODELS=opt-1.3b NO_IN_GPU=none NO_HALF=1 DEPTHS="1 4" PROFILE_MODEL=opt-1.3b \
  bash launch/benchmarks/run_offload_gpu.sh
mv "$OUT/offload_log.txt" "$OUT/log_1.3b.txt"
# 30B at 1x2048, two slots.
SKIP_TESTS=1 MODELS=opt-30b NO_IN_GPU=opt-30b NO_HALF=1 DEPTHS=0 BATCHES=1x2048 STEPS=3 WARMUP=1 \
  PER_MODEL_S=260 MEM_TRACE_MODEL=opt-30b bash launch/benchmarks/run_offload_gpu.sh
mv "$OUT/offload_log.txt" "$OUT/log_30b.txt"
