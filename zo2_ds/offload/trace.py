"""What the offloader reports about itself: its schedule as it is issued (observers, the timeline) and the
device bytes it holds.

Observers are the documented hook into the schedule, for benchmarks and tests: ``observer(what, block,
phase, stream)`` is called on the host as each operation is issued, with ``what`` one of "upload"
(host -> slot, including a re-upload of the other copy), "gather" (with ``zo2.offload.partition``: the
node's all-gather of the other ranks' shards into the slot), "compute" (the block's passes, from acquire to
release) and "writeback" (slot -> host master), ``phase`` "start" or "end", and ``stream`` the stream
the operation is queued on (None on the CPU). An observer may enqueue work on that stream (a test
delays it with ``torch.cuda._sleep`` to expose a missing event wait); it must not synchronise.
With no observer the hook costs one check per call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["Observer", "Tracer", "Timeline", "device_bytes"]

Observer = Callable[[str, int, str, Any], None]


class Tracer:
    """The observers of one runner."""

    def __init__(self) -> None:
        self.observers: list[Observer] = []

    def emit(self, what: str, block: int, phase: str, stream: Any) -> None:
        for observer in self.observers:
            observer(what, block, phase, stream)


class Timeline:
    """An observer recording a timed CUDA event at each start and end: ``events`` is a list of
    (what, block, phase, event); ``event.elapsed_time`` gives the times once the device is synchronised.
    ``issued[i]`` is the host's ``time.perf_counter()`` when event i was recorded: the device reaching an
    event just as the host issued it means it was waiting for the host. Records nothing on the CPU (no
    streams). Use it through ``OffloadRunner.recording_timeline()``."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, str, Any]] = []
        self.issued: list[float] = []

    def __call__(self, what: str, block: int, phase: str, stream: Any) -> None:
        if stream is None:
            return
        from deepspeed.accelerator import get_accelerator

        event = get_accelerator().Event(enable_timing=True)
        event.record(stream)
        self.events.append((what, block, phase, event))
        self.issued.append(time.perf_counter())


def _distinct(params: Iterable[Any]) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for p in params:
        if p is not None:
            seen.setdefault(id(p), p)
    return list(seen.values())


def device_bytes(
    module: torch.nn.Module,
    in_blocks: set[int],
    device: torch.device,
    buffers: dict[str, list[torch.Tensor]],
    resident_bytes: int,
    outside_shares_scratch: bool,
    perturbed_whole: Callable[[torch.nn.Module], bool] = lambda module: True,
) -> dict[str, int]:
    """Device memory an offloaded model holds for the whole run, by part, in bytes.

    ``buffers``: the offloader's own device buffers by part ("slot_ring", "perturbation_scratch",
    "transfer_staging"); ``resident_bytes``: the resident blocks (the budget). ``outside_blocks`` counts
    embeddings, head, norms and buffers; ``outside_perturbed`` the largest unit of trainable tensors outside
    the blocks, perturbed into a pooled copy (the tied embedding / head), 0 where it goes into the
    perturbation scratch (``outside_shares_scratch``: the multi-tensor path); ``perturbed_whole(module)`` False for
    a module perturbed without a copy (a gathered embedding, a head in vocabulary chunks: zo2_ds/vocab.py).
    """
    outside = sum(
        p.numel() * p.element_size()
        for p in _distinct(module.parameters())
        if id(p) not in in_blocks and p.device.type == device.type
    )
    outside += sum(b.numel() * b.element_size() for b in module.buffers() if b.device.type == device.type)
    per_module = [
        sum(
            p.numel() * p.element_size()
            for p in _distinct(mod._parameters.values())
            if p.requires_grad and id(p) not in in_blocks
        )
        for mod in module.modules()
        if perturbed_whole(mod)
    ]
    return {
        "resident_blocks": resident_bytes,
        **{part: sum(t.numel() * t.element_size() for t in tensors) for part, tensors in buffers.items()},
        "outside_blocks": outside,
        "outside_perturbed": 0 if outside_shares_scratch else max(per_module, default=0),
    }
