"""The three streams of the offloader and the events that order them, through DeepSpeed's accelerator.

- compute: the caller's current stream (the forward's kernels, the perturbation and the lazy update);
- upload: host -> device copies of the blocks into the GPU slots;
- writeback: device -> host copies of updated blocks back into their pinned masters;
- gather: with ``zo2.offload.partition``, the all-gathers of the node's shards into a slot, off the upload
  stream so that the next shard's host copy does not queue behind this one's gather.

On a synchronized device (CPU) the accelerator has no streams or events: :class:`Streams` then runs the
same calls with every stream ``None`` and every event a no-op, so the whole schedule runs (and is tested)
on CPU, just without overlap.
"""

from __future__ import annotations

import contextlib
from typing import Any

from deepspeed.accelerator import get_accelerator

__all__ = ["Streams", "Marker"]


class Marker:
    """A reusable event: ``record`` on one stream, ``wait`` from another (no host sync). No-op without streams."""

    def __init__(self, event: Any = None):
        self._event = event
        self.recorded = False

    def record(self, stream: Any) -> None:
        if self._event is not None:
            self._event.record(stream)
        self.recorded = True

    def wait(self, stream: Any) -> None:
        if self._event is not None and self.recorded:
            stream.wait_event(self._event)

    def synchronize(self) -> None:
        if self._event is not None and self.recorded:
            self._event.synchronize()


class Streams:
    """Upload, write-back and gather side streams plus the compute stream, or the no-op twin on CPU."""

    def __init__(self, enabled: bool | None = None, timing: bool = False):
        acc = get_accelerator()
        if enabled is None:
            enabled = not acc.is_synchronized_device() and acc.Stream is not None
        self.enabled = enabled
        self.timing = timing
        self.upload = acc.Stream() if enabled else None
        self.writeback = acc.Stream() if enabled else None
        # High priority: the copy-engine gather's barrier kernels start ahead of the forward's waiting blocks.
        self.gather = _high_priority_stream(acc) if enabled else None

    def compute(self) -> Any:
        return get_accelerator().current_stream() if self.enabled else None

    def marker(self) -> Marker:
        if not self.enabled:
            return Marker()
        return Marker(get_accelerator().Event(enable_timing=self.timing))

    def on(self, stream: Any) -> contextlib.AbstractContextManager:
        return get_accelerator().stream(stream) if self.enabled else contextlib.nullcontext()

    def synchronize(self) -> None:
        if self.enabled:
            self.upload.synchronize()
            self.writeback.synchronize()
            self.gather.synchronize()
            get_accelerator().current_stream().synchronize()


def _high_priority_stream(acc) -> Any:
    try:
        return acc.Stream(priority=-1)
    except TypeError:  # an accelerator whose streams take no priority
        return acc.Stream()
