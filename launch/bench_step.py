"""The in-GPU ZO step against two plain forwards and MeZO's own pattern, and the fused kernels.

    python launch/bench_step.py --models opt-1.3b,opt-6.7b,opt-13b --batches 1x2048,16x256 --out $OUT/step.json
    python launch/bench_step.py --models opt-1.3b --kernels torch --out $OUT/step_torch.json   # kernels off
    python launch/bench_step.py --models none --kernel-micro --out $OUT/kernels.json           # CUDA
    python launch/bench_step.py --tiny                                                         # CPU, seconds

Modes (``--modes``), on one random-init model per name (fp16 on CUDA, fp32 on CPU): ``forward`` (two
plain forwards under inference_mode: the floor), ``mezo_ref`` (MeZO's per-tensor torch.normal + add_),
``zo`` (engine(**batch), engine.backward, engine.step). Median step over ``--steps`` after ``--warmup``,
peak allocated / reserved and NVML memory; the JSON is rewritten after each model.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts


from zo2_ds.bench import driver, kernel_micro, report, step  # noqa: E402

COLUMNS = "model batch mode median_ms:.2f time_vs_forward:.2f peak_allocated_bytes:gib peak_vs_forward:.3f "
COLUMNS += "nvml_used_bytes:gib error"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_run_args(p, default_models="opt-1.3b", tiny_batches="2x32")
    p.add_argument("--modes", default="forward,mezo_ref,zo", help=f"comma list of {list(step.STEP_MODES)}")
    p.add_argument("--kernels", default="auto", choices=driver.KERNEL_CHOICES, help="zo2.kernels of the engine")
    p.add_argument("--kernel-micro", action="store_true", help="also time the fused kernels alone (CUDA)")
    args = report.run_args(p, p.parse_args(argv))
    try:
        args.modes = report.parse_names(args.modes, step.STEP_MODES, "--modes")
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    switches = driver.resolve_switches(kernels=args.kernels)
    run = driver.Settings(args.dtype, switches, warmup=args.warmup, steps=args.steps)
    result = {"env": report.environment(), "args": vars(args), "switches": switches, "records": [], "kernels": []}
    if args.kernel_micro:
        result["kernels"] = kernel_micro.kernel_records()
        report.write_json(args.out, result)
    for name in args.models:
        result["records"] += step.step_records(name, args.batches, args.modes, run, log=lambda r: print(r, flush=True))
        step.add_ratios(result["records"])
        report.write_json(args.out, result)
    print(f"\n{result['env']['card']}  {result['env']['date']}  kernels {args.kernels} ({switches['route']})")
    print(report.format_table(result["records"], COLUMNS))
    for rec in result["kernels"]:
        print(rec)
    return result


if __name__ == "__main__":
    main()
