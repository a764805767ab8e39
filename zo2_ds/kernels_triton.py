"""Device code of :mod:`zo2_ds.kernels`: the Triton kernels and their helpers (see that module for the
definition of z, the rounding rules and the host API).

One kernel body, ``_zo_group``, handles one 4 x ROW group of one tensor for every entry point: constexpr
flags select the parts (update, one or two perturbed outputs, theta read or not, seeds given or derived
from a pass hash and the tensor's key), so the arithmetic of a fused call is the arithmetic of the
separate calls, and the multi-tensor kernel's is the single-tensor kernel's, by construction. Triton
inlines every ``@triton.jit`` helper into the kernel that calls it.
"""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["ROW", "PHILOX_ROUNDS", "NUM_WARPS", "INTERPRET", "FAST_MATH", "triton", "zo_kernel", "zo_multi_kernel",
           "z_seeds_kernel", "zo_gather_kernel"]  # fmt: skip

ROW = 1024  # part of z's definition (see zo2_ds.kernels): changing it changes every z
# Philox4x32-7: seven rounds pass TestU01's BigCrush (Salmon et al., SC'11, "Random123"); cuRAND and torch
# use ten as a safety margin. Measured on an H200 (2026-11-26; launch/benchmarks/NOTES.md in git history at
# ed57633): 10 rounds made the fp16 perturbation compute-bound (1.25x a copy of the same bytes), 7 rounds run
# at copy speed (1.04x).
PHILOX_ROUNDS = 7
NUM_WARPS = 4  # 1024 lanes / 128 threads = 8 elements a thread per quarter: 16-byte fp16 loads
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's own switch: its CPU interpreter
FAST_MATH = not INTERPRET  # the interpreter cannot run libdevice calls


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
def _pass_seed(seed_or_hash, key, KEYED: tl.constexpr):
    """The z seed of a tensor: given (the single-tensor kernel), or z_seed_from_pass(hash, key) (multi)."""
    if KEYED:
        return _seed_from_pass(_as_u64(seed_or_hash), key)
    else:
        return seed_or_hash


@_jit
def _direction(
    seeds, key, coefs, coef_ptr, counter,
    Q: tl.constexpr, COEFS_ON_DEVICE: tl.constexpr, KEYED: tl.constexpr, ROUNDS: tl.constexpr,
    FAST_MATH: tl.constexpr,
):  # fmt: skip
    """sum_i coefs[i] * z(seed_i) for the four quarters, summed in order i (unrolled over Q), with
    seed_i = _pass_seed(seeds[i], key, KEYED)."""
    c = _coef(coefs, coef_ptr, 0, COEFS_ON_DEVICE)
    n0, n1, n2, n3 = _normal4(_pass_seed(seeds[0], key, KEYED), counter, ROUNDS, FAST_MATH)
    d0, d1, d2, d3 = c * n0, c * n1, c * n2, c * n3
    for i in tl.static_range(1, Q):
        c = _coef(coefs, coef_ptr, i, COEFS_ON_DEVICE)
        n0, n1, n2, n3 = _normal4(_pass_seed(seeds[i], key, KEYED), counter, ROUNDS, FAST_MATH)
        d0, d1, d2, d3 = tl.fma(c, n0, d0), tl.fma(c, n1, d1), tl.fma(c, n2, d2), tl.fma(c, n3, d3)
    return d0, d1, d2, d3


@_jit
def _zo_group(
    theta_ptr, out0_ptr, out1_ptr, coef_ptr, decay_ptr, numel, chunk, z_chunk,
    seeds, key, coefs, neg_lr, weight_decay,  # the update (used when Q > 0)
    pert_seed, scale0, scale1,  # the perturbation (used when NUM_OUTS > 0)
    Q: tl.constexpr, COEFS_ON_DEVICE: tl.constexpr, NUM_OUTS: tl.constexpr, READ_THETA: tl.constexpr,
    KEYED: tl.constexpr, ROW: tl.constexpr, ROUNDS: tl.constexpr, FAST_MATH: tl.constexpr,
):  # fmt: skip
    """The one kernel body: group ``chunk`` (4 x ROW elements) of one tensor, whose z is group ``z_chunk`` of the
    tensor's z (``chunk`` itself, but for a slice that starts at group ``z_chunk - chunk``). Optionally apply
    the update in place (rounded to theta's dtype), then write theta + scale_j z into out_j. ``KEYED``: ``seeds`` and
    ``pert_seed`` are pass hashes and each seed is z_seed_from_pass(hash, key); the weight decay is scaled
    by the tensor's flag at ``decay_ptr`` (1.0 or 0.0: wd or 0.0 exactly)."""
    lane = tl.arange(0, ROW)
    counter = z_chunk * ROW + lane  # int32 or int64 (the chunk's type): randint4x gives the same bits
    o0 = chunk * (4 * ROW) + lane
    o1 = o0 + ROW
    o2 = o0 + 2 * ROW
    o3 = o0 + 3 * ROW
    # Issue all four loads before the Philox arithmetic, so the memory latency hides behind it.
    t0 = _load_f32(theta_ptr, o0, numel, READ_THETA)
    t1 = _load_f32(theta_ptr, o1, numel, READ_THETA)
    t2 = _load_f32(theta_ptr, o2, numel, READ_THETA)
    t3 = _load_f32(theta_ptr, o3, numel, READ_THETA)
    if Q > 0:
        d0, d1, d2, d3 = _direction(seeds, key, coefs, coef_ptr, counter, Q, COEFS_ON_DEVICE, KEYED, ROUNDS,
                                    FAST_MATH)  # fmt: skip
        wd = weight_decay
        if KEYED:
            wd = weight_decay * tl.load(decay_ptr)
        if COEFS_ON_DEVICE:  # the gate after the coefficients: 1.0, or 0.0 for a skipped step (a no-op)
            neg_lr = neg_lr * tl.load(coef_ptr + Q).to(tl.float32)
        t0 = _update_store(theta_ptr, o0, numel, t0, d0, neg_lr, wd)
        t1 = _update_store(theta_ptr, o1, numel, t1, d1, neg_lr, wd)
        t2 = _update_store(theta_ptr, o2, numel, t2, d2, neg_lr, wd)
        t3 = _update_store(theta_ptr, o3, numel, t3, d3, neg_lr, wd)
    if NUM_OUTS > 0:
        z0, z1, z2, z3 = _normal4(_pass_seed(pert_seed, key, KEYED), counter, ROUNDS, FAST_MATH)
        _perturb_store(out0_ptr, o0, numel, t0, z0, scale0)
        _perturb_store(out0_ptr, o1, numel, t1, z1, scale0)
        _perturb_store(out0_ptr, o2, numel, t2, z2, scale0)
        _perturb_store(out0_ptr, o3, numel, t3, z3, scale0)
        if NUM_OUTS > 1:
            _perturb_store(out1_ptr, o0, numel, t0, z0, scale1)
            _perturb_store(out1_ptr, o1, numel, t1, z1, scale1)
            _perturb_store(out1_ptr, o2, numel, t2, z2, scale1)
            _perturb_store(out1_ptr, o3, numel, t3, z3, scale1)


@_jit(do_not_specialize=["seeds", "pert_seed", "group_offset"])
def zo_kernel(
    theta_ptr, out0_ptr, out1_ptr, coef_ptr, numel, group_offset,
    seeds, coefs, neg_lr, weight_decay,  # the update (used when Q > 0)
    pert_seed, scale0, scale1,  # the perturbation (used when NUM_OUTS > 0)
    Q: tl.constexpr, COEFS_ON_DEVICE: tl.constexpr, NUM_OUTS: tl.constexpr, READ_THETA: tl.constexpr,
    INDEX_64: tl.constexpr, ROW: tl.constexpr, ROUNDS: tl.constexpr, FAST_MATH: tl.constexpr,
):  # fmt: skip
    """One tensor, or a slice of one that starts at its group ``group_offset``: program p handles group p of it,
    with z of group p + group_offset."""
    pid = tl.program_id(0)
    if INDEX_64:  # tensors near or past 2^31 elements: int32 offsets would wrap
        pid = pid.to(tl.int64)
    _zo_group(theta_ptr, out0_ptr, out1_ptr, coef_ptr, coef_ptr, numel, pid, pid + group_offset, seeds, 0, coefs,
              neg_lr, weight_decay, pert_seed, scale0, scale1, Q, COEFS_ON_DEVICE, NUM_OUTS, READ_THETA, False, ROW,
              ROUNDS, FAST_MATH)  # fmt: skip


@_jit(do_not_specialize=["pass_hashes", "pert_hash"])
def zo_multi_kernel(
    chunk_tensor_ptr, chunk_start_ptr, theta_tab_ptr, numel_tab_ptr, key_tab_ptr, decay_tab_ptr, out_off_ptr,
    out0_ptr, out1_ptr, coef_ptr,
    pass_hashes, coefs, neg_lr, weight_decay,  # the update (used when Q > 0)
    pert_hash, scale0, scale1,  # the perturbation (used when NUM_OUTS > 0)
    Q: tl.constexpr, COEFS_ON_DEVICE: tl.constexpr, NUM_OUTS: tl.constexpr, ALIGNED: tl.constexpr,
    ROW: tl.constexpr, ROUNDS: tl.constexpr, FAST_MATH: tl.constexpr,
):  # fmt: skip
    """A TensorTable: program p handles group ``p - chunk_start[t]`` of tensor ``t = chunk_tensor[p]``, with
    the body of `zo_kernel` (its element indexing, counters and arithmetic)."""
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + pid)
    chunk = pid.to(tl.int64) - tl.load(chunk_start_ptr + t)
    theta_ptr = tl.load(theta_tab_ptr + t).to(out0_ptr.dtype)  # out0 has the table's dtype (a dummy if no outs)
    numel = tl.load(numel_tab_ptr + t)
    key = tl.load(key_tab_ptr + t).to(tl.uint64, bitcast=True)
    if ALIGNED:  # every pointer 16-byte aligned and every numel a multiple of 16: vector loads/stores
        theta_ptr = tl.multiple_of(theta_ptr, 16)
        numel = tl.multiple_of(numel, 16)
    out0 = out0_ptr
    out1 = out1_ptr
    if NUM_OUTS > 0:  # each tensor's slot in the flat scratch
        out_off = tl.load(out_off_ptr + t)
        if ALIGNED:
            out_off = tl.multiple_of(out_off, 16)
        out0 = out0_ptr + out_off
        out1 = out1_ptr + out_off
    _zo_group(theta_ptr, out0, out1, coef_ptr, decay_tab_ptr + t, numel, chunk, chunk, pass_hashes, key, coefs, neg_lr,
              weight_decay, pert_hash, scale0, scale1, Q, COEFS_ON_DEVICE, NUM_OUTS, True, True, ROW, ROUNDS,
              FAST_MATH)  # fmt: skip


@_jit(do_not_specialize=["pert_seed"])
def zo_gather_kernel(
    rows_ptr, ids_ptr, row_len, pert_seed, scale,
    BLOCK: tl.constexpr, ROW: tl.constexpr, ROUNDS: tl.constexpr, FAST_MATH: tl.constexpr,
):  # fmt: skip
    """In place, ``rows[r] = rows[r] + scale * z[ids[r]]`` where ``rows[r]`` holds row ``ids[r]`` of a 2-D tensor
    of rows of ``row_len`` elements and z is that tensor's z: element e = ids[r] * row_len + c takes lane
    e % ROW of group e // (4 ROW) and the quarter (e // ROW) % 4 of its Philox call, through the same Box-Muller
    as `_normal4` (the pair of words that quarter comes from; cos for even quarters, sin for odd)."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < row_len
    e = tl.load(ids_ptr + r).to(tl.int64) * row_len + cols
    quarter = (e // ROW) % 4
    counter = (e // (4 * ROW)) * ROW + e % ROW
    x0, x1, x2, x3 = tl.randint4x(pert_seed, counter, ROUNDS)
    low = quarter < 2
    n_cos, n_sin = _box_muller(tl.where(low, x0, x2), tl.where(low, x1, x3), FAST_MATH)
    z = tl.where(quarter % 2 == 0, n_cos, n_sin)
    offs = r * row_len + cols
    theta = tl.load(rows_ptr + offs, mask=mask).to(tl.float32)
    tl.store(rows_ptr + offs, tl.fma(scale, z, theta).to(rows_ptr.dtype.element_ty), mask=mask)


@_jit
def z_seeds_kernel(key_ptr, out_ptr, n, pass_hash, BLOCK: tl.constexpr):
    """For tests: out[i] = z_seed_from_pass(pass_hash, keys[i]) as computed inside the kernels."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keys = tl.load(key_ptr + offs, mask=offs < n).to(tl.uint64, bitcast=True)
    seeds = _seed_from_pass(_as_u64(pass_hash), keys)
    tl.store(out_ptr + offs, seeds.to(tl.int64, bitcast=True), mask=offs < n)
