"""The zeroth-order maths: seeded perturbation, projected gradient, update.

Everything here is a plain function of explicit arguments. The engine and the offloader call these
functions and nothing else touches parameter values, so "offload on" and "offload off" run the very
same arithmetic on every tensor.

Keying of z. The random direction for one tensor is a function of
``(seed, step, perturbation index, parameter name)`` only: :func:`z_seed` hashes those four into one
63-bit integer and z is drawn from a generator seeded with it. The hash is a chain of splitmix64
finalisers (integer multiply / xor-shift only), so the fused CUDA kernels evaluate the last link
themselves: the host hashes ``(seed, step, index)`` once per pass (:func:`z_pass_hash`) and each
tensor's seed is ``z_seed_from_pass(pass_hash, param_key(name))``, computed on the host (CPU path) or
inside the kernel from a static table of keys (CUDA path), bit-identically. Nothing depends on execution order,
on which other parameters exist or are resident, or on the rank, which is what lets the offloader
(perturbing a block when it arrives) and data-parallel ranks regenerate identical z.

Precision. z is drawn in fp32 and all arithmetic is done in fp32; the result is rounded once to the
parameter's dtype. The canonical formulas (the CPU path computes exactly these expressions, and the
tests' reference repeats them):

    perturbed = theta + scale * z                         (scale = +eps or -eps)
    direction = sum_i coef_i * z_i                        (coef_i = g_i / q, summed in order i)
    theta     = theta - lr * (direction + weight_decay * theta)

The functions here are the torch implementation. On CUDA the same formulas run in fused Triton kernels
(`zo2_ds.kernels`), which never materialise z and make one pass over memory; there z comes from Triton's
Philox generator, so z differs from torch's, but is again a pure function of the key. Which one runs is
decided in one place, :class:`zo2_ds.ops.Ops` (``zo2.kernels``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import torch

__all__ = [
    "param_key",
    "z_seed",
    "z_pass_hash",
    "z_seed_from_pass",
    "generate_z",
    "perturbed_into",
    "perturbed_rows_into",
    "perturbed_gather_",
    "apply_update_",
    "DeviceCoefs",
    "step_coefs",
    "kept_coefs",
    "projected_grad",
    "uses_weight_decay",
    "pass_spec",
    "pass_specs",
]

_MASK64 = (1 << 64) - 1


def param_key(name: str) -> int:
    """A stable 64-bit integer for a parameter name (identical across processes and runs)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")


# splitmix64 (Steele, Lea, Flood, OOPSLA'14): a bijective 64-bit finaliser with full avalanche. The same
# constants and steps are in kernels_triton._mix64; tests check that the two agree.
_GOLDEN64 = 0x9E3779B97F4A7C15
_MIX_MUL1 = 0xBF58476D1CE4E5B9
_MIX_MUL2 = 0x94D049BB133111EB


def _mix64(x: int) -> int:
    x = ((x ^ (x >> 30)) * _MIX_MUL1) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX_MUL2) & _MASK64
    return x ^ (x >> 31)


def z_pass_hash(seed: int, step: int, perturbation: int) -> int:
    """The 64-bit hash of ``(seed, step, perturbation)``: the part of :func:`z_seed` shared by every
    tensor of one perturbation (computed once per pass)."""
    h = _mix64(((seed & _MASK64) + _GOLDEN64) & _MASK64)
    h = _mix64(((h ^ (step & _MASK64)) + _GOLDEN64) & _MASK64)
    return _mix64(((h ^ (perturbation & _MASK64)) + _GOLDEN64) & _MASK64)


def z_seed_from_pass(pass_hash: int, key: int) -> int:
    """``z_seed(seed, step, perturbation, key)`` given ``pass_hash = z_pass_hash(seed, step, perturbation)``."""
    return _mix64(((pass_hash ^ (key & _MASK64)) + _GOLDEN64) & _MASK64) >> 1


def z_seed(seed: int, step: int, perturbation: int, key: int) -> int:
    """The generator seed of z for one tensor: a 63-bit hash of (seed, step, perturbation, key).

    63 bits (not 64) so the value is a valid non-negative int64 for every backend.
    """
    return z_seed_from_pass(z_pass_hash(seed, step, perturbation), key)


def generate_z(seed: int, shape: Sequence[int] | torch.Size, device: torch.device | str = "cpu") -> torch.Tensor:
    """Materialise z (fp32) for one tensor with torch's generator (the kernels draw their own z in place)."""
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.randn(tuple(shape), generator=gen, device=device, dtype=torch.float32)


def perturbed_into(out: torch.Tensor, theta: torch.Tensor, seed: int, scale: float) -> torch.Tensor:
    """Write ``theta + scale * z(seed)`` into ``out`` (same shape; any float dtype). Returns ``out``.

    ``theta`` is only read, so restoring the clean value is exact by construction: the caller swaps
    ``out`` in for the forward and swaps ``theta`` back afterwards.
    """
    z = generate_z(seed, theta.shape, theta.device)
    out.copy_(theta.float() + scale * z)
    return out


def perturbed_rows_into(
    out: torch.Tensor, theta: torch.Tensor, start: int, seed: int, scale: float, z: torch.Tensor | None = None
) -> torch.Tensor:
    """``out`` = rows ``[start, start + len(out))`` of ``theta + scale * z(seed)`` (theta 2-D). torch's generator
    is sequential, so z is drawn for the whole of theta; ``z``: that draw, when the caller keeps it for
    several slices."""
    return perturbed_part_into(out, theta[start : start + out.shape[0]], start, theta.shape, seed, scale, z)


def perturbed_part_into(
    out: torch.Tensor,
    part: torch.Tensor,
    start: int,
    shape: Sequence[int],
    seed: int,
    scale: float,
    z: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out = part + scale * z`` where ``part`` holds rows ``[start, start + len(part))`` of a 2-D tensor of
    ``shape`` (e.g. a copy of them uploaded alone) and z is that tensor's z of those rows (``z``: the whole
    tensor's, when the caller keeps it for several parts; else drawn whole here)."""
    z = generate_z(seed, shape, part.device) if z is None else z
    out.copy_(part.float() + scale * z[start : start + part.shape[0]])
    return out


def apply_update_part_(
    part: torch.Tensor,
    start: int,
    shape: Sequence[int],
    seeds: Sequence[int],
    coefs: Sequence[float],
    lr: float,
    weight_decay: float,
    zs: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`apply_update_` on rows ``[start, start + len(part))`` of a 2-D tensor of ``shape`` held by ``part``:
    the same elementwise arithmetic, so the same bits as those rows of the whole tensor's update (``zs``: the
    whole tensor's z of each seed, else drawn here)."""
    if len(seeds) != len(coefs) or not seeds:
        raise ValueError(f"need one coefficient per seed, got {len(seeds)} seeds and {len(coefs)} coefs")
    whole = (generate_z(seed, shape, part.device) for seed in seeds) if zs is None else zs
    rows = slice(start, start + part.shape[0])
    return _update_(part, (z[rows] for z in whole), coefs, lr, weight_decay)


def perturbed_gather_(
    rows: torch.Tensor, theta: torch.Tensor, ids: torch.Tensor, seed: int, scale: float
) -> torch.Tensor:
    """In place: ``rows`` holds ``theta[ids]`` and becomes ``(theta + scale * z(seed))[ids]``, the same bits as
    :func:`perturbed_into` followed by the gather (z is drawn whole: see :func:`perturbed_rows_into`)."""
    z = generate_z(seed, theta.shape, theta.device)
    rows.copy_(rows.float() + scale * z[ids])
    return rows


def apply_update_(
    theta: torch.Tensor,
    seeds: Sequence[int],
    coefs: Sequence[float],
    lr: float,
    weight_decay: float,
) -> torch.Tensor:
    """In place: ``theta = theta - lr * (sum_i coefs[i] * z(seeds[i]) + weight_decay * theta)``."""
    if len(seeds) != len(coefs) or not seeds:
        raise ValueError(f"need one coefficient per seed, got {len(seeds)} seeds and {len(coefs)} coefs")
    return _update_(theta, (generate_z(seed, theta.shape, theta.device) for seed in seeds), coefs, lr, weight_decay)


def _update_(
    theta: torch.Tensor, zs: Iterable[torch.Tensor], coefs: Sequence[float], lr: float, weight_decay: float
) -> torch.Tensor:
    """The update's arithmetic, shared by the whole tensor and its parts (``zs``: each seed's z of theta's
    elements, drawn one at a time where they are generated). :class:`DeviceCoefs` scale lr by their gate."""
    if isinstance(coefs, DeviceCoefs):
        coefs, lr = coefs.coefs(), lr * coefs.gate()
    zs = iter(zs)
    direction = coefs[0] * next(zs)
    for z, coef in zip(zs, coefs[1:]):
        direction += coef * z
    master = theta.float()
    theta.copy_(master - lr * (direction + weight_decay * master))
    return theta


class DeviceCoefs:
    """One step's coefficients still on the device: an fp32 tensor ``[c_0, ..., c_{q-1}, gate]`` with
    c_i = g_i / q, and gate 1.0, or 0.0 with every c_i 0.0 when some g_i is not finite. The update then
    multiplies lr by the gate, so a skipped step changes no bit of theta (theta - 0 * (0 + wd * theta)),
    decided on the device with no host sync. ``len()`` is q, as for a sequence of floats."""

    __slots__ = ("values",)

    def __init__(self, values: torch.Tensor):
        if values.dim() != 1 or values.numel() < 2 or values.dtype != torch.float32 or not values.is_contiguous():
            raise ValueError(f"DeviceCoefs: expected a contiguous 1-D fp32 tensor of q + 1 values, got {values!r}")
        self.values = values

    def __len__(self) -> int:
        return self.values.numel() - 1

    def coefs(self) -> list[torch.Tensor]:
        """c_0 .. c_{q-1} as 0-d device tensors (views, no copy)."""
        return list(self.values[:-1].unbind())

    def gate(self) -> torch.Tensor:
        return self.values[-1]

    def __repr__(self) -> str:
        return f"DeviceCoefs(q={len(self)}, device={self.values.device})"


def kept_coefs(coefs: Sequence[float] | DeviceCoefs) -> tuple[float, ...] | DeviceCoefs:
    """Coefficients to keep for a deferred update: host values as a tuple of floats, device ones as they are."""
    return coefs if isinstance(coefs, DeviceCoefs) else tuple(float(c) for c in coefs)


def step_coefs(g: torch.Tensor) -> DeviceCoefs:
    """A step's :class:`DeviceCoefs` from its g (fp32, shape [q], on the device), without reading it: g / q,
    zeroed together with the gate where any g_i is not finite."""
    q = g.numel()
    finite = torch.isfinite(g).all()
    coefs = torch.where(finite, g / q, torch.zeros_like(g))
    return DeviceCoefs(torch.cat([coefs, finite.float().reshape(1)]))


def projected_grad(loss_plus: torch.Tensor, loss_minus: torch.Tensor, eps: float) -> torch.Tensor:
    """g = (L+ - L-) / (2 eps), kept on the device as an fp32 scalar (no host sync)."""
    return (loss_plus.detach().float() - loss_minus.detach().float()) / (2.0 * eps)


def uses_weight_decay(param: torch.Tensor) -> bool:
    """MeZO decays no biases and no norm weights; those are exactly the 1-D parameters."""
    return param.dim() >= 2


PassSpec = tuple[int, int, float]  # (step, perturbation index, scale): what one perturbed pass sees


def pass_spec(step: int, index: int, sign: int, eps: float) -> PassSpec:
    """The pass at theta + sign * eps * z(step, index): the one place the perturbation scale is derived."""
    return (step, index, sign * eps)


def pass_specs(step: int, num_perturbations: int, eps: float) -> list[PassSpec]:
    """The 2q perturbed passes of a step, in order: (step, i, +eps) then (step, i, -eps) for each i."""
    return [pass_spec(step, i, sign, eps) for i in range(num_perturbations) for sign in (1, -1)]
