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

Layout: this module is the API (what zo2_ds.ops dispatches to) and the multi-tensor tables;
:mod:`zo2_ds.kernels_triton` holds the device code (one kernel body for every entry point);
:mod:`zo2_ds.kernels_launch` the argument checks and the launch path.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from zo2_ds.kernels_launch import (
    SUPPORTED_DTYPES,
    as_signed64,
    check_out,
    check_tensor,
    direct_launches,
    is_i32,
    kernel_args,
    launch,
    run_kernel,
    set_direct_launch,
)
from zo2_ds.kernels_triton import (
    FAST_MATH,
    INTERPRET,
    NUM_WARPS,
    PHILOX_ROUNDS,
    ROW,
    triton,
    z_seeds_kernel,
    zo_gather_kernel,
    zo_multi_kernel,
)

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
    "perturbed_rows_into",
    "perturbed_part_into",
    "apply_update_part_",
    "perturbed_gather_",
    "set_direct_launch",
    "direct_launches",
    "launch",
    "as_signed64",
    "check_out",
    "INTERPRET",
    "ROW",
    "SUPPORTED_DTYPES",
]


@functools.cache
def available() -> bool:
    """True when the fused kernels can run: triton importable and a CUDA device present (or Triton's CPU
    interpreter, ``TRITON_INTERPRET=1``). Whether they are used is :class:`zo2_ds.ops.Ops`'s choice."""
    return triton is not None and (torch.cuda.is_available() or INTERPRET)


# ---------------------------------------------------------------------------------------------------
# Public API: the zo.py functions, on CUDA.
# ---------------------------------------------------------------------------------------------------


def generate_z(seed: int, shape: Sequence[int] | torch.Size, device: torch.device | str) -> torch.Tensor:
    """Materialise z (fp32) for a tensor of ``shape``: for tests and debugging; the kernels never do."""
    z = torch.empty(tuple(shape), dtype=torch.float32, device=device)
    check_tensor(z, "z")
    launch(z, outs=(z,), scales=(1.0,), pert_seed=seed, read_theta=False)  # fma(1, z, 0) == z exactly
    return z


def perturbed_into(out: torch.Tensor, theta: torch.Tensor, seed: int, scale: float) -> torch.Tensor:
    """``out = theta + scale * z(seed)`` in one pass (theta is only read; ``out`` may be ``theta``)."""
    check_tensor(theta, "theta")
    check_out(out, theta, "out")
    launch(theta, outs=(out,), scales=(scale,), pert_seed=seed)
    return out


def apply_update_(
    theta: torch.Tensor,
    seeds: Sequence[int],
    coefs: Sequence[float] | torch.Tensor,
    lr: float,
    weight_decay: float,
) -> torch.Tensor:
    """In place, one pass: ``theta = theta - lr * (sum_i coefs[i] * z(seeds[i]) + weight_decay * theta)``.

    ``coefs``: Python floats (passed as kernel arguments), or a 1-D fp32 device tensor / 0-d device tensors / a
    :class:`zo2_ds.zo.DeviceCoefs` whose gate scales lr (read by the kernel, no host sync; they must be ready on
    the current stream). Each distinct ``len(seeds)`` compiles its own kernel (the loop over seeds is unrolled).
    """
    if len(seeds) != len(coefs) or len(seeds) == 0:
        raise ValueError(f"need one coefficient per seed, got {len(seeds)} seeds and {len(coefs)} coefs")
    check_tensor(theta, "theta")
    launch(theta, update=(seeds, coefs, lr, weight_decay))
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
    check_tensor(theta, "theta")
    for j, out in enumerate(outs):
        check_out(out, theta, f"outs[{j}]")
    if update is not None:
        seeds, coefs, _, _ = update
        if len(seeds) != len(coefs) or len(seeds) == 0:
            raise ValueError(f"need one coefficient per seed, got {len(seeds)} seeds and {len(coefs)} coefs")
    launch(theta, outs=tuple(outs), scales=tuple(scales), pert_seed=pert_seed, update=update)
    return theta


def perturbed_rows_into(out: torch.Tensor, theta: torch.Tensor, start: int, seed: int, scale: float) -> torch.Tensor:
    """``out`` = rows ``[start, start + len(out))`` of ``theta + scale * z(seed)`` for a 2-D ``theta``, bit-identical
    to those rows of :func:`perturbed_into`'s result, without perturbing the other rows. One pass where the rows
    start on a 4 x ROW group of z (``start * row_len`` a multiple of 4 ROW), else through the gather kernel."""
    check_tensor(theta, "theta")
    rows = out.shape[0]
    if out.dim() != 2 or out.shape[1] != theta.shape[1] or start < 0 or start + rows > theta.shape[0]:
        raise ValueError(f"out: need rows [{start}, {start} + n) of {tuple(theta.shape)}, got {tuple(out.shape)}")
    return perturbed_part_into(out, theta[start : start + rows], start, seed, scale)


def perturbed_part_into(out: torch.Tensor, part: torch.Tensor, start: int, seed: int, scale: float) -> torch.Tensor:
    """``out = part + scale * z`` where ``part`` holds rows ``[start, start + len(part))`` of a 2-D tensor and z is
    that tensor's z of those rows (``part`` may be a copy of them, e.g. uploaded alone): bit-identical to those
    rows of :func:`perturbed_into` on the whole tensor. One pass where the rows start on a 4 x ROW group of z,
    else through the gather kernel."""
    check_tensor(part, "part")
    check_out(out, part, "out")
    first = start * part.shape[1]
    if first % (4 * ROW):
        out.copy_(part)
        return perturbed_gather_(out, part, torch.arange(start, start + part.shape[0], device=part.device), seed, scale)
    launch(part, outs=(out,), scales=(scale,), pert_seed=seed, group_offset=first // (4 * ROW))
    return out


def apply_update_part_(
    part: torch.Tensor, start: int, seeds: Sequence[int], coefs: Sequence[float], lr: float, weight_decay: float
) -> torch.Tensor:
    """:func:`apply_update_` on rows ``[start, start + len(part))`` of a 2-D tensor held by ``part`` (bit-identical to
    those rows of the whole tensor's update); the rows must start on a 4 x ROW group of z."""
    if len(seeds) != len(coefs) or len(seeds) == 0:
        raise ValueError(f"need one coefficient per seed, got {len(seeds)} seeds and {len(coefs)} coefs")
    check_tensor(part, "part")
    first = start * part.shape[1]
    if first % (4 * ROW):
        raise ValueError(f"part: rows from {start} of {part.shape[1]} elements do not start on a z group ({4 * ROW})")
    launch(part, update=(seeds, coefs, lr, weight_decay), group_offset=first // (4 * ROW))
    return part


_GATHER_BLOCK = 1024


def perturbed_gather_(
    rows: torch.Tensor, theta: torch.Tensor, ids: torch.Tensor, seed: int, scale: float
) -> torch.Tensor:
    """In place: ``rows`` holds ``theta[ids]`` (ids of any shape, rows of shape ``ids.shape + (row_len,)``) and
    becomes ``(theta + scale * z(seed))[ids]``, bit-identical to gathering :func:`perturbed_into`'s result."""
    check_tensor(theta, "theta")
    check_tensor(rows, "rows")
    row_len = theta.shape[-1]
    if rows.shape != (*ids.shape, row_len) or rows.dtype != theta.dtype:
        raise ValueError(f"rows: need {(*ids.shape, row_len)} {theta.dtype}, got {tuple(rows.shape)} {rows.dtype}")
    flat_ids = ids.reshape(-1).contiguous()
    if flat_ids.numel() and row_len:
        grid = (flat_ids.numel(), -(-row_len // _GATHER_BLOCK))
        zo_gather_kernel[grid](rows, flat_ids, row_len, int(seed), float(scale), _GATHER_BLOCK, ROW, PHILOX_ROUNDS,
                               FAST_MATH, num_warps=NUM_WARPS)  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------------
# Multi-tensor API: one launch for a fixed list of tensors.
# ---------------------------------------------------------------------------------------------------

_SCRATCH_ALIGN = 64  # elements: every tensor's slot in a flat scratch starts 128-byte aligned (fp16)


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
            check_tensor(t, f"tensors[{i}]")
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
        group = 4 * ROW
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
            torch.tensor([as_signed64(k) for k in keys], dtype=torch.int64),
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
) -> Any:
    """Launch `zo_multi_kernel` over ``table`` (arguments already validated; the tuning knobs of
    :func:`zo2_ds.kernels_launch.launch` are the defaults here)."""
    if table.num_chunks == 0:
        return None
    dummy = table._dummy
    hashes, coefs, coef_ptr, neg_lr, weight_decay, out0, out1, scale0, scale1 = kernel_args(
        update, outs, scales, dummy, table.device, as_signed64
    )
    q, on_device = len(hashes) if update is not None else 0, coef_ptr is not dummy
    pert = as_signed64(int(pert_hash))
    grid = (table.num_chunks, 1, 1)
    args = (*table._tables, out0, out1, coef_ptr, hashes, coefs, neg_lr, weight_decay, pert, scale0, scale1)
    constexprs = (q, on_device, len(outs), table.aligned, ROW, PHILOX_ROUNDS, FAST_MATH)
    specialisation = (
        out0.dtype, out1.dtype, coef_ptr.dtype, table._tables_aligned, out0.data_ptr() % 16 == 0,
        out1.data_ptr() % 16 == 0, coef_ptr.data_ptr() % 16 == 0, is_i32(pert), tuple(is_i32(h) for h in hashes),
    )  # fmt: skip
    return run_kernel("multi", zo_multi_kernel, grid, table.device.index, args, constexprs, NUM_WARPS, specialisation)


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
    check_tensor(torch.empty(0, device=keys.device), "keys")
    out = torch.empty_like(keys)
    n = keys.numel()
    if n:
        z_seeds_kernel[(-(-n // 256),)](keys, out, n, as_signed64(pass_hash), 256)
    return out
