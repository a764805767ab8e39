#!/usr/bin/env bash
# A/B of two source trees on one CUDA card (launch/bench_ab.py): tree A (default .ab_old) against this
# checkout, the in-GPU and offloaded steps of OPT-1.3B, 6.7B and 13B, ABAB: estimated at 6-8 minutes on
# one H200 (not yet timed there); --budget-s 560 stops starting processes in time.
#
# Make .ab_old (an exported tree of the old main, git-ignored so that it can be carried):
#   mkdir .ab_old && git archive OLD_COMMIT zo2_ds | tar -x -C .ab_old && echo /.ab_old/ >> .git/info/exclude
# Run it (device tool):  run(command="bash launch/gpu/ab.sh", carry=[".whl", ".ab_old"])
#   extra arguments go to bench_ab.py: bash launch/gpu/ab.sh --quick, ... --models opt-13b
set -uo pipefail
cd "$(dirname "$0")/../.."
source launch/gpu/env.sh
python3 launch/bench_ab.py --a "${A:-.ab_old}" --b "${B:-.}" --out "$OUT/ab" "$@"
