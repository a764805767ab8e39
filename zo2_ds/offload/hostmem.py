"""Host memory for the blocks' masters: page-locked buffers of an exact size, how much is available, and the
check that a block store's masters fit it.

Kept apart from :mod:`~zo2_ds.offload.store` (which lays blocks out in these buffers) because
:mod:`~zo2_ds.offload.materialize` allocates the same buffers before any block store exists.
"""

from __future__ import annotations

import mmap
from typing import Any

import torch

_GIB = 1024**3
ADVISE_HUGE_PAGES = True  # see pinned_host_buffer; launch/bench_materialize.py --no-huge-pages turns it off

__all__ = ["available_host_bytes", "check_host_memory", "pinned_host_buffer"]


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

    The mapping is advised to use transparent huge pages (where the kernel offers them: "madvise" or
    "always" in /sys/kernel/mm/transparent_hugepage/enabled): page-locking then faults 2 MiB pages instead
    of 4 KiB ones, and materializing 12 of OPT-175B's blocks ran 1.64-1.87x faster on the H200 host
    (launch/results/README.md, "Huge pages for the pinned homes"; ``bench_materialize --no-huge-pages``).
    The upload bandwidth and the GPU memory the driver keeps per registered byte (8 bytes per 4 KiB
    either way) do not change.
    """
    pages = _LockedPages(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE)  # private, as malloc's: copied on fork
    _advise_huge_pages(pages)
    buf = torch.frombuffer(pages, dtype=torch.uint8)[:nbytes]  # holds the mapping until its last view dies
    if acc.register_host_memory(buf.data_ptr(), nbytes):
        pages.unlock = (acc, buf.data_ptr())
        return buf, True
    del buf, pages
    return acc.pin_empty(nbytes, dtype=torch.uint8), False


def _advise_huge_pages(pages: mmap.mmap) -> None:
    """MADV_HUGEPAGE on an untouched mapping; a no-op where the platform or the kernel has no such advice."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or not ADVISE_HUGE_PAGES:
        return
    try:
        pages.madvise(advice)
    except OSError:  # EINVAL: a kernel built without transparent huge pages
        pass


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


def check_host_memory(store: Any, adopted: set[int]) -> None:
    """Raise ValueError, with the numbers, when a :class:`~zo2_ds.offload.store.BlockStore`'s pinned masters
    (and narrow copies) cannot fit the host's MemAvailable; checked before anything is allocated. ``adopted``
    blocks keep the buffer they are in."""
    streamed = store.streamed
    copied = [b for b in streamed if b not in adopted]
    pinned_bytes = sum(store.home_nbytes(b) for b in copied)
    if store.narrow is not None:
        pinned_bytes += sum(store.home_nbytes(b, narrow=True) for b in streamed)
    # Host bytes freed as each block's original storage is replaced (only what is on the CPU now).
    freed = sum(e.nbytes for b in copied for e in store.entries[b] if e.param.device.type == "cpu")
    needed = pinned_bytes - freed + (max(store.home_nbytes(b) for b in copied) if copied else 0)
    available = available_host_bytes()
    if needed > available:
        raise ValueError(
            f"zo2.offload: the pinned host masters of {len(streamed)} streamed blocks "
            f"{'and their transfer_dtype copies ' if store.narrow is not None else ''}need "
            f"{pinned_bytes / _GIB:.2f} GiB "
            f"({needed / _GIB:.2f} GiB more than the model holds on the host now), but only {available / _GIB:.2f} GiB "
            "is available (MemAvailable). Free host memory, keep more blocks on the GPU "
            "(zo2.offload.max_gpu_memory / num_resident_blocks), or use more nodes."
        )
