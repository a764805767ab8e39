"""Plot a run's curves: train loss, eval metric(s) and learning rate against steps, into one PNG.

    python launch/plot.py runs/sst2                       # writes runs/sst2/curves.png
    python launch/plot.py runs/sst2 --out sst2.png --samples-per-step 16

Inputs, both optional (at least one must hold data):
- ``<output_dir>/log.jsonl`` written by launch/train.py: one JSON object per line with ``step``,
  ``train_loss``, ``lr`` and, on evaluation steps, ``eval_<metric>`` (eval_accuracy, eval_f1, ...).
- DeepSpeed csv monitor files anywhere under ``<output_dir>`` (``<output_path>/<job_name>/
  Train_Samples_train_loss.csv`` ...: a ``step,<name>`` header, then rows; train.py puts them in
  ``<output_dir>/monitor`` when the config enables ``csv_monitor`` without an output_path). Its
  ``Eval/<metric>`` events (``Eval_accuracy.csv``) become ``eval_<metric>``. DeepSpeed's
  ``Train/Samples/*`` and train.py's ``Eval/*`` events are keyed by samples, not steps:
  ``--samples-per-step`` (the global batch size) converts them. A series present in log.jsonl is not
  taken again from csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

Series = dict[str, list[tuple[float, float]]]


def _number(value) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def read_jsonl_log(path: Path) -> Series:
    """Every numeric key of the log (except step) as a series of (step, value) points."""
    series: Series = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not a JSON object: {err}") from None
            step = _number(record.get("step")) if isinstance(record, dict) else None
            if step is None:
                raise ValueError(f"{path}:{line_no}: each line needs a numeric 'step'")
            for key, value in record.items():
                if key != "step" and (y := _number(value)) is not None:
                    series.setdefault(key, []).append((step, y))
    return series


def read_csv_monitor(root: Path, samples_per_step: float | None = None) -> Series:
    """DeepSpeed csvMonitor files under ``root``, named by their value column."""
    series: Series = {}
    for path in sorted(root.rglob("*.csv")):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        if len(rows) < 2 or len(rows[0]) != 2 or rows[0][0] != "step":
            continue  # not a monitor file
        name = rows[0][1]
        if path.stem.startswith("Eval_"):  # train.py's Eval/<metric> events: the same name as in log.jsonl
            name = f"eval_{name}"
        points = [
            (x, y) for x, y in ((_number(r[0]), _number(r[1])) for r in rows[1:] if len(r) == 2) if None not in (x, y)
        ]
        if samples_per_step and path.stem.startswith(("Train_Samples_", "Eval_")):
            points = [(x / samples_per_step, y) for x, y in points]
        series.setdefault(name, []).extend(points)
    return series


def collect_series(output_dir: Path, samples_per_step: float | None = None) -> Series:
    series = read_csv_monitor(output_dir, samples_per_step)
    log = output_dir / "log.jsonl"
    if log.is_file():
        series.update(read_jsonl_log(log))  # log.jsonl wins over csv for the same name
    return {name: sorted(points) for name, points in series.items() if points}


def _panel(name: str) -> str | None:
    if name.startswith("eval_"):
        return "eval"
    if name == "lr" or name.endswith("_lr"):
        return "lr"
    if name.endswith("loss") and name != "loss_scale":
        return "loss"
    return None  # timings, loss scale, ...: not plotted


def build_figure(series: Series, title: str = ""):
    """A figure with three panels (train loss, eval metrics, lr) sharing the step axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    labels = {"loss": "train loss", "eval": "eval metric", "lr": "learning rate"}
    for ax, panel in zip(axes, ("loss", "eval", "lr")):
        names = [n for n in series if _panel(n) == panel]
        for name in names:
            xs, ys = zip(*series[name])
            ax.plot(xs, ys, marker="o" if panel == "eval" else None, markersize=3, label=name)
        if names:
            ax.legend(loc="best", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_ylabel(labels[panel])
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_run(output_dir: Path, out: Path | None = None, samples_per_step: float | None = None) -> Path:
    series = collect_series(output_dir, samples_per_step)
    if not any(_panel(n) for n in series):
        raise ValueError(f"no train loss, eval metric or lr found in {output_dir} (log.jsonl or DeepSpeed csv files)")
    out = out or output_dir / "curves.png"
    fig = build_figure(series, title=output_dir.name)
    fig.savefig(out, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="the run's output folder")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: <output_dir>/curves.png)")
    parser.add_argument("--samples-per-step", type=float, default=None, help="global batch size, for csv x axes")
    args = parser.parse_args(argv)
    if not args.output_dir.is_dir():
        parser.error(f"not a folder: {args.output_dir}")
    try:
        out = plot_run(args.output_dir, args.out, args.samples_per_step)
    except ValueError as err:
        print(f"plot.py: {err}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
