"""The GPU slot ring and its copies: which block holds which slot, the upload of a block into its slot, the
write-back of its slot to its pinned master, and the order of uploads during a run (the prefetch, which
wraps into the next step's first blocks).

Block b always lands in slot ``slot_of[b]`` (streamed blocks in order, round the ring), so a block's
device views and kernel tables are built once. Every reuse is ordered by events, never by a host wait:

    upload stream   : wait [slot free] and [slot read] of the slot's last block, wait b's last write-back
                      ->  copy pinned master (or narrow copy) -> slot                        [uploaded]
    compute stream  : wait [uploaded] (acquire) ... b's passes ... [slot free] (release)
    write-back      : wait [updated] (recorded on compute right after the update is in the slot);
                      copy slot -> pinned master [slot read], then the narrow copy, if any     [written]

With ``zo2.offload.partition`` the master is this rank's shard: the upload copies it into its place in the
slot, and the gather stream all-gathers the node's shards into the slot behind that copy ([uploaded] is then
recorded on the gather stream; over copy engines where the partition says so: zo2_ds/offload/peer.py); the
write-back copies only the own shard.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from zo2_ds.offload.narrow import NarrowCopies, NoNarrowCopies
from zo2_ds.offload.partition import home_copies
from zo2_ds.offload.store import BlockStore
from zo2_ds.offload.streams import Streams
from zo2_ds.offload.trace import Tracer

__all__ = ["SlotRing"]


class SlotRing:
    """``num_slots`` device buffers of the largest streamed block, and the events that order their reuse."""

    def __init__(
        self,
        store: BlockStore,
        num_slots: int,
        streams: Streams,
        narrow: NarrowCopies | NoNarrowCopies,
        tracer: Tracer,
        prefetch_next_step: bool,
    ):
        self.store, self.streams, self.narrow, self.tracer = store, streams, narrow, tracer
        self.prefetch_next_step = prefetch_next_step
        self.streamed = store.streamed
        self.num_slots = num_slots
        # Whole homes, or with zo2.offload.partition this rank's shard up and the node's all-gather.
        self.homes = home_copies(store.partition, streams, store.device)
        slot_bytes = max((store.slot_nbytes(b) for b in self.streamed), default=0)
        self.slots = [self.homes.empty(slot_bytes, store.device) for _ in range(num_slots)]
        num_blocks = store.num_blocks
        # Each block's tensors on the device: in its slot, or its resident home (see set_order).
        self.dev_views: list[list[torch.Tensor]] = [[] for _ in range(num_blocks)]
        self.owner: list[int | None] = [None] * num_slots  # the block whose copy is (being) put in each slot
        self.set_order(self.streamed)
        self.exact = [True] * num_blocks  # the copy in block b's slot is its exact master (not the narrow one)
        self._uploaded = [streams.marker() for _ in range(num_blocks)]
        self._updated = [streams.marker() for _ in range(num_slots)]
        self._slot_read = [streams.marker() for _ in range(num_slots)]  # its write-back's copy done
        self._slot_free = [streams.marker() for _ in range(num_slots)]
        self._written = [streams.marker() for _ in range(num_blocks)]
        # The upload schedule of the run in progress (None: no run).
        self._cursor: int | None = None  # next position in `streamed` to upload
        self._wrap = False  # positions past the end wrap to the next step's blocks (see prefetch)
        self.released: set[int] = set()  # blocks this run is done with (the wrapped prefetch waits for them)

    def set_order(self, streamed: list[int]) -> None:
        """Upload the streamed blocks in this order (the order the forward calls them), block b in slot
        ``slot_of[b]`` = its position modulo the ring; re-points ``dev_views`` (the list is kept, its items
        replaced). Only between runs, with no slot holding anything."""
        assert sorted(streamed) == self.store.streamed and all(o is None for o in self.owner)
        self.streamed = list(streamed)
        self.slot_of = {b: pos % self.num_slots for pos, b in enumerate(self.streamed)}
        store = self.store
        for b in range(store.num_blocks):
            self.dev_views[b] = (
                store.views(b, self.slots[self.slot_of[b]]) if store.is_streamed(b) else store.home_views[b]
            )

    # -- one block ---------------------------------------------------------------------------------
    def flat(self, b: int) -> torch.Tensor:
        """Block b's slot, as many bytes as the block has (its device copy, for tests and debugging too)."""
        return self.slots[self.slot_of[b]][: self.store.sizes[b]]

    def make_ready(self, b: int, exact: bool, compute: Any) -> None:
        """Block b's copy (``exact``: its master, else its narrow copy) in its slot, in ``compute`` order."""
        slot = self.slot_of[b]
        if self.owner[slot] != b:
            self.issue_upload(b, exact)
        elif self.exact[b] != exact:  # uploaded ahead as the other copy (a gradient accumulation step)
            with self.streams.on(self.streams.upload):
                self._copy_in(b, exact)
        self._uploaded[b].wait(compute)
        if not exact:  # the narrow copy is in the slot's staging buffer
            with self.streams.on(compute):
                self.narrow.widen(b, slot, self.slots[slot], self.dev_views[b])

    def issue_upload(self, b: int, exact: bool) -> None:
        slot = self.slot_of[b]
        if self.owner[slot] is not None:
            raise RuntimeError(f"zo2.offload: slot {slot} still holds block {self.owner[slot]} (internal error)")
        up = self.streams.upload
        with self.streams.on(up):
            # The slot is reused only after its last reader (compute) or writer (write-back) finished, and
            # b's master only after its last write-back landed.
            self._slot_free[slot].wait(up)
            self._slot_read[slot].wait(up)
            self._written[b].wait(up)
            self._copy_in(b, exact)
        self.owner[slot] = b

    def _copy_in(self, b: int, exact: bool) -> None:
        """On the upload stream: block b's exact master into its slot, or its narrow copy into the slot's
        staging buffer (widened into the slot at acquire)."""
        up = self.streams.upload
        self.tracer.emit("upload", b, "start", up)
        if exact:
            dst, size = self.slots[self.slot_of[b]], self.store.sizes[b]
            self.homes.upload(self.store.homes[b], dst, size)
        else:  # into the slot's staging buffer, widened from before the slot was freed
            dst, size = self.narrow.upload(b, self.slot_of[b])
        self.tracer.emit("upload", b, "end", up)
        # Partitioned: the node's gather of the other shards into dst, on the gather stream.
        self._uploaded[b].record(self.homes.complete(dst, size, b, self.tracer))
        self.exact[b] = exact

    def write_back(self, b: int, compute: Any) -> None:
        """Copy block b's updated slot to its pinned master now, while its passes run.

        The passes never write the slot (they read it and write the perturbation scratch), so the slot
        holds the final theta of this step as soon as the update kernels are done: the copy overlaps b's
        own compute and the next upload, and the slot is free once b's passes finish (see free).
        """
        slot = self.slot_of[b]
        wb = self.streams.writeback
        self.narrow.narrow_for_write_back(b, self.slots[slot], self.dev_views[b], compute)
        self._updated[slot].record(compute)
        with self.streams.on(wb):
            self._updated[slot].wait(wb)
            self.tracer.emit("writeback", b, "start", wb)
            # The master is only read by the next upload of b (which waits for [written]) or after a flush.
            self.homes.write_back(self.store.homes[b], self.slots[slot], self.store.sizes[b])
            self._slot_read[slot].record(wb)
            self.narrow.send(b, wb)
            self.tracer.emit("writeback", b, "end", wb)
            self._written[b].record(wb)

    def free(self, b: int, compute: Any) -> None:
        """All passes are done with streamed block b: its slot may take the next upload."""
        slot = self.slot_of[b]
        # The slot's next upload also waits for [slot read], the copy of b's write-back out of it (if any):
        # not for the whole write-back stream, which may still be sending b's narrow copy from its staging.
        self._slot_free[slot].record(compute)
        self.owner[slot] = None

    def drop_prefetched(self, acquired: set[int]) -> None:
        """Forget blocks uploaded ahead that no forward holds: their slots are free once the copies land."""
        up = self.streams.upload
        for slot, owner in enumerate(self.owner):
            if owner is not None and owner not in acquired:
                self._uploaded[owner].wait(up)  # (the gather into the slot, if partitioned)
                self._slot_free[slot].record(up)  # behind the upload into the slot
                self.owner[slot] = None

    def forget_all(self) -> None:
        """After a failed run, once every copy is waited for: no slot holds anything."""
        self.owner = [None] * self.num_slots

    # -- the upload schedule of a run ----------------------------------------------------------------
    def start_run(self, training: bool, prefetch: bool = True) -> None:
        """A run begins: its blocks are uploaded ahead in order (unless not ``prefetch``: each at its acquire,
        for a run whose order is not known yet), and in training past its end into the next step's."""
        self._cursor = 0 if prefetch else None
        self._wrap = training and self.prefetch_next_step
        self.released.clear()

    def end_run(self) -> None:
        self._cursor, self._wrap = None, False

    def prefetch(self, exact_for: Callable[[int, bool], bool]) -> None:
        """During a run: upload the next streamed blocks in order while their slots are free.

        In a training run the order continues into the next step's blocks (position n + k is block k of the
        next step): a slot freed by one of the last blocks of this step takes one of the first of the next
        at once, so the link keeps working through the end of the step and the host's work between steps
        (the g sync without zo2.async_step, the update bookkeeping, the next forward's preamble), which
        otherwise leaves it idle.
        By then block k is done for this step, its write-back is ordered before the upload, and the next
        step applies its pending updates at acquire. The last block's release happens inside the run, so
        every free slot is taken before the run returns. Anything but the next training run drops these
        copies first (``drop_prefetched``). ``exact_for(b, next_run)`` says which copy of b to upload.
        """
        if self._cursor is None:
            return
        n = len(self.streamed)
        end = 2 * n if self._wrap else n
        while self._cursor < end:
            b = self.streamed[self._cursor % n]
            if self._cursor >= n and b not in self.released:
                return  # still to run (or running) in this step: its next-step copy waits for its release
            owner = self.owner[self.slot_of[b]]
            if owner == b:
                self._cursor += 1
                continue
            if owner is not None:
                return
            self.issue_upload(b, exact_for(b, self._cursor >= n))
            self._cursor += 1
