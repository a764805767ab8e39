"""Evaluation inside a training run: the task's metrics on a split, the best-dev checkpoint, the summary.

The summary is one flat dict (written to metrics.json and carried in every checkpoint): ``eval_<m>_before``
/ ``_after`` / ``_best`` on the test split (never trained or tuned on), ``dev_<m>_after``,
``best_dev_<metric>`` and ``best_step``, the first and last logged train loss, and the run's figures.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from torch import nn

from zo2_ds.job.checkpoints import RunCheckpoints
from zo2_ds.tasks import TaskData

__all__ = ["Evaluator", "BestKeeper", "prefixed", "run_figures"]


def prefixed(prefix: str, values: dict[str, float], suffix: str = "") -> dict[str, float]:
    """``{"accuracy": 0.9}`` -> ``{"eval_accuracy_after": 0.9}`` for prefix "eval_", suffix "_after"."""
    return {f"{prefix}{k}{suffix}": v for k, v in values.items()}


class Evaluator:
    """All of the task's metrics (accuracy; or em and f1) of the engine's model on some examples, and
    the dev metrics to DeepSpeed's monitors (csv / tensorboard / wandb; x axis = samples, like theirs)."""

    def __init__(self, engine, model: nn.Module, task_data: TaskData, *, batch_size: int) -> None:
        self.engine, self.model, self.task_data, self.batch_size = engine, model, task_data, batch_size

    def __call__(self, examples: Sequence[dict]) -> dict[str, float]:
        self.engine.eval()  # applies any pending (offloaded) update before the parameters are read
        try:
            return self.task_data.evaluate(self.model, examples, batch_size=self.batch_size, device=self.engine.device)
        finally:
            self.engine.train()

    def report(self, dev: dict[str, float]) -> None:
        if self.engine.global_rank == 0 and self.engine.monitor.enabled:
            samples = self.engine.global_samples
            self.engine.monitor.write_events([(f"Eval/{k}", v, samples) for k, v in dev.items()])


class BestKeeper:
    """Tracks the best dev ``metric`` so far (in ``summary``: best_dev_<metric>, best_step; the launcher saves
    the checkpoint as ``best``), and at the end scores the best checkpoint on the test split, the number MeZO
    reports."""

    def __init__(self, summary: dict[str, Any], *, metric: str, enabled: bool) -> None:
        self.summary, self.metric, self.enabled = summary, metric, enabled

    def update(self, step: int, dev: dict[str, float]) -> bool:
        """Whether ``dev`` beats the best so far (then it is recorded as the best)."""
        if not self.enabled or dev[self.metric] <= self.summary.get(f"best_dev_{self.metric}", float("-inf")):
            return False
        self.summary.update({f"best_dev_{self.metric}": dev[self.metric], "best_step": step})
        return True

    def score_best(self, engine, evaluate: Evaluator, test: Sequence[dict], checkpoints: RunCheckpoints) -> None:
        """``eval_<m>_best``: the best checkpoint's test metrics (the final model's when it is the best).
        Call it after the last save: it loads the best checkpoint into the engine."""
        best_step = self.summary.get("best_step")
        if best_step is None:
            return
        if best_step == engine.global_steps:
            after = {k: v for k, v in self.summary.items() if k.startswith("eval_") and k.endswith("_after")}
            self.summary.update({f"{k.removesuffix('_after')}_best": v for k, v in after.items()})
        elif checkpoints.has_best():
            checkpoints.load_best()
            self.summary.update(prefixed("eval_", evaluate(test), "_best"))


def run_figures(
    engine,
    *,
    started: float,
    train_seconds: float,
    steps_this_run: int,
    model: nn.Module,
    peak_bytes: int | None,
) -> dict[str, Any]:
    """Steps, time, speed, device and memory (``peak_bytes``: of the training loop) of the run."""
    return {
        "steps": engine.global_steps,
        "steps_this_run": steps_this_run,
        "seconds": train_seconds,
        "steps_per_second": steps_this_run / train_seconds if train_seconds > 0 else None,
        "total_seconds": time.perf_counter() - started,
        "world_size": engine.world_size,
        "device": str(engine.device),
        "num_trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "peak_gpu_memory_allocated_bytes": peak_bytes,
    }
