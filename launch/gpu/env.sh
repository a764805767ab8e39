# Sourced from the repository root on a CUDA machine by the scripts beside it. Installs the carried wheels
# (.whl/, made by /work/shared/gpu-wheels/make.sh where a package index is reachable) into /tmp/site, puts
# them and this checkout on PYTHONPATH, sets OUT (default runs/gpu) and records the card in $OUT/card.txt.
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
