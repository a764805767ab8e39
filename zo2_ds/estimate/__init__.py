"""GPU memory, host memory and the step's floors of a zo2_ds run, before running it (``python -m zo2_ds.estimate``).

    python -m zo2_ds.estimate opt-13b --batch 1x2048                 # a zo2_ds.bench shape, offloaded
    python -m zo2_ds.estimate path/to/config.json --no-offload --json
    python -m zo2_ds.estimate opt-13b --num_gpus 2                   # one node of 2: partitioned masters
    python -m zo2_ds.estimate opt-13b --num_gpus 16 --gpus_per_node 8 --perturbation_parallel 2
    python -m zo2_ds.estimate --check opt-13b --batch 1x2048         # on a CUDA machine: against a real run

What the offloader holds on the device is *exact*: the model is built on the meta device and the
offloader's own layout code sizes every buffer (:mod:`zo2_ds.estimate.budget`), so these parts equal
``engine.zo_runner.device_bytes()`` of a real engine byte for byte. What comes on top is estimated, from
the measured runs of ``launch/results/README.md`` (OPT-1.3B to 30B, fp16, H100; within 3% of the peak
allocated there):

- activations of one block's forward: its MLP's ``t x ffn`` tensors (two, three for a gated MLP), ``t``
  the tokens of the micro-batch; at granularity "layer" the passes take turns inside the MLP, so each of
  the other 2q - 1 passes holds one more ``t x ffn`` tensor while it waits (H200, OPT-6.7B to 175B: the
  peak allocated within 3% with it, 5-7% under without);
- the logits of one pass (``t x vocab`` in the model dtype) and the lean loss's fp32 chunk with its
  log-softmax (:mod:`zo2_ds.loss`). The measured peaks are the sum of these and the activations (the last
  pass's logits are returned to the caller, and may live on while the next step's blocks run). Where the head
  is computed in vocabulary chunks (``zo2.vocab_chunks``, :mod:`zo2_ds.vocab`) there are no logits, and the
  loss's transient is one chunk: its perturbed rows of the head (in the offloader's perturbation scratch when
  they fit there, as they do from OPT-6.7B / Qwen2.5-7B up), its logits in the model dtype and in fp32;
- the CUDA context with a cuBLAS handle and the allocator's slack (:data:`ALLOCATOR_SLACK_BYTES`, measured
  in fresh processes with ``expandable_segments``): NVML shows the peak allocated plus both. A process that
  used the GPU for something else first (the benchmark's in-GPU baseline) shows 0.4-0.5 GiB more in NVML:
  the allocator keeps part of that cache;
- the driver's mappings of the pinned masters (:data:`HOST_MAPPING_BYTES_PER_HOST_BYTE`: 8 bytes of GPU
  memory per 4 KiB registered, measured on the H200 host): 0.68 GB for OPT-175B's 96 blocks.

Measured against the OPT-175B shape at the defaults (30 blocks, H200, launch/results/README.md "OPT-175B's
shape on one GPU"), the peak allocated comes out under the run's: 0.92x at 1 x 2048 and 0.87x at 16 x 256
(about 0.5 and 0.8 GiB short). The sub-block table (6 blocks) had 0.965x with the estimate of that time, whose
logits term (removed since by vocabulary chunks; the measured peak did not drop) covered part of it: the peak
is in the blocks, and what their activations hold beyond the terms above is not identified.

The CUDA context depends on the card, the driver and the CUDA version: :data:`CUDA_CONTEXT_BYTES` was
measured on an H100 (1.18 GiB); an H200 with a newer driver showed 1.31 GiB. ``cuda_context_bytes`` (CLI:
``--cuda_context_bytes 1.3GiB``) replaces it with the figure of your machine, e.g. ``env.cuda_context_nvml_bytes``
of any ``launch/bench_*.py`` JSON. ``--check`` measures the context itself, in its own process before
anything else touches the GPU, uses that figure for the estimate and prints the constant beside it.

The rules come from where they live: ``zo2_ds.offload.store.plan_store`` (the layout),
``zo2_ds.loss.CHUNK_BYTES`` (the lean loss's chunk), ``zo2_ds.vocab.head_chunk_rows`` (the head's chunks),
``zo2_ds.bench.models.hf_config`` (the shapes).

Several GPUs (``num_gpus``, ``gpus_per_node``): every figure is per GPU, with the batch per GPU, except the
host memory, given per rank and per node. ``partition`` resolves as the engine resolves
``zo2.offload.partition`` (:func:`zo2_ds.offload.node.node_size`: "auto" is "node" with offload on and
more than one rank per node). Partitioned, each rank pins its shard of every streamed unit and of its
``transfer_dtype`` copy (``Partition.shard_nbytes``: 1/N, rounded up to 256 bytes), uploads it and gathers
the other N - 1 shards from the node's ranks over NVLink; resident units are whole on every GPU, the slots
hold the padded whole unit, and a node's host holds one copy of the masters (plus the padding). Replicated,
every rank pins and uploads a whole copy. ``perturbation_parallel`` P: each rank of a group of P runs 2q / P
of the step's forwards on the group's one micro-batch, so the job's tokens per step count each group once.

Floors, per rank and step: the transfer floor is the bytes its host link uploads (every streamed unit once,
or its shard of it; with a narrower ``transfer_dtype`` the average over ``write_back_interval`` steps) over
``bandwidth_gbs``; the NVLink floor the bytes it gathers (N - 1 shards of every streamed unit) over
``nvlink_gbs`` (default: the all-gather measured on two H200s, ``launch/results/README.md``, "Offload across
GPUs"); the compute floor the FLOPs of its 2q / P forwards (2 x parameters x tokens each) over ``tflops``.
The host floor is what the node's host moves for all its ranks per step, their uploads and their write-backs
(every streamed master or shard once per ``write_back_interval``, a streamed head every step), over
``host_gbs`` (default: measured for 2 H200s of one host, 117 GB/s; one GPU alone does not reach it there, two
that upload and write back at once do). The step's floor is the largest of the four: the gathers run on a stream
of their own, beside the uploads and the forwards (measured, the forward beside the gathers runs slower: the
floor is a bound, not a forecast).
"""

from __future__ import annotations

from typing import Any

import torch

from zo2_ds.config import ZO2Config, parse_zo2_config
from zo2_ds.dtypes import DTYPES
from zo2_ds.estimate import result
from zo2_ds.estimate.budget import in_gpu_scratch_bytes, offloader_parts
from zo2_ds.estimate.meta_model import meta_model
from zo2_ds.estimate.result import (
    ALLOCATOR_SLACK_BYTES,
    CUDA_CONTEXT_BYTES,
    DEFAULT_BANDWIDTH_GBS,
    DEFAULT_HOST_GBS,
    DEFAULT_NVLINK_GBS,
    DEFAULT_TFLOPS,
    HOST_MAPPING_BYTES_PER_HOST_BYTE,  # noqa: F401 (exported: result.__all__)
    NCCL_COMMUNICATOR_BYTES,
    Estimate,
)
from zo2_ds.estimate.transient import transient_bytes
from zo2_ds.offload.node import node_size
from zo2_ds.offload.store import parse_bytes
from zo2_ds.parallel import check_sizes

__all__ = ["estimate", "parse_batch", *result.__all__]  # Estimate and the constants, from zo2_ds.estimate.result


def parse_batch(text: str) -> tuple[int, int]:
    """``"16x256"`` -> (16, 256). Raises ValueError naming ``--batch``."""
    parts = str(text).lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--batch: {text!r} is not BATCHxSEQ with two positive integers, e.g. 1x2048 or 16x256")
    return int(parts[0]), int(parts[1])


def _zo2_config(
    offload: bool, options: dict[str, Any], num_perturbations: int, perturbation_parallel: int, **zo2: Any
) -> ZO2Config:
    block: dict[str, Any] = {"enabled": True, "num_perturbations": num_perturbations, **zo2}
    block["perturbation_parallel"] = perturbation_parallel
    if offload:
        block["offload"] = {"enabled": True, **options}
    return parse_zo2_config({"zo2": block})


def estimate(
    model: str,
    *,
    batch: str | tuple[int, int] = (1, 2048),
    dtype: str = "fp16",
    offload: bool = True,
    prefetch_depth: int | str = "auto",
    granularity: str = "auto",
    num_resident_blocks: int | None = None,
    max_gpu_memory: int | str | None = None,
    transfer_dtype: str = "auto",
    write_back_interval: int | str = "auto",
    num_perturbations: int = 1,
    num_gpus: int = 1,
    gpus_per_node: int | None = None,
    partition: str = "auto",
    gather: str = "auto",
    perturbation_parallel: int = 1,
    bandwidth_gbs: float = DEFAULT_BANDWIDTH_GBS,
    nvlink_gbs: float = DEFAULT_NVLINK_GBS,
    host_gbs: float = DEFAULT_HOST_GBS,
    tflops: float = DEFAULT_TFLOPS,
    kernels: str = "auto",
    vocab_chunks: bool | str = "auto",
    stream_head: bool | str = "auto",
    device: str = "cuda",
    blocks_attr: str | None = None,
    num_layers: int | None = None,
    cuda_context_bytes: int | str | None = None,
) -> Estimate:
    """The estimate of a run of ``model`` (a ``zo2_ds.bench`` shape name, a config.json or a model directory).

    ``num_layers``: keep only that many blocks (e.g. the OPT-175B shape truncated to 6, as measured).
    ``device`` "cuda" counts the budget as a CUDA run makes it; "cpu" as a CPU run (the tests compare with
    CPU engines). ``cuda_context_bytes``: your machine's CUDA context (int or "1.3GiB"; default an H100's,
    :data:`CUDA_CONTEXT_BYTES`). ``num_gpus`` data-parallel ranks, ``gpus_per_node`` of them per node (default:
    all on one); ``partition`` and ``perturbation_parallel``: ``zo2.offload.partition`` and
    ``zo2.perturbation_parallel``. Raises ValueError naming the bad argument and what is allowed.
    """
    batch_size, seq_len = parse_batch(batch) if isinstance(batch, str) else batch
    gpus_per_node = num_gpus if gpus_per_node is None else gpus_per_node
    positive = {"num_gpus": num_gpus, "gpus_per_node": gpus_per_node, "bandwidth_gbs": bandwidth_gbs}
    positive.update(nvlink_gbs=nvlink_gbs, host_gbs=host_gbs, tflops=tflops)
    _check_arguments(dtype, device, partition, gather, offload, **positive)
    options = {
        "prefetch_depth": prefetch_depth,
        "granularity": granularity,
        "num_resident_blocks": num_resident_blocks,
        "max_gpu_memory": max_gpu_memory,
        "transfer_dtype": transfer_dtype,
        "write_back_interval": write_back_interval,
        "blocks_attr": blocks_attr,
        "partition": partition,
        "gather": gather,
        "stream_head": stream_head,
    }
    context_bytes, context_source = _context(cuda_context_bytes, device)
    zo2 = {"kernels": kernels, "vocab_chunks": vocab_chunks}
    config = _zo2_config(offload, options, num_perturbations, perturbation_parallel, **zo2)
    check_sizes(perturbation_parallel, num_gpus, 2 * num_perturbations)
    ranks = (node_size(config.offload, num_gpus, gpus_per_node) or 1) if offload else 1
    net = meta_model(model, DTYPES[dtype], num_layers)
    if offload:
        parts, host, streamed, facts = _offloaded(net, config, device == "cuda", ranks)
    else:
        parts, host, streamed, facts = _in_gpu(net, config), dict.fromkeys(_HOST_PARTS, 0), 0.0, {}
    written_back = facts.pop("written_back_bytes_per_step", 0.0)
    tokens, passes = batch_size * seq_len, 2 * num_perturbations // perturbation_parallel
    granularity, itemsize = facts.get("granularity"), DTYPES[dtype].itemsize
    activations, logits, loss = transient_bytes(net, config, parts, tokens, itemsize, passes, granularity)
    num_params = sum(p.numel() for p in net.parameters())
    return Estimate(
        model=model,
        batch_size=batch_size,
        seq_len=seq_len,
        dtype=dtype,
        offload=offload,
        num_perturbations=num_perturbations,
        num_gpus=num_gpus,
        num_params=num_params,
        device_parts=parts,
        activation_bytes=activations,
        logits_bytes=logits,
        loss_chunk_bytes=loss,
        context_bytes=context_bytes,
        slack_bytes=ALLOCATOR_SLACK_BYTES if device == "cuda" else 0,
        host_parts=host,
        streamed_bytes_per_step=streamed,
        bandwidth_gbs=float(bandwidth_gbs),
        flops_per_step=passes * 2.0 * num_params * tokens,
        tflops=float(tflops),
        offload_facts=facts,
        context_source=context_source,
        gpus_per_node=gpus_per_node,
        partition="node" if ranks > 1 else "none",
        perturbation_parallel=perturbation_parallel,
        gathered_bytes_per_step=(ranks - 1) * streamed,  # every rank's shard of a unit is the same size
        nvlink_gbs=float(nvlink_gbs),
        written_back_bytes_per_step=written_back,
        host_gbs=float(host_gbs),
        communicator_bytes=NCCL_COMMUNICATOR_BYTES
        * _communicators(device, num_gpus, perturbation_parallel, ranks > 1 and gather == "collective"),
    )


def _communicators(device: str, num_gpus: int, perturbation_parallel: int, node_gathers: bool) -> int:
    """NCCL communicators a rank sets up in training: the world's (several ranks), a perturbation group's, and
    the node group's where partitioned masters are gathered by the collective (``gather`` "collective"; "auto"
    is taken as the copy engines, which need none)."""
    if device != "cuda" or num_gpus == 1:
        return 0
    return 1 + (perturbation_parallel > 1) + node_gathers


def _check_arguments(dtype: str, device: str, partition: str, gather: str, offload: bool, **positive: float) -> None:
    if dtype not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"--dtype: {dtype!r} is not one of 'fp32', 'fp16', 'bf16'")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device: {device!r} is not one of 'cuda', 'cpu'")
    if partition not in ("auto", "none", "node"):
        raise ValueError(f"--partition: {partition!r} is not one of 'auto', 'none', 'node'")
    if gather not in ("auto", "copy_engine", "collective"):
        raise ValueError(f"--gather: {gather!r} is not one of 'auto', 'copy_engine', 'collective'")
    if partition == "node" and not offload:
        raise ValueError('--partition: "node" partitions the offloaded masters: it needs --offload')
    for name, value in positive.items():
        if not value > 0:
            raise ValueError(f"--{name}: {value!r} must be positive")


def _context(cuda_context_bytes: int | str | None, device: str) -> tuple[int, str]:
    """The CUDA context's bytes and where the figure comes from; none on the CPU."""
    if device != "cuda":
        return 0, "none"
    if cuda_context_bytes is None:
        return CUDA_CONTEXT_BYTES, "constant"
    try:
        value = parse_bytes(cuda_context_bytes)
    except (ValueError, TypeError, AttributeError):
        value = -1
    if value < 0:
        raise ValueError(
            f'--cuda_context_bytes: {cuda_context_bytes!r} is not a byte count (e.g. 1400000000, "1.3GiB" or "1.4GB")'
        )
    return value, "given"


_HOST_PARTS = ("pinned_masters", "narrow_copies", "streamed_head", "outside_blocks")


def _in_gpu(net: torch.nn.Module, config: ZO2Config) -> dict[str, int]:
    """The in-GPU engine's device parts: the whole model and its perturbation scratch."""
    model_bytes = sum(t.numel() * t.element_size() for t in (*net.parameters(), *net.buffers()))
    return {"model": model_bytes, "perturbation_scratch": in_gpu_scratch_bytes(net, config)}


def _offloaded(
    net: torch.nn.Module, config: ZO2Config, on_cuda: bool, partition_ranks: int
) -> tuple[dict[str, int], dict[str, int], float, dict[str, int]]:
    """The offloader's device parts, the host parts, the bytes one step uploads over this rank's link (the
    average over ``write_back_interval`` steps with a narrower ``transfer_dtype``) and the ring's facts, on a
    rank of a node whose ``partition_ranks`` ranks share one copy of the masters (1: replicated)."""
    layout = offloader_parts(net, config, on_cuda, partition_ranks)
    parts = dict(layout.device_bytes)
    host = {
        "pinned_masters": layout.host_masters_bytes,
        "narrow_copies": layout.host_narrow_bytes,
        "streamed_head": layout.head_bytes,
        "outside_blocks": parts["outside_blocks"],
    }
    k = layout.write_back_interval
    streamed = (layout.streamed_exact_bytes + (k - 1) * layout.streamed_narrow_bytes) / k + layout.head_bytes
    facts = {
        "num_blocks": layout.num_blocks,
        "num_units": layout.num_units,
        "granularity": layout.granularity,
        "num_resident": layout.num_resident,
        "num_slots": layout.num_slots,
        "block_bytes": layout.block_bytes,
        "unit_bytes": layout.unit_bytes,
        "write_back_interval": k,
        # Every streamed master (or shard) rewritten once per interval, and a streamed head every step.
        "written_back_bytes_per_step": layout.streamed_exact_bytes / k + layout.head_bytes,
    }
    return parts, host, streamed, facts
