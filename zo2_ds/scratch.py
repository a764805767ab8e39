"""Where the resident runner writes perturbed copies: a small pool of flat device buffers, and a buffer lent
by the offloader.

Pool. A unit's perturbed values are written into a flat buffer taken from the pool by its pre-hook and given
back by its post-hook. Units run one after another, so the pool holds one buffer (two when a unit's module
contains another unit). All use is on the current stream, so a buffer given back may be rewritten by the
next unit's kernel: the stream orders it after the forward that read it. Once every unit of a pass has run,
the buffers' storage is freed (resize_(0), as FSDP does with unsharded parameters) so that the loss,
computed after the last unit, has the memory it had without the pool; the tensors and the units' cached
views of them stay, and the next pass re-allocates the same bytes from the caching allocator.

Lent buffer. The offloader lends its block perturbation scratch (idle outside the blocks): units that hold
no block (embeddings, head, final norm) never run while a block does, and every use is on the compute
stream, in order, so the perturbed embedding / head costs no memory of its own.
"""

from __future__ import annotations

import torch

from zo2_ds.ops import Ops

__all__ = ["ScratchPool"]


class ScratchPool:
    """Flat perturbation buffers keyed by (device, dtype), plus an optional lent buffer."""

    def __init__(self) -> None:
        self._free: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        self._lent: torch.Tensor | None = None
        self._lent_typed: dict[torch.dtype, torch.Tensor] = {}
        self._lent_busy = False

    def lend(self, buffer: torch.Tensor | None) -> None:
        """Use ``buffer`` (flat uint8) for :meth:`take_lent` from now on (None: nothing lent)."""
        self._lent, self._lent_typed, self._lent_busy = buffer, {}, False

    def take_lent(self, device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor | None:
        """The lent buffer as ``numel``+ elements of ``dtype``, or None (none lent, in use, too small)."""
        lent = self._lent
        if lent is None or self._lent_busy or lent.device != device:
            return None
        typed = self._lent_typed.get(dtype)
        if typed is None:
            typed = self._lent_typed[dtype] = Ops.flat_view(lent, dtype)
        if typed.numel() < numel:
            return None
        self._lent_busy = True
        return typed

    def take(self, device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """A pooled flat buffer of at least ``numel`` elements (its storage re-allocated if it was freed)."""
        free = self._free.setdefault((device, dtype), [])
        for i, buf in enumerate(free):
            if buf.numel() >= numel:
                buf = free.pop(i)
                storage = buf.untyped_storage()
                if storage.nbytes() == 0:  # freed at the end of the last pass
                    storage.resize_(buf.numel() * buf.element_size())
                return buf
        if free:  # too small for this unit: replace it (the pool settles at the largest unit)
            free.pop()
        return torch.empty(numel, dtype=dtype, device=device)

    def give_back(self, buf: torch.Tensor) -> None:
        """Return a buffer from :meth:`take_lent` or :meth:`take`."""
        if self._lent_typed.get(buf.dtype) is buf:
            self._lent_busy = False
        else:
            self._free[(buf.device, buf.dtype)].append(buf)

    def release_memory(self) -> None:
        """Free the pooled buffers' storage (end of a pass); the tensors stay for the next pass."""
        for free in self._free.values():
            for buf in free:
                buf.untyped_storage().resize_(0)

    def storage_bytes(self) -> list[int]:
        """Storage bytes held by each pooled buffer (all 0 between passes)."""
        return [buf.untyped_storage().nbytes() for free in self._free.values() for buf in free]

    def clear(self) -> None:
        self._free.clear()
        self.lend(None)
