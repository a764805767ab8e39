"""Host side of :mod:`zo2_ds.kernels`: argument checks, the coefficients' form, and the launch path (through
triton's dispatcher the first time, directly afterwards)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from zo2_ds.kernels_triton import FAST_MATH, INTERPRET, NUM_WARPS, PHILOX_ROUNDS, ROW, triton, zo_kernel
from zo2_ds.zo import DeviceCoefs

__all__ = [
    "SUPPORTED_DTYPES",
    "check_tensor",
    "check_out",
    "coef_args",
    "launch",
    "kernel_args",
    "run_kernel",
    "set_direct_launch",
    "direct_launches",
    "as_signed64",
    "is_i32",
]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: dtype {t.dtype} not supported; expected one of {SUPPORTED_DTYPES}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: the fused kernels need a contiguous tensor (z is keyed by the flat index)")
    if t.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"{name}: the fused kernels need a CUDA tensor, got device {t.device}")
    if triton is None:
        raise RuntimeError("zo2_ds.kernels: triton is not available; use the torch path in zo2_ds.zo")


def check_out(out: torch.Tensor, theta: torch.Tensor, name: str) -> None:
    if isinstance(out, torch.Tensor) and out.shape != theta.shape or out.device != theta.device:
        raise ValueError(
            f"{name}: shape {tuple(out.shape)} on {out.device} does not match theta's {tuple(theta.shape)} "
            f"on {theta.device}"
        )
    check_tensor(out, name)


def coef_args(coefs: Sequence[float] | torch.Tensor, q: int, device: torch.device) -> tuple[tuple, torch.Tensor | None]:
    """(scalar coefs for the kernel, device tensor of coefs or None), without any host sync.

    Python floats travel as kernel arguments; coefficients already on the GPU (g_i before any
    ``.item()``) are read by the kernel from a small fp32 tensor ``[c_0, ..., c_{q-1}, gate]``: a
    :class:`zo2_ds.zo.DeviceCoefs` is that tensor; q plain values get the gate 1.0 appended.
    """
    if isinstance(coefs, DeviceCoefs):
        if len(coefs) != q:
            raise ValueError(f"need one coefficient per seed, got {q} seeds and {len(coefs)} coefs")
        values = coefs.values
    else:
        if isinstance(coefs, torch.Tensor):
            values = coefs.reshape(-1)
        elif any(isinstance(c, torch.Tensor) and c.device.type != "cpu" for c in coefs):
            values = torch.stack([torch.as_tensor(c, device=device).reshape(()) for c in coefs])
        else:
            return tuple(float(c) for c in coefs), None
        if values.numel() != q:
            raise ValueError(f"need one coefficient per seed, got {q} seeds and {values.numel()} coefs")
        values = torch.cat([values.to(torch.float32), values.new_ones(1, dtype=torch.float32)])
    if values.device != device:
        raise ValueError(f"coefs on {values.device}, theta on {device}")
    return (0.0,) * q, values  # fp32 and contiguous: made so above, or a DeviceCoefs


def kernel_args(
    update: tuple[Sequence[int], Sequence[float] | torch.Tensor, float, float] | None,
    outs: Sequence[torch.Tensor],
    scales: Sequence[float],
    dummy: torch.Tensor,
    device: torch.device,
    as_int: Any,
) -> tuple:
    """The kernels' update and output arguments: (seeds or pass hashes through ``as_int``, scalar coefs,
    coefficient pointer (``dummy`` unless the coefs are on the device), -lr, weight decay, out0, out1,
    scale0, scale1); ``dummy`` also stands in for missing outputs."""
    seeds, scalar_coefs, coef_ptr, neg_lr, weight_decay = (0,), (0.0,), dummy, 0.0, 0.0
    if update is not None:
        seeds, coefs, lr, weight_decay = update
        if len(seeds) == 0:
            raise ValueError("update needs at least one seed")
        seeds = tuple(as_int(int(s)) for s in seeds)
        scalar_coefs, coef_tensor = coef_args(coefs, len(seeds), device)
        coef_ptr = dummy if coef_tensor is None else coef_tensor
        neg_lr, weight_decay = -float(lr), float(weight_decay)
    out0 = outs[0] if outs else dummy
    out1 = outs[1] if len(outs) > 1 else out0
    scale0 = float(scales[0]) if scales else 0.0
    scale1 = float(scales[1]) if len(scales) > 1 else 0.0
    return seeds, scalar_coefs, coef_ptr, neg_lr, weight_decay, out0, out1, scale0, scale1


def launch(
    theta: torch.Tensor,
    outs: Sequence[torch.Tensor] = (),
    scales: Sequence[float] = (),
    pert_seed: int = 0,
    update: tuple[Sequence[int], Sequence[float] | torch.Tensor, float, float] | None = None,
    read_theta: bool = True,
    group_offset: int = 0,
    *,
    rounds: int = PHILOX_ROUNDS,
    fast_math: bool = FAST_MATH,
    num_warps: int = NUM_WARPS,
) -> Any:
    """Launch `zo_kernel` (arguments already validated); returns triton's compiled-kernel handle. ``group_offset``:
    theta is a slice of a tensor starting at that 4 x ROW group of it, and takes those elements' z.
    The keyword-only knobs exist for benchmarks: ``rounds`` and ``fast_math`` change z itself, so
    production calls leave them alone."""
    numel = theta.numel()
    if numel == 0:
        return None
    seeds, coefs, coef_ptr, neg_lr, weight_decay, out0, out1, scale0, scale1 = kernel_args(
        update, outs, scales, theta, theta.device, int
    )
    q, on_device = len(seeds) if update is not None else 0, coef_ptr is not theta
    pert_seed = int(pert_seed)
    group = 4 * ROW
    grid = ((numel + group - 1) // group, 1, 1)
    args = (theta, out0, out1, coef_ptr, numel, int(group_offset), seeds, coefs, neg_lr, weight_decay, pert_seed,
            scale0, scale1)  # fmt: skip
    index_64 = (numel + group) + group_offset * group > 2**31 - 1  # the counters of a slice far into its tensor
    constexprs = (q, on_device, len(outs), read_theta, index_64, ROW, rounds, fast_math)
    # Everything triton specialises a compiled kernel on, for these arguments (see `run_kernel`).
    specialisation = (
        theta.dtype, out0.dtype, out1.dtype, coef_ptr.dtype,
        theta.data_ptr() % 16 == 0, out0.data_ptr() % 16 == 0, out1.data_ptr() % 16 == 0,
        coef_ptr.data_ptr() % 16 == 0, numel == 1, numel % 16 == 0, numel > 2**31 - 1,
        pert_seed > 2**31 - 1, tuple(s > 2**31 - 1 for s in seeds), group_offset > 2**31 - 1,
    )  # fmt: skip
    return run_kernel("single", zo_kernel, grid, theta.device.index, args, constexprs, num_warps, specialisation)


# Direct launches. Triton's own launch path (JITFunction.run) costs ~20 us of host time per call,
# mostly re-deriving the specialisation key (str() of the options, for one); an OPT step makes ~3
# launches per parameter tensor (~1200 for OPT-1.3B), which would make small-batch steps CPU-bound.
# So the first launch of each specialisation goes through triton (compiling if needed) and the
# compiled kernel is kept under a key holding everything triton specialises on (device, dtypes, 16-byte
# alignment of each pointer, numel == 1 / divisible by 16 / 64-bit, 64-bit seeds, the constexprs);
# later launches call the compiled kernel's launcher directly. This uses triton's CompiledKernel
# internals (`run`, `function`, `packed_metadata`, as JITFunction.run does in triton 3.x): any
# failure turns the direct path off for the process and falls back to triton's own launch.
_DIRECT_CACHE: dict[tuple, Any] = {}
# Benchmarks switch the direct path off to measure triton's own launch (set_direct_launch).
_DIRECT_STATE = {"enabled": True, "launches": 0}


def run_kernel(
    name: str,
    kernel: Any,
    grid: tuple[int, int, int],
    device_index: int,
    args: tuple,
    constexprs: tuple,
    num_warps: int,
    specialisation: tuple,
) -> Any:
    """Launch ``kernel`` (``name``: its key in the cache of compiled kernels) on ``grid``: through triton the
    first time for a specialisation (compiling if needed), directly afterwards; under the interpreter, or on
    another device than the current one, through triton."""
    if INTERPRET:
        return kernel[grid](*args, *constexprs, num_warps=num_warps)
    if device_index != torch.cuda.current_device():
        with torch.cuda.device(device_index):  # triton launches on the current device
            return kernel[grid](*args, *constexprs, num_warps=num_warps)
    key = (name, constexprs, num_warps, device_index, *specialisation)
    compiled = _DIRECT_CACHE.get(key)
    if compiled is not None and _direct_launch(compiled, grid, device_index, args + constexprs):
        return compiled
    compiled = kernel[grid](*args, *constexprs, num_warps=num_warps)
    _DIRECT_CACHE[key] = compiled
    return compiled


def direct_launches() -> int:
    """How many launches took the direct path so far (tests and benchmarks)."""
    return _DIRECT_STATE["launches"]


def set_direct_launch(enabled: bool) -> None:
    """Use the direct launch path (default) or triton's own launcher for every later launch (benchmarks)."""
    _DIRECT_STATE["enabled"] = bool(enabled)


def _direct_launch(compiled: Any, grid: tuple[int, int, int], device_index: int, all_args: tuple) -> bool:
    """Launch ``compiled`` without triton's dispatcher; False (and nothing launched) if unavailable."""
    hook = triton.knobs.runtime.launch_enter_hook  # a HookChain in triton 3.6 (a function or None before)
    if not _DIRECT_STATE["enabled"] or getattr(hook, "calls", hook):
        return False  # a launch hook (e.g. triton's profiler) is installed: let triton call it
    try:
        stream = torch._C._cuda_getCurrentRawStream(device_index)
        compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None, None, None,
                     *all_args)  # fmt: skip
    except (AttributeError, TypeError) as exc:  # triton internals changed: use its public path from now on
        _DIRECT_STATE["enabled"] = False
        import warnings

        warnings.warn(f"zo2_ds.kernels: direct launch unavailable ({exc!r}); using triton's launcher", stacklevel=3)
        return False
    _DIRECT_STATE["launches"] += 1
    return True


def as_signed64(value: int) -> int:
    """A 64-bit value as the signed int triton passes as i64 (the kernels bitcast it back)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def is_i32(value: int) -> bool:
    return -(2**31) <= value <= 2**31 - 1
