"""The node's all-gather of a unit's shards on the GPUs' copy engines (``zo2.offload.gather = "copy_engine"``).

NCCL's all-gather runs as kernels: beside the forward they take SMs from its GEMMs (two H200s, OPT-6.7B: the
blocks' compute ran about 35% slower beside the gathers), and at normal priority they queue behind them. Here
each slot of the ring is allocated in symmetric memory (``torch.distributed._symmetric_memory``): every rank
of the node maps its peers' slots, so after its own shard's host copy has landed a rank copies the others'
shards straight out of their slots, peer to peer (``cudaMemcpyAsync``: the copy engines, over NVLink where
there is one). Two device-side barriers of the slot's handle order it, on the gather stream:

    barrier 1 : every rank's own shard of this unit is in its slot    -> copy the others' shards in
    barrier 2 : every rank has copied its shards out of this slot     -> [uploaded]

[uploaded] must wait for barrier 2, not only for this rank's copies: the compute applies the unit's pending
update in place in the slot, which a peer still reading this rank's shard would then see (and apply again;
the CUDA test of partitioned against replicated caught that variant). Once the compute is done the slot's
next upload may overwrite it: by then every peer has its copy.

A barrier is a one-block kernel (a few microseconds); the copies take no SMs. Every rank gathers the same
units in the same order, as with the collective, so the barriers pair up. Same bytes as the all-gather.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["PeerSlots", "copy_engine_unavailable", "rendezvous_fails"]


def copy_engine_unavailable(device: torch.device, group: Any) -> str | None:
    """Why this rank cannot gather over copy engines (None: it can): not a CUDA device, no symmetric memory in
    this torch, or a GPU of the node that is not a peer of this one. Local: the caller has the ranks agree."""
    if device.type != "cuda":
        return f"the device is {device.type}, not cuda"
    try:
        import torch.distributed._symmetric_memory as symm_mem  # noqa: F401
    except ImportError as err:  # pragma: no cover - every torch this package supports has it
        return f"torch.distributed._symmetric_memory cannot be imported ({err})"
    import torch.distributed as dist

    if dist.get_backend(group) != "nccl":
        return f"the node's process group is {dist.get_backend(group)}, not nccl"
    index = device.index if device.index is not None else torch.cuda.current_device()
    for other in range(torch.cuda.device_count()):
        if other != index and not torch.cuda.can_device_access_peer(index, other):
            return f"GPU {index} cannot access GPU {other} as a peer"
    return None


def rendezvous_fails(device: torch.device, group: Any) -> str | None:
    """A small symmetric buffer made and mapped by the node's ranks (a collective): why that failed here, or
    None. A machine may have peer GPUs and still refuse the mappings (a container without IPC, a driver that
    lacks the virtual-memory calls); the caller agrees over the ranks before any slot is made."""
    try:
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        probe = symm_mem.empty(4096, dtype=torch.uint8, device=device)
        handle = symm_mem.rendezvous(probe, group)
        handle.get_buffer((dist.get_rank(group) + 1) % dist.get_world_size(group), (4096,), torch.uint8)
    except Exception as err:  # noqa: BLE001 - any failure means: use the collective
        return f"symmetric memory failed here ({type(err).__name__}: {err})"
    return None


class PeerSlots:
    """Slots in symmetric memory and their gather over copy engines (see the module docstring)."""

    def __init__(self, partition: Any, device: torch.device):
        import torch.distributed._symmetric_memory as symm_mem

        self.partition, self.device, self._symm = partition, device, symm_mem
        self._slots: dict[int, tuple[Any, list[torch.Tensor]]] = {}  # data_ptr -> (handle, each rank's slot)

    def empty(self, nbytes: int) -> torch.Tensor:
        """A slot of ``nbytes`` that the node's peers can read (a collective: every rank of the node calls it,
        with the same size, in the same order)."""
        slot = self._symm.empty(nbytes, dtype=torch.uint8, device=self.device)
        handle = self._symm.rendezvous(slot, self.partition.group)
        me = self.partition.rank
        views = [slot if r == me else handle.get_buffer(r, (nbytes,), torch.uint8)
                 for r in range(self.partition.num_ranks)]  # fmt: skip
        self._slots[slot.data_ptr()] = (handle, views)
        return slot

    def owns(self, flat: torch.Tensor) -> bool:
        return flat.data_ptr() in self._slots

    def gather(self, flat: torch.Tensor, nbytes: int) -> None:
        """Fill slot ``flat`` (one of :meth:`empty`'s) with every rank's shard of a ``nbytes`` unit, this rank's
        already copied in (on the current stream, behind that copy); done on that stream once every rank has
        its copy (barrier 2)."""
        handle, views = self._slots[flat.data_ptr()]
        partition = self.partition
        shard = partition.shard_nbytes(nbytes)
        handle.barrier(channel=0)
        for r, peer in enumerate(views):
            if r != partition.rank:
                flat[r * shard : (r + 1) * shard].copy_(peer[r * shard : (r + 1) * shard], non_blocking=True)
        handle.barrier(channel=0)
