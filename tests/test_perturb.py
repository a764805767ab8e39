"""ResidentRunner's perturbation units on CPU: one unit per block, per owning module elsewhere, tied tensors
perturbed at each use, the offloader's subset, a model without blocks. (Values: tests/test_engine.py checks
the engine against an independent MeZO reference bit for bit; tests/test_kernels.py the CUDA path.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zo2_ds import zo
from zo2_ds.config import ZO2Config
from zo2_ds.models import find_blocks
from zo2_ds.perturb import ResidentRunner, trainable_params
from zo2_ds.testing import tiny_causal_lm


@pytest.mark.parametrize("arch", ["opt", "gpt2", "llama"])
def test_blocks_are_single_units(arch):
    model = tiny_causal_lm(arch, layers=3).eval()
    params = trainable_params(model)
    runner = ResidentRunner(model, params, ZO2Config(eps=1e-3, seed=0))
    blocks = find_blocks(model).blocks
    by_module = {id(u.module): u for u in runner.units}
    for block in blocks:
        unit = by_module[id(block)]
        assert {id(tp.param) for tp in unit.tensors} == {id(p) for p in block.parameters()}
    inside = {id(p) for b in blocks for p in b.parameters()}
    outside = [tp for tp in params if id(tp.param) not in inside]
    assert len(runner.units) == len(blocks) + len({id(m) for tp in outside for m, _ in tp.uses})
    hooks = [(len(u.module._forward_pre_hooks), len(u.module._forward_hooks)) for u in runner.units]
    assert hooks == [(1, 1)] * len(runner.units)  # one pre- and one post-hook per unit
    runner.close()
    assert all(not u.module._forward_pre_hooks and not u.module._forward_hooks for u in runner.units)


def test_tied_weight_perturbed_at_each_use_and_restored():
    model = tiny_causal_lm("opt", tied=True).eval()
    params = trainable_params(model)
    runner = ResidentRunner(model, params, ZO2Config(eps=0.1, seed=3))
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert embed.weight is head.weight
    seen = {}

    def grab_head(mod, args):
        seen.setdefault("head", mod.weight.detach().clone())  # a pre-hook returning a value replaces args

    def grab_embedded(mod, args, out):  # the embedding gathers perturbed rows (zo2_ds/vocab.py)
        seen.setdefault("embed", out.detach().clone())

    hooks = [embed.register_forward_hook(grab_embedded), head.register_forward_pre_hook(grab_head)]
    clean = {tp.name: tp.param.detach().clone() for tp in params}
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad(), runner.perturbed(2, 0, +1):
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    name = next(tp.name for tp in params if tp.param is embed.weight)
    expected = clean[name] + 0.1 * zo.generate_z(zo.z_seed(3, 2, 0, zo.param_key(name)), embed.weight.shape)
    assert torch.equal(seen["embed"], expected[ids]) and torch.equal(seen["head"], expected)
    assert all(torch.equal(tp.param, clean[tp.name]) for tp in params), "restored exactly"
    runner.close()


def test_subset_outside_blocks_has_no_block_units():
    """The offloader builds a runner over the tensors outside its streamed blocks."""
    model = tiny_causal_lm("opt", layers=2).eval()
    inside = {id(p) for b in find_blocks(model).blocks for p in b.parameters()}
    subset = [tp for tp in trainable_params(model) if id(tp.param) not in inside]
    runner = ResidentRunner(model, subset, ZO2Config(eps=1e-3, seed=0))
    hooked = {id(u.module) for u in runner.units}
    assert not hooked & {id(b) for b in find_blocks(model).blocks}
    assert {id(tp.param) for u in runner.units for tp in u.tensors} == {id(tp.param) for tp in subset}
    runner.close()


def test_model_without_blocks_uses_module_units():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    params = trainable_params(model)
    runner = ResidentRunner(model, params, ZO2Config(eps=0.5, seed=1))
    assert sorted(type(u.module).__name__ for u in runner.units) == ["Linear", "Linear"]
    x = torch.randn(3, 4)
    with torch.no_grad(), runner.perturbed(0, 1, -1):
        out = model(x)
    w = {tp.name: tp.param.detach() - 0.5 * zo.generate_z(zo.z_seed(1, 0, 1, tp.key), tp.param.shape) for tp in params}
    ref = torch.relu(x @ w["0.weight"].T + w["0.bias"]) @ w["2.weight"].T + w["2.bias"]
    assert torch.equal(out, ref)
    runner.close()


def test_reentered_unit_raises_and_restores():
    model = tiny_causal_lm("opt", layers=1).eval()
    params = trainable_params(model)
    runner = ResidentRunner(model, params, ZO2Config(eps=1e-3, seed=0))
    block = find_blocks(model).blocks[0]

    def reenter(mod, args):
        if not getattr(mod, "_reentered", False):
            mod._reentered = True
            mod(*args)

    block.register_forward_pre_hook(reenter)
    with pytest.raises(RuntimeError, match="already perturbed"), torch.no_grad(), runner.perturbed(0, 0, 1):
        model(input_ids=torch.randint(0, 96, (1, 4)))
    assert all(m._parameters[a] is tp.param for tp in params for m, a in tp.uses)
    runner.close()
