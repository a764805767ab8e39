#!/bin/bash
# Run 8 (one device call, carry [".whl"]): CUDA tests; OPT-1.3B A/B (default; native allocator; without the
# next-step prefetch); OPT-13B at depth 0 and 1 and OPT-30B at depth 0 (memory); OPT-6.7B (step time).
#   run (device tool): bash launch/benchmarks/run_run8.sh       results under $OUT (default /tmp/zo2_run8)
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=${OUT:-/tmp/zo2_run8}
mkdir -p "$ROOT"
B=launch/benchmarks/run_offload_gpu.sh
export NO_HALF=1
OUT=$ROOT TESTS="tests/test_offload.py tests/test_perturb.py tests/test_loss.py tests/test_engine.py" \
  MODELS=opt-1.3b NO_IN_GPU=none PROFILE_MODEL=opt-1.3b bash $B
mkdir -p "$ROOT/native_alloc" "$ROOT/no_next_prefetch"
OUT=$ROOT/native_alloc PYTORCH_CUDA_ALLOC_CONF= SKIP_TESTS=1 MODELS=opt-1.3b NO_IN_GPU=none bash $B
OUT=$ROOT/no_next_prefetch ZO2_DS_PREFETCH_NEXT_STEP=0 SKIP_TESTS=1 MODELS=opt-1.3b NO_IN_GPU=opt-1.3b bash $B
mkdir -p "$ROOT/big"
OUT=$ROOT/big SKIP_TESTS=1 MODELS=opt-13b NO_IN_GPU=opt-13b DEPTHS="0 1" STEPS=3 WARMUP=1 MEM_TRACE_MODEL=opt-13b bash $B
mv "$ROOT/big/offload_log.txt" "$ROOT/big/log_13b.txt"
OUT=$ROOT/big SKIP_TESTS=1 MODELS=opt-30b NO_IN_GPU=opt-30b DEPTHS=0 BATCHES=1x2048 STEPS=3 WARMUP=1 PER_MODEL_S=200 \
  MEM_TRACE_MODEL=opt-30b bash $B
mv "$ROOT/big/offload_log.txt" "$ROOT/big/log_30b.txt"
OUT=$ROOT/big SKIP_TESTS=1 MODELS=opt-6.7b NO_IN_GPU=none bash $B
mv "$ROOT/big/offload_log.txt" "$ROOT/big/log_6.7b.txt"
