"""ZO2 offloading: the transformer blocks live in pinned host memory and stream through a ring of GPU slots.

- :mod:`~zo2_ds.offload.store`: block homes (one aligned flat buffer per block, pinned or resident),
  built inside ``ZOEngine._configure_distributed_model``;
- :mod:`~zo2_ds.offload.streams`: upload / write-back streams and events (no-op twin on CPU);
- :mod:`~zo2_ds.offload.lockstep`: the 2q passes run block-major;
- :mod:`~zo2_ds.offload.runner`: :class:`OffloadRunner`, the per-step block schedule and the lazy update.
"""

from __future__ import annotations

from typing import Any

import torch

from zo2_ds.offload.runner import OffloadRunner
from zo2_ds.offload.store import BlockStore, build_store

__all__ = ["OffloadRunner", "BlockStore", "build_store", "broadcast_store"]


def broadcast_store(engine: Any, store: BlockStore) -> None:
    """DeepSpeed's ``_broadcast_model`` for an offloaded model: every rank starts from rank 0's weights.

    Parameters outside the blocks are on the device and broadcast as DeepSpeed does; a streamed block's
    pinned master goes through one device staging buffer when the backend cannot send host tensors (NCCL);
    with a narrower ``transfer_dtype`` each rank then remakes its narrow copies from the received masters.
    Does nothing with one rank.
    """
    from deepspeed import comm as dist
    from deepspeed.utils import groups

    if engine.dist_backend is None:
        return
    group = engine.seq_data_parallel_group
    if dist.get_world_size(group=group) == 1:
        return
    src = groups._get_broadcast_src_rank()
    in_blocks = store.param_ids
    for p in engine.module.parameters():
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
