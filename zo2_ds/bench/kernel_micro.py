"""The fused ZO kernels against a device copy of the same bytes (their bandwidth ceiling) and against
MeZO's per-tensor ``torch.normal`` + ``add_`` (CUDA only).

Uses ``zo2_ds.kernels.perturbed_into`` / ``apply_update_`` where the installed zo2_ds has them (feature-
detected: a case the checkout lacks is recorded with its error, the others still run).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

from zo2_ds.bench.measure import time_calls

__all__ = ["KERNEL_SIZES", "kernel_records"]

# OPT-1.3B's embedding, fc1 and q_proj.
KERNEL_SIZES = (50272 * 2048, 8192 * 2048, 2048 * 2048)


def _cases(numel: int, dtype: torch.dtype) -> dict[str, tuple[Callable[[], Any], int]]:
    """{name: (call, bytes moved per element)}."""
    from zo2_ds import kernels

    theta = torch.randn(numel, device="cuda", dtype=dtype)
    out = torch.empty_like(theta)
    size = theta.element_size()

    def mezo_pattern() -> None:
        theta.add_(torch.normal(0.0, 1.0, size=theta.shape, device="cuda", dtype=dtype), alpha=1e-9)

    cases = {"copy": (lambda: out.copy_(theta), 2 * size), "mezo_normal_add": (mezo_pattern, 6 * size)}
    if hasattr(kernels, "perturbed_into"):
        cases["perturb"] = (lambda: kernels.perturbed_into(out, theta, 12345, 1e-3), 2 * size)
    if hasattr(kernels, "apply_update_"):
        cases["update_q1"] = (lambda: kernels.apply_update_(theta, [12345], [1e-9], 1.0, 0.0), 2 * size)
    return cases


def kernel_records(warmup: int = 3, steps: int = 20, calls_per_sample: int = 20) -> list[dict[str, Any]]:
    """One record per (size, dtype, case): ms of one call (the median sample of ``calls_per_sample``
    back-to-back calls, divided), GB/s moved, time over a copy's."""
    if not torch.cuda.is_available():
        return [{"case": "all", "error": "the kernel microbenchmark needs CUDA"}]
    records = []
    for numel in KERNEL_SIZES:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            copy_ms = None
            for name, (call, bytes_per_element) in _cases(numel, dtype).items():
                rec: dict[str, Any] = {"case": name, "numel": numel, "dtype": str(dtype).removeprefix("torch.")}
                try:
                    sample = time_calls(lambda c=call: [c() for _ in range(calls_per_sample)], warmup, steps)
                    ms = statistics.median(sample) / calls_per_sample
                except Exception as exc:  # one failing case must not hide the others
                    records.append({**rec, "error": repr(exc)})
                    continue
                copy_ms = ms if name == "copy" else copy_ms
                rec.update(ms=ms, gb_per_s=numel * bytes_per_element / ms / 1e6, vs_copy=ms / copy_ms)
                records.append(rec)
            torch.cuda.empty_cache()
    return records
