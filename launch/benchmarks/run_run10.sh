#!/bin/bash
# Run 10 (one device call, carry [".whl"]): write_back_interval 1 / 2 / 4 on OPT-1.3B (depth 1, 20 steps)
# and OPT-13B (depth 0), in one call so the ratios share a card.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=${OUT:-/tmp/zo2_run10}
export NO_HALF=1
for k in 1 2 4; do
  mkdir -p "$ROOT/wbi$k"
  OUT=$ROOT/wbi$k WBI=$k SKIP_TESTS=$([ $k = 1 ] && echo "" || echo 1) TESTS="tests/test_offload.py" \
    STEPS=20 WARMUP=3 MODELS=opt-1.3b NO_IN_GPU=$([ $k = 1 ] && echo none || echo opt-1.3b) \
    bash launch/benchmarks/run_offload_gpu.sh
  OUT=$ROOT/wbi$k WBI=$k SKIP_TESTS=1 STEPS=3 WARMUP=1 MODELS=opt-13b DEPTHS=0 BATCHES=1x2048 \
    bash launch/benchmarks/run_offload_gpu.sh
done
