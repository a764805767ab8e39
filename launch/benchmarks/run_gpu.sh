#!/bin/bash
# One device-machine call: kernel tests, kernel microbenchmark, then the model benchmark one model per
# process (an OOM, crash or timeout loses that model only). Logs and JSON go to $OUT; a table prints last.
#
#   run (device tool), carry [".whl"]:  bash launch/benchmarks/run_gpu.sh
#   knobs: MODES_1B=forward,zo_engine  MODELS="opt-1.3b opt-6.7b opt-13b"  BATCHES=1x2048,16x256  STEPS=10  SKIP_TESTS=1  SKIP_KERNELS=1
# On a CPU machine it degrades to the CPU tests and a tiny-model run.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/zo2_bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# Keep NVLink multicast off (the device machines require it; harmless elsewhere).
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
  if [ "$cuda" = 1 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    models=${MODELS:-opt-1.3b opt-6.7b opt-13b}
  else
    echo "no CUDA: CPU tests and a tiny model only"
    models=tiny
  fi
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__)" 2>&1 | tail -1

  if [ -z "${SKIP_TESTS:-}" ]; then
    echo "== tests/test_kernels.py"
    # The Triton-interpreter test runs on CPU machines; here the same checks run compiled (cuda tests).
    timeout 300 python3 -m pytest -q -rs tests/test_kernels.py -k "not interpreter" 2>&1 | tee "$OUT/pytest.txt" | tail -25
  fi
  if [ "$cuda" = 1 ] && [ -z "${SKIP_KERNELS:-}" ]; then
    echo "== kernel microbenchmark"
    timeout 240 python3 launch/bench.py --kernels --models none --out "$OUT/kernels.json" | tail -40
  fi
  local reports=()
  for model in $models; do
    echo "== bench $model"
    local extra=()
    [ "$model" = tiny ] && extra=(--tiny)
    # On the smallest model also time the engine with one launch per tensor (the multi-tensor kernels off).
    [ "$model" = opt-1.3b ] && extra=(--modes "${MODES_1B:-forward,mezo_ref,zo_engine,zo_engine_per_tensor}")
    timeout "${PER_MODEL_S:-300}" python3 launch/bench.py --models "$model" --batches "${BATCHES:-1x2048,16x256}" \
      --steps "${STEPS:-10}" --warmup "${WARMUP:-3}" --profile "${extra[@]}" --out "$OUT/bench_$model.json" 2>&1 | grep -v -e "UserWarning" -e "_warn_once" \
      || echo "bench $model exited with an error"
    reports+=("$OUT/bench_$model.json")
  done
  echo "== summary"
  [ -f "$OUT/kernels.json" ] && python3 launch/bench.py --report "$OUT/kernels.json"
  python3 launch/bench.py --report "${reports[@]}"
  date -u
}

main 2>&1 | tee "$OUT/log"
