"""The pending-update log and its rules: which updates a block's master lacks, when it is written back,
and whether an upload must bring the exact master or may bring the narrow copy.

Pure logic on numbers: no tensors, no streams (unit-tested as such in tests/test_offload_pending.py).

Every step's update of an offloaded block is deferred to its next upload: ``OffloadRunner.update`` only
records (pass hashes, coefs, lr, weight decay), per block and trainable tensor. At the upload the GPU
applies the recorded updates in order, in place, the newest fused with pass 0's perturbation; the same
sequence of roundings as one update per step, so the trajectory does not depend on when the master is
rewritten. A streamed block's master is rewritten (written back) every ``write_back_interval`` steps,
staggered over the blocks: block b at the steps s with (s + b) % interval == 0, or once ``interval``
updates are pending, and always in plain forwards and flushes; until then its entries stay in the log.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from zo2_ds import zo

__all__ = [
    "Update",
    "PendingLog",
    "resolve_interval",
    "write_back_due",
    "upload_is_exact",
    "split_step_update",
    "block_update",
    "tensor_update",
]


class Update(NamedTuple):
    """One step's update of a tensor: the step's pass hashes (zo.z_pass_hash, one per perturbation, shared by
    every tensor of the step), coefs (g_i / q), lr and the group's weight decay (applied where
    zo.uses_weight_decay). Unpacks as the multi-tensor kernels' ``update`` argument."""

    pass_hashes: tuple[int, ...]
    coefs: tuple[float, ...] | zo.DeviceCoefs  # compared by identity when on the device
    lr: float
    weight_decay: float


Entry = list  # one step's updates of one block: per trainable tensor, an Update or None (no update)


class PendingLog:
    """Per block, the updates not yet in its master, oldest first: one entry per step."""

    def __init__(self, num_blocks: int):
        self._entries: list[list[Entry]] = [[] for _ in range(num_blocks)]

    def __getitem__(self, block: int) -> list[Entry]:
        return self._entries[block]

    def record(self, block: int, entry: Entry) -> None:
        self._entries[block].append(entry)

    def clear(self, block: int) -> None:
        self._entries[block] = []

    def count(self, block: int) -> int:
        return len(self._entries[block])

    @property
    def blocks(self) -> list[int]:
        """The blocks with at least one pending update."""
        return [b for b, e in enumerate(self._entries) if e]

    def longest(self) -> int:
        return max((len(e) for e in self._entries), default=0)


def resolve_interval(value: int | str, has_streams: bool) -> int:
    """``zo2.offload.write_back_interval``: "auto" is 4 with streams (a link to spare), 1 without (CPU)."""
    if value == "auto":
        return 4 if has_streams else 1
    return int(value)


def write_back_due(step: int | None, block: int, interval: int, num_pending: int) -> bool:
    """Whether block ``block``'s master is rewritten at its acquire for a run at ``step`` (None: a plain
    forward or a flush), with ``num_pending`` updates applied on the way: when there is something to
    write and it is a plain run, ``interval`` updates are pending, or it is the block's turn."""
    if num_pending == 0:
        return False
    return step is None or num_pending >= interval or (step + block) % interval == 0


def upload_is_exact(narrow: bool, step: int | None, block: int, interval: int, num_pending: int) -> bool:
    """Whether block ``block``'s upload for a run at ``step`` (None: plain forward or flush) must be its exact
    master. Always without a narrower transfer_dtype (``narrow`` False). With one: at the block's
    write-back steps ((step + block) % interval == 0, or ``interval`` updates pending), in plain forwards
    and flushes; otherwise the narrow copy (the master at its last write-back, rounded) comes up, and the
    pending updates are applied to it on the GPU as to the master."""
    if not narrow or step is None:
        return True
    return (step + block) % interval == 0 or num_pending >= interval


def split_step_update(
    groups: Sequence[Any],
    where: Mapping[int, tuple[int, int]],
    num_trained: Sequence[int],
    pass_hashes: tuple[int, ...],
    coefs: tuple[float, ...] | zo.DeviceCoefs,
) -> tuple[dict[int, Entry], list[tuple[Any, list[Any]]]]:
    """One step's update split into the blocks' log entries and what is outside the blocks.

    ``groups``: objects with ``params``, ``lr``, ``weight_decay`` (optimizer param groups); ``where``: id of a
    block parameter -> (block, index among the block's trainable tensors); ``num_trained[b]``: how many
    trainable tensors block b has. Returns ({block: entry}, [(group, its params outside the blocks)]).
    """
    entries: dict[int, Entry] = {}
    outside = []
    for group in groups:
        update = Update(pass_hashes, coefs, group.lr, group.weight_decay)
        rest = []
        for p in group.params:
            found = where.get(id(p))
            if found is None:
                rest.append(p)
                continue
            b, t = found
            if b not in entries:
                entries[b] = [None] * num_trained[b]
            entries[b][t] = update
        if rest:
            outside.append((group, rest))
    return entries, outside


def block_update(entry: Entry | None) -> Update | None:
    """A block's entry as one multi-tensor update, or None when there is none or its tensors differ in lr /
    weight decay / step (the per-tensor path then)."""
    if not entry:
        return None
    first = entry[0]
    if first is None or any(u is not first and u != first for u in entry):
        return None
    return first


def tensor_update(update: Update | None, decays: bool, key: int) -> tuple[list[int], tuple, float, float] | None:
    """One tensor's pending update as zo.apply_update_'s (seeds, coefs, lr, weight decay)."""
    if update is None:
        return None
    hashes, coefs, lr, wd = update
    return [zo.z_seed_from_pass(h, key) for h in hashes], coefs, lr, (wd if decays else 0.0)
