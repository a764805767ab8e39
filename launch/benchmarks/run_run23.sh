#!/bin/bash
# Run 23 (2026-11-26): every CUDA test of the repository on the final code of the session (one GPU: the
# 2-GPU data-parallel test skips; it passed in run 17).
#   run (device tool), carry [".whl"]:  bash launch/benchmarks/run_run23.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/zo2_run23}
R=$OUT
source launch/benchmarks/device_env.sh
timeout 500 python3 -m pytest -q -rs -m cuda tests/ >"$OUT/pytest_full.txt" 2>&1
tail -12 "$OUT/pytest_full.txt"
