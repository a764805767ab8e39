"""GPU memory, host memory and the step's floors of a zo2_ds run, before running it (``python -m zo2_ds.estimate``).

    python -m zo2_ds.estimate opt-13b --batch 1x2048                 # a zo2_ds.bench shape, offloaded
    python -m zo2_ds.estimate path/to/config.json --no-offload --json
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
  the allocator keeps part of that cache.

The CUDA context depends on the card, the driver and the CUDA version: :data:`CUDA_CONTEXT_BYTES` was
measured on an H100 (1.18 GiB); an H200 with a newer driver showed 1.31 GiB. ``cuda_context_bytes`` (CLI:
``--cuda_context_bytes 1.3GiB``) replaces it with the figure of your machine, e.g. ``env.cuda_context_nvml_bytes``
of any ``launch/bench_*.py`` JSON. ``--check`` measures the context itself, in its own process before
anything else touches the GPU, uses that figure for the estimate and prints the constant beside it.

The rules come from where they live: ``zo2_ds.offload.store.plan_store`` (the layout),
``zo2_ds.loss.CHUNK_BYTES`` (the lean loss's chunk), ``zo2_ds.vocab.head_chunk_rows`` (the head's chunks),
``zo2_ds.bench.models.hf_config`` (the shapes).

Floors: the transfer floor is the bytes one step uploads (every streamed block once; with a narrower
``transfer_dtype`` the average over ``write_back_interval`` steps) over the host link's bandwidth; the
compute floor is the FLOPs of the 2q forwards (2 x parameters x tokens each) over ``tflops``. With
``num_gpus`` > 1 (data parallel) every figure is per GPU with the batch per GPU, except the host memory:
every rank pins its own copy of the masters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from zo2_ds.config import ZO2Config, parse_zo2_config
from zo2_ds.dtypes import DTYPES
from zo2_ds.estimate.budget import chunked_head_shape, in_gpu_scratch_bytes, offloader_parts
from zo2_ds.estimate.meta_model import meta_model, model_dims
from zo2_ds.loss import CHUNK_BYTES
from zo2_ds.offload.store import parse_bytes
from zo2_ds.vocab import head_chunk_rows

__all__ = ["Estimate", "estimate", "parse_batch", "CUDA_CONTEXT_BYTES", "ALLOCATOR_SLACK_BYTES"]

_GIB = 1024**3
# NVML-used bytes with CUDA initialised, a cuBLAS handle made and nothing allocated: 1.18 GiB on the H100
# host (launch/results/offload_h100.json, cuda_context_nvml_bytes); up to 1.31 GiB seen on H200 hosts.
CUDA_CONTEXT_BYTES = 1263337472
# NVML - peak allocated - context in fresh processes (OPT-13B/30B offloaded, expandable_segments): 0.20-0.30 GiB.
ALLOCATOR_SLACK_BYTES = _GIB // 4
DEFAULT_BANDWIDTH_GBS = 55.0  # pinned host -> device, H100 / H200 (REFERENCE.md: 55.2 / 55.5 GB/s)
DEFAULT_TFLOPS = 500.0  # fp16 forward, effective 2 N tokens / t (H200: 424-572 TFLOP/s for OPT-1.3B..13B)


@dataclass(frozen=True)
class Estimate:
    """One run's estimate; every ``*_bytes`` in bytes (per GPU unless named host)."""

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
    # Per rank: pinned_masters and narrow_copies for the whole run; outside_blocks (embeddings, head, norms)
    # only while the model is built on the host, until the engine moves them to the GPU.
    host_parts: dict[str, int]
    streamed_bytes_per_step: float
    bandwidth_gbs: float
    flops_per_step: float
    tflops: float
    offload_facts: dict[str, Any] = field(default_factory=dict)  # num_blocks, num_units, granularity, num_slots, ...
    context_source: str = "constant"  # of context_bytes: "constant" (CUDA_CONTEXT_BYTES), "given" or "none" (CPU)

    @property
    def exact_bytes(self) -> int:
        return sum(self.device_parts.values())

    @property
    def peak_allocated_bytes(self) -> int:
        """What ``torch.cuda.max_memory_allocated`` would report."""
        return self.exact_bytes + self.activation_bytes + self.logits_bytes + self.loss_chunk_bytes

    @property
    def nvml_bytes(self) -> int:
        """What NVML (``nvidia-smi``) would show for the process: peak allocated + context + slack."""
        return self.peak_allocated_bytes + self.context_bytes + self.slack_bytes

    @property
    def host_bytes(self) -> int:
        """Host memory of all ranks of this host for the pinned masters and copies (each rank its own)."""
        return self.num_gpus * (self.host_parts["pinned_masters"] + self.host_parts["narrow_copies"])

    @property
    def transfer_floor_ms(self) -> float:
        return self.streamed_bytes_per_step / (self.bandwidth_gbs * 1e9) * 1e3

    @property
    def compute_floor_ms(self) -> float:
        return self.flops_per_step / (self.tflops * 1e12) * 1e3

    @property
    def bound(self) -> str:
        """Which floor bounds the step: "transfer" or "compute"."""
        return "transfer" if self.transfer_floor_ms > self.compute_floor_ms else "compute"

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("exact_bytes", "peak_allocated_bytes", "nvml_bytes", "host_bytes"):
            out[name] = getattr(self, name)
        for name in ("transfer_floor_ms", "compute_floor_ms", "bound"):
            out[name] = getattr(self, name)
        return out


def parse_batch(text: str) -> tuple[int, int]:
    """``"16x256"`` -> (16, 256). Raises ValueError naming ``--batch``."""
    parts = str(text).lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--batch: {text!r} is not BATCHxSEQ with two positive integers, e.g. 1x2048 or 16x256")
    return int(parts[0]), int(parts[1])


def _zo2_config(
    offload: bool, offload_options: dict[str, Any], num_perturbations: int, kernels: str, vocab_chunks: bool | str
) -> ZO2Config:
    block: dict[str, Any] = {"enabled": True, "num_perturbations": num_perturbations, "kernels": kernels}
    block["vocab_chunks"] = vocab_chunks
    if offload:
        block["offload"] = {"enabled": True, **offload_options}
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
    bandwidth_gbs: float = DEFAULT_BANDWIDTH_GBS,
    tflops: float = DEFAULT_TFLOPS,
    kernels: str = "auto",
    vocab_chunks: bool | str = "auto",
    device: str = "cuda",
    blocks_attr: str | None = None,
    num_layers: int | None = None,
    cuda_context_bytes: int | str | None = None,
) -> Estimate:
    """The estimate of a run of ``model`` (a ``zo2_ds.bench`` shape name, a config.json or a model directory).

    ``num_layers``: keep only that many blocks (e.g. the OPT-175B shape truncated to 6, as measured).
    ``device`` "cuda" counts the budget as a CUDA run makes it; "cpu" as a CPU run (the tests compare with
    CPU engines). ``cuda_context_bytes``: your machine's CUDA context (int or "1.3GiB"; default an H100's,
    :data:`CUDA_CONTEXT_BYTES`). Raises ValueError naming the bad argument and what is allowed.
    """
    batch_size, seq_len = parse_batch(batch) if isinstance(batch, str) else batch
    _check_arguments(dtype, device, num_gpus=num_gpus, bandwidth_gbs=bandwidth_gbs, tflops=tflops)
    options = {
        "prefetch_depth": prefetch_depth,
        "granularity": granularity,
        "num_resident_blocks": num_resident_blocks,
        "max_gpu_memory": max_gpu_memory,
        "transfer_dtype": transfer_dtype,
        "write_back_interval": write_back_interval,
        "blocks_attr": blocks_attr,
    }
    context_bytes, context_source = _context(cuda_context_bytes, device)
    config = _zo2_config(offload, options, num_perturbations, kernels, vocab_chunks)
    net = meta_model(model, DTYPES[dtype], num_layers)
    dims = model_dims(net)
    tokens = batch_size * seq_len
    itemsize = DTYPES[dtype].itemsize
    num_params = sum(p.numel() for p in net.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    model_bytes += sum(b.numel() * b.element_size() for b in net.buffers())
    if offload:
        parts, host, streamed, facts = _offloaded(net, config, device == "cuda")
    else:
        parts = {"model": model_bytes, "perturbation_scratch": in_gpu_scratch_bytes(net, config)}
        host, streamed, facts = {"pinned_masters": 0, "narrow_copies": 0, "outside_blocks": 0}, 0.0, {}
    head = chunked_head_shape(net, config)
    if head is None:
        logits_bytes, loss_bytes = tokens * dims["vocab"] * itemsize, _loss_chunk_bytes(tokens, dims["vocab"])
    else:
        lent = parts["perturbation_scratch"] if offload else 0  # the offloader lends its scratch to the chunks
        logits_bytes, loss_bytes = 0, _head_chunk_bytes(tokens, head, itemsize, lent)
    mlp_tensors = 3 if _gated_mlp(net) else 2
    if facts.get("granularity") == "layer":
        mlp_tensors += 2 * num_perturbations - 1  # one held per waiting pass (see the module docstring)
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
        activation_bytes=mlp_tensors * tokens * dims["ffn"] * itemsize,
        logits_bytes=logits_bytes,
        loss_chunk_bytes=loss_bytes,
        context_bytes=context_bytes,
        slack_bytes=ALLOCATOR_SLACK_BYTES if device == "cuda" else 0,
        host_parts=host,
        streamed_bytes_per_step=streamed,
        bandwidth_gbs=float(bandwidth_gbs),
        flops_per_step=2 * num_perturbations * 2.0 * num_params * tokens,
        tflops=float(tflops),
        offload_facts=facts,
        context_source=context_source,
    )


def _check_arguments(dtype: str, device: str, **positive: float) -> None:
    if dtype not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"--dtype: {dtype!r} is not one of 'fp32', 'fp16', 'bf16'")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device: {device!r} is not one of 'cuda', 'cpu'")
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


def _offloaded(
    net: torch.nn.Module, config: ZO2Config, on_cuda: bool
) -> tuple[dict[str, int], dict[str, int], float, dict[str, int]]:
    """The offloader's device parts, the host parts, the bytes one step uploads (the average over
    ``write_back_interval`` steps with a narrower ``transfer_dtype``) and the ring's facts."""
    layout = offloader_parts(net, config, on_cuda)
    parts = dict(layout.device_bytes)
    host = {
        "pinned_masters": layout.host_masters_bytes,
        "narrow_copies": layout.host_narrow_bytes,
        "outside_blocks": parts["outside_blocks"],
    }
    k = layout.write_back_interval
    streamed = (layout.streamed_exact_bytes + (k - 1) * layout.streamed_narrow_bytes) / k
    facts = {
        "num_blocks": layout.num_blocks,
        "num_units": layout.num_units,
        "granularity": layout.granularity,
        "num_resident": layout.num_resident,
        "num_slots": layout.num_slots,
        "block_bytes": layout.block_bytes,
        "unit_bytes": layout.unit_bytes,
        "write_back_interval": k,
    }
    return parts, host, streamed, facts


def _loss_chunk_bytes(tokens: int, vocab: int) -> int:
    """zo2_ds.loss's largest transient: one chunk of rows in fp32 and its log-softmax."""
    rows = min(tokens, max(1, CHUNK_BYTES // (4 * vocab)))
    return 2 * rows * vocab * 4


def _head_chunk_bytes(tokens: int, head: tuple[int, int], itemsize: int, lent_bytes: int) -> int:
    """zo2_ds.vocab's transient: one chunk's perturbed rows of the head (none of its own where the offloader's
    scratch of ``lent_bytes`` holds them), its logits in the model dtype and in fp32."""
    vocab, width = head
    rows = head_chunk_rows(tokens, vocab, width)
    weight = rows * width * itemsize
    logits = rows * tokens * (4 + (itemsize if itemsize != 4 else 0))
    return (0 if weight <= lent_bytes else weight) + logits


def _gated_mlp(net: torch.nn.Module) -> bool:
    """Llama-style MLP (gate, up, down: three t x ffn tensors at its peak) rather than fc1 / act / fc2."""
    return any(name.endswith("gate_proj") for name, _ in net.named_modules())
