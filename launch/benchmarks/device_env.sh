# Sourced by the run_run*.sh scripts on the device machine, from the repository root, with R set to the
# results folder: installs the carried wheels (.whl), sets the CUDA environment, records the card in R.
mkdir -p "$R"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$R/card.txt"
