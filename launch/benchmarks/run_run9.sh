#!/bin/bash
# Run 9 (one device call, carry [".whl"]): OPT-1.3B offloaded step, 20 timed steps: prefetch depth 1, 3 and 6
# with the next-step prefetch, and depth 1 without it (ZO2_DS_PREFETCH_NEXT_STEP=0), plus the in-GPU baseline.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=${OUT:-/tmp/zo2_run9}
mkdir -p "$ROOT/no_next_prefetch"
export NO_HALF=1 STEPS=20 WARMUP=3 MODELS=opt-1.3b
OUT=$ROOT TESTS="tests/test_offload.py" NO_IN_GPU=none DEPTHS="1 3 6" bash launch/benchmarks/run_offload_gpu.sh
OUT=$ROOT/no_next_prefetch ZO2_DS_PREFETCH_NEXT_STEP=0 SKIP_TESTS=1 NO_IN_GPU=opt-1.3b bash launch/benchmarks/run_offload_gpu.sh
