#!/bin/bash
# Run 12 (one device call, carry [".whl"]): OPT-1.3B in-GPU and offloaded, 30 timed steps, without and with
# gc.freeze() after the engine is built (the step-time spread of runs 9-11 looked like host pauses).
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=${OUT:-/tmp/zo2_run12}
mkdir -p "$ROOT/plain" "$ROOT/gc_freeze"
export NO_HALF=1 STEPS=30 WARMUP=3 MODELS=opt-1.3b NO_IN_GPU=none SKIP_TESTS=1
OUT=$ROOT/plain bash launch/benchmarks/run_offload_gpu.sh
OUT=$ROOT/gc_freeze GC_FREEZE=1 bash launch/benchmarks/run_offload_gpu.sh
OUT=$ROOT/gc_freeze_depth3 GC_FREEZE=1 DEPTHS=3 bash launch/benchmarks/run_offload_gpu.sh
