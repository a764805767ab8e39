"""Host masters partitioned over a node's ranks (``zo2.offload.partition = "node"``).

Every rank trains the same weights (g is all-reduced), so a node needs one copy of the masters, not one per
rank. Each streamed unit's flat home (:mod:`~zo2_ds.offload.store`) is cut into ``num_ranks`` contiguous
shards of ``shard_nbytes`` (a multiple of ALIGN_BYTES; the last shard padded), and rank r pins only shard r:

    upload of unit b   : own pinned shard -> its place in the slot (host link, 1/N of the unit)
                         all-gather of the shards into the slot (the node's ranks; NVLink on a GPU node),
                         on the gather stream, after the copy: the slot then holds the whole unit, while
                         the upload stream copies the next unit's shard (zo2.offload.gather: NCCL's
                         all-gather, or on peer GPUs copies out of the peers' slots on the copy engines,
                         zo2_ds/offload/peer.py)
    write-back of b    : the slot's own shard -> own pinned shard (every rank holds the same updated unit)

Between uses a partitioned unit's parameters point at a zero-byte placeholder of their shape (a zero
broadcast to it, read-only: a write fails loudly), since no rank holds them whole. Whole tensors exist
only on demand: ``state_dict`` gathers each unit (a collective: every rank of the node calls it, as
DeepSpeed's ``save_checkpoint`` does), ``load_state_dict`` keeps each rank's shard of what it is given.
So a checkpoint holds whole tensors, the same as without partitioning.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from zo2_ds.offload.hostmem import pinned_host_buffer

__all__ = [
    "Partition",
    "record_materialized_shard",
    "take_materialized_shard",
    "is_placeholder",
    "ReplicatedHomes",
    "PartitionedHomes",
    "home_copies",
    "placeholder",
    "build_shard",
    "install_state_hooks",
    "kept_gathered",
]


@dataclass(frozen=True)
class Partition:
    """This rank's place among the ``num_ranks`` ranks of its node that share one copy of the masters."""

    rank: int  # index within the node
    num_ranks: int
    group: Any  # the node's process group (None where nothing is gathered: materialize)
    align_bytes: int  # the store's ALIGN_BYTES
    copy_engine: bool = False  # the ring's slots gather over copy engines (zo2_ds/offload/peer.py)

    def shard_nbytes(self, nbytes: int) -> int:
        """Bytes of each rank's shard of a ``nbytes`` flat home (a multiple of ``align_bytes``, so each shard
        starts where a normal allocation would)."""
        per_rank = -(-nbytes // self.num_ranks)
        return -(-per_rank // self.align_bytes) * self.align_bytes

    def padded_nbytes(self, nbytes: int) -> int:
        """The flat home with the last shard padded: what the all-gather fills."""
        return self.shard_nbytes(nbytes) * self.num_ranks

    def own(self, flat: torch.Tensor, nbytes: int) -> torch.Tensor:
        """This rank's shard of ``flat`` (a buffer of at least ``padded_nbytes(nbytes)`` bytes)."""
        shard = self.shard_nbytes(nbytes)
        return flat[self.rank * shard : (self.rank + 1) * shard]

    def gather(self, flat: torch.Tensor, nbytes: int) -> None:
        """Fill ``flat`` with every rank's shard, its own already in place (on the current stream)."""
        import torch.distributed as dist

        padded = flat[: self.padded_nbytes(nbytes)]
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        all_gather(padded, self.own(padded, nbytes), group=self.group)

    def gather_whole(self, home: torch.Tensor, nbytes: int, device: torch.device) -> torch.Tensor:
        """A new tensor on ``device`` holding the whole ``nbytes`` unit whose own shard is ``home`` (a
        collective: every rank of the node calls it)."""
        flat = torch.empty(self.padded_nbytes(nbytes), dtype=torch.uint8, device=device)
        self.own(flat, nbytes).copy_(home)
        self.gather(flat, nbytes)
        return flat[:nbytes]

    def gather_to_host(self, home: torch.Tensor, nbytes: int, device: torch.device) -> torch.Tensor:
        """:meth:`gather_whole` onto the host (gathered through ``device`` where the backend cannot send host
        tensors)."""
        return self.gather_whole(home, nbytes, device).cpu()

    def copy_own_part(self, dst: torch.Tensor, offset: int, src: torch.Tensor) -> None:
        """Copy the bytes of ``src`` (a tensor placed at byte ``offset`` of a flat home) that fall in this
        rank's shard into ``dst`` (the shard)."""
        raw = src.detach().contiguous().reshape(-1).view(torch.uint8)
        shard = dst.numel()
        start = max(offset, self.rank * shard)
        end = min(offset + raw.numel(), (self.rank + 1) * shard)
        if start < end:
            dst[start - self.rank * shard : end - self.rank * shard].copy_(raw[start - offset : end - offset])


def build_shard(partition: Partition, entries, nbytes: int, acc) -> tuple[torch.Tensor, bool, list[torch.Tensor]]:
    """This rank's pinned shard of a unit whose parameters (``entries``, :class:`~zo2_ds.offload.store.Entry`)
    hold the whole unit now: their bytes in the shard copied in, each parameter re-pointed at its
    :func:`placeholder` (its own storage is released here, unless someone else holds it). Returns the
    shard, whether it is page-locked, and the placeholders."""
    if any(is_placeholder(e.param.data) for e in entries):
        raise ValueError(
            "zo2.offload.partition: the model was materialized with a partition whose shards do not match this "
            "engine's units; materialize with the engine's zo2.offload granularity and cuda_graphs"
        )
    home, pinned = pinned_host_buffer(acc, partition.shard_nbytes(nbytes))
    views = []
    for e in entries:
        partition.copy_own_part(home, e.offset, e.param.data)
        e.param.data = view = placeholder(e.dtype, e.shape)
        views.append(view)
    return home, pinned, views


# Shards :func:`~zo2_ds.offload.materialize.materialize` built, per unit module, until build_store adopts them.
_MATERIALIZED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def record_materialized_shard(unit: torch.nn.Module, partition: Partition, shard: torch.Tensor) -> None:
    """``shard`` is this rank's part of ``unit``'s flat home, whose parameters point at their placeholders."""
    _MATERIALIZED[unit] = (partition.rank, partition.num_ranks, shard)


def take_materialized_shard(unit: torch.nn.Module, partition: Partition, entries, nbytes: int) -> torch.Tensor | None:
    """The shard :func:`record_materialized_shard` recorded for ``unit`` (given up: adopted once), or None.
    Raises ValueError when it was made for another partition, or a parameter no longer points at its
    placeholder (DeepSpeed cast it: materialize in the config's dtype)."""
    record = _MATERIALIZED.pop(unit, None)
    if record is None:
        return None
    rank, num_ranks, shard = record
    if not all(is_placeholder(e.param.data) for e in entries):
        raise ValueError(
            'zo2.offload.partition="node": parameters of a materialized shard were replaced (the DeepSpeed config '
            "casts them to another dtype?); materialize in the dtype of the DeepSpeed config"
        )
    if (rank, num_ranks) != (partition.rank, partition.num_ranks):
        raise ValueError(
            f'zo2.offload.partition="node": the model was materialized as rank {rank} of {num_ranks}, the engine '
            f"runs as rank {partition.rank} of {partition.num_ranks}; materialize with the engine's partition"
        )
    assert shard.numel() == partition.shard_nbytes(nbytes), "materialize and the store lay a unit out alike"
    return shard


_PLACEHOLDER_BASES: dict[torch.dtype, torch.Tensor] = {}


def placeholder(dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    """A read-only tensor of ``shape`` with no storage of its own (one zero of ``dtype``, broadcast): what a
    partitioned unit's parameters point at between uses."""
    base = _PLACEHOLDER_BASES.setdefault(dtype, torch.zeros((), dtype=dtype))
    return base.expand(shape)


def is_placeholder(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a :func:`placeholder` (one element broadcast to its shape)."""
    base = _PLACEHOLDER_BASES.get(tensor.dtype)
    return base is not None and tensor.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


class ReplicatedHomes:
    """A unit's copies between its whole pinned home and its slot (``partition = "none"``)."""

    def __init__(self, streams: Any):
        self.streams = streams

    def empty(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """A slot of ``nbytes`` on ``device``."""
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def upload(self, home: torch.Tensor, slot: torch.Tensor, nbytes: int) -> None:
        slot[:nbytes].copy_(home, non_blocking=True)

    def complete(self, slot: torch.Tensor, nbytes: int, b: int, tracer: Any) -> Any:
        """After :meth:`upload`: the stream on which the slot holds the whole unit (the upload stream)."""
        return self.streams.upload

    def write_back(self, home: torch.Tensor, slot: torch.Tensor, nbytes: int) -> None:
        home.copy_(slot[:nbytes], non_blocking=True)


class PartitionedHomes(ReplicatedHomes):
    """A unit's copies between this rank's pinned shard and the slot: the shard up, then the node's
    all-gather on the gather stream (over copy engines into the slots :meth:`empty` made, where the partition
    says so: zo2_ds/offload/peer.py); only the shard back (see the module docstring)."""

    def __init__(self, partition: Partition, streams: Any, device: torch.device | None = None):
        super().__init__(streams)
        self.partition = partition
        self._copied = streams.marker()  # the last shard's host copy landed (waited for at once: one suffices)
        self.peers = None  # slots in symmetric memory: the ring's (given a device), not the narrow staging's
        if partition.copy_engine and streams.enabled and device is not None:
            from zo2_ds.offload.peer import PeerSlots

            self.peers = PeerSlots(partition, device)

    def empty(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """A slot of ``nbytes`` on ``device`` (in symmetric memory for copy-engine gathers: a collective)."""
        return super().empty(nbytes, device) if self.peers is None else self.peers.empty(nbytes)

    def upload(self, home: torch.Tensor, slot: torch.Tensor, nbytes: int) -> None:
        self.partition.own(slot, nbytes).copy_(home, non_blocking=True)

    def complete(self, slot: torch.Tensor, nbytes: int, b: int, tracer: Any) -> Any:
        """After :meth:`upload` (issued on the upload stream): the node's all-gather into the slot, on the
        gather stream behind the copy; returns the stream on which the slot then holds the whole unit. The
        upload stream goes on to the next shard meanwhile (the host link and NVLink work at once)."""
        streams = self.streams
        self._copied.record(streams.upload)
        with streams.on(streams.gather):
            self._copied.wait(streams.gather)
            tracer.emit("gather", b, "start", streams.gather)
            if self.peers is not None and self.peers.owns(slot):
                self.peers.gather(slot, nbytes)
            else:
                self.partition.gather(slot, nbytes)
            tracer.emit("gather", b, "end", streams.gather)
        return streams.gather

    def write_back(self, home: torch.Tensor, slot: torch.Tensor, nbytes: int) -> None:
        home.copy_(self.partition.own(slot, nbytes), non_blocking=True)


# False inside kept_gathered(False): a partitioned unit's state_dict takes part in the gather but keeps nothing.
_KEEP_GATHERED = contextvars.ContextVar("zo2_keep_gathered", default=True)


@contextlib.contextmanager
def kept_gathered(keep: bool) -> Iterator[None]:
    """Within: a ``state_dict`` still gathers each partitioned unit (a collective: every rank of the node takes
    part), but unless ``keep`` this rank drops the gathered unit (on the device where there is one) and
    leaves the parameters' placeholders in the state_dict. For a save that one rank writes: the node's host
    then holds one whole copy, the writer's, not one per rank."""
    token = _KEEP_GATHERED.set(keep)
    try:
        yield
    finally:
        _KEEP_GATHERED.reset(token)


def install_state_hooks(store: Any, is_home: Callable[[int], bool]) -> list[Any]:
    """The partitioned units' ``state_dict`` / ``load_state_dict`` hooks (see the module docstring); install
    them after the hooks that flush pending updates. A load also remakes this rank's shard of the unit's
    transfer_dtype copy, if any, from the whole unit it was given. ``is_home(b)``: unit b's parameters point
    at their placeholders (not at a device copy, as inside a forward). Returns the handles."""
    loading: dict[int, torch.Tensor] = {}  # unit -> the whole unit a load_state_dict is writing

    def gathered_state(b: int, module: Any, state_dict: dict, prefix: str, local_metadata: Any) -> None:
        if not is_home(b):
            return  # a state_dict inside a forward: the parameters are the unit's device copy already
        if not _KEEP_GATHERED.get():
            store.partition.gather_whole(store.homes[b], store.sizes[b], store.device)  # the others' part
            return
        full = store.partition.gather_to_host(store.homes[b], store.sizes[b], store.device)
        names = {id(p): name for name, p in module.named_parameters(remove_duplicate=False)}
        for e in store.entries[b]:
            key = prefix + names[id(e.param)]
            if key in state_dict:
                state_dict[key] = e.view(full)

    def open_for_load(b: int, *_: Any) -> None:
        # Parameters the state_dict lacks keep their bytes in this rank's shard; the rest of it is not kept.
        partition, size = store.partition, store.sizes[b]
        full = loading[b] = torch.empty(partition.padded_nbytes(size), dtype=torch.uint8)
        partition.own(full, size).copy_(store.homes[b])
        for e in store.entries[b]:
            e.param.data = e.view(full)

    def keep_loaded_shard(b: int, *_: Any) -> None:
        full = loading.pop(b)
        store.homes[b].copy_(store.partition.own(full, store.sizes[b]))
        if store.narrow is not None:  # from the whole unit loaded: no collective
            store.narrow_from_master(b, full)
        store.point_params_home(b)

    handles = []
    for b in store.streamed:
        unit = store.units[b]
        handles.append(unit.register_state_dict_post_hook(functools.partial(gathered_state, b)))
        handles.append(unit.register_load_state_dict_pre_hook(functools.partial(open_for_load, b)))
        handles.append(unit.register_load_state_dict_post_hook(functools.partial(keep_loaded_shard, b)))
    return handles


def home_copies(partition: Partition | None, streams: Any, device: torch.device | None = None,
                ) -> ReplicatedHomes | PartitionedHomes:  # fmt: skip
    return ReplicatedHomes(streams) if partition is None else PartitionedHomes(partition, streams, device)
