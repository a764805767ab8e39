"""The kernel dispatch (zo2_ds.ops): the choice by zo2.kernels and the one place of the fallback."""

from __future__ import annotations

import pytest
import torch

from zo2_ds import kernels, zo
from zo2_ds.ops import KERNEL_MODES, Ops

SEED = 1234


def test_unknown_mode_names_the_key():
    with pytest.raises(ValueError, match=r"zo2\.kernels: expected one of auto, multi_tensor, per_tensor, torch"):
        Ops("triton")


@pytest.mark.skipif(kernels.available(), reason="a machine without the kernels")
def test_without_kernels_every_mode_runs_torch_and_explicit_modes_warn():
    theta = torch.randn(7, 5)
    for mode in KERNEL_MODES:
        if mode in ("multi_tensor", "per_tensor"):
            with pytest.warns(UserWarning, match=f"zo2.kernels='{mode}'.*torch path runs instead"):
                ops = Ops(mode)
        else:
            ops = Ops(mode)
        assert not ops.fused(theta) and not ops.multi_tensor and ops.table([theta], [1]) is None
        out = ops.perturbed_into(torch.empty_like(theta), theta, SEED, 0.5)
        assert torch.equal(out, zo.perturbed_into(torch.empty_like(theta), theta, SEED, 0.5))
        a, b = theta.clone(), theta.clone()
        ops.update_and_perturb_(a, ([SEED], [0.3], 1e-2, 0.1), SEED + 1, (0.5,), (out,))
        zo.apply_update_(b, [SEED], [0.3], 1e-2, 0.1)
        assert torch.equal(a, b) and torch.equal(out, zo.perturbed_into(torch.empty_like(b), b, SEED + 1, 0.5))


def test_a_failed_multi_tensor_launch_warns_once_and_turns_the_path_off(monkeypatch):
    ops = Ops("auto")
    ops.multi_tensor = True  # as on a CUDA machine

    def broken(*args):
        raise RuntimeError("triton cannot compile this")

    monkeypatch.setattr(kernels, "perturbed_into_multi", broken)
    with pytest.warns(UserWarning, match="multi-tensor kernels failed.*tensor by tensor from now on"):
        assert ops.perturbed_into_multi(object(), torch.empty(4), 1, 0.1) is False
    assert ops.multi_tensor is False
    assert ops.apply_update_multi_(object(), [1], [0.1], 1e-3, 0.0) is False  # nothing launched any more
