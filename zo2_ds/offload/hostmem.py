"""Host memory for the blocks' masters: page-locked buffers of an exact size, and how much is available.

Kept apart from :mod:`~zo2_ds.offload.store` (which lays blocks out in these buffers) because
:mod:`~zo2_ds.offload.materialize` allocates the same buffers before any block store exists.
"""

from __future__ import annotations

import mmap

import torch

__all__ = ["available_host_bytes", "pinned_host_buffer"]


def available_host_bytes() -> int:
    """MemAvailable from /proc/meminfo (psutil where that is missing)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return psutil.virtual_memory().available


def pinned_host_buffer(acc, nbytes: int) -> tuple[torch.Tensor, bool]:
    """``nbytes`` of page-locked host memory, exactly, as a flat uint8 tensor, and whether it is page-locked.

    ``acc.pin_empty`` goes through torch's caching host allocator, which rounds every request up to a
    power of two (a 629 MB OPT-13B block takes 1 GiB: +60% host memory). Where the accelerator can
    register host memory (CUDA: cudaHostRegister), page-lock an anonymous mapping of the exact size
    instead; the lock belongs to the memory and is released when the memory is (when the last tensor
    viewing it is gone), so a buffer can change hands (a materialized model's blocks adopted by the block
    store) and is never freed while still registered. Elsewhere fall back to ``pin_empty`` (a plain
    tensor on CPU, reported as not page-locked).
    """
    pages = _LockedPages(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE)  # private, as malloc's: copied on fork
    buf = torch.frombuffer(pages, dtype=torch.uint8)[:nbytes]  # holds the mapping until its last view dies
    if acc.register_host_memory(buf.data_ptr(), nbytes):
        pages.unlock = (acc, buf.data_ptr())
        return buf, True
    del buf, pages
    return acc.pin_empty(nbytes, dtype=torch.uint8), False


class _LockedPages(mmap.mmap):
    """An anonymous, page-aligned mapping that unregisters itself from the accelerator when it is freed
    (``__del__`` runs when the last tensor viewing it is gone: torch.frombuffer keeps the mapping alive)."""

    unlock: tuple | None = None  # (accelerator, address) once registered

    def __del__(self) -> None:
        if self.unlock is not None:
            acc, address = self.unlock
            try:
                acc.unregister_host_memory(address)
            except Exception:  # interpreter shutdown: the driver may already be gone
                pass
