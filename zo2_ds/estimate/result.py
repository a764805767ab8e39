"""What :func:`zo2_ds.estimate.estimate` returns (:class:`Estimate`: the parts, the floors and what they add up
to) and the measured constants behind its defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Estimate",
    "CUDA_CONTEXT_BYTES",
    "ALLOCATOR_SLACK_BYTES",
    "NCCL_COMMUNICATOR_BYTES",
    "HOST_MAPPING_BYTES_PER_HOST_BYTE",
    "DEFAULT_BANDWIDTH_GBS",
    "DEFAULT_TFLOPS",
    "DEFAULT_NVLINK_GBS",
    "DEFAULT_HOST_GBS",
]

_GIB = 1024**3
# NVML-used bytes with CUDA initialised, a cuBLAS handle made and nothing allocated: 1.18 GiB on the H100
# host (launch/results/offload_h100.json, cuda_context_nvml_bytes); up to 1.31 GiB seen on H200 hosts.
CUDA_CONTEXT_BYTES = 1263337472
# NVML - peak allocated - context in fresh processes (OPT-13B/30B offloaded, expandable_segments): 0.20-0.30 GiB.
ALLOCATOR_SLACK_BYTES = _GIB // 4
# NVML bytes of one NCCL communicator a rank uses in training, 2 ranks on 2 H200s (NVLink): 2 replicated ranks
# used 4.31 GB per GPU against 2.99 GB for one GPU alone (OPT-6.7B offloaded, 1x2048,
# launch/results/copy_engine_gather_h200x2.json). "One" is DeepSpeed's pair: the world's (made by init_distributed)
# and its data-parallel clone's (connected by the weights' broadcast and g's all-reduce); partitioned with copy
# engines the pair measured 1.02 GB (launch/results/memory_stages_h200x2.json), so this figure is an upper one.
# A perturbation group adds its own (measured +1.00 GB) and so does the collective gather's node group
# (+1.60 GB); the copy-engine gather needs none. One figure for each: not measured for more ranks.
NCCL_COMMUNICATOR_BYTES = 1_323_000_000
# GPU memory the driver keeps for host memory registered with cudaHostRegister (the pinned masters): 8 bytes per
# 4 KiB page, with 4 KiB or 2 MiB host pages alike (+16 MiB per 8 GiB, +64 MiB per 32 GiB on the H200 host; OPT-175B's
# shape from 6 to 30 blocks: NVML +213.9 MB, this and the allocator's growth predict 215.2 MB; launch/results/README.md
# "OPT-175B's shape on one GPU").
HOST_MAPPING_BYTES_PER_HOST_BYTE = 8 / 4096
DEFAULT_BANDWIDTH_GBS = 55.0  # pinned host -> device, H100 / H200 (REFERENCE.md: 55.2 / 55.5 GB/s)
DEFAULT_TFLOPS = 500.0  # fp16 forward, effective 2 N tokens / t (H200: 424-572 TFLOP/s for OPT-1.3B..13B)
DEFAULT_NVLINK_GBS = 260.0  # NCCL all-gather received per rank, 2 x H200 (launch/results/README.md: 257-266 GB/s)
# Uploads and write-backs together that one host carried for all its GPUs at once: 2 x H200 (one NUMA node)
# each uploading at 46.8 GB/s beside a write-back of a quarter of those bytes (launch/bench_link.py,
# launch/results/README.md "The step without a host sync, and the host's links"); one GPU alone never reaches
# it there (53.0 GB/s x 1.25). Another host's figure is its own (an 8-GPU host's is not measured).
DEFAULT_HOST_GBS = 117.0


@dataclass(frozen=True)
class Estimate:
    """One run's estimate; every ``*_bytes`` in bytes, per GPU (rank) unless named host or node."""

    model: str
    batch_size: int
    seq_len: int
    dtype: str
    offload: bool
    num_perturbations: int
    num_gpus: int
    num_params: int
    device_parts: dict[str, int]  # exact: the offloader's by part, or the in-GPU engine's model + scratch
    activation_bytes: int
    logits_bytes: int
    loss_chunk_bytes: int
    context_bytes: int
    slack_bytes: int
    # Per rank: pinned_masters and narrow_copies for the whole run (its shards of them when partitioned);
    # outside_blocks (embeddings, head, norms) only while the model is built on the host, until the engine
    # moves them to the GPU.
    host_parts: dict[str, int]
    streamed_bytes_per_step: float  # over this rank's host link
    bandwidth_gbs: float
    flops_per_step: float  # this rank's forwards
    tflops: float
    offload_facts: dict[str, Any] = field(default_factory=dict)  # num_blocks, num_units, granularity, num_slots, ...
    context_source: str = "constant"  # of context_bytes: "constant" (CUDA_CONTEXT_BYTES), "given" or "none" (CPU)
    gpus_per_node: int = 1
    partition: str = "none"  # as resolved: "node" (the masters shared by a node's ranks) or "none" (replicated)
    perturbation_parallel: int = 1
    gathered_bytes_per_step: float = 0.0  # the other ranks' shards, all-gathered into this rank's slots
    nvlink_gbs: float = DEFAULT_NVLINK_GBS
    written_back_bytes_per_step: float = 0.0  # this rank's masters (or shards) rewritten per step, on average
    host_gbs: float = DEFAULT_HOST_GBS
    communicator_bytes: int = 0  # NCCL's, on a CUDA run of several ranks (NCCL_COMMUNICATOR_BYTES each)

    @property
    def exact_bytes(self) -> int:
        return sum(self.device_parts.values())

    @property
    def peak_allocated_bytes(self) -> int:
        """What ``torch.cuda.max_memory_allocated`` would report."""
        return self.exact_bytes + self.activation_bytes + self.logits_bytes + self.loss_chunk_bytes

    @property
    def host_mapping_bytes(self) -> int:
        """GPU memory the driver keeps to map this rank's registered host memory (none on a CPU run)."""
        if self.context_source == "none":
            return 0
        return int(self.host_bytes_per_rank * HOST_MAPPING_BYTES_PER_HOST_BYTE)

    @property
    def nvml_bytes(self) -> int:
        """What NVML (``nvidia-smi``) would show for the process: peak allocated + context + slack + NCCL's
        communicators + the driver's mappings of the pinned host memory."""
        parts = self.context_bytes + self.slack_bytes + self.communicator_bytes + self.host_mapping_bytes
        return self.peak_allocated_bytes + parts

    @property
    def ranks_per_node(self) -> int:
        return min(self.num_gpus, self.gpus_per_node)

    @property
    def host_bytes_per_rank(self) -> int:
        """Host memory of one rank's pinned masters and copies (its shards of them when partitioned), and of its
        streamed head (every rank pins its own)."""
        parts = self.host_parts
        return parts["pinned_masters"] + parts["narrow_copies"] + parts.get("streamed_head", 0)

    @property
    def host_bytes_per_node(self) -> int:
        """Host memory of all ranks of a node for the pinned masters and copies: one copy when partitioned
        (plus the last shards' padding), one per rank when replicated."""
        return self.ranks_per_node * self.host_bytes_per_rank

    @property
    def passes_per_rank(self) -> int:
        """The forwards one rank runs per step: the 2q passes, spread over a perturbation group."""
        return 2 * self.num_perturbations // self.perturbation_parallel

    @property
    def tokens_per_step(self) -> int:
        """The job's tokens per step: one micro-batch per perturbation group (a group of one: per rank)."""
        return self.num_gpus // self.perturbation_parallel * self.batch_size * self.seq_len

    @property
    def transfer_floor_ms(self) -> float:
        return self.streamed_bytes_per_step / (self.bandwidth_gbs * 1e9) * 1e3

    @property
    def nvlink_floor_ms(self) -> float:
        return self.gathered_bytes_per_step / (self.nvlink_gbs * 1e9) * 1e3

    @property
    def compute_floor_ms(self) -> float:
        return self.flops_per_step / (self.tflops * 1e12) * 1e3

    @property
    def host_bytes_per_step(self) -> float:
        """What a node's host moves per step for all its ranks: their uploads and their write-backs."""
        return self.ranks_per_node * (self.streamed_bytes_per_step + self.written_back_bytes_per_step)

    @property
    def host_floor_ms(self) -> float:
        return self.host_bytes_per_step / (self.host_gbs * 1e9) * 1e3

    @property
    def step_floor_ms(self) -> float:
        return max(self.transfer_floor_ms, self.nvlink_floor_ms, self.compute_floor_ms, self.host_floor_ms)

    @property
    def bound(self) -> str:
        """Which floor bounds the step: "transfer" (the rank's host link), "host" (the node's host, all its
        ranks' uploads and write-backs), "nvlink" (the gather) or "compute"."""
        floors = {"compute": self.compute_floor_ms, "nvlink": self.nvlink_floor_ms, "host": self.host_floor_ms}
        floors["transfer"] = self.transfer_floor_ms
        return max(floors, key=floors.get)

    @property
    def tokens_per_s_at_floor(self) -> float:
        return self.tokens_per_step / self.step_floor_ms * 1e3

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("exact_bytes", "peak_allocated_bytes", "nvml_bytes", "host_mapping_bytes", "ranks_per_node"):
            out[name] = getattr(self, name)
        for name in ("host_bytes_per_rank", "host_bytes_per_node", "passes_per_rank", "tokens_per_step"):
            out[name] = getattr(self, name)
        for name in ("transfer_floor_ms", "nvlink_floor_ms", "compute_floor_ms", "host_bytes_per_step"):
            out[name] = getattr(self, name)
        for name in ("host_floor_ms", "step_floor_ms", "bound"):
            out[name] = getattr(self, name)
        out["tokens_per_s_at_floor"] = self.tokens_per_s_at_floor
        return out
