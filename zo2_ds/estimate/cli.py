"""The command line of the estimator: parse, estimate, print a table by part (or ``--json``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

from zo2_ds.estimate import (
    CUDA_CONTEXT_BYTES,
    DEFAULT_BANDWIDTH_GBS,
    DEFAULT_HOST_GBS,
    DEFAULT_NVLINK_GBS,
    DEFAULT_TFLOPS,
    Estimate,
    estimate,
)

__all__ = ["main", "format_estimate", "parse_args"]

_GIB = 1024**3
_CONTEXT_SOURCES = {
    "constant": "an H100's; --cuda_context_bytes for your machine's",
    "given": "--cuda_context_bytes",
    "measured": "measured here",
    "none": "no CUDA",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m zo2_ds.estimate",
        description="GPU / host memory and the step's floors of a zo2_ds run, computed on the meta device.",
    )
    p.add_argument("model", help="a zo2_ds.bench shape (opt-1.3b ... opt-175b), a config.json or a model directory")
    p.add_argument("--num_layers", type=int, default=None, help="keep only this many blocks (a truncated shape)")
    p.add_argument("--batch", default="1x2048", help="BATCHxSEQ per GPU (default 1x2048)")
    p.add_argument("--dtype", default="fp16", help="fp32, fp16 or bf16 (default fp16)")
    p.add_argument("--offload", action=argparse.BooleanOptionalAction, default=True, help="zo2.offload (default on)")
    p.add_argument(
        "--prefetch_depth", type=lambda v: v if v == "auto" else int(v), default="auto", help="an int, or auto"
    )
    p.add_argument("--granularity", default="auto", choices=("auto", "block", "layer"), help="zo2.offload.granularity")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--num_resident_blocks", type=int, default=None)
    budget.add_argument("--max_gpu_memory", default=None, help='bytes the resident blocks may use, e.g. "8GB"')
    p.add_argument("--transfer_dtype", default="auto", help="auto, fp32, fp16 or bf16")
    p.add_argument("--write_back_interval", default="auto")
    p.add_argument("--num_perturbations", type=int, default=1)
    p.add_argument(
        "--vocab_chunks", default="auto", choices=("auto", "true", "false"), help="zo2.vocab_chunks (default auto)"
    )
    p.add_argument(
        "--stream_head",
        default="auto",
        choices=("auto", "true", "false"),
        help="zo2.offload.stream_head (default auto: on CUDA, an untied head zo2.vocab_chunks chunks)",
    )
    p.add_argument("--num_gpus", type=int, default=1, help="data-parallel ranks (default 1)")
    p.add_argument("--gpus_per_node", type=int, default=None, help="ranks per node (default: all on one node)")
    p.add_argument(
        "--partition",
        default="auto",
        choices=("auto", "none", "node"),
        help="zo2.offload.partition: node = a node's ranks share one copy of the masters, a shard each; "
        "none = a copy per rank; auto (default) = node with offload on and several ranks per node",
    )
    p.add_argument(
        "--gather",
        default="auto",
        choices=("auto", "copy_engine", "collective"),
        help="zo2.offload.gather, partitioned: collective adds the node group's NCCL communicator (default auto: "
        "the copy engines, as on peer GPUs)",
    )
    p.add_argument(
        "--perturbation_parallel",
        type=int,
        default=1,
        help="zo2.perturbation_parallel: ranks that split a step's 2q forwards on one micro-batch (default 1)",
    )
    p.add_argument("--bandwidth_gbs", type=float, default=DEFAULT_BANDWIDTH_GBS, help="pinned host->GPU GB/s")
    p.add_argument(
        "--nvlink_gbs",
        type=float,
        default=DEFAULT_NVLINK_GBS,
        help="all-gather GB/s received per rank, partitioned (default: measured on 2 H200s)",
    )
    p.add_argument(
        "--host_gbs",
        type=float,
        default=DEFAULT_HOST_GBS,
        help="GB/s of uploads and write-backs one host carries for all its GPUs at once (default: measured for "
        "2 H200s, launch/bench_link.py)",
    )
    p.add_argument("--tflops", type=float, default=DEFAULT_TFLOPS, help="effective forward TFLOP/s")
    p.add_argument(
        "--cuda_context_bytes",
        default=None,
        help=f'NVML bytes of the CUDA context on your machine, e.g. "1.3GiB" (default {CUDA_CONTEXT_BYTES / _GIB:.2f} '
        "GiB, an H100's; --check measures it)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--check", action="store_true", help="on a CUDA machine: build the engine, run steps, compare with NVML"
    )
    p.add_argument("--steps", type=int, default=3, help="--check: timed training steps")
    return p.parse_args(argv)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    interval = args.write_back_interval
    return {
        "batch": args.batch,
        "num_layers": args.num_layers,
        "dtype": args.dtype,
        "offload": args.offload,
        "prefetch_depth": args.prefetch_depth,
        "granularity": args.granularity,
        "num_resident_blocks": args.num_resident_blocks,
        "max_gpu_memory": args.max_gpu_memory,
        "transfer_dtype": args.transfer_dtype,
        "write_back_interval": int(interval) if str(interval).isdigit() else interval,
        "num_perturbations": args.num_perturbations,
        "vocab_chunks": {"true": True, "false": False}.get(args.vocab_chunks, args.vocab_chunks),
        "stream_head": {"true": True, "false": False}.get(args.stream_head, args.stream_head),
        "num_gpus": args.num_gpus,
        "gpus_per_node": args.gpus_per_node,
        "partition": args.partition,
        "gather": args.gather,
        "perturbation_parallel": args.perturbation_parallel,
        "bandwidth_gbs": args.bandwidth_gbs,
        "nvlink_gbs": args.nvlink_gbs,
        "host_gbs": args.host_gbs,
        "tflops": args.tflops,
        "cuda_context_bytes": args.cuda_context_bytes,
    }


def _gib(nbytes: float) -> str:
    return f"{nbytes / _GIB:9.3f} GiB"


def format_estimate(est: Estimate) -> str:
    """The estimate as a table by part, then the totals, the host memory and the floors."""
    lines = [_heading(est)]
    if est.offload_facts:
        lines.append("  " + ", ".join(f"{k} {v}" for k, v in est.offload_facts.items()))
    lines.append("GPU memory (exact: what the engine allocates for the run)")
    lines += [f"  {part:<24}{_gib(n)}" for part, n in est.device_parts.items()]
    lines.append("GPU memory (estimated, on top)")
    for name, n in (
        ("activations (one block)", est.activation_bytes),
        ("logits", est.logits_bytes),
        ("loss chunk", est.loss_chunk_bytes),
    ):
        lines.append(f"  {name:<24}{_gib(n)}")
    lines.append(f"  {'= peak allocated':<24}{_gib(est.peak_allocated_bytes)}")
    lines.append(f"  {'CUDA context':<24}{_gib(est.context_bytes)}  ({_CONTEXT_SOURCES[est.context_source]})")
    lines.append(f"  {'allocator slack':<24}{_gib(est.slack_bytes)}")
    if est.communicator_bytes:
        lines.append(f"  {'NCCL communicators':<24}{_gib(est.communicator_bytes)}  (measured on 2 H200 ranks)")
    if est.host_mapping_bytes:
        lines.append(f"  {'pinned memory mappings':<24}{_gib(est.host_mapping_bytes)}  (8 bytes per 4 KiB pinned)")
    lines.append(f"  {'= NVML':<24}{_gib(est.nvml_bytes)}  ({est.nvml_bytes / 1e9:.2f} GB)")
    return "\n".join(lines + _host_lines(est) + _floor_lines(est))


def _heading(est: Estimate) -> str:
    mode = "offloaded" if est.offload else "in GPU"
    text = (
        f"{est.model}, {est.batch_size}x{est.seq_len}, {est.dtype}, {mode}, q={est.num_perturbations}, "
        f"{est.num_params / 1e9:.2f}B parameters"
    )
    if est.num_gpus > 1:
        nodes = -(-est.num_gpus // est.ranks_per_node)
        text += f", {est.num_gpus} GPUs ({nodes} node{'s' if nodes > 1 else ''} of {est.ranks_per_node})"
        if est.offload:
            text += ", masters partitioned over each node" if est.partition == "node" else ", masters replicated"
        if est.perturbation_parallel > 1:
            text += f", perturbation groups of {est.perturbation_parallel}"
        text += "; figures per GPU"
    return text


def _host_lines(est: Estimate) -> list[str]:
    shard = f": its 1/{est.ranks_per_node} shards" if est.partition == "node" else ""
    lines = [f"Host memory (per rank{shard})"]
    lines += [f"  {part:<24}{_gib(n)}" for part, n in est.host_parts.items()]
    if est.num_gpus > 1:
        copies = "one copy" if est.partition == "node" else f"{est.ranks_per_node} copies"
        lines.append(f"Host memory (per node of {est.ranks_per_node} ranks)")
        lines.append(f"  {'pinned, all ranks':<24}{_gib(est.host_bytes_per_node)}  ({copies} of the streamed masters)")
    return lines


def _floor_lines(est: Estimate) -> list[str]:
    floors = [("transfer", est.streamed_bytes_per_step / 1e9, "GB", est.bandwidth_gbs, "GB/s", est.transfer_floor_ms)]
    if est.partition == "node":
        floors.append(("nvlink", est.gathered_bytes_per_step / 1e9, "GB", est.nvlink_gbs, "GB/s", est.nvlink_floor_ms))
    if est.offload:
        floors.append(("host", est.host_bytes_per_step / 1e9, "GB", est.host_gbs, "GB/s", est.host_floor_ms))
    floors.append(("compute", est.flops_per_step / 1e12, "TFLOP", est.tflops, "TFLOP/s", est.compute_floor_ms))
    notes = {"transfer": "this rank's host link", "nvlink": "the other ranks' shards, all-gathered"}
    notes["host"] = f"uploads and write-backs of the node's {est.ranks_per_node} rank(s)"
    notes["compute"] = f"{est.passes_per_rank} forward{'s' if est.passes_per_rank > 1 else ''}"
    lines = ["Step floors (per rank)"]
    for name, amount, unit, rate, rate_unit, ms in floors:
        lines.append(
            f"  {name:<9}{amount:8.2f} {unit:<5} / {f'{rate:g} {rate_unit}':<13} = {ms:8.1f} ms  ({notes[name]})"
        )
    lines.append(f"  bound: {est.bound} ({est.step_floor_ms:.1f} ms per step)")
    per_group = ", one micro-batch per perturbation group" if est.perturbation_parallel > 1 else ""
    rate = est.tokens_per_s_at_floor / 1e3
    lines.append(f"  tokens per step {est.tokens_per_step} (the job's{per_group}): {rate:.1f}K tokens/s at the floor")
    return lines


def _logs_to_stderr() -> None:
    """DeepSpeed's logger writes to stdout (its accelerator warning on a CPU machine): keep stdout for the
    table / JSON, so ``--json`` output parses."""
    from deepspeed.utils import logger

    for handler in logger.handlers:
        if getattr(handler, "stream", None) is sys.stdout:
            handler.setStream(sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _logs_to_stderr()
    try:
        # Whatever the libraries print while the engine is built (--check) goes to stderr: stdout is the result.
        with contextlib.redirect_stdout(sys.stderr):
            if args.check:
                from zo2_ds.estimate.check import check, format_check

                result = check(args.model, steps=args.steps, **_options(args))
                text = json.dumps(result, indent=1) if args.json else format_check(result)
            else:
                est = estimate(args.model, **_options(args))
                text = json.dumps(est.as_dict(), indent=1) if args.json else format_estimate(est)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(text)
    return 0
