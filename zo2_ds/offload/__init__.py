"""ZO2 offloading: the transformer blocks live in pinned host memory and stream through a ring of GPU slots.

Which file owns what (see README.md in this folder):

- :mod:`~zo2_ds.offload.store`: where each block's parameters live (one flat buffer per block, pinned or
  resident), built inside ``ZOEngine._configure_distributed_model``;
- :mod:`~zo2_ds.offload.hostmem`: page-locked host buffers of an exact size, and the host memory available;
- :mod:`~zo2_ds.offload.materialize`: a model built block by block straight into its pinned homes (from a
  config or a safetensors checkpoint, read by :mod:`~zo2_ds.offload.checkpoint_reader`), which the store
  adopts;
- :mod:`~zo2_ds.offload.streams`: the upload / write-back streams and events (no-op twin on CPU);
- :mod:`~zo2_ds.offload.ring`: the GPU slot ring, its uploads and write-backs, and the prefetch order;
- :mod:`~zo2_ds.offload.pending`: the pending-update log, the write-back and exact-copy rules (pure);
- :mod:`~zo2_ds.offload.narrow`: the narrow-copy path of ``transfer_dtype`` (and its no-op twin);
- :mod:`~zo2_ds.offload.perturber`: the blocks' update and perturbation kernels, the perturbation scratch;
- :mod:`~zo2_ds.offload.lockstep`: the 2q passes run block-major;
- :mod:`~zo2_ds.offload.graphs`: CUDA graphs of the blocks' forwards;
- :mod:`~zo2_ds.offload.trace`: observers, the timeline and the device-byte accounting;
- :mod:`~zo2_ds.offload.runner`: :class:`OffloadRunner`, the facade composing them, and its hooks.
"""

from __future__ import annotations

from typing import Any

import torch

from zo2_ds.offload.materialize import materialize
from zo2_ds.offload.runner import OffloadRunner
from zo2_ds.offload.store import BlockStore, build_store

__all__ = ["OffloadRunner", "BlockStore", "build_store", "broadcast_store", "materialize"]


def broadcast_store(module: torch.nn.Module, store: BlockStore, *, src: int, group: Any) -> None:
    """Every rank of ``group`` takes rank ``src``'s weights (DeepSpeed's ``_broadcast_model`` for an offloaded
    model; call it only with more than one rank).

    Parameters outside the blocks are on the device and broadcast as DeepSpeed does; a streamed block's
    pinned master goes through one device staging buffer when the backend cannot send host tensors (NCCL);
    with a narrower ``transfer_dtype`` each rank then remakes its narrow copies from the received masters.
    """
    from deepspeed import comm as dist

    in_blocks = store.param_ids
    for p in module.parameters():
        if id(p) not in in_blocks:
            dist.broadcast(p.data.view(torch.uint8), src, group=group)
    staging = None
    for b, home in enumerate(store.homes):
        if home.device == store.device or store.device.type == "cpu":
            dist.broadcast(home, src, group=group)
            continue
        if staging is None:
            staging = torch.empty(max(store.sizes), dtype=torch.uint8, device=store.device)
        buf = staging[: store.sizes[b]]
        buf.copy_(home)
        dist.broadcast(buf, src, group=group)
        home.copy_(buf)
    if store.narrow is not None:  # the transfer_dtype copies were made from this rank's own init
        for b in store.streamed:
            store.narrow_from_master(b)
