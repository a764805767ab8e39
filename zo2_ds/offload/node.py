"""Which ranks share one copy of the offloaded masters (``zo2.offload.partition``), their process group, and
whether they gather over copy engines (``zo2.offload.gather``): decided once, at engine init, the same on every
rank. What a :class:`~zo2_ds.offload.partition.Partition` then does with a unit's bytes is in
:mod:`zo2_ds.offload.partition`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from zo2_ds.offload.partition import Partition

__all__ = ["node_partition", "node_size", "materialize_partition", "cannot_partition"]

logger = logging.getLogger(__name__)


def node_partition(cfg, device: torch.device, world_group: Any = None) -> Partition | None:
    """The :class:`Partition` ``zo2.offload.partition`` asks for ("auto" resolved), or None (replicated masters,
    or a node of one rank). On CPU every rank of the world is one node; on an accelerator a node has
    ``device_count()`` ranks (consecutive global ranks, as the launchers number them). Every rank must call
    it (it may make groups).

    ``world_group``: a group over every rank whose communicator the job connects anyway (DeepSpeed's
    data-parallel group: the weights' broadcast, g's all-reduce), or None. The ranks agree over it, and where one
    node is the world a copy-engine gather takes it as the node's group: an NCCL communicator costs each GPU
    memory (2 x H200: 0.46 GiB more once connected), so none is made or connected that a step does not need.
    The collective gather gets a group of its own (its high-priority stream)."""
    place = _node_place(cfg, device)
    if place is None:
        return None
    import torch.distributed as dist

    from zo2_ds.offload.store import ALIGN_BYTES

    world, rank, per_node = dist.get_world_size(), dist.get_rank(), place[1]
    if world_group is not None and dist.get_world_size(world_group) != world:
        world_group = None
    if per_node == world and world_group is not None:  # one node: its group is the world's
        copy_engine = _copy_engine(cfg, device, world_group, world_group)
        group = world_group if copy_engine else dist.new_group(list(range(world)), pg_options=_group_options(dist))
        return Partition(rank, per_node, group, ALIGN_BYTES, copy_engine)
    options = _group_options(dist)
    groups = [
        dist.new_group(list(range(n * per_node, (n + 1) * per_node)), pg_options=options)
        for n in range(world // per_node)
    ]
    if per_node == 1:
        return None
    group = groups[rank // per_node]
    return Partition(rank % per_node, per_node, group, ALIGN_BYTES, _copy_engine(cfg, device, group, world_group))


def _copy_engine(cfg, device: torch.device, group: Any, agree_group: Any = None) -> bool:
    """Whether the node gathers over copy engines (``zo2.offload.gather``; all ranks agree over ``agree_group``,
    None: the default group; a collective). An explicit "copy_engine" that some rank cannot do is a ValueError
    naming the key on every rank."""
    if cfg.gather == "collective" or (cfg.gather == "auto" and device.type != "cuda"):
        return False
    import torch.distributed as dist

    from zo2_ds.offload.peer import copy_engine_unavailable, rendezvous_fails

    reason = copy_engine_unavailable(device, group)
    if device.type == "cuda" and dist.get_backend() == "nccl":
        # Every rank able locally, then every rank mapped: agreed over every rank, on a communicator the step
        # connects anyway (the g all-reduce's).
        reason = _agreed(reason, device, agree_group)
        if reason is None:
            reason = _agreed(rendezvous_fails(device, group), device, agree_group)
    if reason is None:
        return True
    if cfg.gather == "copy_engine":
        raise ValueError(f'zo2.offload.gather="copy_engine": {reason}; use "collective" or "auto"')
    if reason not in _WARNED and dist.get_rank() == 0:
        _WARNED.add(reason)
        logger.warning('zo2.offload.gather="auto": the collective all-gather, since %s', reason)
    return False


def _agreed(reason: str | None, device: torch.device, group: Any = None) -> str | None:
    """``reason`` (why this rank cannot), or one for every rank where another rank cannot (a collective over
    ``group``, every rank)."""
    import torch.distributed as dist

    able = torch.tensor([0 if reason else 1], dtype=torch.int32, device=device)
    dist.all_reduce(able, op=dist.ReduceOp.MIN, group=group)
    return reason or (None if able.item() else "another rank cannot (its own log or error says why)")


def _group_options(dist) -> Any:
    """NCCL: the node group's kernels on a high-priority stream. The gathers run beside the forward's GEMMs;
    at normal priority their kernels wait for free SMs behind them, and the next unit's compute waits for
    the gather (H200, OPT-6.7B on 2 GPUs: the gathers took 152 ms of a 184 ms step that way)."""
    if dist.get_backend() != "nccl":
        return None
    options = dist.ProcessGroupNCCL.Options()
    options.is_high_priority_stream = True
    return options


def materialize_partition(cfg, device: torch.device) -> Partition | None:
    """This rank's place among its node's ranks as :func:`node_partition` will give it to the engine, without a
    process group (no collective: :func:`~zo2_ds.offload.materialize.materialize` builds only this rank's
    shards), or None. Needs torch.distributed initialized for more than one rank."""
    from zo2_ds.offload.store import ALIGN_BYTES

    place = _node_place(cfg, device)
    if place is None or place[1] == 1:
        return None
    return Partition(place[0], place[1], None, ALIGN_BYTES)


def _node_place(cfg, device: torch.device) -> tuple[int, int] | None:
    """(this rank's index in its node, ranks per node), or None: see :func:`node_size`."""
    if cfg.partition == "none" or not cfg.enabled:
        return None
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    per_node = node_size(cfg, world, world if device.type == "cpu" else get_accelerator().device_count())
    return None if per_node is None else (rank % per_node, per_node)


def node_size(cfg, world_size: int, devices_per_node: int) -> int | None:
    """The ranks of a node that share one copy of the masters under ``cfg`` (the ``zo2.offload`` config) in a world
    of ``world_size`` ranks on nodes of ``devices_per_node`` devices (consecutive ranks per node), or None for
    replicated masters: ``partition`` "none", offload off, one rank, or "auto" where "node" would be refused (see
    :func:`cannot_partition`). 1 where a node has one rank. No collective: ``zo2_ds.estimate`` resolves with it."""
    if cfg.partition == "none" or not cfg.enabled or world_size == 1:
        return None
    per_node = min(world_size, devices_per_node)
    if world_size % per_node:
        cannot_partition(cfg, f"the world of {world_size} ranks is not whole nodes of {per_node} ranks")
        return None
    return per_node


_WARNED: set[str] = set()


def cannot_partition(cfg, reason: str) -> None:
    """The masters cannot be partitioned here, for ``reason``: a ValueError naming the key for an explicit
    ``partition`` "node"; for "auto" the masters are replicated, said once in the log (by global rank 0, or by
    this process where torch.distributed is not up: the estimator)."""
    import torch.distributed as dist

    if cfg.partition == "node":
        raise ValueError(f'zo2.offload.partition="node": {reason}; use "none" or "auto"')
    rank = dist.get_rank() if dist.is_initialized() else 0
    if reason not in _WARNED and rank == 0:
        _WARNED.add(reason)
        logger.warning('zo2.offload.partition="auto": replicated masters (one copy per rank), since %s', reason)
