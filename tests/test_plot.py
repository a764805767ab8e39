"""launch/plot.py: series read from log.jsonl and DeepSpeed csv monitor files, three panels, a PNG."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "plot.py"
_spec = importlib.util.spec_from_file_location("zo2_ds_launch_plot", SCRIPT)
plot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot)


def _write_run(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(0, 21):
        record = {"step": step, "train_loss": 1.0 / (step + 1), "lr": 1e-6}
        if step % 5 == 0:
            record["eval_accuracy"] = 0.5 + step / 100
        lines.append(json.dumps(record))
    (root / "log.jsonl").write_text("\n".join(lines) + "\n")
    monitor = root / "csv_monitor" / "job"  # DeepSpeed: <output_path>/<job_name>/<event>.csv
    monitor.mkdir(parents=True)
    (monitor / "Train_Samples_lr.csv").write_text("step,lr\n16,1e-6\n32,1e-6\n")
    (monitor / "Train_Samples_loss_scale.csv").write_text("step,loss_scale\n16,65536\n32,65536\n")
    (monitor / "Train_Samples_elapsed_time_ms_step.csv").write_text("step,elapsed_time_ms_step\n16,10\n32,11\n")
    return root


def test_series_come_from_jsonl_and_csv(tmp_path):
    series = plot.collect_series(_write_run(tmp_path), samples_per_step=16)
    assert series["eval_accuracy"] == [(0, 0.5), (5, 0.55), (10, 0.6), (15, 0.65), (20, 0.7)]
    assert len(series["train_loss"]) == 21 and series["train_loss"][3] == (3, 0.25)
    assert len(series["lr"]) == 21  # log.jsonl's lr wins over the csv one
    assert series["loss_scale"] == [(1.0, 65536.0), (2.0, 65536.0)]  # samples / 16 -> steps
    csv_only = plot.read_csv_monitor(tmp_path)
    assert csv_only["lr"] == [(16.0, 1e-6), (32.0, 1e-6)]


def test_figure_has_loss_eval_and_lr_panels(tmp_path):
    fig = plot.build_figure(plot.collect_series(_write_run(tmp_path)))
    loss_ax, eval_ax, lr_ax = fig.axes
    assert [line.get_label() for line in loss_ax.lines] == ["train_loss"]  # loss_scale and timings left out
    assert list(eval_ax.lines[0].get_xdata()) == [0, 5, 10, 15, 20]
    assert [line.get_label() for line in lr_ax.lines] == ["lr"]


def test_cli_writes_a_png(tmp_path):
    run = _write_run(tmp_path / "run")
    out = tmp_path / "curves.png"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(run), "--out", str(out)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_eval_events_and_generation_metrics_are_plotted(tmp_path):
    """train.py's Eval/<metric> csv events read as eval_<metric> (samples -> steps); any eval_* key of
    log.jsonl (eval_em, eval_f1 of a generation task) lands in the eval panel."""
    monitor = tmp_path / "monitor" / "zo2"
    monitor.mkdir(parents=True)
    (monitor / "Eval_f1.csv").write_text("step,f1\n32,0.25\n64,0.5\n")
    (monitor / "Train_Samples_train_loss.csv").write_text("step,train_loss\n16,2.0\n32,1.5\n")
    series = plot.collect_series(tmp_path, samples_per_step=16)
    assert series["eval_f1"] == [(2.0, 0.25), (4.0, 0.5)] and series["train_loss"] == [(1.0, 2.0), (2.0, 1.5)]
    (tmp_path / "log.jsonl").write_text(
        "".join(
            json.dumps({"step": s, "train_loss": 1.0, "lr": 1e-3, "eval_em": 0.1, "eval_f1": 0.3}) + "\n"
            for s in (2, 4)
        )
    )
    series = plot.collect_series(tmp_path, samples_per_step=16)
    assert series["eval_f1"] == [(2, 0.3), (4, 0.3)]  # log.jsonl wins over the csv copy
    _, eval_ax, _ = plot.build_figure(series).axes
    assert sorted(line.get_label() for line in eval_ax.lines) == ["eval_em", "eval_f1"]
    assert plot.main([str(tmp_path)]) == 0 and (tmp_path / "curves.png").is_file()


def test_errors_are_clear(tmp_path):
    assert plot.main([str(tmp_path)]) == 1  # nothing to plot
    (tmp_path / "log.jsonl").write_text('{"step": 1, "train_loss": 0.5}\nnot json\n')
    with pytest.raises(ValueError, match=r"log.jsonl:2: not a JSON object"):
        plot.read_jsonl_log(tmp_path / "log.jsonl")
