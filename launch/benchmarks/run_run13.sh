#!/bin/bash
# Run 13 (one device call, carry [".whl"]): OPT-1.3B after the host-side trims (dropout toggled by flag, the
# compute stream looked up once per run): in-GPU, offloaded at depth 1 and 3, 30 steps; CUDA tests first.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=${OUT:-/tmp/zo2_run13}
mkdir -p "$ROOT"
export NO_HALF=1 STEPS=30 WARMUP=3 MODELS=opt-1.3b
OUT=$ROOT TESTS="tests/test_offload.py tests/test_perturb.py tests/test_loss.py tests/test_engine.py" NO_IN_GPU=none \
  DEPTHS="1 3" HOST_PROFILE_MODEL=opt-1.3b bash launch/benchmarks/run_offload_gpu.sh
