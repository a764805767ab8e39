"""Sub-block streaming (``zo2.offload.granularity`` "layer"): a block's large sub-modules stream as units of
their own. The trajectory equals offload off (and whole-block streaming) bit for bit; the GPU buffers shrink to
the largest sub-module; a model laid out once (materialize) is adopted at either granularity.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_offload import (
    VOCAB,
    assert_same,
    batches,
    make_config,
    observe,
    params_of,
    reference_narrow_transfer,
    train,
    trajectory,
)

import zo2_ds
from zo2_ds.models import find_blocks
from zo2_ds.offload import materialize, sizing, units
from zo2_ds.offload.partition import Partition
from zo2_ds.offload.store import ALIGN_BYTES, block_layout, flat_layout, plan_store
from zo2_ds.testing import tiny_causal_lm

LAYER = {"enabled": True, "granularity": "layer"}


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in params}.values())


@pytest.mark.parametrize("arch", ["opt", "gpt2", "llama", "qwen2", "mistral"])
def test_a_block_splits_into_its_large_sub_modules_and_keeps_its_norms_on_the_device(arch):
    block = find_blocks(tiny_causal_lm(arch, layers=2)).blocks[0]
    split = units.split_block(block)
    assert split is not None and len(split.units) >= 2
    largest_own = max(_nbytes([p for p in m._parameters.values() if p is not None]) for m in block.modules())
    for unit in split.units:  # no unit larger than 1.5x one module's own parameters, none tiny
        assert largest_own / units.SMALL_FRACTION <= _nbytes(unit.parameters()) <= 1.5 * largest_own
    streamed = [p for u in split.units for p in u.parameters()]
    assert {id(p) for p in streamed} | {id(p) for p in split.rest} == {id(p) for p in block.parameters()}
    assert not {id(p) for p in streamed} & {id(p) for p in split.rest}
    assert all(p.dim() == 1 for p in split.rest)  # only norms' weights and biases stay on the device
    # The block's home holds the units one after the other, each aligned: a unit's home is a slice of it.
    offsets = {id(p): off for p, off, _ in block_layout(block)[0]}
    start = 0
    for unit in split.units:
        unit_layout, size = flat_layout(unit.parameters())
        assert [offsets[id(p)] - start for p, _, _ in unit_layout] == [off for _, off, _ in unit_layout]
        start += size
        assert start % ALIGN_BYTES == 0


@pytest.mark.parametrize(
    "arch,tied,q,grad_accum,weight_decay,offload",
    [
        ("opt", True, 2, 2, 0.1, {}),  # OPT registers k, v, q but calls q first: the order is learned
        ("gpt2", False, 1, 1, 0.0, {"prefetch_depth": 0}),
        ("llama", False, 3, 1, 0.05, {"num_resident_blocks": 1}),
        ("qwen2", True, 1, 2, 0.0, {"write_back_interval": 3, "prefetch_depth": 2}),
        ("mistral", False, 2, 1, 0.1, {"max_gpu_memory": 7000}),
        ("opt", False, 1, 1, 0.0, {"write_back_interval": 2, "prefetch_next_step": False}),
    ],
)
def test_layer_granularity_equals_offload_off_bit_exactly(arch, tied, q, grad_accum, weight_decay, offload):
    base = tiny_causal_lm(arch, tied=tied, vocab_size=VOCAB, layers=3)
    data = batches(4, grad_accum)
    kw = dict(q=q, grad_accum=grad_accum, weight_decay=weight_decay)
    off = trajectory(copy.deepcopy(base), {"enabled": False}, data, **kw)
    on = trajectory(copy.deepcopy(base), {**LAYER, **offload}, data, **kw)
    store = on[0].zo_offload_store
    assert store.granularity == "layer" and store.num_blocks > 3
    assert_same(off, on)


def test_narrow_transfer_at_layer_granularity_equals_its_reference_bit_exactly():
    """The transfer_dtype schedule per unit: unit u uploads its exact master at the steps s with
    (s + u) % interval == 0 and its narrow copy (plus the updates since) at the others; the norms left on
    the device are exact at every step."""
    base = tiny_causal_lm("llama", tied=False, vocab_size=VOCAB, layers=3)
    data = batches(6, 2)
    cfg = {**LAYER, "transfer_dtype": "bf16", "write_back_interval": 3, "num_resident_blocks": 1}
    engine, *_ = zo2_ds.initialize(model=copy.deepcopy(base), config=make_config(cfg, q=2, grad_accum=2))
    store = engine.zo_offload_store
    names = {id(p): n for n, p in engine.module.named_parameters()}
    unit_of = {names[id(e.param)]: u for u in store.streamed for e in store.entries[u]}
    losses, gs = train(engine, data)
    params = params_of(engine)
    assert store.granularity == "layer" and len(store.resident) == 4
    ref_losses, ref_gs, ref_params = reference_narrow_transfer(
        copy.deepcopy(base), data, blocks="", exact_blocks=(), eps=1e-3, seed=1234, q=2, lr=2e-3, wd=0.0,
        interval=3, narrow=torch.bfloat16, unit_of=unit_of,
    )  # fmt: skip
    assert losses == ref_losses
    assert gs == ref_gs
    for name, value in ref_params.items():
        assert torch.equal(params[name], value), name


def test_the_first_run_learns_the_call_order_then_uploads_each_unit_once_per_step_ahead():
    engine, *_ = zo2_ds.initialize(model=tiny_causal_lm("opt", layers=2), config=make_config(LAYER, q=2))
    runner, store = engine.zo_runner, engine.zo_offload_store
    names = {id(m): n for n, m in engine.module.named_modules()}
    called = []
    for b, unit in enumerate(store.units):
        unit.register_forward_pre_hook(lambda m, a, b=b: called.append(b) if runner.current_pass == 0 else None)
    uploads, in_run = observe(runner, "upload"), []
    runner.add_observer(lambda w, b, p, s: in_run.append(runner.running) if (w, p) == ("upload", "start") else None)
    train(engine, batches(3, 1))
    n = store.num_blocks
    step = called[:n]
    assert called == step * 3 and sorted(step) == list(range(n))
    # OPT's attention registers k, v, q, out but calls q first: the learned order is the called one.
    first = [names[id(store.units[b])].rsplit(".", 1)[-1] for b in step[:4]]
    assert first == ["q_proj", "k_proj", "v_proj", "out_proj"]
    assert step != list(range(n))
    assert runner._order == step and runner.ring.streamed == step
    # Each unit once per step; the first run uploads each at its acquire, the later ones in the called
    # order, ahead, and into the next step (the ring's three slots stay full at the step's end).
    assert runner.num_slots == 3
    assert uploads[:n] == step and uploads[n:] == (step * 3)[: len(uploads) - n]
    assert len(uploads) == 3 * n + 3 and all(in_run)


def test_auto_streams_whole_blocks_below_the_threshold_and_sub_modules_above(monkeypatch):
    model = tiny_causal_lm("llama", layers=2)
    store, _ = plan_store(model, _offload_cfg({}), torch.device("cpu"))
    assert store.granularity == "block" and store.units == find_blocks(model).blocks
    monkeypatch.setattr(units, "AUTO_LAYER_BYTES", 1)
    store, _ = plan_store(model, _offload_cfg({}), torch.device("cpu"))
    assert store.granularity == "layer" and len(store.units) == 8
    store, _ = plan_store(model, _offload_cfg({"cuda_graphs": True}), torch.device("cpu"))
    assert store.granularity == "block"  # graphs replay whole blocks


def test_auto_follows_what_each_rank_uploads_when_the_masters_are_partitioned(monkeypatch):
    model = tiny_causal_lm("opt", layers=2)
    block_bytes = block_layout(find_blocks(model).blocks[0])[1]
    monkeypatch.setattr(units, "AUTO_LAYER_BYTES", block_bytes * 2 // 3)  # a whole block is over, half of it under
    cpu = torch.device("cpu")
    assert plan_store(model, _offload_cfg({}), cpu)[0].granularity == "layer"
    assert plan_store(model, _offload_cfg({}), cpu, ranks_sharing=2)[0].granularity == "block"
    assert plan_store(model, _offload_cfg({"granularity": "layer"}), cpu, ranks_sharing=2)[0].granularity == "layer"

    # The ring's depth, "auto": sub-modules of >= 192 MiB per rank two slots, smaller ones one ahead, or two
    # ahead when partitioned; whole blocks one ahead; an explicit depth as given.
    store, _ = plan_store(model, _offload_cfg({"granularity": "layer"}), cpu)
    unit = max(store.sizes)
    monkeypatch.setattr(sizing, "_TWO_SLOTS_FROM_BYTES", unit)
    assert sizing.prefetch_depth("auto", store) == 0
    store.partition = Partition(0, 2, None, ALIGN_BYTES)
    assert sizing.prefetch_depth("auto", store) == 2  # each rank uploads half a unit
    assert sizing.prefetch_depth(3, store) == 3
    monkeypatch.setattr(sizing, "_TWO_SLOTS_FROM_BYTES", unit // 2)
    assert sizing.prefetch_depth("auto", store) == 0
    store, _ = plan_store(model, _offload_cfg({"granularity": "block"}), cpu, ranks_sharing=2)
    store.partition = Partition(0, 2, None, ALIGN_BYTES)
    assert sizing.prefetch_depth("auto", store) == 1


def _offload_cfg(extra):
    from zo2_ds.config import parse_zo2_config

    return parse_zo2_config({"zo2": {"enabled": True, "offload": {"enabled": True, **extra}}}).offload


def test_layer_granularity_shrinks_the_slots_and_the_scratch():
    model = tiny_causal_lm("llama", tied=False, layers=4, hidden=32)
    budgets = {}
    for granularity in ("block", "layer"):
        engine, *_ = zo2_ds.initialize(
            model=copy.deepcopy(model), config=make_config({"enabled": True, "granularity": granularity})
        )
        runner, store = engine.zo_runner, engine.zo_offload_store
        budget = budgets[granularity] = runner.device_bytes()
        assert budget["slot_ring"] == runner.num_slots * max(store.sizes)
        train(engine, batches(1, 1))
        assert runner.device_bytes() == budget
    block, layer = budgets["block"], budgets["layer"]
    assert layer["slot_ring"] < block["slot_ring"] / 2
    assert layer["perturbation_scratch"] < block["perturbation_scratch"] / 2
    # The norms left on the device are counted outside the blocks.
    assert 0 < layer["outside_blocks"] - block["outside_blocks"] < block["slot_ring"] / 50


@pytest.mark.parametrize("granularity", ["block", "layer"])
def test_a_materialized_model_is_adopted_at_either_granularity(tmp_path, granularity):
    from transformers import AutoModelForCausalLM

    tiny_causal_lm("opt", tied=False, layers=3).save_pretrained(tmp_path)
    config = make_config({"enabled": True, "granularity": granularity}, q=2)
    model = materialize(tmp_path, dtype=torch.float32, device="cpu", progress=False)
    pointers = {id(p): p.data_ptr() for p in model.parameters()}
    held = [p.data for p in model.parameters()]  # no address is reused
    engine, *_ = zo2_ds.initialize(model=model, config=config)
    store = engine.zo_offload_store
    assert store.granularity == granularity
    for b in store.streamed:  # every unit's home is where materialize put its parameters: no copy
        assert store.homes[b].data_ptr() == pointers[id(store.entries[b][0].param)]
    data = batches(3, 1)
    ref_engine, *_ = zo2_ds.initialize(model=AutoModelForCausalLM.from_pretrained(tmp_path), config=config)
    assert train(engine, data) == train(ref_engine, data)
    del held


def test_bad_granularity_is_refused_with_the_key():
    model = tiny_causal_lm("opt", layers=2)
    with pytest.raises(ValueError, match="granularity"):
        zo2_ds.initialize(model=model, config=make_config({"enabled": True, "granularity": "tensor"}))
    with pytest.raises(ValueError, match='granularity="layer" cannot be combined with cuda_graphs'):
        zo2_ds.initialize(model=model, config=make_config({**LAYER, "cuda_graphs": True}))
    with pytest.raises(ValueError, match="do not split"):
        units.stream_units([torch.nn.Linear(4, 4)], "layer")
    with pytest.raises(ValueError, match=r"max_gpu_memory.*streamed unit.*\d+ bytes"):
        zo2_ds.initialize(model=model, config=make_config({**LAYER, "max_gpu_memory": 64}))


def test_a_device_too_small_for_the_offloader_is_refused_before_allocating(monkeypatch):
    from zo2_ds.offload import sizing

    model = tiny_causal_lm("llama", layers=2)
    store, _ = plan_store(model, _offload_cfg({"granularity": "block"}), torch.device("cpu"))
    slot = max(store.sizes)
    allocated = []
    monkeypatch.setattr(sizing, "device_free_bytes", lambda device: slot)  # one slot: less than two
    monkeypatch.setattr(torch, "empty", lambda *a, **k: allocated.append(a) or pytest.fail("allocated"))
    with pytest.raises(ValueError) as err:
        sizing.check_device_memory(store, 3, 4096)
    text = str(err.value)
    assert f"needs {3 * slot + 4096} bytes" in text and f"only {slot} bytes" in text
    assert f"least this model can run with is {2 * slot + 4096} bytes" in text
    assert 'granularity "layer"' in text and not allocated
    monkeypatch.undo()
    monkeypatch.setattr(sizing, "device_free_bytes", lambda device: 1000)
    with pytest.raises(ValueError, match=r"the offloader needs \d+ bytes .* slot ring \(2 x \d+ bytes\)"):
        zo2_ds.initialize(model=model, config=make_config({"enabled": True, "granularity": "block"}))
    monkeypatch.setattr(sizing, "device_free_bytes", lambda device: 10**9)
    zo2_ds.initialize(model=tiny_causal_lm("llama", layers=2), config=make_config({"enabled": True}))


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_a_lora_model_at_layer_granularity_equals_offload_off(arch):
    """PEFT wraps the projections: the wrapped linear streams as a unit, its tiny adapters stay on the device."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_causal_lm(arch, tied=False, vocab_size=VOCAB, layers=3),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    with torch.no_grad():  # non-zero adapters, so that they matter to the loss from the first step
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    data = batches(3, 1)
    off = trajectory(copy.deepcopy(model), {"enabled": False}, data, q=2)
    on = trajectory(copy.deepcopy(model), LAYER, data, q=2)
    assert on[0].zo_offload_store.granularity == "layer"
    assert_same(off, on)


def test_a_sub_module_called_twice_is_refused_naming_granularity():
    """A block calling one of its streamed sub-modules twice (here gate_proj) cannot stream per sub-module."""

    def model_calling_gate_proj_twice():
        model = tiny_causal_lm("llama", layers=2)
        mlp = model.model.layers[1].mlp
        forward = mlp.forward
        mlp.forward = lambda x: forward(x) + 0 * mlp.gate_proj(x).sum()
        return model

    engine, *_ = zo2_ds.initialize(model=model_calling_gate_proj_twice(), config=make_config(LAYER))
    with pytest.raises(RuntimeError, match=r"called unit \d+ where a unit it had not called yet was due.*granularity"):
        train(engine, batches(1, 1))
    # Whole blocks are called once each: such a model trains when it streams whole blocks.
    block = make_config({"enabled": True, "granularity": "block"})
    engine, *_ = zo2_ds.initialize(model=model_calling_gate_proj_twice(), config=block)
    train(engine, batches(1, 1))
