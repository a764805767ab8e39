"""Tests for zo2_ds.kernels (the fused Triton kernels).

On CPU: the API contract (available() is False, the module imports without triton, arguments are
validated before anything launches, zo.py falls back to torch) and, where triton is installed, the
kernels' logic under the Triton interpreter (TRITON_INTERPRET=1, in a subprocess: the flag must be set
before triton is imported). On CUDA (marked ``cuda``): the statistics of z, determinism, independence,
bitwise fused == separate, and accuracy against a float64 reference, in fp32, fp16 and bf16.

The ``_check_*`` functions take a device and a size so the GPU tests and the interpreter run share them.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from zo2_ds import kernels, zo
from zo2_ds.ops import KERNEL_MODES, Ops

ROOT = Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SEED = zo.z_seed(1234, 7, 0, zo.param_key("model.decoder.layers.0.fc1.weight"))

# z_seed(0, 0, 0, 0) and z_seed(1234, 7, 0, key of SEED's name): pinned, see test_z_seed_is_the_pass_hash_chain.
_PINNED_SEED_0 = 0x10983A4555640134
_PINNED_SEED_1 = 0x3B7D9C7573D923FB

requires_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and kernels.available()), reason="needs CUDA and triton"
)


def _ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


# -------------------------------------------------------------------------------------------------
# Shared checks (device and size are parameters)
# -------------------------------------------------------------------------------------------------


def _check_z_statistics(device: str, numel: int) -> None:
    z = kernels.generate_z(SEED, (numel,), device).double()
    tol = 6.0 / numel**0.5  # ~6 sigma for the mean
    assert torch.isfinite(z).all()
    assert abs(z.mean().item()) < tol
    assert abs(z.std().item() - 1.0) < 8.0 / numel**0.5 + 1e-4
    assert abs((z**4).mean().item() - 3.0) < 60.0 / numel**0.5 + 1e-3  # kurtosis of a normal
    inside = (z.abs() < 1.0).double().mean().item()
    assert abs(inside - 0.6826894921) < 6.0 / numel**0.5
    assert z.abs().max().item() <= 5.7  # 23-bit uniforms bound |z| by sqrt(2 * 23 ln 2)
    # The four outputs of one Philox call land a ROW apart: they must be uncorrelated too.
    row = kernels.ROW
    if numel >= 8 * row:
        groups = z[: numel // (4 * row) * 4 * row].view(-1, 4, row)
        for j in range(1, 4):
            corr = torch.corrcoef(torch.stack([groups[:, 0].flatten(), groups[:, j].flatten()]))[0, 1]
            assert abs(corr.item()) < 6.0 / groups[:, 0].numel() ** 0.5


def _check_determinism_and_independence(device: str, numel: int) -> None:
    a = kernels.generate_z(SEED, (numel,), device)
    assert torch.equal(a, kernels.generate_z(SEED, (numel,), device))
    # A pure function of (seed, flat index): independent of the shape and of the tensor's length.
    shaped = kernels.generate_z(SEED, (numel // 16, 16), device)
    assert torch.equal(a[: numel // 16 * 16], shaped.flatten())
    prefix = kernels.generate_z(SEED, (numel // 3,), device)
    assert torch.equal(a[: numel // 3], prefix)
    tol = 6.0 / numel**0.5
    for other in (SEED + 1, SEED ^ (1 << 40), SEED ^ (1 << 62)):  # the high 32 bits of the seed matter too
        b = kernels.generate_z(other, (numel,), device)
        corr = torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1].item()
        assert abs(corr) < tol, (other, corr)


def _check_perturbed_into(device: str, numel: int, dtype: torch.dtype) -> None:
    theta = torch.randn(numel, device=device).to(dtype)
    theta_before = theta.clone()
    scale = 1e-2
    big = torch.full((numel + 37,), float("nan"), device=device, dtype=dtype)  # poisoned, with a tail
    out = big[:numel]
    kernels.perturbed_into(out, theta, SEED, scale)
    assert torch.equal(theta, theta_before), "theta must be read-only"
    assert torch.isfinite(out).all(), "every element written"
    assert torch.isnan(big[numel:]).all(), "nothing written past the end"
    z = kernels.generate_z(SEED, (numel,), device).double()
    ref = theta.double() + scale * z
    err = (out.double() - ref).norm() / ref.norm()
    assert err.item() < _ulp(dtype), (dtype, err.item())
    # fp32 arithmetic, then one rounding: within one ulp of the dtype of the exact value, plus the fp32
    # rounding of the terms (zero with a true fma, as on GPU; the interpreter rounds the product too).
    slack = torch.finfo(dtype).tiny * _ulp(dtype) + _ulp(torch.float32) * (theta.double().abs() + scale * z.abs())
    assert ((out.double() - ref).abs() <= _ulp(dtype) * ref.abs() + slack).all()


def _check_rows_and_gather(device: str, dtype: torch.dtype) -> None:
    """Rows of theta + s z and rows gathered by id: the bits of perturbing the whole tensor, then slicing."""
    for num_rows, width in ((300, 56), (40, 4096), (37, 100)):
        theta = torch.randn(num_rows, width, device=device).to(dtype)
        whole = kernels.perturbed_into(torch.empty_like(theta), theta, SEED, -1e-2)
        ids = torch.randint(0, num_rows, (3, 5), device=device)
        gathered = kernels.perturbed_gather_(theta[ids].contiguous(), theta, ids, SEED, -1e-2)
        assert torch.equal(gathered, whole[ids]), (dtype, num_rows, width)
        strided = torch.empty(5, 3, width, device=device, dtype=dtype).transpose(0, 1)  # rows not contiguous
        strided.copy_(theta[ids])
        assert torch.equal(Ops("per_tensor").perturbed_gather_(strided, theta, ids, SEED, -1e-2), whole[ids])
        align = 4096 // math.gcd(width, 4096)  # row starts on a z group: the one-pass slice kernel
        starts = [*range(0, num_rows, align), 5]  # 5: not on a group (the gather kernel)
        for start in starts:
            n = min(2 * align, num_rows - start)
            out = torch.full((n + 1, width), float("nan"), device=device, dtype=dtype)
            kernels.perturbed_rows_into(out[:n], theta, start, SEED, -1e-2)
            assert torch.equal(out[:n], whole[start : start + n]), (dtype, num_rows, width, start)
            assert torch.isnan(out[n]).all(), "nothing written past the rows"
    with pytest.raises(ValueError, match="rows"):
        kernels.perturbed_rows_into(torch.empty(3, 8, device=device), torch.zeros(2, 8, device=device), 0, 1, 0.1)


def _check_apply_update(device: str, numel: int, dtype: torch.dtype, coefs_on_device: bool) -> None:
    theta = torch.randn(numel, device=device).to(dtype)
    seeds = [zo.z_seed(1, 3, i, 42) for i in range(3)]
    coefs = [0.7, -1.3, 0.25]
    lr, wd = 1e-2, 0.1
    ref = theta.double().clone()
    direction = sum(c * kernels.generate_z(s, (numel,), device).double() for s, c in zip(seeds, coefs))
    ref = ref - lr * (direction + wd * ref)
    arg = torch.tensor(coefs, device=device) if coefs_on_device else coefs
    kernels.apply_update_(theta, seeds, arg, lr, wd)
    err = ((theta.double() - ref).norm() / ref.norm()).item()
    assert err < _ulp(dtype), (dtype, err)


def _check_fused_equals_separate(device: str, numel: int, dtype: torch.dtype) -> None:
    theta0 = torch.randn(numel, device=device).to(dtype)
    seeds = [zo.z_seed(5, 9, i, 77) for i in range(2)]
    pert_seed = zo.z_seed(5, 10, 0, 77)
    eps = 1e-3
    coef_variants = ([0.5, -2.0], torch.tensor([0.5, -2.0], device=device))
    for update in (None, (seeds, coef_variants[0], 1e-3, 0.0), (seeds, coef_variants[1], 1e-3, 0.01)):
        for scales in ((eps,), (eps, -eps)):
            fused = theta0.clone()
            outs = [torch.full_like(theta0, float("nan")) for _ in scales]
            kernels.update_and_perturb_(fused, update, pert_seed, scales, outs)
            sep = theta0.clone()
            if update is not None:
                kernels.apply_update_(sep, *update)
            assert torch.equal(fused, sep)
            for scale, out in zip(scales, outs):
                ref = torch.full_like(theta0, float("nan"))
                kernels.perturbed_into(ref, sep, pert_seed, scale)
                assert torch.equal(out, ref), (dtype, update is not None, scale)


def _check_gated_coefs(device: str, numel: int, dtype: torch.dtype) -> None:
    """zo2.async_step's coefficients (zo.DeviceCoefs, [c_0 .. c_{q-1}, gate]): gate 1 gives the bits of the
    same values passed as floats; a non-finite g gives gate 0 and a no-op, weight decay included, in the
    single-tensor, fused and multi-tensor kernels."""
    theta0 = torch.randn(numel, device=device).to(dtype)
    seeds = [zo.z_seed(2, 5, i, 31) for i in range(2)]
    g = torch.tensor([0.9, -2.5], device=device)
    live, dead = zo.step_coefs(g), zo.step_coefs(torch.tensor([0.9, float("inf")], device=device))
    floats = (g / 2).tolist()
    a, b, c = theta0.clone(), theta0.clone(), theta0.clone()
    kernels.apply_update_(a, seeds, live, 1e-2, 0.1)
    kernels.apply_update_(b, seeds, floats, 1e-2, 0.1)
    kernels.apply_update_(c, seeds, dead, 1e-2, 0.1)
    assert torch.equal(a, b) and not torch.equal(a, theta0)
    assert torch.equal(c, theta0)
    pert = zo.z_seed(2, 6, 0, 31)
    fused, out = theta0.clone(), torch.full_like(theta0, float("nan"))
    kernels.update_and_perturb_(fused, (seeds, dead, 1e-2, 0.1), pert, (1e-3,), (out,))
    ref = torch.full_like(theta0, float("nan"))
    kernels.perturbed_into(ref, theta0, pert, 1e-3)
    assert torch.equal(fused, theta0) and torch.equal(out, ref)
    tensors, keys, decays = _multi_case(device, dtype, False)
    hashes = [zo.z_pass_hash(2, 5, i) for i in range(2)]
    for coefs, changes in ((live, True), (dead, False)):
        upd = [t.clone() for t in tensors]
        kernels.apply_update_multi_(kernels.TensorTable(upd, keys, decays), hashes, coefs, 1e-2, 0.1)
        want = [t.clone() for t in tensors]
        if changes:
            kernels.apply_update_multi_(kernels.TensorTable(want, keys, decays), hashes, floats, 1e-2, 0.1)
        assert all(torch.equal(u, w) for u, w in zip(upd, want)), (dtype, changes)


def _check_device_seeds(device: str) -> None:
    """The kernels' z_seed_from_pass == zo's, including keys with the top bit set."""
    keys = [zo.param_key(f"model.layers.{i}.w") for i in range(50)] + [0, 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
    for pass_hash in (zo.z_pass_hash(0, 0, 0), zo.z_pass_hash(7, 123456, 3), 0, 5, (1 << 64) - 1, 1 << 63):
        signed = torch.tensor([kernels.as_signed64(k) for k in keys], dtype=torch.int64, device=device)
        got = kernels.z_seeds_from_pass(pass_hash, signed).tolist()
        assert got == [zo.z_seed_from_pass(pass_hash, k) for k in keys], pass_hash


def _multi_case(device: str, dtype: torch.dtype, misaligned: bool) -> tuple[list[torch.Tensor], list[int], list[bool]]:
    row4 = 4 * kernels.ROW
    sizes = [2 * row4 + 96, 16, row4, 3 * 32, row4 + 48]  # multiples of 16: the aligned (vector) variant
    if misaligned:
        sizes = [2 * row4 + 100, 1, 7, row4, 5001]
    buf = torch.randn(sum(sizes) + len(sizes), device=device).to(dtype)
    tensors, start = [], int(misaligned)  # misaligned: views at odd element offsets
    for n in sizes:
        tensors.append(buf[start : start + n] if misaligned else torch.randn(n, device=device).to(dtype))
        start += n + 1
    keys = [zo.param_key(f"t{i}") for i in range(len(sizes))]
    return tensors, keys, [i % 2 == 0 for i in range(len(sizes))]


def _check_multi_equals_single(device: str, dtype: torch.dtype, misaligned: bool) -> None:
    """One multi-tensor launch == the single-tensor kernel on each tensor, bitwise."""
    tensors, keys, decays = _multi_case(device, dtype, misaligned)
    table = kernels.TensorTable(tensors, keys, decays)
    assert table.aligned is not misaligned
    pass_hash = zo.z_pass_hash(11, 4, 1)
    # perturb into a poisoned flat scratch
    flat = torch.full((table.scratch_numel + 5,), float("nan"), device=device, dtype=dtype)
    assert kernels.perturbed_into_multi(table, flat, pass_hash, -1e-2) is flat
    views = table.views(flat)
    for t, v, k in zip(tensors, views, keys):
        ref = torch.full_like(t, float("nan"))
        kernels.perturbed_into(ref, t, zo.z_seed_from_pass(pass_hash, k), -1e-2)
        assert torch.equal(v, ref), dtype
    # update, coefficients as floats and on the device, weight decay per flag
    hashes = [zo.z_pass_hash(11, 4, i) for i in range(2)]
    for coefs in ([0.5, -1.5], torch.tensor([0.5, -1.5], device=device)):
        upd = [t.clone() for t in tensors]
        kernels.apply_update_multi_(kernels.TensorTable(upd, keys, decays), hashes, coefs, 1e-2, 0.1)
        for t, u, k, d in zip(tensors, upd, keys, decays):
            ref = t.clone()
            kernels.apply_update_(ref, [zo.z_seed_from_pass(h, k) for h in hashes], coefs, 1e-2, 0.1 if d else 0.0)
            assert torch.equal(u, ref), (dtype, d)
    # fused update + two perturbations == the separate multi calls
    fused = [t.clone() for t in tensors]
    outs = [torch.full_like(flat, float("nan")) for _ in range(2)]
    ftable = kernels.TensorTable(fused, keys, decays)
    kernels.update_and_perturb_multi_(ftable, (hashes, [0.5, -1.5], 1e-2, 0.1), pass_hash, (1e-2, -1e-2), outs)
    sep = [t.clone() for t in tensors]
    stable = kernels.TensorTable(sep, keys, decays)
    kernels.apply_update_multi_(stable, hashes, [0.5, -1.5], 1e-2, 0.1)
    for out, scale in zip(outs, (1e-2, -1e-2)):
        ref = torch.full_like(flat, float("nan"))
        kernels.perturbed_into_multi(stable, ref, pass_hash, scale)
        for a, b in zip(ftable.views(out), stable.views(ref)):
            assert torch.equal(a, b)
    for a, b in zip(fused, sep):
        assert torch.equal(a, b)


def _check_resident_runner(device: str) -> None:
    """The engine's runner (one launch per block, one per update group) == the single-tensor kernels."""
    from zo2_ds.config import ZO2Config
    from zo2_ds.perturb import ResidentRunner, UpdateGroup, trainable_params
    from zo2_ds.testing import tiny_causal_lm

    model = tiny_causal_lm("opt", hidden=64, layers=3, dtype=torch.float16).to(device).eval()
    params = trainable_params(model)
    runner = ResidentRunner(model, params, ZO2Config(eps=1e-2, seed=5, kernels="multi_tensor"))
    assert all(u.table is None for u in runner.units)
    assert len(runner.units) < len(params) / 3, "blocks are single units"
    seen: dict[str, torch.Tensor] = {}
    owner_names = {id(m): n for n, m in model.named_modules()}

    def grab(mod, args):
        for attr, p in mod._parameters.items():
            if p is not None:
                seen.setdefault(f"{owner_names[id(mod)]}.{attr}".lstrip("."), p.detach().clone())

    embed = model.get_input_embeddings()  # gathers its rows perturbed (zo2_ds/vocab.py): seen through its output
    handles = [m.register_forward_pre_hook(grab) for m in model.modules() if m._parameters and m is not embed]
    handles.append(embed.register_forward_hook(lambda mod, args, out: seen.setdefault("embedded", out.clone())))
    ids = torch.randint(0, 96, (2, 12), device=device)
    for sign in (-1, 1, -1):  # the later passes run on the pool's re-allocated storage
        seen.clear()
        with torch.no_grad(), runner.perturbed(3, 1, sign):
            model(input_ids=ids)
        pooled = runner.scratch.storage_bytes()
        assert pooled and all(n == 0 for n in pooled), "scratch freed after the pass"
        for tp in params:
            ref = torch.empty_like(tp.param)
            kernels.perturbed_into(ref, tp.param.data, zo.z_seed(5, 3, 1, tp.key), sign * 1e-2)
            if tp.param is embed.weight:  # tied: the head's perturbed copy, and the embedding's rows, same z
                assert torch.equal(seen["embedded"], ref[ids]), "tied: same z"
            assert torch.equal(seen[tp.name if tp.param is not embed.weight else "lm_head.weight"], ref), tp.name
    for h in handles:
        h.remove()
    assert all(u.table for u in runner.units if u.module is not embed), "every unit took the multi-tensor path"
    before = {tp.name: tp.param.detach().clone() for tp in params}
    runner.update(3, [0.3, -0.1], [UpdateGroup(tuple(tp.param for tp in params), 1e-3, 0.05)])
    for tp in params:
        ref = before[tp.name]
        wd = 0.05 if tp.param.dim() >= 2 else 0.0
        kernels.apply_update_(ref, [zo.z_seed(5, 3, i, tp.key) for i in range(2)], [0.3, -0.1], 1e-3, wd)
        assert torch.equal(tp.param.data, ref), tp.name
    runner.close()


# -------------------------------------------------------------------------------------------------
# CPU: the contract
# -------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_not_available_without_cuda():
    assert kernels.available() is False
    for mode in KERNEL_MODES:
        assert not Ops(mode).fused(torch.zeros(3)), mode


def test_imports_and_reports_unavailable_without_triton():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # any `import triton` now raises ImportError
        from zo2_ds import kernels
        assert kernels.available() is False
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env["TRITON_INTERPRET"] = "0"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_validation_happens_before_launch():
    theta = torch.zeros(8, 8)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.perturbed_into(torch.empty(8, 8), theta.t(), 1, 0.1)
    with pytest.raises(ValueError, match="dtype"):
        kernels.perturbed_into(torch.empty(8, 8), theta.double(), 1, 0.1)
    with pytest.raises(ValueError, match="shape"):
        kernels.check_out(torch.empty(4), theta, "out")
    with pytest.raises(ValueError, match="coefficient"):
        kernels.apply_update_(theta, [1, 2], [0.1], 1e-3, 0.0)
    with pytest.raises(ValueError, match="outputs"):
        kernels.update_and_perturb_(theta, None, 1, [0.1], [])
    with pytest.raises(ValueError, match="outputs"):
        kernels.update_and_perturb_(theta, None, 1, [0.1, 0.2, 0.3], [theta, theta, theta])
    if not torch.cuda.is_available() and not kernels.INTERPRET:
        with pytest.raises(ValueError, match="CUDA"):
            kernels.perturbed_into(torch.empty(8, 8), theta, 1, 0.1)


def test_zo_uses_torch_path_on_cpu():
    theta = torch.randn(64, 3)
    out = zo.perturbed_into(torch.empty_like(theta), theta, SEED, 0.5)
    assert torch.equal(out, theta + 0.5 * zo.generate_z(SEED, theta.shape))


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_rows_and_gather_are_slices_of_the_whole_perturbation(dtype):
    theta = torch.randn(37, 24).to(dtype)
    whole = zo.perturbed_into(torch.empty_like(theta), theta, SEED, 0.5)
    ids = torch.tensor([[3, 0, 36], [3, 5, 1]])
    assert torch.equal(zo.perturbed_gather_(theta[ids], theta, ids, SEED, 0.5), whole[ids])
    z = zo.generate_z(SEED, theta.shape)
    for start, n in ((0, 37), (5, 9), (36, 1)):
        assert torch.equal(zo.perturbed_rows_into(torch.empty(n, 24, dtype=dtype), theta, start, SEED, 0.5),
                           whole[start : start + n])  # fmt: skip
        out = Ops("torch").perturbed_rows_into(torch.empty(n, 24, dtype=dtype), theta, start, SEED, 0.5, z)
        assert torch.equal(out, whole[start : start + n])


def test_z_seed_is_the_pass_hash_chain():
    """z_seed = z_seed_from_pass(z_pass_hash(seed, step, index), key); 63-bit; pinned values (the definition
    of z: changing them changes every trajectory)."""
    key = zo.param_key("model.decoder.layers.0.fc1.weight")
    assert zo.z_seed(1234, 7, 0, key) == zo.z_seed_from_pass(zo.z_pass_hash(1234, 7, 0), key)
    assert zo._mix64(zo._GOLDEN64) == 0xE220A8397B1DCDAF, "splitmix64's first output from state 0"
    pinned = {(0, 0, 0, 0): zo.z_seed(0, 0, 0, 0), (1234, 7, 0, key): zo.z_seed(1234, 7, 0, key)}
    assert pinned == {(0, 0, 0, 0): _PINNED_SEED_0, (1234, 7, 0, key): _PINNED_SEED_1}
    seen = set()
    for seed in (0, 1, 2**63):
        for step in (0, 1, 2):
            for index in (0, 1):
                for k in (0, 1, key):
                    s = zo.z_seed(seed, step, index, k)
                    assert 0 <= s < 2**63
                    seen.add(s)
    assert len(seen) == 3 * 3 * 2 * 3, "distinct inputs give distinct seeds"
    assert zo.z_seed(-1, 0, 0, 0) == zo.z_seed(2**64 - 1, 0, 0, 0), "inputs are taken mod 2^64"


def test_tensor_table_validation():
    with pytest.raises(ValueError, match="one key"):
        kernels.TensorTable([torch.zeros(4)], [])
    if not kernels.INTERPRET and not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            kernels.TensorTable([torch.zeros(4)], [1])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_kernels_under_triton_interpreter():
    """The kernels' indexing, masking and fused == separate logic, run by Triton's CPU interpreter."""
    code = textwrap.dedent(
        f"""
        import runpy, torch
        ns = runpy.run_path({str(Path(__file__))!r})
        n = 4 * {kernels.ROW} * 2 + 100   # two full groups and a ragged tail
        ns["_check_z_statistics"]("cpu", 4 * {kernels.ROW} * 4)
        ns["_check_determinism_and_independence"]("cpu", n)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            ns["_check_perturbed_into"]("cpu", n, dtype)
            ns["_check_fused_equals_separate"]("cpu", n, dtype)
            ns["_check_gated_coefs"]("cpu", n, dtype)
        ns["_check_apply_update"]("cpu", n, torch.float32, False)
        ns["_check_device_seeds"]("cpu")
        for misaligned in (False, True):
            ns["_check_multi_equals_single"]("cpu", torch.float16, misaligned)
        ns["_check_multi_equals_single"]("cpu", torch.float32, False)
        ns["_check_resident_runner"]("cpu")  # zo2.kernels "multi_tensor": the kernels, on CPU tensors
        ns["_check_rows_and_gather"]("cpu", torch.float16)
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env["TRITON_INTERPRET"] = "1"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


# -------------------------------------------------------------------------------------------------
# CUDA
# -------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@requires_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_coefs_cuda(dtype):
    _check_gated_coefs("cuda", (1 << 20) + 5, dtype)


@pytest.mark.cuda
@requires_kernels
def test_z_statistics_cuda():
    _check_z_statistics("cuda", 1 << 24)


@pytest.mark.cuda
@requires_kernels
def test_z_determinism_and_independence_cuda():
    _check_determinism_and_independence("cuda", (1 << 22) + 12345)


@pytest.mark.cuda
@requires_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_and_gather_cuda(dtype):
    _check_rows_and_gather("cuda", dtype)


@pytest.mark.cuda
@requires_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", [1, 4097, (1 << 20) + 3])
def test_perturbed_into_cuda(dtype, numel):
    _check_perturbed_into("cuda", numel, dtype)


@pytest.mark.cuda
@requires_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("coefs_on_device", [False, True])
def test_apply_update_cuda(dtype, coefs_on_device):
    _check_apply_update("cuda", (1 << 20) + 5, dtype, coefs_on_device)


@pytest.mark.cuda
@requires_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_equals_separate_bitwise_cuda(dtype):
    _check_fused_equals_separate("cuda", (1 << 20) + 7, dtype)


@pytest.mark.cuda
@requires_kernels
def test_q16_update_cuda():
    theta = torch.randn(1 << 16, device="cuda", dtype=torch.float16)
    seeds = [zo.z_seed(2, 0, i, 5) for i in range(16)]
    coefs = [float(i - 8) / 16 for i in range(16)]
    direction = sum(c * kernels.generate_z(s, theta.shape, "cuda").double() for s, c in zip(seeds, coefs))
    ref = theta.double() - 1e-2 * direction
    kernels.apply_update_(theta, seeds, coefs, 1e-2, 0.0)
    assert ((theta.double() - ref).norm() / ref.norm()).item() < _ulp(torch.float16)


@pytest.mark.cuda
@requires_kernels
def test_ops_dispatch_to_kernels_cuda():
    """zo2.kernels "auto" (and the kernel modes) run the kernels on CUDA tensors; "torch" runs zo.py."""
    theta = torch.randn(3000, 7, device="cuda", dtype=torch.bfloat16)
    b = kernels.perturbed_into(torch.empty_like(theta), theta, SEED, 1e-3)
    for mode in ("auto", "multi_tensor", "per_tensor"):
        ops = Ops(mode)
        assert torch.equal(ops.perturbed_into(torch.empty_like(theta), theta, SEED, 1e-3), b), mode
        assert torch.equal(ops.generate_z(SEED, theta.shape, "cuda"), kernels.generate_z(SEED, theta.shape, "cuda"))
    torch_path = Ops("torch").perturbed_into(torch.empty_like(theta), theta, SEED, 1e-3)
    assert torch.equal(torch_path, zo.perturbed_into(torch.empty_like(theta), theta, SEED, 1e-3))


@pytest.mark.cuda
@requires_kernels
@pytest.mark.parametrize("direct", [True, False])
def test_direct_launch_matches_triton_launch_cuda(direct):
    """The cached direct launch (second call onwards) == triton's own launch, also for views whose
    pointer is not 16-byte aligned (a different specialisation, so a different cache entry)."""
    kernels.set_direct_launch(direct)
    launches_before = kernels.direct_launches()
    buf = torch.randn(3 * 4096 + 9, device="cuda", dtype=torch.float16)
    for theta in (buf[:4096], buf[1:4097], buf[3 : 3 + 3 * 4096 + 5]):  # aligned, misaligned, ragged
        ref = torch.empty_like(theta)
        kernels.perturbed_into(ref, theta, SEED, 0.5)
        for _ in range(2):
            out = torch.empty_like(theta)
            kernels.perturbed_into(out, theta, SEED, 0.5)
            assert torch.equal(out, ref)
        z = kernels.generate_z(SEED, theta.shape, "cuda").double()
        expected = theta.double() + 0.5 * z
        assert ((out.double() - expected).abs() <= 1e-3 * expected.abs() + 1e-6).all()
    kernels.set_direct_launch(True)
    assert (kernels.direct_launches() > launches_before) == direct


@pytest.mark.cuda
@requires_kernels
def test_int64_offsets_cuda():
    """A tensor past 2^31 elements: the tail must be written and must not alias the head."""
    numel = (1 << 31) + 3 * kernels.ROW + 11
    if torch.cuda.mem_get_info()[0] < 3 * numel * 2 + (1 << 30):
        pytest.skip("not enough GPU memory")
    theta = torch.zeros(numel, device="cuda", dtype=torch.float16)
    out = torch.full_like(theta, float("nan"))
    kernels.perturbed_into(out, theta, SEED, 1.0)
    tail = out[-(1 << 20) :].float()
    assert torch.isfinite(out).all()
    assert abs(tail.mean().item()) < 0.01 and abs(tail.std().item() - 1.0) < 0.01
    assert not torch.equal(out[: 1 << 20], out[1 << 31 : (1 << 31) + (1 << 20)])
    del theta
    # The update path at the same size, in place: out = fp16(z) - z, zero up to fp16 rounding.
    kernels.apply_update_(out, [SEED], [1.0], 1.0, 0.0)
    assert out[-(1 << 20) :].float().abs().max().item() < 1e-2


@pytest.mark.cuda
@requires_kernels
def test_device_seeds_cuda():
    _check_device_seeds("cuda")


@pytest.mark.cuda
@requires_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("misaligned", [False, True])
def test_multi_equals_single_bitwise_cuda(dtype, misaligned):
    _check_multi_equals_single("cuda", dtype, misaligned)


@pytest.mark.cuda
@requires_kernels
def test_resident_runner_units_equal_per_tensor_kernels_cuda():
    _check_resident_runner("cuda")
