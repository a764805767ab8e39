#!/bin/bash
# Run 19 (2026-11-26): zo2.offload.cuda_graphs. Every CUDA test of the repository, then OPT-1.3B and
# OPT-6.7B (fp16, 1x2048 and 16x256) offloaded with eager blocks and with graphed blocks in the same
# process (--cuda-graphs), two processes for 1.3B (its step varies from process to process).
#   run (device tool), carry [".whl"]:  bash launch/benchmarks/run_run19.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/zo2_run19}
R=$OUT/run19
source launch/benchmarks/device_env.sh
if [ -z "${SKIP_TESTS:-}" ]; then
  # shellcheck disable=SC2086
  timeout "${TEST_TIMEOUT:-330}" python3 -m pytest -q -rs -m cuda ${TESTS:-tests/test_offload.py} >"$R/pytest_full.txt" 2>&1
  tail -15 "$R/pytest_full.txt" | tee "$R/pytest.txt"
fi
for run in ${RUNS:-opt-1.3b:1 opt-1.3b:2 opt-6.7b:1}; do
  model=${run%%:*}; n=${run##*:}
  timeout 120 python3 launch/bench_offload.py --models "$model" --batches 1x2048,16x256 --no-half --cuda-graphs \
    --steps 6 --warmup 3 ${IN_GPU:---no-in-gpu} --out "$R/${model}_$n.json" 2>"$R/${model}_$n.err" \
    | grep "^$model |" | sed "s/^/p$n: /" | tee -a "$R/summary.txt"
done
tar czf "$OUT/run19.tgz" -C "$OUT" run19 && rm -rf "$R"
