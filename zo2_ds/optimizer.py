"""ZOOptimizer: the optimizer a :class:`~zo2_ds.engine.ZOEngine` gives DeepSpeed in place of its own.

It holds param groups (lr, weight decay) for DeepSpeed's and torch's schedulers, and no state: no moments,
no gradients, no fp32 masters. Its ``step`` is driven by the engine's (see :mod:`zo2_ds.engine`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from zo2_ds import zo
from zo2_ds.perturb import UpdateGroup
from zo2_ds.runner import ZORunner

__all__ = ["ZOOptimizer"]


class ZOOptimizer(torch.optim.Optimizer):
    """Param groups (lr, weight_decay) that DeepSpeed's and torch's schedulers can drive; no state.

    ``step()`` applies the ZO-SGD update of the step the engine prepared (:meth:`prepare_step`: the step
    number and the coefficients g_i / q) through the runner it was bound to (:meth:`bind`), with each
    group's current lr and weight decay. ``overflow`` tells DeepSpeed's step to skip the scheduler and
    count a skipped step (set when g is not finite; the update is skipped too).
    """

    def __init__(self, params: Any, lr: float, weight_decay: float = 0.0):
        if lr is None or not isinstance(lr, (int, float)) or lr < 0:
            raise ValueError(f"optimizer.params.lr: expected a non-negative number, got {lr!r}")
        super().__init__(params, {"lr": float(lr), "weight_decay": float(weight_decay)})
        self.overflow = False
        self._runner: ZORunner | None = None
        self._trainable: frozenset[int] = frozenset()
        self._step: tuple[int, list[float]] | None = None

    def bind(self, runner: ZORunner, trainable: Sequence[torch.nn.Parameter]) -> None:
        """Apply updates through ``runner``, to the ``trainable`` parameters of the groups (others are skipped)."""
        self._runner, self._trainable = runner, frozenset(id(p) for p in trainable)

    def prepare_step(self, step: int, coefs: Sequence[float] | zo.DeviceCoefs, finite: bool) -> None:
        """The update the next ``step()`` applies: training step ``step``, ``coefs`` = g_i / q (skipped and
        counted as an overflow when g is not ``finite``; :class:`~zo2_ds.zo.DeviceCoefs` carry their own gate,
        decided on the device, and come with ``finite`` True)."""
        self._step = (step, zo.kept_coefs(coefs))
        self.overflow = not finite

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:  # noqa: D102
        if self._runner is None or self._step is None:
            raise RuntimeError("ZOOptimizer.step() is driven by ZOEngine.step(); call engine.step()")
        step, coefs = self._step
        self._step = None
        if self.overflow:
            return
        groups = []
        for group in self.param_groups:
            params = tuple(p for p in group["params"] if id(p) in self._trainable)
            if params:
                groups.append(UpdateGroup(params, float(group["lr"]), float(group.get("weight_decay", 0.0))))
        self._runner.update(step, coefs, groups)

    def load_state_dict(self, state_dict: dict, load_optimizer_states: bool = True) -> None:  # noqa: D102
        # DeepSpeed passes load_optimizer_states for fp16/bf16 runs; there is no state to skip.
        super().load_state_dict(state_dict)
