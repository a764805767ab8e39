#!/usr/bin/env bash
# Task runs at real size on one GPU: OPT-1.3B shape (random init), fp16, SST-2-layout data, 200 steps,
# full ZO and LoRA; steps/s and peak GPU memory to $OUT/tasks_gpu.json and a printed table.
#
#   OUT=results bash launch/benchmarks/run_tasks_gpu.sh                  # on the GPU machine
#   OUT=/tmp/o bash launch/benchmarks/run_tasks_gpu.sh --tiny --steps 3  # CPU smoke test
#
# One process per run (python3 launch/train.py): the deepspeed CLI is not needed.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 launch/benchmarks/tasks_gpu.py --out "${OUT:-runs/tasks_gpu}" "$@"
