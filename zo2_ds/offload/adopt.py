"""The homes :func:`~zo2_ds.offload.store.build_store` takes over as they are, instead of copying the blocks'
parameters into new ones: what :func:`~zo2_ds.offload.materialize.materialize` builds (a streamed unit's whole
page-locked home, or with a partition this rank's shard of it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from zo2_ds.offload.partition import is_placeholder, take_materialized_shard

if TYPE_CHECKING:
    from zo2_ds.offload.store import BlockStore

__all__ = ["adopted_home"]


def adopted_home(store: BlockStore, index: int, layout, size: int) -> torch.Tensor | None:
    """Unit ``index``'s home as materialize left it, or None: for a streamed unit its whole pinned home, or
    this rank's shard with a partition; for a resident unit materialized as shards, its whole device home
    gathered from the node's shards (a collective: every rank builds the same store). Raises ValueError for
    a unit materialized as shards that the store would copy."""
    if store.partition is None and any(is_placeholder(e.param.data) for e in store.entries[index]):
        raise ValueError(
            'zo2.offload.partition="none": the model was materialized with a partition (each rank holds only its '
            'shards); set partition "node" or materialize without a partition'
        )
    if store.partition is None:
        return _adoptable_home(layout, size, store.device) if store.is_streamed(index) else None
    shard = take_materialized_shard(store.units[index], store.partition, store.entries[index], size)
    if shard is None or store.is_streamed(index):
        return shard
    return store.partition.gather_whole(shard, size, store.device)


def _adoptable_home(
    layout: list[tuple[nn.Parameter, int, int]], size: int, device: torch.device
) -> torch.Tensor | None:
    """The flat ``size``-byte host buffer a block's parameters already live in, at exactly the offsets of
    ``layout`` (as :mod:`zo2_ds.offload.materialize` leaves them), or None. On an accelerator the buffer must
    also be page-locked (a pageable one is copied into a pinned home as usual).

    Such a model reaches this point untouched by DeepSpeed 0.19's ``_configure_distributed_model``: its
    fp16 / bf16 cast sets ``p.data`` only for a parameter whose dtype differs from the config's (none,
    when the model was materialized in that dtype; a mismatch casts into new pageable tensors, which are
    then copied as usual), it casts buffers only with ``buffer_dtype`` set, and with offload on it does not
    move the module (``dont_change_device``, :mod:`zo2_ds.ds_compat`). The fp32 path only checks dtypes."""
    first = layout[0][0].data
    if first.device.type != "cpu":
        return None
    storage = first.untyped_storage()
    for p, offset, _ in layout:
        data = p.data
        if data.device.type != "cpu" or not data.is_contiguous() or data.data_ptr() != first.data_ptr() + offset:
            return None
        if data.untyped_storage().data_ptr() != storage.data_ptr():
            return None
    start = first.data_ptr() - storage.data_ptr()
    if start + size > storage.nbytes():
        return None
    home = torch.empty(0, dtype=torch.uint8).set_(storage, start, (size,))
    if device.type != "cpu" and not home.is_pinned():
        return None
    return home
