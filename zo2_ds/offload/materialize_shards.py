"""A partitioned :func:`~zo2_ds.offload.materialize.materialize`: each rank builds only its shards.

With ``zo2.offload.partition = "node"`` each rank of a node pins its 1/N shard of every streamed unit
(:mod:`~zo2_ds.offload.partition`). Building the whole model on every rank first and then cutting it would
hold N copies on the node while loading; here each block passes through one transient of its own size at
most, and only the shards stay:

- from a config, every rank draws the same random numbers (seed every rank alike), so each rank initializes
  the whole block in one reused buffer (on the device, or on the host for a CPU build), copies its shard of
  each unit into the unit's pinned shard, and keeps nothing else of it;
- from safetensors, each rank reads only the bytes of its shards, row range by row range, straight into them.

The units are cut as the engine's block store will cut them (:func:`~zo2_ds.offload.units.stream_units`
with the engine's granularity): ``build_store`` then adopts each shard as the unit's home, without a copy
(:func:`~zo2_ds.offload.partition.take_materialized_shard`). A unit's parameters point at their
placeholders; the parameters of a block that no unit holds (granularity "layer": its small modules) are
built whole, as the parts outside the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zo2_ds.offload import hostmem
from zo2_ds.offload.partition import Partition, placeholder, record_materialized_shard
from zo2_ds.offload.store import flat_layout
from zo2_ds.offload.units import stream_units

__all__ = ["ShardedBlocks"]


@dataclass(frozen=True)
class _Unit:
    module: nn.Module
    start: int  # its first byte in its block's flat buffer
    layout: list[tuple[nn.Parameter, int, int]]  # its flat_layout: (meta parameter, byte offset, bytes)
    nbytes: int


class ShardedBlocks:
    """The streamed units of each block and this rank's shards of them, filled as the blocks are built.

    ``blocks``: the skeleton's blocks (meta parameters); ``layouts``: their ``block_layout``; ``granularity`` and
    ``cuda_graphs``: the engine's ``zo2.offload`` settings, which decide the units."""

    def __init__(self, partition: Partition, blocks, layouts, granularity: str, cuda_graphs: bool, acc: Any):
        self.partition, self.acc = partition, acc
        block_bytes = [size for _, size in layouts]
        _, units, block_of = stream_units(
            blocks, granularity, cuda_graphs=cuda_graphs, block_bytes=block_bytes, ranks_sharing=partition.num_ranks
        )
        self.units: list[list[_Unit]] = [[] for _ in blocks]
        offsets = [{id(p): offset for p, offset, _ in layout} for layout, _ in layouts]  # per block
        for unit, b in zip(units, block_of):
            layout, size = layouts[b] if unit is blocks[b] else flat_layout(unit.parameters())
            start = offsets[b][id(layout[0][0])]
            assert all(offsets[b][id(p)] == start + off for p, off, _ in layout), (
                "a unit is a contiguous part of its block"
            )
            self.units[b].append(_Unit(unit, start, layout, size))

    def shard_nbytes(self) -> int:
        """Host bytes of this rank's shards of every unit."""
        return sum(self.partition.shard_nbytes(u.nbytes) for units in self.units for u in units)

    def unit_params(self, index: int) -> list[tuple[nn.Parameter, int]]:
        """Block ``index``'s parameters that some unit holds, with their byte offsets in the block's flat buffer."""
        return [(p, u.start + off) for u in self.units[index] for p, off, _ in u.layout]

    def keep(self, index: int, flat: torch.Tensor, made: dict[int, nn.Parameter]) -> None:
        """Block ``index`` was built whole in ``flat`` (its flat layout): keep this rank's shard of each unit, and
        point the units' parameters (``made``: id of meta parameter -> its parameter) at their placeholders."""
        for u in self.units[index]:
            shard = self._new_shard(u)
            lo, hi = self._own_range(u)
            if lo < hi:
                shard[: hi - lo].copy_(flat[u.start + lo : u.start + hi])
            for p, _, _ in u.layout:
                made[id(p)].data = placeholder(p.dtype, p.shape)
            record_materialized_shard(u.module, self.partition, shard)

    def read(self, index: int, checkpoint: Any, names: dict[int, list[str]], made: dict[int, nn.Parameter]) -> None:
        """Read this rank's shard of each unit of block ``index`` from ``checkpoint`` (only the rows that hold its
        bytes); the units' parameters (``names``: id of meta parameter -> its names) get their placeholders."""
        for u in self.units[index]:
            shard = self._new_shard(u)
            lo, hi = self._own_range(u)
            for p, offset, nbytes in u.layout:
                start, end = max(offset, lo), min(offset + nbytes, hi)
                if start < end:
                    key = checkpoint.key_for(names[id(p)])
                    checkpoint.read_bytes_into(key, p, start - offset, shard[start - lo : end - lo])
                made[id(p)] = nn.Parameter(placeholder(p.dtype, p.shape), requires_grad=p.requires_grad)
            record_materialized_shard(u.module, self.partition, shard)

    def _new_shard(self, unit: _Unit) -> torch.Tensor:
        return hostmem.pinned_host_buffer(self.acc, self.partition.shard_nbytes(unit.nbytes))[0]

    def _own_range(self, unit: _Unit) -> tuple[int, int]:
        """The bytes of ``unit``'s flat buffer in this rank's shard (empty for a rank past its end)."""
        shard = self.partition.shard_nbytes(unit.nbytes)
        lo = self.partition.rank * shard
        return lo, max(lo, min(lo + shard, unit.nbytes))
