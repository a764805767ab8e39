#!/bin/bash
# Run 11: the final figures of the offloader (defaults: prefetch_depth 1, write_back_interval 4, lean loss),
# carry [".whl"]. Two device calls, each under the 10-minute limit:
#   STAGE=a bash launch/benchmarks/run_run11.sh   CUDA tests; OPT-1.3B (20 steps), 6.7B, 13B: in-GPU, offload, half
#   STAGE=b bash launch/benchmarks/run_run11.sh   OPT-13B at depth 0 (memory trace), OPT-30B at depth 0,
#                                                 OPT-1.3B offloaded again with a host profile
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=${OUT:-/tmp/zo2_run11}
mkdir -p "$ROOT"
B=launch/benchmarks/run_offload_gpu.sh
if [ "${STAGE:-a}" = a ]; then
  OUT=$ROOT TESTS="tests/test_offload.py tests/test_perturb.py tests/test_loss.py tests/test_engine.py" \
    MODELS=opt-1.3b NO_IN_GPU=none NO_HALF=1 STEPS=20 WARMUP=3 bash $B
  mv "$ROOT/offload_log.txt" "$ROOT/log_1.3b.txt"
  OUT=$ROOT SKIP_TESTS=1 MODELS="opt-6.7b opt-13b" NO_IN_GPU=none STEPS=4 WARMUP=1 PER_MODEL_S=240 bash $B
  mv "$ROOT/offload_log.txt" "$ROOT/log_6.7b_13b.txt"
else
  OUT=$ROOT SKIP_TESTS=1 MODELS=opt-13b NO_IN_GPU=opt-13b NO_HALF=1 DEPTHS=0 STEPS=3 WARMUP=1 \
    MEM_TRACE_MODEL=opt-13b bash $B
  mv "$ROOT/offload_log.txt" "$ROOT/log_13b_depth0.txt"
  OUT=$ROOT SKIP_TESTS=1 MODELS=opt-30b NO_IN_GPU=opt-30b NO_HALF=1 DEPTHS=0 BATCHES=1x2048 STEPS=3 WARMUP=1 \
    PER_MODEL_S=240 MEM_TRACE_MODEL=opt-30b bash $B
  mv "$ROOT/offload_log.txt" "$ROOT/log_30b.txt"
  OUT=$ROOT SKIP_TESTS=1 MODELS=opt-1.3b NO_IN_GPU=opt-1.3b NO_HALF=1 STEPS=20 WARMUP=3 HOST_PROFILE_MODEL=opt-1.3b \
    TIMELINE_MODEL=none bash $B
  mv "$ROOT/offload_log.txt" "$ROOT/log_1.3b_stage_b.txt"
fi
