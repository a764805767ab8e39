"""Summarise a py-spy ``record --threads --idle -f raw`` file: per thread, where its samples sit.

    python launch/benchmarks/spy_summary.py spy_raw.txt [--top 25]

For each thread: the share of its samples by leaf function, and by the innermost frame of zo2_ds /
transformers / deepspeed / torch.nn code (what our code or the model was doing when the leaf ran).
"""

from __future__ import annotations

import argparse
import collections
import re


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    leaf: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    ours: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    for line in open(args.raw):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = next((f for f in frames if f.startswith("thread ")), "?")
        body = [f for f in frames if not f.startswith(("thread ", "process "))]
        if not body:
            continue
        totals[thread] += n
        leaf[thread][_short(body[-1])] += n
        inner = next(
            (f for f in reversed(body) if re.search(r"(zo2_ds|transformers|deepspeed|torch/nn)/", f)), body[-1]
        )
        ours[thread][_short(inner)] += n
    for thread, total in totals.most_common(6):
        print(f"== {thread}: {total} samples")
        print("  by leaf:")
        for name, n in leaf[thread].most_common(args.top):
            print(f"    {100 * n / total:5.1f}%  {name}")
        print("  by innermost zo2_ds / transformers / deepspeed / torch.nn frame:")
        for name, n in ours[thread].most_common(args.top):
            print(f"    {100 * n / total:5.1f}%  {name}")


def _short(frame: str) -> str:
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    return f"{name} {where.split('site-packages/')[-1].split('/main/')[-1]}"


if __name__ == "__main__":
    main()
