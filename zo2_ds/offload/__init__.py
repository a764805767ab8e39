"""ZO2 offloading: the transformer blocks live in pinned host memory and stream through a ring of GPU slots.

Which file owns what (see README.md in this folder):

- :mod:`~zo2_ds.offload.store`: where each block's parameters live (one flat buffer per block, pinned or
  resident), built inside ``ZOEngine._configure_distributed_model``; :mod:`~zo2_ds.offload.resident`: how many
  stay resident;
- :mod:`~zo2_ds.offload.partition`: the masters shared by a node's ranks, one shard each (``partition``);
- :mod:`~zo2_ds.offload.hostmem`: page-locked host buffers of an exact size, and the host memory available;
- :mod:`~zo2_ds.offload.materialize`: a model built block by block straight into its pinned homes (from a
  config or a safetensors checkpoint, read by :mod:`~zo2_ds.offload.checkpoint_reader`), which the store
  adopts (:mod:`~zo2_ds.offload.adopt`); with a partition each rank builds only its shards
  (:mod:`~zo2_ds.offload.materialize_shards`);
- :mod:`~zo2_ds.offload.streams`: the upload / write-back streams and events (no-op twin on CPU);
- :mod:`~zo2_ds.offload.ring`: the GPU slot ring, its uploads and write-backs, and the prefetch order;
- :mod:`~zo2_ds.offload.pending`: the pending-update log, the write-back and exact-copy rules (pure);
- :mod:`~zo2_ds.offload.narrow`: the narrow-copy path of ``transfer_dtype`` (and its no-op twin);
- :mod:`~zo2_ds.offload.perturber`: the blocks' update and perturbation kernels, the perturbation scratch;
- :mod:`~zo2_ds.offload.lockstep`: the 2q passes run block-major;
- :mod:`~zo2_ds.offload.head`: the untied head streamed in row chunks (``stream_head``);
- :mod:`~zo2_ds.offload.graphs`: CUDA graphs of the blocks' forwards;
- :mod:`~zo2_ds.offload.trace`: observers, the timeline and the device-byte accounting;
- :mod:`~zo2_ds.offload.hooks`: the units' forward hooks and the state_dict hooks;
- :mod:`~zo2_ds.offload.runner`: :class:`OffloadRunner`, the facade composing them.
"""

from __future__ import annotations

from typing import Any

import torch

from zo2_ds.offload.materialize import materialize
from zo2_ds.offload.runner import OffloadRunner
from zo2_ds.offload.store import BlockStore, build_store

__all__ = ["OffloadRunner", "BlockStore", "build_store", "broadcast_store", "broadcast_module", "materialize"]


def broadcast_store(module: torch.nn.Module, store: BlockStore, *, src: int, group: Any) -> None:
    """Every rank of ``group`` takes rank ``src``'s weights (DeepSpeed's ``_broadcast_model`` for an offloaded
    model; call it only with more than one rank).

    Parameters outside the blocks are on the device and broadcast as DeepSpeed does; a streamed block's
    pinned master goes through one device staging buffer when the backend cannot send host tensors (NCCL);
    with a narrower ``transfer_dtype`` each rank then remakes its narrow copies from the received masters.
    A partitioned store's shards are not broadcast (each rank holds its own part of the same weights: see
    :func:`broadcast_module`).
    """
    from deepspeed import comm as dist

    in_blocks = store.param_ids
    for p in module.parameters():
        if id(p) not in in_blocks:
            dist.broadcast(p.data.view(torch.uint8), src, group=group)
    staging: list[torch.Tensor] = []
    for b, home in enumerate(store.homes):
        if store.partition is None or not store.is_streamed(b):
            _broadcast_host(home, store.device, staging, src, group)
    if store.narrow is not None:  # the transfer_dtype copies were made from this rank's own init
        for b in store.streamed:
            store.narrow_from_master(b)


def broadcast_module(module: torch.nn.Module, device: torch.device, *, src: int, group: Any) -> None:
    """Every rank of ``group`` takes rank ``src``'s parameters, wherever they are (host ones through a device
    buffer when the backend cannot send host tensors): before a partitioned block store is built, since each
    rank then keeps only its shard of the weights it holds. Parameters at their placeholders (a partitioned
    ``materialize``: each rank built its shards of the same weights) are left as they are."""
    from zo2_ds.offload.partition import is_placeholder

    staging: list[torch.Tensor] = []
    for p in module.parameters():
        if not is_placeholder(p.data):
            _broadcast_host(p.data.view(-1).view(torch.uint8), device, staging, src, group)


def _broadcast_host(
    flat: torch.Tensor, device: torch.device, staging: list[torch.Tensor], src: int, group: Any
) -> None:
    """Broadcast the flat uint8 tensor ``flat`` in place; a host tensor goes through a device staging buffer
    (``staging``: [] or [the buffer], grown as needed) unless ``device`` is the CPU."""
    from deepspeed import comm as dist

    if flat.device == device or device.type == "cpu":
        dist.broadcast(flat, src, group=group)
        return
    if not staging or staging[0].numel() < flat.numel():
        staging[:] = [torch.empty(flat.numel(), dtype=torch.uint8, device=device)]
    buf = staging[0][: flat.numel()]
    buf.copy_(flat)
    dist.broadcast(buf, src, group=group)
    flat.copy_(buf)
