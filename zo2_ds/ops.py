"""Kernel dispatch: which implementation of the ZO maths runs, chosen once, with its fallback.

Three implementations compute the same formulas (:mod:`zo2_ds.zo`):

- ``torch``: :mod:`zo2_ds.zo`'s functions (z materialised by ``torch.randn``; the only one on the CPU);
- per-tensor Triton kernels (:func:`zo2_ds.kernels.perturbed_into` and friends): one launch per tensor,
  z drawn in registers;
- multi-tensor Triton kernels (:class:`zo2_ds.kernels.TensorTable`): one launch per list of tensors (a
  block, an update group), the same z and bits as the per-tensor kernels.

``zo2.kernels`` picks: ``"auto"`` (multi-tensor kernels for CUDA tensors when triton is available,
else torch), ``"multi_tensor"``, ``"per_tensor"``, ``"torch"``. A kernel mode on a machine without
triton or CUDA warns and runs torch. Under ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, for
debugging and tests) the explicit kernel modes also run the kernels on CPU tensors.

The fallback lives here and only here: if a multi-tensor launch fails (a triton that cannot compile the
kernel; nothing was launched), this dispatch warns once and uses the per-tensor path from then on;
callers see ``multi_tensor`` turn False and drop their tables.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch

from zo2_ds import kernels, zo

__all__ = ["KernelMode", "KERNEL_MODES", "Ops", "Update"]

KernelMode = Literal["auto", "multi_tensor", "per_tensor", "torch"]
KERNEL_MODES: tuple[str, ...] = ("auto", "multi_tensor", "per_tensor", "torch")

# An update as the kernels take it: (seeds or pass hashes, coefs, lr, weight decay).
Update = tuple[Sequence[int], Sequence[float], float, float]


class Ops:
    """The implementation chosen by ``zo2.kernels``, for every perturbation and update of one engine."""

    def __init__(self, mode: str = "auto"):
        if mode not in KERNEL_MODES:
            raise ValueError(f"zo2.kernels: expected one of {', '.join(KERNEL_MODES)}, got {mode!r}")
        self.mode = mode
        usable = kernels.available()
        if mode in ("multi_tensor", "per_tensor") and not usable:
            warnings.warn(
                f"zo2.kernels={mode!r}: triton or a CUDA device is missing; the torch path runs instead", stacklevel=2
            )
        self._fused = usable and mode != "torch"
        # Explicit kernel modes also take CPU tensors under Triton's interpreter; "auto" only CUDA tensors.
        self._any_device = kernels.INTERPRET and mode != "auto"
        self.multi_tensor = self._fused and mode in ("auto", "multi_tensor")

    def fused(self, t: torch.Tensor) -> bool:
        """Whether the Triton kernels run on ``t`` (else the torch path)."""
        return self._fused and (t.device.type == "cuda" or self._any_device) and t.dtype in kernels.SUPPORTED_DTYPES

    # -- per tensor --------------------------------------------------------------------------------
    def perturbed_into(self, out: torch.Tensor, theta: torch.Tensor, seed: int, scale: float) -> torch.Tensor:
        """``out = theta + scale * z(seed)`` (see :func:`zo2_ds.zo.perturbed_into`)."""
        if self.fused(theta):
            return kernels.perturbed_into(out, theta, seed, scale)
        return zo.perturbed_into(out, theta, seed, scale)

    def apply_update_(
        self, theta: torch.Tensor, seeds: Sequence[int], coefs: Sequence[float], lr: float, weight_decay: float
    ) -> torch.Tensor:
        """In place: ``theta -= lr * (sum_i coefs[i] z(seeds[i]) + weight_decay * theta)``."""
        if self.fused(theta):
            return kernels.apply_update_(theta, seeds, coefs, lr, weight_decay)
        return zo.apply_update_(theta, seeds, coefs, lr, weight_decay)

    def update_and_perturb_(
        self,
        theta: torch.Tensor,
        update: Update | None,
        seed: int,
        scales: Sequence[float],
        outs: Sequence[torch.Tensor],
    ) -> None:
        """Apply ``update`` to theta in place (if any), then ``outs[j] = theta + scales[j] z(seed)``; fused into
        one pass over theta on the kernels (bit-identical to the separate calls)."""
        if self.fused(theta):
            kernels.update_and_perturb_(theta, update, seed, scales, outs)
            return
        if update is not None:
            zo.apply_update_(theta, *update)
        for scale, out in zip(scales, outs):
            zo.perturbed_into(out, theta, seed, scale)

    def perturbed_rows_into(
        self, out: torch.Tensor, theta: torch.Tensor, start: int, seed: int, scale: float, z: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``out`` = rows ``[start, start + len(out))`` of ``theta + scale * z(seed)``, the other rows untouched
        (``z``: theta's whole z from :meth:`generate_z`, reused by the torch path; the kernels draw their own)."""
        if self.fused(theta):
            return kernels.perturbed_rows_into(out, theta, start, seed, scale)
        return zo.perturbed_rows_into(out, theta, start, seed, scale, z)

    def perturbed_part_into(
        self,
        out: torch.Tensor,
        part: torch.Tensor,
        start: int,
        shape: Sequence[int],
        seed: int,
        scale: float,
        z: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``out = part + scale * z`` where ``part`` holds rows ``[start, start + len(part))`` of a 2-D tensor of
        ``shape`` (a copy of them uploaded alone): those rows of :meth:`perturbed_into` on the whole tensor
        (``z``: the whole tensor's z from :meth:`generate_z`, reused by the torch path)."""
        if self.fused(part):
            return kernels.perturbed_part_into(out, part, start, seed, scale)
        return zo.perturbed_part_into(out, part, start, shape, seed, scale, z)

    def apply_update_part_(
        self,
        part: torch.Tensor,
        start: int,
        shape: Sequence[int],
        update: Update,
        zs: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """In place: :meth:`apply_update_` on the rows ``part`` holds (as :meth:`perturbed_part_into`); on the
        kernels they must start on a z group (:func:`zo2_ds.vocab.head_chunk_rows` aligns them)."""
        if self.fused(part):
            return kernels.apply_update_part_(part, start, *update)
        return zo.apply_update_part_(part, start, shape, *update, zs=zs)

    def perturbed_gather_(
        self, rows: torch.Tensor, theta: torch.Tensor, ids: torch.Tensor, seed: int, scale: float
    ) -> torch.Tensor:
        """In place: ``rows`` = ``theta[ids]`` becomes ``(theta + scale * z(seed))[ids]`` (an embedding lookup)."""
        if not self.fused(theta):
            return zo.perturbed_gather_(rows, theta, ids, seed, scale)
        if rows.is_contiguous():
            return kernels.perturbed_gather_(rows, theta, ids, seed, scale)
        return rows.copy_(kernels.perturbed_gather_(rows.contiguous(), theta, ids, seed, scale))

    def generate_z(self, seed: int, shape: Sequence[int] | torch.Size, device: torch.device | str) -> torch.Tensor:
        """z (fp32) as the chosen implementation draws it on ``device`` (for tests and references)."""
        if self.fused(torch.empty(0, device=device)):
            return kernels.generate_z(seed, shape, device)
        return zo.generate_z(seed, shape, device)

    # -- multi-tensor ------------------------------------------------------------------------------
    def table(self, tensors: Sequence[torch.Tensor], keys: Sequence[int], decays: Sequence[bool] | None = None) -> Any:
        """A :class:`~zo2_ds.kernels.TensorTable` for one launch over ``tensors``, or None where the per-tensor
        path applies (multi-tensor off or failed, mixed dtypes or devices, a non-contiguous tensor)."""
        if not tensors or not self.multi_tensor or not self.fused(tensors[0]):
            return None
        first = tensors[0]
        if any(t.dtype != first.dtype or t.device != first.device or not t.is_contiguous() for t in tensors):
            return None
        return kernels.TensorTable(tensors, keys, decays)

    def perturbed_into_multi(self, table: Any, flat: torch.Tensor, pass_hash: int, scale: float) -> bool:
        """Every tensor of ``table`` perturbed into its slot of ``flat``; False (nothing launched, per-tensor
        path from now on) if the launch failed."""
        return self._multi(kernels.perturbed_into_multi, table, flat, pass_hash, scale)

    def apply_update_multi_(
        self, table: Any, pass_hashes: Sequence[int], coefs: Sequence[float], lr: float, weight_decay: float
    ) -> bool:
        """Every tensor of ``table`` updated in place (weight decay where its flag is set); False as above."""
        return self._multi(kernels.apply_update_multi_, table, pass_hashes, coefs, lr, weight_decay)

    def update_and_perturb_multi_(
        self, table: Any, update: Update | None, pass_hash: int, scale: float, flat: torch.Tensor
    ) -> bool:
        """``update`` applied to every tensor of ``table``, then each perturbed into ``flat``; False as above."""
        return self._multi(kernels.update_and_perturb_multi_, table, update, pass_hash, (scale,), (flat,))

    def _multi(self, fn: Any, *args: Any) -> bool:
        if not self.multi_tensor:
            return False
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - triton compile failures surface as many types; nothing launched
            self.multi_tensor = False
            warnings.warn(
                f"zo2: the multi-tensor kernels failed ({exc!r}); perturbing and updating tensor by tensor from now on",
                stacklevel=3,
            )
            return False
        return True

    @staticmethod
    def flat_view(buffer: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A flat uint8 ``buffer`` as a flat tensor of ``dtype`` over as many whole elements as fit."""
        itemsize = torch.empty(0, dtype=dtype).element_size()
        return buffer[: buffer.numel() // itemsize * itemsize].view(dtype)
