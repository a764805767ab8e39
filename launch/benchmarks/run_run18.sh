#!/bin/bash
# Run 18 (2026-11-26): A/B of the default (fp16, no transfer_dtype) offload step before and after this
# session's runner changes, ABAB in separate processes on one card. The old tree (commit 4e32a59) is
# carried as the git-ignored folder _ab_old (zo2_ds + launch copied from that commit).
# Make _ab_old first:  git worktree add /tmp/ab 4e32a59 && mkdir _ab_old && cp -r /tmp/ab/zo2_ds /tmp/ab/launch _ab_old/ \
#   && git worktree remove --force /tmp/ab && echo _ab_old/ >> .git/info/exclude
#   run (device tool), carry [".whl", "_ab_old"]:  bash launch/benchmarks/run_run18.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/zo2_run18}
mkdir -p "$OUT/run18"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name --format=csv,noheader
for round in 1 2; do
  for tree in old new; do
    root=.; [ "$tree" = old ] && root=_ab_old
    for model in opt-1.3b opt-6.7b; do
      timeout 150 python3 "$root/launch/bench_offload.py" --models "$model" --batches 1x2048,16x256 --no-in-gpu \
        --no-half --steps 5 --warmup 2 --out "$OUT/run18/${model}_${tree}_$round.json" 2>/dev/null | grep "^$model |" | sed "s/^/$tree r$round: /"
    done
  done
done | tee "$OUT/run18/summary.txt"
tar czf "$OUT/run18.tgz" -C "$OUT" run18 && rm -rf "$OUT/run18"
