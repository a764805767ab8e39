"""Perturbation parallelism (``zo2.perturbation_parallel``): the 2q passes of one step spread over a group of
ranks that see the same micro-batch, so a step's latency falls instead of its batch growing.

With P = ``perturbation_parallel`` and W ranks, consecutive ranks form W / P groups of P ("perturbation
groups"); group k takes the k-th shard of the data, as rank k would with plain data parallelism over W / P
ranks. Within a group, rank p runs the passes j with j % P == p (2q must be a multiple of P). After its
passes, each rank puts its losses into their slots of a zero vector of 2q (+ one input checksum per rank),
and one all-reduce over the group fills every slot on every rank: a slot holds one rank's value plus
zeros, so every rank of the group has exactly the losses one rank running all 2q passes would have, and
computes the same g from them. g then goes through the usual data-parallel mean, over the W / P ranks
with the same position p in their groups (one per group, in group order), so a P x D run follows the
trajectory of data parallelism over D ranks bit for bit, and P x 1 the trajectory of one rank.

Checks: W and 2q must be multiples of P (ValueError naming the key at initialize), and the ranks of a group
must be fed the same micro-batch (a checksum of the forward's tensors rides along with the losses; a
mismatch is noted on the device and read at the step's one host sync, where every rank raises a ValueError
naming the sampler rank to use, ``engine.zo_data_rank``, before the update is applied).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["PerturbationGroups", "check_sizes", "input_checksum"]

_KEY = "zo2.perturbation_parallel"


def check_sizes(size: int, world_size: int, num_passes: int) -> None:
    """Raise ValueError, naming the key, unless ``size`` divides the world and the 2q passes."""
    if world_size % size:
        raise ValueError(f"{_KEY}={size} must divide the number of ranks ({world_size})")
    if num_passes % size:
        raise ValueError(
            f"{_KEY}={size} must divide the 2 x num_perturbations = {num_passes} passes of a step "
            f"(allowed here: {', '.join(str(p) for p in range(1, num_passes + 1) if num_passes % p == 0)})"
        )


class PerturbationGroups:
    """This rank's perturbation group and data group (process groups made once, by every rank)."""

    def __init__(self, size: int, rank: int, world_size: int, num_passes: int):
        from deepspeed import comm as dist

        check_sizes(size, world_size, num_passes)
        self.size, self.num_passes = size, num_passes
        self.index = rank % size  # position in the group: runs the passes j with j % size == index
        self.data_rank, self.data_world_size = rank // size, world_size // size
        # Every rank creates every group, in the same order (torch.distributed requires it).
        self.group = self.data_group = None
        for first in range(0, world_size, size):
            group = dist.new_group(list(range(first, first + size)))
            if first == rank - self.index:
                self.group = group
        for index in range(size):
            group = dist.new_group(list(range(index, world_size, size)))
            if index == self.index:
                self.data_group = group

    @property
    def passes(self) -> list[int]:
        """The indices of the passes this rank runs."""
        return list(range(self.index, self.num_passes, self.size))

    def loader_kwargs(self, dataset: Any, args: tuple, kwargs: dict) -> dict:
        """``DeepSpeedEngine.deepspeed_io``'s arguments as keywords, with a sampler that shards ``dataset`` by
        group (shuffled for training, as DeepSpeed's own), unless the caller gave one."""
        from deepspeed.runtime.engine import ROUTE_TRAIN, DeepSpeedEngine

        names = ("batch_size", "route", "pin_memory", "data_sampler", "collate_fn", "num_local_io_workers")
        kwargs = {**dict(zip(names, args)), **kwargs}
        if kwargs.get("data_sampler") is None:
            route = kwargs.get("route", ROUTE_TRAIN)
            kwargs["data_sampler"] = torch.utils.data.DistributedSampler(
                dataset, num_replicas=self.data_world_size, rank=self.data_rank, shuffle=route == ROUTE_TRAIN
            )
        assert DeepSpeedEngine.deepspeed_io.__code__.co_varnames[2:8] == names, "DeepSpeed's signature moved"
        return kwargs

    def gather_losses(self, local: Iterable[torch.Tensor], checksum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every pass's loss ([num_passes], in the losses' dtype) on every rank of the group, from this rank's
        ``local`` losses (of :attr:`passes`, in order), and whether the group's inputs differed (a 0-dim
        float tensor, 1.0 if so; read at the step's one host sync, see :meth:`check_inputs`)."""
        from deepspeed import comm as dist

        local = list(local)
        slots = torch.zeros(self.num_passes + self.size, dtype=torch.float64, device=local[0].device)
        slots[self.passes] = torch.stack([loss.detach().to(torch.float64) for loss in local])
        slots[self.num_passes + self.index] = checksum.to(slots.device)
        dist.all_reduce(slots, group=self.group)
        sums = slots[self.num_passes :]
        differed = (sums != sums[0]).any().float()
        return slots[: self.num_passes].to(local[0].dtype), differed  # each loss as computed, exactly

    def check_inputs(self, differed: float) -> None:
        """Raise ValueError when a group was fed different micro-batches this step (``differed`` > 0: summed
        over the groups by the step's all-reduce, so every rank raises together, before any update)."""
        if differed > 0:
            raise ValueError(
                f"{_KEY}={self.size}: the ranks of a perturbation group (P consecutive ranks; this rank's group "
                f"is {self.data_rank}) were fed different micro-batches; every rank of a group must get the same "
                f"one: shard the data by engine.zo_data_rank ({self.data_rank} here) over "
                f"engine.zo_data_world_size ({self.data_world_size}) instead of the global rank"
            )


def input_checksum(inputs: Iterable[Any]) -> torch.Tensor:
    """A float64 fingerprint of the tensors in a forward's arguments (sums of the values, plain and weighted
    by position), cheap on any device; equal inputs give equal checksums on every rank."""
    total = None
    for value in inputs:
        if isinstance(value, torch.Tensor) and value.numel():
            flat = value.detach().reshape(-1).to(torch.float64)
            weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64).remainder_(9973)
            part = flat.sum() + (flat * weights).sum()  # on the input's device: no host sync
            total = part if total is None else total + part.to(total.device)
    return torch.zeros((), dtype=torch.float64) if total is None else total
