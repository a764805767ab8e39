"""Run records in ``output_dir``: ``log.jsonl`` (one object per logged step, read by launch/plot.py)
and ``metrics.json`` (the run's summary). Only the writing rank (rank 0) touches the files; other
ranks get a writer that does nothing, so the training loop never branches on the rank."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from zo2_ds.checkpoint import write_json_atomic

__all__ = ["RunRecorder", "LossWindow"]


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
        write_json_atomic(self.metrics_path, {k: _clean(v) for k, v in metrics.items()})


class LossWindow:
    """The train loss summed since the last ``log.jsonl`` record, over all ranks' shards. It travels in every
    checkpoint, so a run resumed between two records logs what an uninterrupted one logs."""

    def __init__(self, *, world_size: int, saved: list[float] | None = None, rank: int = 0) -> None:
        self.world_size = world_size
        self.sums = torch.zeros(2, dtype=torch.float64)  # (sum of step losses, number of steps)
        if saved is not None and rank == 0:  # saved summed over the ranks: rank 0 carries it on
            self.sums += torch.tensor(saved, dtype=torch.float64)

    def add(self, step_loss: float) -> None:
        self.sums += torch.tensor([step_loss, 1.0], dtype=torch.float64)

    def _reduced(self) -> torch.Tensor:
        sums = self.sums.clone()
        if self.world_size > 1:
            from zo2_ds.checkpoint._dist import sum_over_ranks

            sum_over_ranks(sums)  # the loss over all ranks' shards
        return sums

    def take(self) -> float:
        """The mean loss of the window (every rank calls it), which then starts again."""
        sums = self._reduced()
        self.sums.zero_()
        return float(sums[0] / sums[1])

    def state(self) -> list[float]:
        """For a checkpoint (every rank calls it): the window summed over the ranks."""
        return self._reduced().tolist()
