"""The narrow-copy path (``zo2.offload.transfer_dtype`` narrower than the masters), and its no-op twin.

A streamed block comes up either as its exact master (into its slot) or as its narrow copy into its slot's
staging buffer, widened into the slot by the compute stream when the block is acquired (so the staging
buffer is free when the slot is); a write-back also narrows the slot into one more staging buffer (compute
stream, right after the update) and copies that to the block's narrow host copy. No conversion kernel runs
on a copy stream: there it would wait for free SMs behind the forward's GEMMs and hold up every copy
queued behind it (H100, fp32 OPT-6.7B with bf16 transfers: 1.48x the transfer floor that way).

With partitioned masters (:mod:`~zo2_ds.offload.partition`) the narrow host copy is this rank's shard of
it, moved as the master's shard is (the same ``home_copies``): up into its part of the staging buffer, then
the node's all-gather of the staging buffer; back, only its part of the write-back stage.

:class:`NoNarrowCopies` is the twin for the usual case (every block crosses in its own dtype): the ring
calls the same methods, which do nothing, so no caller writes ``if narrow:``.
"""

from __future__ import annotations

from typing import Any

import torch

from zo2_ds.offload.partition import home_copies
from zo2_ds.offload.store import BlockStore
from zo2_ds.offload.streams import Streams

__all__ = ["NarrowCopies", "NoNarrowCopies", "narrow_copies"]


class NoNarrowCopies:
    """Every upload is the exact master; nothing to convert or send."""

    enabled = False
    buffers: list[torch.Tensor] = []

    def upload(self, b: int, slot: int) -> tuple[torch.Tensor, int]:
        raise AssertionError("no narrow copies to upload")  # upload_is_exact is always True without them

    def widen(self, b: int, slot: int, slot_flat: torch.Tensor, dev_views: list[torch.Tensor]) -> None:
        raise AssertionError("no narrow copies to widen")

    def narrow_for_write_back(self, b: int, slot_flat: torch.Tensor, dev_views: list, compute: Any) -> None:
        pass

    def send(self, b: int, wb: Any) -> None:
        pass


class NarrowCopies:
    """Staging buffers on the device (one per slot, one for write-backs) and the conversions."""

    enabled = True

    def __init__(self, store: BlockStore, num_slots: int, streams: Streams):
        self.store = store
        self.narrow = store.narrow
        self.streams = streams
        self.homes = home_copies(store.partition, streams)  # whole narrow copies, or own shard and the gather
        stage_bytes = max(store.slot_nbytes(b, narrow=True) for b in store.streamed)
        self.buffers = [torch.empty(stage_bytes, dtype=torch.uint8, device=store.device) for _ in range(num_slots + 1)]
        self._wb_stage_free = streams.marker()  # the write-back stage's last narrow copy has left it

    def upload(self, b: int, slot: int) -> tuple[torch.Tensor, int]:
        """On the upload stream: block b's narrow host copy (this rank's shard, if partitioned) into the slot's
        staging buffer, widened at acquire. Returns the staging buffer and the copy's bytes (the ring then
        completes it: the node's gather, if partitioned)."""
        self.homes.upload(self.narrow.homes[b], self.buffers[slot], self.narrow.sizes[b])
        return self.buffers[slot], self.narrow.sizes[b]

    def widen(self, b: int, slot: int, slot_flat: torch.Tensor, dev_views: list[torch.Tensor]) -> None:
        """On the compute stream: the staged narrow copy into the slot (every acquire follows its upload)."""
        self._convert(b, self.buffers[slot], slot_flat, dev_views, to_narrow=False)

    def narrow_for_write_back(self, b: int, slot_flat: torch.Tensor, dev_views: list, compute: Any) -> None:
        """On the compute stream, after the update: the slot narrowed into the write-back stage."""
        self._wb_stage_free.wait(compute)  # the previous write-back's narrow copy has left
        with self.streams.on(compute):
            self._convert(b, self.buffers[-1], slot_flat, dev_views, to_narrow=True)

    def send(self, b: int, wb: Any) -> None:
        """On the write-back stream, after the master's copy: the write-back stage to b's narrow host copy."""
        self.homes.write_back(self.narrow.homes[b], self.buffers[-1], self.narrow.sizes[b])
        self._wb_stage_free.record(wb)

    def _convert(
        self, b: int, stage: torch.Tensor, flat: torch.Tensor, dev_views: list[torch.Tensor], to_narrow: bool
    ) -> None:
        """Block b's slot <-> its narrow copy in ``stage``: one flat kernel when the layouts match element for
        element (a block of one dtype), else one per parameter."""
        narrow = self.narrow
        if narrow.flat[b]:
            wide_dtype = self.store.entries[b][0].dtype
            wide = flat[: self.store.sizes[b]].view(wide_dtype)
            small = stage[: narrow.sizes[b]].view(narrow.dtype)
            pairs = [(wide, small)]
        else:
            pairs = [(v, n.view(stage)) for v, n in zip(dev_views, narrow.entries[b])]
        for wide, small in pairs:
            if to_narrow:
                small.copy_(wide)
            else:
                wide.copy_(small)


def narrow_copies(store: BlockStore, num_slots: int, streams: Streams) -> NarrowCopies | NoNarrowCopies:
    """The narrow-copy path when the store keeps narrow copies of streamed blocks, else its no-op twin."""
    if store.narrow is None or not store.streamed:
        return NoNarrowCopies()
    return NarrowCopies(store, num_slots, streams)
