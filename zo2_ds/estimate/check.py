"""The estimate against a real run (``python -m zo2_ds.estimate --check MODEL``), on a CUDA machine.

    python -m zo2_ds.estimate --check opt-13b --batch 1x2048
    python -m zo2_ds.estimate --check opt-175b --num_layers 6 --batch 1x2048

Measures the CUDA context first, builds the random-init model of the named ``zo2_ds.bench`` shape on the
device and the engine on it (as ``launch/bench_offload.py`` does), runs ``steps`` training steps, and prints
the estimate beside ``torch.cuda.max_memory_allocated``, NVML and ``engine.zo_runner.device_bytes()``, with
their ratios. On a CPU it runs the same steps on the CPU and compares the exact parts only (there is no NVML
there).

The context is measured in this process before anything in it touches the GPU: under ``python -m
zo2_ds.estimate --check`` that is a fresh process, so a child process would measure the same bytes for ten
more seconds of imports (and NVML counts the whole device, so a child could not tell its context from a
parent's that used the GPU before). The estimate then uses the measured context, unless
``cuda_context_bytes`` is given, and the result shows :data:`~zo2_ds.estimate.CUDA_CONTEXT_BYTES` beside it
with the NVML ratio the constant would have given. Where this process used CUDA before ``check`` (a
library call), nothing is measured and the constant (or the given figure) is used.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from zo2_ds.estimate import CUDA_CONTEXT_BYTES, estimate

__all__ = ["check", "format_check"]

_GIB = 1024**3
_CPU_CHECK_LIMIT_BYTES = 2 * _GIB  # without CUDA the model is built and trained on the CPU: keep it small


def check(
    model: str,
    *,
    steps: int = 3,
    num_layers: int | None = None,
    cuda_context_bytes: int | str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Estimate, then measure one engine of ``model`` (a ``zo2_ds.bench`` shape) with the same options."""
    from zo2_ds.bench import driver, measure
    from zo2_ds.bench.models import DTYPES, SHAPES, build_model, make_batch

    if model not in SHAPES:
        raise ValueError(f"--check: model {model!r} must be a zo2_ds.bench shape, one of {', '.join(sorted(SHAPES))}")
    if steps < 1:
        raise ValueError(f"--steps: {steps!r} must be at least 1")
    on_cuda = torch.cuda.is_available()
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as the benchmarks run
    measured_context = measure.cuda_context_bytes() if on_cuda and not torch.cuda.is_initialized() else None
    context = measured_context if cuda_context_bytes is None else cuda_context_bytes
    est = estimate(
        model, num_layers=num_layers, device="cuda" if on_cuda else "cpu", cuda_context_bytes=context, **options
    )
    if cuda_context_bytes is None and measured_context is not None:
        est = dataclasses.replace(est, context_source="measured")
    if est.partition == "node" or est.perturbation_parallel > 1:
        raise ValueError(
            "--check builds one engine in one process: it cannot check partitioned masters or perturbation groups "
            "(give --partition none and --perturbation_parallel 1, or --num_gpus 1)"
        )
    if not on_cuda and est.exact_bytes + est.host_bytes_per_rank > _CPU_CHECK_LIMIT_BYTES:
        raise ValueError(
            f"--check: {model} would be built on this machine's CPU ({est.num_params / 1e9:.1f}B parameters); "
            "run --check on a CUDA machine, or pick a small shape here (tiny, tiny-llama, opt-125m)"
        )
    name = model
    if num_layers is not None:  # a truncated copy of the shape, registered for build_model / make_batch
        name = f"{model}-{num_layers}-blocks"
        SHAPES[name] = dataclasses.replace(SHAPES[model], name=name, num_layers=num_layers)
    try:
        device = driver.select_device()
        net = build_model(name, device, DTYPES[est.dtype])
        offload = None
        if est.offload:
            offload = {
                k: options[k]
                for k in ("prefetch_depth", "granularity", "transfer_dtype", "write_back_interval")
                if k in options
            }
            offload.update({k: options[k] for k in ("num_resident_blocks", "max_gpu_memory") if options.get(k)})
            offload["enabled"] = True
        config = driver.engine_config(est.batch_size, est.dtype, offload=offload)
        config["zo2"]["num_perturbations"] = est.num_perturbations
        config["zo2"]["vocab_chunks"] = options.get("vocab_chunks", "auto")
        engine = driver.build_engine(net, config)
        batch = make_batch(name, est.batch_size, est.seq_len, device)
        measure.reset_peak_memory()
        step = driver.zo_step(engine, batch)
        for _ in range(steps):
            step()
        measure.sync()
        measured = dict(measure.device_memory())
        budget = getattr(engine.zo_runner, "device_bytes", None)
        measured["device_parts"] = dict(budget()) if callable(budget) else None
        driver.finish(engine)
    finally:
        SHAPES.pop(f"{model}-{num_layers}-blocks", None)
    return _compare(est.as_dict(), measured, measured_context)


def _compare(est: dict[str, Any], measured: dict[str, Any], measured_context: int | None) -> dict[str, Any]:
    ratios = {}
    for key, measured_key in (("peak_allocated_bytes", "peak_allocated_bytes"), ("nvml_bytes", "nvml_used_bytes")):
        if measured.get(measured_key):
            ratios[key] = est[key] / measured[measured_key]
    exact_match = None
    if measured.get("device_parts") is not None and est["offload"]:
        exact_match = measured["device_parts"] == est["device_parts"]
    context = {
        "constant_bytes": CUDA_CONTEXT_BYTES,
        "measured_bytes": measured_context,
        "used_bytes": est["context_bytes"],
        "source": est["context_source"],
        "nvml_ratio_with_constant": None,
    }
    if measured.get("nvml_used_bytes") and est["context_source"] != "none":
        with_constant = est["nvml_bytes"] - est["context_bytes"] + CUDA_CONTEXT_BYTES
        context["nvml_ratio_with_constant"] = with_constant / measured["nvml_used_bytes"]
    return {
        "estimate": est,
        "measured": {**measured, "cuda_context_bytes": measured_context},
        "ratios": ratios,
        "exact_parts_match": exact_match,
        "context": context,
    }


def format_check(result: dict[str, Any]) -> str:
    est, measured = result["estimate"], result["measured"]
    lines = [f"{est['model']} {est['batch_size']}x{est['seq_len']} {est['dtype']}: estimate / measured"]
    for key, measured_key in (("peak_allocated_bytes", "peak_allocated_bytes"), ("nvml_bytes", "nvml_used_bytes")):
        value = measured.get(measured_key)
        shown = f"{value / _GIB:.3f} GiB" if value else "n/a"
        ratio = result["ratios"].get(key)
        lines.append(
            f"  {key:<22}{est[key] / _GIB:8.3f} GiB / {shown:>12}" + (f"   ratio {ratio:.3f}" if ratio else "")
        )
    context = result["context"]
    if context["source"] != "none":
        shown = f"{context['measured_bytes'] / _GIB:.3f} GiB" if context["measured_bytes"] else "not measured"
        lines.append(
            f"  CUDA context: measured {shown}, constant {context['constant_bytes'] / _GIB:.3f} GiB; "
            f"the estimate used {context['used_bytes'] / _GIB:.3f} GiB ({context['source']})"
        )
        if context["nvml_ratio_with_constant"]:
            lines.append(f"  NVML ratio with the constant context {context['nvml_ratio_with_constant']:.3f}")
    lines.append(f"  exact parts equal engine.zo_runner.device_bytes(): {result['exact_parts_match']}")
    return "\n".join(lines)
