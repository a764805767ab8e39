"""Each training step's figures (its g_i, its loss, whether its update was skipped) on their way from the device
to the host.

A step ends with ``stats = [g_0 .. g_{q-1}, loss]`` on the device, averaged over micro-batches and ranks.
Without ``zo2.async_step`` :class:`FigureLog` reads them at once (the host has waited for the step already, as
DeepSpeed's overflow check needs). With it (CUDA's default) it copies them into pinned host memory behind the
step's work, records an event after the copy, and the engine reads the step at the next step's boundary, when
the copy has long landed: waiting on that event costs nothing, where a ``tolist()`` would wait for every kernel
issued since, the next step's forward included. Reading a step updates the last loss and g, counts a non-finite step
as skipped (with a warning), keeps the step's :class:`StepFigures` for the training loop, and reports it
(the monitor and the ``steps_per_print`` line, through the engine's callback).
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from deepspeed.accelerator import get_accelerator

from zo2_ds.config import ZO2Config

__all__ = ["StepFigures", "FigureLog", "resolve_async_step"]


class StepFigures(NamedTuple):
    """One step as the host read it: ``global_steps`` after it, its loss and g, the skipped steps up to it."""

    step: int
    loss: float
    g: list[float]
    skipped_steps: int


class _Unread(NamedTuple):
    stats: torch.Tensor  # in host memory once ``ready`` (an event after the copy; None: there already)
    ready: Any
    step: int
    samples: int
    lr: Any


def resolve_async_step(cfg: ZO2Config) -> bool:
    """``zo2.async_step``: "auto" is on for a device with streams (CUDA) without perturbation parallelism."""
    if cfg.async_step != "auto":
        return bool(cfg.async_step)
    return cfg.perturbation_parallel == 1 and not get_accelerator().is_synchronized_device()


class FigureLog:
    """The steps' figures as the host reads them. ``deferred`` (zo2.async_step): a recorded step is read at the
    next :meth:`read`, not at once. ``report(figures, samples, lr)`` is called once per step, when it is read."""

    def __init__(self, deferred: bool, report: Callable[[StepFigures, int, Any], None]):
        self.deferred = deferred
        self.skipped = 0
        self.last_g: list[float] = []
        self.last_loss = float("nan")
        self._report = report
        self._read: deque[StepFigures] = deque(maxlen=64)  # the last steps read, oldest first
        self._unread: _Unread | None = None

    @property
    def pending(self) -> bool:
        """Whether a recorded step has not been read yet."""
        return self._unread is not None

    def record(self, stats: torch.Tensor, step: int, samples: int, lr: Any) -> None:
        """A finished step's ``stats`` (on the device), with its ``global_steps``, ``global_samples`` and lr: read at
        once, or (``deferred``) copied to pinned memory behind the step's work, to be read later."""
        self.read()  # (already read at the step's boundary where deferred)
        acc = get_accelerator()
        ready = None
        if self.deferred and stats.device.type != "cpu" and not acc.is_synchronized_device():
            host = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
            host.copy_(stats, non_blocking=True)
            ready = acc.Event()
            ready.record()
            stats = host
        self._unread = _Unread(stats, ready, step, samples, lr)
        if not self.deferred:
            self.read()

    def read(self) -> None:
        """Read the recorded step, if any (waiting for its copy only)."""
        unread, self._unread = self._unread, None
        if unread is None:
            return
        if unread.ready is not None:
            unread.ready.synchronize()
        *g, loss = unread.stats.tolist()
        self.last_g, self.last_loss = g, loss
        if not all(math.isfinite(v) for v in g):
            self.skipped += 1
            warnings.warn(
                f"zo2: non-finite projected gradient {g} at step {unread.step - 1}; update skipped "
                f"(parameters unchanged; {self.skipped} skipped so far)",
                stacklevel=4,
            )
        figures = StepFigures(unread.step, loss, g, self.skipped)
        self._read.append(figures)
        self._report(figures, unread.samples, unread.lr)

    def since(self, step: int, wait: bool) -> list[StepFigures]:
        """The steps read after ``global_steps`` ``step``, oldest first (``wait``: read the recorded one first)."""
        if wait:
            self.read()
        return [f for f in self._read if f.step > step]
