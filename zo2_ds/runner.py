"""The contract between the engine and a runner: what :class:`zo2_ds.engine.ZOEngine` calls, and what comes back.

Two runners satisfy it: :class:`zo2_ds.perturb.ResidentRunner` (every parameter on the device) and
:class:`zo2_ds.offload.OffloadRunner` (the blocks streamed from pinned host memory). Both are built from
explicit arguments (the model, its trainable tensors, the ``zo2`` config, and for the offloader the block
store); the engine holds one as ``engine.zo_runner`` and calls nothing else on it.

How passes are scheduled (one after the other, or interleaved block by block on threads) is the runner's
business: the engine hands over one forward that takes the pass index, and gets each pass's output back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from zo2_ds.perturb import UpdateGroup

__all__ = ["ZORunner", "PassForward"]

PassForward = Callable[[int], Any]
"""``forward(j)`` runs pass j of the step's 2q passes (j = 2i: theta + eps z_i, j = 2i + 1: theta - eps z_i)
and returns what the engine wants back from it (a scalar loss, or the model output)."""


@runtime_checkable
class ZORunner(Protocol):
    """Runs the perturbed forwards of a step and applies its update."""

    def run(self, step: int, forward: PassForward, next_step: int | None = None) -> list[tuple[Any, Any]]:
        """Run the 2q passes of training step ``step`` (q = ``zo2.num_perturbations``, eps = ``zo2.eps``):
        returns ``[(forward(2i) at theta + eps z_i, forward(2i + 1) at theta - eps z_i) for i in range(q)]``.
        Each pass index is run exactly once; passes may interleave. ``next_step`` is the step of the next
        training run (``step`` again within a gradient accumulation; default step + 1): a hint for what to
        prefetch, never a change of the result."""
        ...

    def run_passes(
        self, step: int, forward: PassForward, passes: Sequence[int], next_step: int | None = None
    ) -> list[Any]:
        """Run only the passes ``passes`` of step ``step`` (pass j at theta + (-1)^j eps z_{j // 2}); returns
        ``[forward(j) for j in passes]``. With ``zo2.perturbation_parallel`` each rank runs its share."""
        ...

    def run_plain(self, forward: Callable[[], Any]) -> Any:
        """One unperturbed forward (eval); returns its output. Any deferred update is applied first."""
        ...

    def update(self, step: int, coefs: Sequence[float], groups: Sequence[UpdateGroup]) -> None:
        """theta <- theta - lr * (sum_i coefs[i] z_i(step) + wd * theta) for every tensor of ``groups`` (the
        lr and weight decay of each group; no weight decay on 1-D tensors). May be deferred until ``flush``."""
        ...

    def flush(self) -> None:
        """Apply every deferred update now; afterwards the parameters hold every update (before eval,
        checkpoints, state_dict reads and the end of training)."""
        ...

    def close(self) -> None:
        """Remove every hook and free what the runner allocated (after a flush)."""
        ...
