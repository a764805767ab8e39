#!/bin/bash
# Run 20 (2026-11-26): the final offload table with zo2.offload.cuda_graphs. Per model one process with
# the in-GPU baseline (two plain forwards: the floor) where it fits, then the offloaded step with eager
# blocks ("offload") and with graphed blocks ("offload_graphs"), fp16, 1x2048 and 16x256.
#   run (device tool), carry [".whl"]:  bash launch/benchmarks/run_run20.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/zo2_run20}
R=$OUT/run20
source launch/benchmarks/device_env.sh
for run in ${RUNS:-opt-1.3b:150 opt-6.7b:170 opt-13b:230}; do
  model=${run%%:*}; limit=${run##*:}
  extra=(); [ "$model" = opt-13b ] && extra=(--no-in-gpu)
  timeout "$limit" python3 launch/bench_offload.py --models "$model" --batches 1x2048,16x256 --no-half --cuda-graphs \
    --steps 6 --warmup 3 "${extra[@]}" --out "$R/$model.json" 2>"$R/$model.err" \
    | grep "^$model |" | tee -a "$R/summary.txt"
done
tar czf "$OUT/run20.tgz" -C "$OUT" run20 && rm -rf "$R"
