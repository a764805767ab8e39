#!/bin/bash
# One device-machine call for the offloader: its CUDA tests, then the offload benchmark one model per
# process (an OOM, crash or timeout loses that model only). Logs, JSON and the timeline PNG go to $OUT.
#
#   run (device tool), carry [".whl"]:  bash launch/benchmarks/run_offload_gpu.sh
#   knobs: MODELS="opt-1.3b opt-6.7b opt-13b"  BATCHES=1x2048,16x256  STEPS=4  WARMUP=2  SKIP_TESTS=1
#          NO_IN_GPU="opt-13b" (models benchmarked without the in-GPU baseline)
#          DEPTHS="1 0" (zo2.offload.prefetch_depth values; the ring holds depth + 2 blocks; a depth other
#          than 1 runs without the in-GPU baseline and writes offload_<model>_depth<d>.json)
#          WBI=2 (zo2.offload.write_back_interval; default: the config's)
#          DTYPE=fp32 (the model's dtype; default fp16)  XFER=auto,bf16 (zo2.offload.transfer_dtype per mode)
#          NO_HALF=1 (skip the half-resident mode)  TESTS="tests/test_offload.py ..." (the CUDA tests to run)
#          MEM_TRACE_MODEL=opt-13b (write offload_memtrace_<model>_depth<d>.txt: what is alive at the peak)
#          HOST_PROFILE_MODEL=opt-1.3b (write offload_hostprof_<model>.txt: cProfile of 10 steps, pass 0's thread)
#          PROFILE_MODEL=opt-1.3b (write offload_profile_<model>.json.gz: torch.profiler trace of 2 steps)
# On a CPU machine: the CPU tests of the offloader and a tiny-model run.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/zo2_offload_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

main() {
  date -u
  if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import deepspeed" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || echo "wheel install failed"
    export PYTHONPATH=/tmp/site:$PWD
  else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  fi
  local cuda
  cuda=$(python3 -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
  local models
  if [ "$cuda" = 1 ]; then
    export DS_ACCELERATOR=cuda
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    models=${MODELS:-opt-1.3b opt-6.7b opt-13b}
  else
    export DS_ACCELERATOR=cpu
    models=tiny
  fi
  if [ -z "${SKIP_TESTS:-}" ]; then
    echo "== offload tests (DS_ACCELERATOR=$DS_ACCELERATOR)"
    if [ "$cuda" = 1 ]; then sel=(-m cuda); else sel=(); fi
    # shellcheck disable=SC2086
    timeout 300 python3 -m pytest -q -rs -x "${sel[@]}" ${TESTS:-tests/test_offload.py} 2>&1 | tee "$OUT/offload_pytest.txt" | tail -30
  fi
  for model in $models; do
    for depth in ${DEPTHS:-1}; do
      echo "== bench $model prefetch_depth=$depth"
      local extra=() suffix=""
      if [ "$model" = tiny ]; then extra=(--tiny); fi
      case " ${NO_IN_GPU:-opt-13b} " in *" $model "*) extra+=(--no-in-gpu);; esac
      if [ "$depth" != 1 ]; then extra+=(--no-in-gpu); suffix="_depth$depth"; fi
      if [ -n "${NO_HALF:-}" ]; then extra+=(--no-half); fi
      if [ -n "${WBI:-}" ]; then extra+=(--write-back-interval "$WBI"); fi
      if [ -n "${DTYPE:-}" ]; then extra+=(--dtype "$DTYPE"); fi
      if [ -n "${XFER:-}" ]; then extra+=(--transfer-dtypes "$XFER"); fi
      if [ -n "${GC_FREEZE:-}" ]; then extra+=(--gc-freeze); fi
      if [ "$model" = "${MEM_TRACE_MODEL:-}" ]; then extra+=(--mem-trace "$OUT/offload_memtrace_$model$suffix.txt"); fi
      if [ "$model" = "${HOST_PROFILE_MODEL:-}" ]; then extra+=(--host-profile "$OUT/offload_hostprof_$model$suffix.txt"); fi
      if [ "$model" = "${PROFILE_MODEL:-}" ] && [ "$depth" = 1 ]; then
        extra+=(--profile "$OUT/offload_profile_$model.json.gz")
      fi
      local timeline=()
      if [ "$depth" = 1 ] && { [ "$model" = "${TIMELINE_MODEL:-opt-1.3b}" ] || [ "$model" = tiny ]; }; then
        timeline=(--timeline "$OUT/offload_timeline_$model.png")
      fi
      timeout "${PER_MODEL_S:-200}" python3 launch/bench_offload.py --models "$model" \
        --batches "${BATCHES:-1x2048,16x256}" --steps "${STEPS:-4}" --warmup "${WARMUP:-2}" --prefetch-depth "$depth" \
        "${extra[@]}" "${timeline[@]}" --out "$OUT/offload_$model$suffix.json" \
        2>"$OUT/offload_$model$suffix.err" | grep -v '^{"model"' || echo "bench $model exited with $?"
      grep -v WARNING "$OUT/offload_$model$suffix.err" | tail -4
    done
  done
  date -u
}

main 2>&1 | tee "$OUT/offload_log.txt"
