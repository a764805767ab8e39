"""Fused Triton kernels for the ZO maths on CUDA: perturb, update, and update-then-perturb in one pass.

Same formulas as the torch path in :mod:`zo2_ds.zo` (fp32 arithmetic, one rounding to the output dtype),
but z is never materialised: each kernel regenerates z from the seed in registers, so a perturbation reads
theta once and writes the output once (4 bytes per element for fp16), and an update reads and writes theta
once, whatever the number q of perturbations folded into it.

Definition of z. For a tensor of ``numel`` elements (flat, row-major; only contiguous tensors are
accepted) and a 63-bit seed from :func:`zo2_ds.zo.z_seed`:

    element i -> group g = i // (4 ROW), quarter j = (i // ROW) % 4, lane k = i % ROW, ROW = 1024
    counter c = g * ROW + k
    x0, x1, x2, x3 = Philox4x32-7(key = seed, counter = (c mod 2^32, c >> 32, 0, 0))    (Triton's randint4x)
    (n0, n1) = BoxMuller(x0, x1),  (n2, n3) = BoxMuller(x2, x3),   z[i] = n_j

so one Philox call yields z for four elements, one in each quarter of a 4 x ROW group. The group layout
is part of the definition (not a launch parameter): z depends on (seed, i) only, not on block sizes,
warps or grid, nor on the tensor's size (a prefix of a longer tensor gets the same z).

Seed handling. Triton's ``philox`` converts the seed to uint64 and, for 32-bit counters, uses its low
and high 32-bit halves as the two key words, so all 63 bits of the seed select the stream. (Triton types
a Python int kernel argument i32 or i64 by value; the value reaching the key is the same either way.)

Box-Muller. The top 23 bits of a uint32 are written straight into the mantissa of a float in [1, 2)
(no integer-to-float conversion, a quarter-rate instruction on NVIDIA GPUs); u = 2 - f in (0, 1] feeds
the log (never log(0); |z| <= 5.65) and f - 1 in [0, 1) the angle. ``log2``, ``sin``, ``cos`` use the
GPU's special-function units (``lg2.approx`` / ``sin.approx`` / ``cos.approx``, about 2^-21 absolute
error on this range): z is deterministic on a given GPU architecture, the property that DP ranks and the
offloader rely on. Under ``TRITON_INTERPRET=1`` (CPU debugging) numpy's precise functions stand in, so
values differ in the last bits there.

Multi-tensor launches. :class:`TensorTable` describes a fixed list of same-dtype tensors on the device
(data pointers, sizes, z keys, decay flags, and a program -> (tensor, chunk) map), built once; then one
launch perturbs every tensor of the list into one flat scratch (:func:`perturbed_into_multi`) or updates
every tensor (:func:`apply_update_multi_`). Each program handles one 4 x ROW group of one tensor with the
same helpers as the single-tensor kernel, and computes that tensor's seed itself with the last splitmix64
link of :func:`zo2_ds.zo.z_seed` (``z_seed_from_pass(pass_hash, key)``), so the host passes one 64-bit
pass hash per perturbation, nothing per tensor, and each tensor's z is exactly the single-tensor z.

Rounding. All maths is fp32 with explicit ``fma`` where a product meets a sum, so the compiler cannot
contract differently in different kernels; every entry point runs the same ``@triton.jit`` helpers inside
one kernel body, and :func:`update_and_perturb_` rounds the updated theta to its dtype before perturbing
it, exactly as :func:`apply_update_` followed by :func:`perturbed_into` would: the fused call is
bit-identical to the separate calls.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "available",
    "generate_z",
    "perturbed_into",
    "apply_update_",
    "update_and_perturb_",
    "TensorTable",
    "perturbed_into_multi",
    "apply_update_multi_",
    "update_and_perturb_multi_",
    "z_seeds_from_pass",
    "set_direct_launch",
    "INTERPRET",
    "SUPPORTED_DTYPES",
]

_ROW = 1024  # part of z's definition (see module docstring): changing it changes every z
# Philox4x32-7: seven rounds pass TestU01's BigCrush (Salmon et al., SC'11, "Random123"); cuRAND and torch
# use ten as a safety margin. Measured on an H200 (launch/benchmarks/): 10 rounds made the fp16 perturbation
# compute-bound (1.25x a copy of the same bytes), 7 rounds run at copy speed (1.04x).
_PHILOX_ROUNDS = 7
_NUM_WARPS = 4  # 1024 lanes / 128 threads = 8 elements a thread per quarter: 16-byte fp16 loads
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's own switch: its CPU interpreter
_FAST_MATH = not INTERPRET  # the interpreter cannot run libdevice calls
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_wanted() -> bool:
    """Import triton only where it can run: a CUDA machine, or the CPU interpreter when asked for."""
    try:
        if importlib.util.find_spec("triton") is None:
            return False
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] = None, as tests do to hide it
        return False
    return INTERPRET or torch.cuda.is_available()


if _triton_wanted():
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    _jit = triton.jit
else:  # CPU machine: the module still imports; the kernels below are plain functions never launched.
    triton = tl = libdevice = None

    def _jit(fn=None, **_kwargs):
        return fn if fn is not None else (lambda f: f)


@functools.cache
def available() -> bool:
    """True when the fused kernels can run: triton importable and a CUDA device present (or Triton's CPU
    interpreter, ``TRITON_INTERPRET=1``). Whether they are used is :class:`zo2_ds.ops.Ops`'s choice."""
    return triton is not None and (torch.cuda.is_available() or INTERPRET)


# ---------------------------------------------------------------------------------------------------
# Device code. One kernel body (`_zo_kernel`) serves every entry point; constexpr flags select the
# parts, so the arithmetic of a fused call is the arithmetic of the separate calls by construction.
# ---------------------------------------------------------------------------------------------------


@_jit
def _box_muller(bits_a, bits_b, FAST_MATH: tl.constexpr):
    """Two independent N(0, 1) floats from two uint32 random words."""
    # 23 random bits as the mantissa of a float in [1, 2): exact, and no int->float conversion.
    f_a = ((bits_a >> 9) | 0x3F800000).to(tl.float32, bitcast=True)
    f_b = ((bits_b >> 9) | 0x3F800000).to(tl.float32, bitcast=True)
    u_radius = 2.0 - f_a  # (0, 1], exact (Sterbenz)
    angle = 6.283185307179586 * (f_b - 1.0)  # [0, 2 pi)
    if FAST_MATH:  # special-function units: one instruction each instead of a libm-style polynomial
        log2_u = libdevice.fast_log2f(u_radius)
        cos_a = libdevice.fast_cosf(angle)
        sin_a = libdevice.fast_sinf(angle)
    else:
        log2_u = tl.log2(u_radius)
        cos_a = tl.cos(angle)
        sin_a = tl.sin(angle)
    radius = tl.sqrt(-1.3862943611198906 * log2_u)  # sqrt(-2 ln u) = sqrt(-2 ln(2) log2(u))
    return radius * cos_a, radius * sin_a


@_jit
def _normal4(seed, counter, ROUNDS: tl.constexpr, FAST_MATH: tl.constexpr):
    """z for the four quarters of a group at lanes ``counter`` (one Philox call per lane)."""
    x0, x1, x2, x3 = tl.randint4x(seed, counter, ROUNDS)
    n0, n1 = _box_muller(x0, x1, FAST_MATH)
    n2, n3 = _box_muller(x2, x3, FAST_MATH)
    return n0, n1, n2, n3


@_jit
def _coef(coefs, coef_ptr, i: tl.constexpr, COEFS_ON_DEVICE: tl.constexpr):
    if COEFS_ON_DEVICE:  # g_i still on the GPU (no host sync): one scalar load, cached in L1/L2
        return tl.load(coef_ptr + i).to(tl.float32)
    else:
        return coefs[i]


@_jit
def _direction(
    seeds,
    coefs,
    coef_ptr,
    counter,
    Q: tl.constexpr,
    COEFS_ON_DEVICE: tl.constexpr,
    ROUNDS: tl.constexpr,
    FAST_MATH: tl.constexpr,
):
    """sum_i coefs[i] * z(seeds[i]) for the four quarters, summed in order i (unrolled over Q)."""
    c = _coef(coefs, coef_ptr, 0, COEFS_ON_DEVICE)
    n0, n1, n2, n3 = _normal4(seeds[0], counter, ROUNDS, FAST_MATH)
    d0, d1, d2, d3 = c * n0, c * n1, c * n2, c * n3
    for i in tl.static_range(1, Q):
        c = _coef(coefs, coef_ptr, i, COEFS_ON_DEVICE)
        n0, n1, n2, n3 = _normal4(seeds[i], counter, ROUNDS, FAST_MATH)
        d0, d1, d2, d3 = tl.fma(c, n0, d0), tl.fma(c, n1, d1), tl.fma(c, n2, d2), tl.fma(c, n3, d3)
    return d0, d1, d2, d3


@_jit
def _load_f32(ptr, offs, numel, READ: tl.constexpr):
    mask = offs < numel
    if READ:
        return tl.load(ptr + offs, mask=mask).to(tl.float32)
    else:
        return tl.zeros(offs.shape, tl.float32)


@_jit
def _update_store(theta_ptr, offs, numel, theta, direction, neg_lr, weight_decay):
    """theta - lr * (direction + wd * theta), rounded to theta's dtype and stored; returns it as fp32."""
    new = tl.fma(neg_lr, tl.fma(weight_decay, theta, direction), theta)
    new = new.to(theta_ptr.dtype.element_ty)
    tl.store(theta_ptr + offs, new, mask=offs < numel)
    return new.to(tl.float32)


@_jit
def _perturb_store(out_ptr, offs, numel, theta, z, scale):
    """theta + scale * z, rounded once to out's dtype."""
    tl.store(out_ptr + offs, tl.fma(scale, z, theta).to(out_ptr.dtype.element_ty), mask=offs < numel)


@_jit(do_not_specialize=["seeds", "pert_seed"])
def _zo_kernel(
    theta_ptr, out0_ptr, out1_ptr, coef_ptr, numel,
    seeds, coefs, neg_lr, weight_decay,  # the update (used when Q > 0)
    pert_seed, scale0, scale1,  # the perturbation (used when NUM_OUTS > 0)
    Q: tl.constexpr, COEFS_ON_DEVICE: tl.constexpr, NUM_OUTS: tl.constexpr, READ_THETA: tl.constexpr,
    INDEX_64: tl.constexpr, ROW: tl.constexpr, ROUNDS: tl.constexpr, FAST_MATH: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    if INDEX_64:  # tensors near or past 2^31 elements: int32 offsets would wrap
        pid = pid.to(tl.int64)
    lane = tl.arange(0, ROW)
    counter = pid * ROW + lane
    o0 = pid * (4 * ROW) + lane
    o1 = o0 + ROW
    o2 = o0 + 2 * ROW
    o3 = o0 + 3 * ROW
    # Issue all four loads before the Philox arithmetic, so the memory latency hides behind it.
    t0 = _load_f32(theta_ptr, o0, numel, READ_THETA)
    t1 = _load_f32(theta_ptr, o1, numel, READ_THETA)
    t2 = _load_f32(theta_ptr, o2, numel, READ_THETA)
    t3 = _load_f32(theta_ptr, o3, numel, READ_THETA)
    if Q > 0:
        d0, d1, d2, d3 = _direction(seeds, coefs, coef_ptr, counter, Q, COEFS_ON_DEVICE, ROUNDS, FAST_MATH)
        t0 = _update_store(theta_ptr, o0, numel, t0, d0, neg_lr, weight_decay)
        t1 = _update_store(theta_ptr, o1, numel, t1, d1, neg_lr, weight_decay)
        t2 = _update_store(theta_ptr, o2, numel, t2, d2, neg_lr, weight_decay)
        t3 = _update_store(theta_ptr, o3, numel, t3, d3, neg_lr, weight_decay)
    if NUM_OUTS > 0:
        z0, z1, z2, z3 = _normal4(pert_seed, counter, ROUNDS, FAST_MATH)
        _perturb_store(out0_ptr, o0, numel, t0, z0, scale0)
        _perturb_store(out0_ptr, o1, numel, t1, z1, scale0)
        _perturb_store(out0_ptr, o2, numel, t2, z2, scale0)
        _perturb_store(out0_ptr, o3, numel, t3, z3, scale0)
        if NUM_OUTS > 1:
            _perturb_store(out1_ptr, o0, numel, t0, z0, scale1)
            _perturb_store(out1_ptr, o1, numel, t1, z1, scale1)
            _perturb_store(out1_ptr, o2, numel, t2, z2, scale1)
            _perturb_store(out1_ptr, o3, numel, t3, z3, scale1)


@_jit
def _mix64(x):
    """splitmix64's finaliser on uint64 (the constants of zo._mix64)."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB
    return x ^ (x >> 31)


@_jit
def _seed_from_pass(pass_hash, key):
    """zo.z_seed_from_pass on uint64 scalars: the tensor's 63-bit z seed."""
    return _mix64((pass_hash ^ key) + 0x9E3779B97F4A7C15) >> 1


@_jit
def _as_u64(x):
    """A 64-bit hash passed from the host as a signed int (typed i32 or i64 by triton) -> its uint64 bits."""
    return x.to(tl.int64).to(tl.uint64, bitcast=True)


@_jit
def _direction_keyed(
    pass_hashes, key, coefs, coef_ptr, counter,
    Q: tl.constexpr, COEFS_ON_DEVICE: tl.constexpr, ROUNDS: tl.constexpr, FAST_MATH: tl.constexpr,
):  # fmt: skip
    """`_direction` with the seeds derived in the kernel: seed_i = z_seed_from_pass(pass_hashes[i], key)."""
    c = _coef(coefs, coef_ptr, 0, COEFS_ON_DEVICE)
    n0, n1, n2, n3 = _normal4(_seed_from_pass(_as_u64(pass_hashes[0]), key), counter, ROUNDS, FAST_MATH)
    d0, d1, d2, d3 = c * n0, c * n1, c * n2, c * n3
    for i in tl.static_range(1, Q):
        c = _coef(coefs, coef_ptr, i, COEFS_ON_DEVICE)
        n0, n1, n2, n3 = _normal4(_seed_from_pass(_as_u64(pass_hashes[i]), key), counter, ROUNDS, FAST_MATH)
        d0, d1, d2, d3 = tl.fma(c, n0, d0), tl.fma(c, n1, d1), tl.fma(c, n2, d2), tl.fma(c, n3, d3)
    return d0, d1, d2, d3


@_jit(do_not_specialize=["pass_hashes", "pert_hash"])
def _zo_multi_kernel(
    chunk_tensor_ptr, chunk_start_ptr, theta_tab_ptr, numel_tab_ptr, key_tab_ptr, decay_tab_ptr, out_off_ptr,
    out0_ptr, out1_ptr, coef_ptr,
    pass_hashes, coefs, neg_lr, weight_decay,  # the update (used when Q > 0)
    pert_hash, scale0, scale1,  # the perturbation (used when NUM_OUTS > 0)
    Q: tl.constexpr, COEFS_ON_DEVICE: tl.constexpr, NUM_OUTS: tl.constexpr, ALIGNED: tl.constexpr,
    ROW: tl.constexpr, ROUNDS: tl.constexpr, FAST_MATH: tl.constexpr,
):  # fmt: skip
    """`_zo_kernel` over a TensorTable: program p handles group ``p - chunk_start[t]`` of tensor
    ``t = chunk_tensor[p]``, with the element indexing, counters and arithmetic of `_zo_kernel`."""
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + pid)
    chunk = pid.to(tl.int64) - tl.load(chunk_start_ptr + t)
    theta_ptr = tl.load(theta_tab_ptr + t).to(out0_ptr.dtype)  # out0 has the table's dtype (a dummy if no outs)
    numel = tl.load(numel_tab_ptr + t)
    key = tl.load(key_tab_ptr + t).to(tl.uint64, bitcast=True)
    if ALIGNED:  # every pointer 16-byte aligned and every numel a multiple of 16: vector loads/stores
        theta_ptr = tl.multiple_of(theta_ptr, 16)
        numel = tl.multiple_of(numel, 16)
    lane = tl.arange(0, ROW)
    counter = chunk * ROW + lane  # int64 here, int32 in `_zo_kernel`: randint4x gives the same bits
    o0 = chunk * (4 * ROW) + lane
    o1 = o0 + ROW
    o2 = o0 + 2 * ROW
    o3 = o0 + 3 * ROW
    t0 = _load_f32(theta_ptr, o0, numel, True)
    t1 = _load_f32(theta_ptr, o1, numel, True)
    t2 = _load_f32(theta_ptr, o2, numel, True)
    t3 = _load_f32(theta_ptr, o3, numel, True)
    if Q > 0:
        d0, d1, d2, d3 = _direction_keyed(pass_hashes, key, coefs, coef_ptr, counter, Q, COEFS_ON_DEVICE, ROUNDS,
                                          FAST_MATH)  # fmt: skip
        wd = weight_decay * tl.load(decay_tab_ptr + t)  # flag 1.0 or 0.0: wd or 0.0 exactly
        t0 = _update_store(theta_ptr, o0, numel, t0, d0, neg_lr, wd)
        t1 = _update_store(theta_ptr, o1, numel, t1, d1, neg_lr, wd)
        t2 = _update_store(theta_ptr, o2, numel, t2, d2, neg_lr, wd)
        t3 = _update_store(theta_ptr, o3, numel, t3, d3, neg_lr, wd)
    if NUM_OUTS > 0:
        z0, z1, z2, z3 = _normal4(_seed_from_pass(_as_u64(pert_hash), key), counter, ROUNDS, FAST_MATH)
        out_off = tl.load(out_off_ptr + t)
        if ALIGNED:
            out_off = tl.multiple_of(out_off, 16)
        out_ptr = out0_ptr + out_off
        _perturb_store(out_ptr, o0, numel, t0, z0, scale0)
        _perturb_store(out_ptr, o1, numel, t1, z1, scale0)
        _perturb_store(out_ptr, o2, numel, t2, z2, scale0)
        _perturb_store(out_ptr, o3, numel, t3, z3, scale0)
        if NUM_OUTS > 1:
            out_ptr = out1_ptr + out_off
            _perturb_store(out_ptr, o0, numel, t0, z0, scale1)
            _perturb_store(out_ptr, o1, numel, t1, z1, scale1)
            _perturb_store(out_ptr, o2, numel, t2, z2, scale1)
            _perturb_store(out_ptr, o3, numel, t3, z3, scale1)


@_jit
def _z_seeds_kernel(key_ptr, out_ptr, n, pass_hash, BLOCK: tl.constexpr):
    """For tests: out[i] = z_seed_from_pass(pass_hash, keys[i]) as computed inside the kernels."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keys = tl.load(key_ptr + offs, mask=offs < n).to(tl.uint64, bitcast=True)
    seeds = _seed_from_pass(_as_u64(pass_hash), keys)
    tl.store(out_ptr + offs, seeds.to(tl.int64, bitcast=True), mask=offs < n)


# ---------------------------------------------------------------------------------------------------
# Host side: validation and launch.
# ---------------------------------------------------------------------------------------------------


def _check_tensor(t: torch.Tensor, name: str) -> None:
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


def _check_out(out: torch.Tensor, theta: torch.Tensor, name: str) -> None:
    if isinstance(out, torch.Tensor) and out.shape != theta.shape or out.device != theta.device:
        raise ValueError(
            f"{name}: shape {tuple(out.shape)} on {out.device} does not match theta's {tuple(theta.shape)} "
            f"on {theta.device}"
        )
    _check_tensor(out, name)


def _coef_args(
    coefs: Sequence[float] | torch.Tensor, q: int, device: torch.device
) -> tuple[tuple, torch.Tensor | None]:
    """(scalar coefs for the kernel, device tensor of coefs or None), without any host sync.

    Python floats travel as kernel arguments; coefficients already on the GPU (g_i before any
    ``.item()``) are read by the kernel from a small fp32 tensor.
    """
    if isinstance(coefs, torch.Tensor):
        values = coefs.reshape(-1)
    elif any(isinstance(c, torch.Tensor) and c.device.type != "cpu" for c in coefs):
        values = torch.stack([torch.as_tensor(c, device=device).reshape(()) for c in coefs])
    else:
        return tuple(float(c) for c in coefs), None
    if values.numel() != q:
        raise ValueError(f"need one coefficient per seed, got {q} seeds and {values.numel()} coefs")
    if values.device != device:
        raise ValueError(f"coefs on {values.device}, theta on {device}")
    return (0.0,) * q, values.to(torch.float32).contiguous()


def _launch(
    theta: torch.Tensor,
    outs: Sequence[torch.Tensor] = (),
    scales: Sequence[float] = (),
    pert_seed: int = 0,
    update: tuple[Sequence[int], Sequence[float] | torch.Tensor, float, float] | None = None,
    read_theta: bool = True,
    *,
    rounds: int = _PHILOX_ROUNDS,
    fast_math: bool = _FAST_MATH,
    num_warps: int = _NUM_WARPS,
) -> Any:
    """Launch `_zo_kernel` (arguments already validated); returns triton's compiled-kernel handle.
    The keyword-only knobs exist for benchmarks: ``rounds`` and ``fast_math`` change z itself, so
    production calls leave them alone."""
    numel = theta.numel()
    if numel == 0:
        return None
    q, seeds, scalar_coefs, coef_tensor, neg_lr, weight_decay = 0, (0,), (0.0,), None, 0.0, 0.0
    if update is not None:
        seeds, coefs, lr, weight_decay = update
        q = len(seeds)
        if q == 0:
            raise ValueError("update needs at least one seed")
        seeds = tuple(int(s) for s in seeds)
        scalar_coefs, coef_tensor = _coef_args(coefs, q, theta.device)
        neg_lr, weight_decay = -float(lr), float(weight_decay)
    out0 = outs[0] if outs else theta
    out1 = outs[1] if len(outs) > 1 else out0
    coef_ptr = theta if coef_tensor is None else coef_tensor
    scale0 = float(scales[0]) if scales else 0.0
    scale1 = float(scales[1]) if len(scales) > 1 else 0.0
    pert_seed = int(pert_seed)
    group = 4 * _ROW
    grid = ((numel + group - 1) // group, 1, 1)
    args = (theta, out0, out1, coef_ptr, numel, seeds, scalar_coefs, neg_lr, weight_decay, pert_seed, scale0, scale1)
    constexprs = (q, coef_tensor is not None, len(outs), read_theta, numel + group > 2**31 - 1, _ROW, rounds, fast_math)
    if INTERPRET:
        return _zo_kernel[grid](*args, *constexprs, num_warps=num_warps)
    device_index = theta.device.index
    if device_index != torch.cuda.current_device():
        with torch.cuda.device(device_index):  # triton launches on the current device
            return _zo_kernel[grid](*args, *constexprs, num_warps=num_warps)
    # Everything triton specialises a compiled kernel on, for these arguments (see `_direct_launch`).
    key = (
        constexprs, num_warps, device_index, theta.dtype, out0.dtype, out1.dtype, coef_ptr.dtype,
        theta.data_ptr() % 16 == 0, out0.data_ptr() % 16 == 0, out1.data_ptr() % 16 == 0,
        coef_ptr.data_ptr() % 16 == 0, numel == 1, numel % 16 == 0, numel > 2**31 - 1,
        pert_seed > 2**31 - 1, tuple(s > 2**31 - 1 for s in seeds),
    )  # fmt: skip
    compiled = _DIRECT_CACHE.get(key)
    if compiled is not None and _direct_launch(compiled, grid, device_index, args + constexprs):
        return compiled
    compiled = _zo_kernel[grid](*args, *constexprs, num_warps=num_warps)
    _DIRECT_CACHE[key] = compiled
    return compiled


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


# ---------------------------------------------------------------------------------------------------
# Public API: the zo.py functions, on CUDA.
# ---------------------------------------------------------------------------------------------------


def generate_z(seed: int, shape: Sequence[int] | torch.Size, device: torch.device | str) -> torch.Tensor:
    """Materialise z (fp32) for a tensor of ``shape``: for tests and debugging; the kernels never do."""
    z = torch.empty(tuple(shape), dtype=torch.float32, device=device)
    _check_tensor(z, "z")
    _launch(z, outs=(z,), scales=(1.0,), pert_seed=seed, read_theta=False)  # fma(1, z, 0) == z exactly
    return z


def perturbed_into(out: torch.Tensor, theta: torch.Tensor, seed: int, scale: float) -> torch.Tensor:
    """``out = theta + scale * z(seed)`` in one pass (theta is only read; ``out`` may be ``theta``)."""
    _check_tensor(theta, "theta")
    _check_out(out, theta, "out")
    _launch(theta, outs=(out,), scales=(scale,), pert_seed=seed)
    return out


def apply_update_(
    theta: torch.Tensor,
    seeds: Sequence[int],
    coefs: Sequence[float] | torch.Tensor,
    lr: float,
    weight_decay: float,
) -> torch.Tensor:
    """In place, one pass: ``theta = theta - lr * (sum_i coefs[i] * z(seeds[i]) + weight_decay * theta)``.

    ``coefs``: Python floats (passed as kernel arguments), or a 1-D fp32 device tensor / 0-d device
    tensors (read by the kernel, no host sync; they must be ready on the current stream). Each distinct
    ``len(seeds)`` compiles its own kernel (the loop over seeds is unrolled); cost grows with it.
    """
    if len(seeds) != len(coefs) or len(seeds) == 0:
        raise ValueError(f"need one coefficient per seed, got {len(seeds)} seeds and {len(coefs)} coefs")
    _check_tensor(theta, "theta")
    _launch(theta, update=(seeds, coefs, lr, weight_decay))
    return theta


def update_and_perturb_(
    theta: torch.Tensor,
    update: tuple[Sequence[int], Sequence[float] | torch.Tensor, float, float] | None,
    pert_seed: int,
    scales: Sequence[float],
    outs: Sequence[torch.Tensor],
) -> torch.Tensor:
    """For the offloader: read theta once, optionally apply ``update = (seeds, coefs, lr, weight_decay)``
    in place, then write ``theta_new + scales[j] * z(pert_seed)`` into ``outs[j]`` (one or two outputs).

    Bit-identical to ``apply_update_(theta, *update)`` followed by ``perturbed_into(outs[j], theta,
    pert_seed, scales[j])`` for each j. Returns theta.
    """
    if len(outs) not in (1, 2) or len(scales) != len(outs):
        raise ValueError(f"need one or two outputs and one scale each, got {len(outs)} outs, {len(scales)} scales")
    _check_tensor(theta, "theta")
    for j, out in enumerate(outs):
        _check_out(out, theta, f"outs[{j}]")
    if update is not None:
        seeds, coefs, _, _ = update
        if len(seeds) != len(coefs) or len(seeds) == 0:
            raise ValueError(f"need one coefficient per seed, got {len(seeds)} seeds and {len(coefs)} coefs")
    _launch(theta, outs=tuple(outs), scales=tuple(scales), pert_seed=pert_seed, update=update)
    return theta


# ---------------------------------------------------------------------------------------------------
# Multi-tensor API: one launch for a fixed list of tensors.
# ---------------------------------------------------------------------------------------------------

_SCRATCH_ALIGN = 64  # elements: every tensor's slot in a flat scratch starts 128-byte aligned (fp16)


def _as_signed64(value: int) -> int:
    """A 64-bit value as the signed int triton passes as i64 (the kernels bitcast it back)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _is_i32(value: int) -> bool:
    return -(2**31) <= value <= 2**31 - 1


class TensorTable:
    """A fixed list of contiguous same-dtype tensors on one device, described on the device once for the
    multi-tensor kernels: their data pointers, sizes, z keys (:func:`zo2_ds.zo.param_key`), weight-decay
    flags, their slots in a flat scratch, and the program -> (tensor, group) map.

    The table holds raw data pointers: it is valid while the tensors keep their storage, which
    :meth:`matches` checks (callers rebuild the table when it returns False).
    """

    def __init__(self, tensors: Sequence[torch.Tensor], keys: Sequence[int], decays: Sequence[bool] | None = None):
        if not tensors or len(keys) != len(tensors) or (decays is not None and len(decays) != len(tensors)):
            raise ValueError(f"need a non-empty list of tensors and one key (and decay flag) each, got {len(tensors)} "
                             f"tensors, {len(keys)} keys")  # fmt: skip
        for i, t in enumerate(tensors):
            _check_tensor(t, f"tensors[{i}]")
        self.dtype, self.device = tensors[0].dtype, tensors[0].device
        if any(t.dtype != self.dtype or t.device != self.device for t in tensors):
            raise ValueError("a TensorTable needs tensors of one dtype on one device")
        self.shapes = tuple(t.shape for t in tensors)
        self.numels = tuple(t.numel() for t in tensors)
        self.data_ptrs = tuple(t.data_ptr() for t in tensors)
        self.out_offsets, total = [], 0
        for n in self.numels:
            self.out_offsets.append(total)
            total += -(-n // _SCRATCH_ALIGN) * _SCRATCH_ALIGN
        self.scratch_numel = total
        group = 4 * _ROW
        chunks = torch.tensor([-(-n // group) for n in self.numels], dtype=torch.int64)
        self.num_chunks = int(chunks.sum())
        if self.num_chunks > 2**31 - 1:
            raise ValueError(f"TensorTable: {self.num_chunks} groups exceed one launch grid; split the list")
        starts = torch.cumsum(chunks, 0) - chunks
        chunk_tensor = torch.repeat_interleave(torch.arange(len(tensors), dtype=torch.int32), chunks)
        flags = [1.0 if d else 0.0 for d in (decays if decays is not None else [False] * len(tensors))]
        host = (
            chunk_tensor,
            starts,
            torch.tensor(self.data_ptrs, dtype=torch.int64),
            torch.tensor(self.numels, dtype=torch.int64),
            torch.tensor([_as_signed64(k) for k in keys], dtype=torch.int64),
            torch.tensor(flags, dtype=torch.float32),
            torch.tensor(self.out_offsets, dtype=torch.int64),
        )
        self._tables = tuple(x.to(self.device) for x in host)
        self._tables_aligned = tuple(t.data_ptr() % 16 == 0 for t in self._tables)  # part of the launch key
        # 16-byte aligned pointers and sizes that are multiples of 16: the kernel may use vector accesses.
        self.aligned = all(p % 16 == 0 for p in self.data_ptrs) and all(n % 16 == 0 for n in self.numels)
        self._dummy = torch.empty(1, dtype=self.dtype, device=self.device)  # out / coef pointer when unused

    def matches(self, tensors: Sequence[torch.Tensor]) -> bool:
        """True if ``tensors`` are (still) the storage this table points at."""
        return len(tensors) == len(self.data_ptrs) and all(t.data_ptr() == p for t, p in zip(tensors, self.data_ptrs))

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each tensor's slot in a flat scratch, shaped like the tensor."""
        return [flat[o : o + n].view(s) for o, n, s in zip(self.out_offsets, self.numels, self.shapes)]

    def check_scratch(self, flat: torch.Tensor, name: str) -> None:
        if (flat.dim() != 1 or flat.numel() < self.scratch_numel or flat.dtype != self.dtype
                or flat.device != self.device or not flat.is_contiguous()):  # fmt: skip
            raise ValueError(
                f"{name}: need a flat contiguous {self.dtype} tensor of >= {self.scratch_numel} elements on "
                f"{self.device}, got {tuple(flat.shape)} {flat.dtype} on {flat.device}"
            )


def _launch_multi(
    table: TensorTable,
    outs: Sequence[torch.Tensor] = (),
    scales: Sequence[float] = (),
    pert_hash: int = 0,
    update: tuple[Sequence[int], Sequence[float] | torch.Tensor, float, float] | None = None,
    *,
    rounds: int = _PHILOX_ROUNDS,
    fast_math: bool = _FAST_MATH,
    num_warps: int = _NUM_WARPS,
) -> Any:
    """Launch `_zo_multi_kernel` over ``table`` (arguments already validated)."""
    if table.num_chunks == 0:
        return None
    q, hashes, scalar_coefs, coef_tensor, neg_lr, weight_decay = 0, (0,), (0.0,), None, 0.0, 0.0
    if update is not None:
        hashes, coefs, lr, weight_decay = update
        q = len(hashes)
        if q == 0:
            raise ValueError("update needs at least one pass hash")
        hashes = tuple(_as_signed64(int(h)) for h in hashes)
        scalar_coefs, coef_tensor = _coef_args(coefs, q, table.device)
        neg_lr, weight_decay = -float(lr), float(weight_decay)
    out0 = outs[0] if outs else table._dummy
    out1 = outs[1] if len(outs) > 1 else out0
    coef_ptr = table._dummy if coef_tensor is None else coef_tensor
    scale0 = float(scales[0]) if scales else 0.0
    scale1 = float(scales[1]) if len(scales) > 1 else 0.0
    pert = _as_signed64(int(pert_hash))
    grid = (table.num_chunks, 1, 1)
    args = (*table._tables, out0, out1, coef_ptr, hashes, scalar_coefs, neg_lr, weight_decay, pert, scale0, scale1)
    constexprs = (q, coef_tensor is not None, len(outs), table.aligned, _ROW, rounds, fast_math)
    if INTERPRET:
        return _zo_multi_kernel[grid](*args, *constexprs, num_warps=num_warps)
    device_index = table.device.index
    if device_index != torch.cuda.current_device():
        with torch.cuda.device(device_index):
            return _zo_multi_kernel[grid](*args, *constexprs, num_warps=num_warps)
    key = (
        "multi", constexprs, num_warps, device_index, out0.dtype, out1.dtype, coef_ptr.dtype,
        table._tables_aligned, out0.data_ptr() % 16 == 0, out1.data_ptr() % 16 == 0, coef_ptr.data_ptr() % 16 == 0,
        _is_i32(pert), tuple(_is_i32(h) for h in hashes),
    )  # fmt: skip
    compiled = _DIRECT_CACHE.get(key)
    if compiled is not None and _direct_launch(compiled, grid, device_index, args + constexprs):
        return compiled
    compiled = _zo_multi_kernel[grid](*args, *constexprs, num_warps=num_warps)
    _DIRECT_CACHE[key] = compiled
    return compiled


def perturbed_into_multi(table: TensorTable, out: torch.Tensor, pass_hash: int, scale: float) -> torch.Tensor:
    """One launch: for every tensor t of ``table``, its slot of the flat scratch ``out`` (see
    :meth:`TensorTable.views`) = ``theta_t + scale * z(z_seed_from_pass(pass_hash, key_t))``.

    Bit-identical to ``perturbed_into(view_t, theta_t, zo.z_seed_from_pass(pass_hash, key_t), scale)``
    for each t. Returns ``out`` (callers keep their views of it: building them costs more host time
    than the launch).
    """
    table.check_scratch(out, "out")
    _launch_multi(table, outs=(out,), scales=(scale,), pert_hash=pass_hash)
    return out


def apply_update_multi_(
    table: TensorTable,
    pass_hashes: Sequence[int],
    coefs: Sequence[float] | torch.Tensor,
    lr: float,
    weight_decay: float,
) -> None:
    """One launch, in place, for every tensor t of ``table``:
    ``theta_t -= lr * (sum_i coefs[i] * z(z_seed_from_pass(pass_hashes[i], key_t)) + wd_t * theta_t)``
    with ``wd_t = weight_decay`` where the table's decay flag is set, else 0. Bit-identical to
    :func:`apply_update_` on each tensor with those seeds and weight decays."""
    if len(pass_hashes) != len(coefs) or len(pass_hashes) == 0:
        raise ValueError(f"need one coefficient per seed, got {len(pass_hashes)} seeds and {len(coefs)} coefs")
    _launch_multi(table, update=(pass_hashes, coefs, lr, weight_decay))


def update_and_perturb_multi_(
    table: TensorTable,
    update: tuple[Sequence[int], Sequence[float] | torch.Tensor, float, float] | None,
    pert_hash: int,
    scales: Sequence[float],
    outs: Sequence[torch.Tensor],
) -> None:
    """:func:`update_and_perturb_` over a table: ``update = (pass_hashes, coefs, lr, weight_decay)`` is
    applied in place, then ``theta_new + scales[j] * z(pert)`` goes into the flat scratch ``outs[j]``."""
    if len(outs) not in (1, 2) or len(scales) != len(outs):
        raise ValueError(f"need one or two outputs and one scale each, got {len(outs)} outs, {len(scales)} scales")
    for j, out in enumerate(outs):
        table.check_scratch(out, f"outs[{j}]")
    if update is not None and (len(update[0]) != len(update[1]) or len(update[0]) == 0):
        raise ValueError(f"need one coefficient per seed, got {len(update[0])} seeds and {len(update[1])} coefs")
    _launch_multi(table, outs=tuple(outs), scales=tuple(scales), pert_hash=pert_hash, update=update)


def z_seeds_from_pass(pass_hash: int, keys: torch.Tensor) -> torch.Tensor:
    """For tests: ``zo.z_seed_from_pass(pass_hash, k)`` for each int64 key k, computed by the kernels'
    device code (keys given as signed int64, the seeds returned as int64)."""
    _check_tensor(torch.empty(0, device=keys.device), "keys")
    out = torch.empty_like(keys)
    n = keys.numel()
    if n:
        _z_seeds_kernel[(-(-n // 256),)](keys, out, n, _as_signed64(pass_hash), 256)
    return out
