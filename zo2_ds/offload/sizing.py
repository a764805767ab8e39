"""How much of the device the offloader takes: the slot ring's depth (``zo2.offload.prefetch_depth``, "auto"
by the size of what streams) and the check, before anything is allocated, that the device can hold the
ring, the perturbation scratch and the staging buffers (the error names the bytes needed, free, and the
least the model can run with)."""

from __future__ import annotations

import torch

from zo2_ds.offload.store import BlockStore
from zo2_ds.offload.units import split_block

__all__ = ["prefetch_depth", "device_free_bytes", "check_device_memory"]

# A sub-module this large takes long enough to upload (3.6 ms at 55 GB/s) to hide a slot's write-back and
# release behind it: the third slot is not needed (H200, 1x2048: OPT-13B's 200 MiB units with two slots 487.6
# ms against 469.8, 1.07x the floor, for 0.2 GiB less; OPT-6.7B's 128 MiB units 254.1 against 243.7).
_TWO_SLOTS_FROM_BYTES = 192 * 1024**2
# Sub-modules whose shards are smaller (partitioned masters) upload in a fraction of their compute: two units
# uploading ahead keep the link busy (two H200s, OPT-13B 1x2048, 100 MiB per rank and unit: 280.2 ms a step
# at depth 2 against 296.8 at depth 0, 274.8 at 4; perturbation-parallel 267.3 against 278.3; launch/results).
_PARTITIONED_LAYER_DEPTH = 2


def prefetch_depth(depth: int | str, store: BlockStore) -> int:
    """``zo2.offload.prefetch_depth``; "auto" by what each rank uploads of the largest unit (all of it, or its
    1/N shard with partitioned masters): sub-modules of at least 192 MiB 0 (two slots), smaller ones 2 when
    partitioned, else 1."""
    if depth != "auto":
        return depth
    streamed = [store.sizes[b] for b in store.streamed]
    if store.granularity != "layer" or not streamed:
        return 1
    ranks = store.partition.num_ranks if store.partition is not None else 1
    if max(streamed) / ranks >= _TWO_SLOTS_FROM_BYTES:
        return 0
    return _PARTITIONED_LAYER_DEPTH if ranks > 1 else 1


def device_free_bytes(device: torch.device) -> int | None:
    """Bytes the offloader can still allocate on ``device``: free in the driver plus what torch's allocator
    holds unused; None off CUDA (no check)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def check_device_memory(store: BlockStore, num_slots: int, scratch_bytes: int) -> None:
    """Refuse, before allocating, a device that cannot hold the offloader's own buffers (the slot ring, the
    perturbation scratch, the transfer_dtype staging), naming the bytes needed, free, and the least the
    model can run with (two slots, at the granularity that streams the smallest units)."""
    free = device_free_bytes(store.device)
    if free is None or not store.streamed:
        return
    slot = max(store.slot_nbytes(b) for b in store.streamed)
    stage = max(store.slot_nbytes(b, narrow=True) for b in store.streamed) if store.narrow is not None else 0
    needed = num_slots * slot + scratch_bytes + (num_slots + 1) * stage
    if needed <= free:
        return
    least = 2 * slot + scratch_bytes + 3 * stage
    hint = ""
    if store.granularity == "block" and all(split_block(b) is not None for b in store.blocks.blocks):
        hint = ' zo2.offload.granularity "layer" streams sub-modules instead of whole blocks, which needs less.'
    raise ValueError(
        f"zo2.offload: the offloader needs {needed} bytes ({needed / 2**30:.2f} GiB) on {store.device} for its "
        f"buffers: the slot ring ({num_slots} x {slot} bytes), the perturbation scratch ({scratch_bytes} bytes)"
        f"{f' and the transfer_dtype staging ({num_slots + 1} x {stage} bytes)' if stage else ''}, but only {free} "
        f"bytes ({free / 2**30:.2f} GiB) are free (the parts outside the blocks already took theirs). The least "
        f"this model can run with is {least} bytes ({least / 2**30:.2f} GiB; zo2.offload.prefetch_depth 0: two "
        f"slots), plus activations.{hint} Free GPU memory, or use a GPU with more."
    )
