#!/bin/bash
# Run 16 (2026-11-26): zo2.offload.transfer_dtype "bf16" for fp32 masters. The offloader's CUDA tests
# (the new narrow-transfer test included), then fp32 OPT shapes offloaded with fp32 and with bf16
# transfers, one process per model, write_back_interval 4 ("auto") and 8.
#   run (device tool), carry [".whl"]:  STAGE=a bash launch/benchmarks/run_run16.sh   (tests + OPT-1.3B)
#                                       STAGE=b bash launch/benchmarks/run_run16.sh   (OPT-6.7B)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/zo2_run16}
export DTYPE=fp32 XFER=auto,bf16 NO_HALF=1 BATCHES=${BATCHES:-1x256} STEPS=${STEPS:-5} WARMUP=${WARMUP:-2}
export TIMELINE_MODEL=${TIMELINE_MODEL:-opt-1.3b}
case "${STAGE:-a}" in
  a)
    OUT=$OUT/wbi4 MODELS=opt-1.3b PER_MODEL_S=150 bash launch/benchmarks/run_offload_gpu.sh
    OUT=$OUT/wbi8 MODELS=opt-1.3b WBI=8 NO_IN_GPU=opt-1.3b SKIP_TESTS=1 PER_MODEL_S=120 \
      bash launch/benchmarks/run_offload_gpu.sh
    ;;
  b)
    OUT=$OUT/wbi4 MODELS=opt-6.7b SKIP_TESTS=1 PER_MODEL_S=300 bash launch/benchmarks/run_offload_gpu.sh
    OUT=$OUT/wbi8 MODELS=opt-6.7b WBI=8 XFER=bf16 NO_IN_GPU=opt-6.7b SKIP_TESTS=1 PER_MODEL_S=200 \
      bash launch/benchmarks/run_offload_gpu.sh
    ;;
esac
# The device tool brings back at most 8 files: one archive per stage.
tar czf "$OUT/run16_${STAGE:-a}.tgz" -C "$OUT" wbi4 wbi8 && rm -rf "$OUT/wbi4" "$OUT/wbi8"
