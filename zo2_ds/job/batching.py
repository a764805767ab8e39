"""Data-parallel batching that is a pure function of (seed, micro-step, rank).

Each micro-step k has one global batch of ``micro_batch_size * world_size`` examples; rank r takes the
r-th contiguous slice of it. The global batches walk through a permutation of the training set that
is reshuffled every epoch from ``(seed, epoch)`` alone, so every rank sees the same order, the shards
are disjoint, and a run resumed at step t draws exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["ShardedBatches"]


@dataclass(frozen=True, kw_only=True)
class ShardedBatches:
    """Index batches for one rank. The last partial global batch of each epoch is dropped."""

    num_examples: int
    micro_batch_size: int
    world_size: int = 1
    rank: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1:
            raise ValueError(f"train_micro_batch_size_per_gpu must be >= 1, got {self.micro_batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        if self.num_examples < self.global_batch_size:
            raise ValueError(
                f"the training set has {self.num_examples} examples, fewer than one global batch "
                f"(train_micro_batch_size_per_gpu {self.micro_batch_size} x {self.world_size} ranks)"
            )

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.num_examples // self.global_batch_size

    def _permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_examples, generator=gen)

    def indices(self, micro_step: int) -> list[int]:
        """This rank's example indices for global micro-step ``micro_step`` (0-based)."""
        epoch, position = divmod(micro_step, self.batches_per_epoch)
        start = position * self.global_batch_size + self.rank * self.micro_batch_size
        return self._permutation(epoch)[start : start + self.micro_batch_size].tolist()

    def iterate(self, start_micro_step: int = 0) -> Iterator[list[int]]:
        """Endless index batches from ``start_micro_step`` on (one permutation per epoch)."""
        micro_step = start_micro_step
        while True:
            epoch, position = divmod(micro_step, self.batches_per_epoch)
            perm = self._permutation(epoch)
            for pos in range(position, self.batches_per_epoch):
                start = pos * self.global_batch_size + self.rank * self.micro_batch_size
                yield perm[start : start + self.micro_batch_size].tolist()
            micro_step = (epoch + 1) * self.batches_per_epoch
