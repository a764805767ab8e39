"""What a benchmark run records besides its timings: the environment, the JSON file, a printed table."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from zo2_ds.bench.models import DTYPES, SHAPES

__all__ = ["environment", "write_json", "parse_batches", "parse_names", "format_table", "add_run_args", "run_args"]


def environment() -> dict[str, Any]:
    """Card, date (UTC), versions, and which zo2_ds was imported (the A/B relies on that line)."""
    import zo2_ds

    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cuda": torch.version.cuda,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "zo2_ds_path": str(Path(zo2_ds.__file__).resolve().parent),
        "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    }
    for name in ("transformers", "deepspeed", "triton"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    return env


def write_json(path: str | Path | None, result: dict[str, Any]) -> None:
    """Write ``result`` to ``path`` (whole or not at all: a run cut short keeps its last complete file).
    Under a launcher only rank 0 writes."""
    if not path or os.environ.get("RANK", "0") != "0":
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(result, indent=1, default=str) + "\n")
    partial.replace(path)


def parse_batches(text: str) -> list[tuple[int, int]]:
    """Parse "1x2048,16x256" into [(1, 2048), (16, 256)]; ValueError naming the argument otherwise."""
    batches = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--batches: {item!r} is not BATCHxSEQ (e.g. 16x256)")
        batches.append((int(parts[0]), int(parts[1])))
    return batches


def register_truncated(name: str) -> None:
    """``"opt-175b@6"``: the shape of opt-175b with only its first 6 blocks, registered in ``SHAPES`` under
    that name (GPU memory does not depend on the number of streamed blocks; the step is per block)."""
    base, sep, count = name.partition("@")
    if not sep or base not in SHAPES or name in SHAPES:
        return
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"--models: {name!r}: the part after @ must be a number of blocks >= 1")
    SHAPES[name] = dataclasses.replace(SHAPES[base], name=name, num_layers=int(count))


def parse_names(text: str, allowed: Any, argument: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise ValueError(f"{argument}: {unknown or text!r} not in {sorted(allowed)}")
    return names


_GIB = 1 << 30


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "gib":
        return f"{value / _GIB:.2f}"
    return format(value, fmt) if fmt else str(value)[:60]


def format_table(records: list[dict[str, Any]], columns: str) -> str:
    """A markdown table, one row per record. ``columns``: record keys separated by spaces, each with an
    optional ``:format`` (a format spec, or ``gib`` for bytes shown in GiB), e.g. "model median_ms:.1f"."""
    specs = [(c.partition(":")[0], c.partition(":")[2]) for c in columns.split()]
    lines = [" | ".join(key for key, _ in specs), " | ".join("---" for _ in specs)]
    for rec in records:
        lines.append(" | ".join(_cell(rec.get(key), fmt) for key, fmt in specs))
    return "\n".join(lines)


def add_run_args(p: argparse.ArgumentParser, default_models: str, tiny_batches: str) -> None:
    """The arguments every model benchmark takes: models, batches, dtype, steps, warm-up, output, --tiny."""
    p.add_argument("--models", default=default_models, help=f"comma list of {sorted(SHAPES)}")
    p.add_argument("--batches", default="1x2048,16x256", help="comma list of BATCHxSEQ")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="fp16 on CUDA, fp32 on CPU")
    p.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--out", default=None, help="results JSON")
    p.add_argument(
        "--tiny", action="store_true", help=f"CPU smoke run: --models tiny --batches {tiny_batches} --steps 2"
    )
    p.set_defaults(tiny_batches=tiny_batches)


def run_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Apply --tiny, parse models and batches (``p.error`` naming the argument), pick the dtype."""
    if args.tiny:
        args.models, args.batches, args.steps, args.warmup = "tiny", args.tiny_batches, 2, 1
    try:
        if args.models != "none":
            for name in args.models.split(","):
                register_truncated(name)
        args.models = [] if args.models == "none" else parse_names(args.models, SHAPES, "--models")
        args.batches = parse_batches(args.batches)
    except ValueError as exc:
        p.error(str(exc))
    args.dtype = args.dtype or ("fp16" if torch.cuda.is_available() else "fp32")
    return args
