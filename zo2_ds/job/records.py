"""Run records in ``output_dir``: ``log.jsonl`` (one object per logged step, read by launch/plot.py)
and ``metrics.json`` (the run's summary). Only the writing rank (rank 0) touches the files; other
ranks get a writer that does nothing, so the training loop never branches on the rank."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["RunRecorder"]


def _clean(value: Any) -> Any:
    """JSON-safe scalars: tensors to floats, non-finite floats to None (JSON has no NaN)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunRecorder:
    """Appends step records to ``log.jsonl`` and writes ``metrics.json`` atomically."""

    def __init__(self, output_dir: str | os.PathLike, *, enabled: bool = True, resume: bool = False) -> None:
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self.log_path = self.output_dir / "log.jsonl"
        self.metrics_path = self.output_dir / "metrics.json"
        if enabled:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if not resume:
                self.log_path.write_text("")  # a fresh run starts a fresh log; a resumed one appends

    def log(self, step: int, **values: Any) -> None:
        """One line of ``log.jsonl``: ``{"step": step, **values}``."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _clean(v) for k, v in values.items()}}
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        tmp = self.metrics_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({k: _clean(v) for k, v in metrics.items()}, indent=2) + "\n")
        tmp.replace(self.metrics_path)
