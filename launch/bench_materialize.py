"""Materializing a model straight into pinned memory against its floor, page-locking the same bytes alone.

    python launch/bench_materialize.py --model opt-30b --out $OUT/materialize_opt-30b.json   # H200: ~1-2 min
    python launch/bench_materialize.py --model opt-175b --layers 12 --out $OUT/materialize_opt-175b.json
    python launch/bench_materialize.py --model opt-175b --layers 12 --no-huge-pages   # 4 KiB pages, to compare
    python launch/bench_materialize.py --model tiny                                           # CPU, seconds

One process (why: :mod:`zo2_ds.bench.materialize`): the floor (one pinned buffer per block of the block
store's exact size, each page written once, then freed), then ``zo2_ds.offload.materialize`` of the
random-init ``zo2_ds.bench`` shape (cuda when available, else cpu), with host RSS sampled every 10 ms in
both. Reported: both times and their ratio (issue 11: <= 1.5), the peak RSS growth over the reading before
materializing and its ratio to the model's parameter bytes (<= 1.1); JSON with the card and software.
"""

from __future__ import annotations

import argparse
import json

from zo2_ds.bench import DTYPES, SHAPES, materialize, report
from zo2_ds.offload import hostmem

COLUMNS = "model num_layers dtype device model_bytes:gib floor_s:.2f materialize_s:.2f time_ratio:.2f "
COLUMNS += "peak_rss_growth_bytes:gib rss_ratio:.3f huge_pages meets_targets"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="opt-30b", choices=sorted(SHAPES), help="a zo2_ds.bench shape")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N blocks (CPU tests, 175B)")
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    p.add_argument("--device", default=None, choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--out", default=None, help="results JSON")
    p.add_argument("--no-huge-pages", action="store_true", help="page-lock 4 KiB pages (no MADV_HUGEPAGE), to compare")
    args = p.parse_args(argv)
    if args.layers is not None and args.layers < 1:
        p.error(f"--layers: {args.layers} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    env = report.environment()
    advise, hostmem.ADVISE_HUGE_PAGES = hostmem.ADVISE_HUGE_PAGES, not args.no_huge_pages
    try:
        record = materialize.materialize_record(args.model, args.dtype, args.device, args.layers)
    finally:
        hostmem.ADVISE_HUGE_PAGES = advise
    record["huge_pages"] = not args.no_huge_pages
    result = {"env": env, "args": vars(args), "records": [record]}
    report.write_json(args.out, result)
    print(json.dumps(record), flush=True)
    print(f"\n{env['card']}  {env['date']}  torch {env['torch']}  cuda {env['cuda']}")
    print(report.format_table([record], COLUMNS))
    return result


if __name__ == "__main__":
    main()
