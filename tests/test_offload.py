"""Offloading: the trajectory with zo2.offload on equals offload off bit-exactly, and the schedule holds.

On CPU the same block schedule runs (uploads, slot ring, lazy fused update, write-back) without streams;
the @cuda tests run it with streams and events, with the compute stream delayed to expose races.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import zo2_ds
from zo2_ds import kernels, zo
from zo2_ds.offload import hostmem
from zo2_ds.offload import store as store_mod
from zo2_ds.testing import ds_config, tiny_causal_lm

VOCAB = 96
SCHEDULE = {
    "type": "WarmupLR",
    "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 2e-3, "warmup_num_steps": 3, "warmup_type": "linear"},
}
CUDA = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"


def batches(num_steps, grad_accum, micro_batch=2, seq=12, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        [
            {"input_ids": (ids := torch.randint(0, VOCAB, (micro_batch, seq), generator=gen)), "labels": ids}
            for _ in range(grad_accum)
        ]
        for _ in range(num_steps)
    ]


def make_config(
    offload, *, q=1, grad_accum=1, lr=2e-3, weight_decay=0.0, schedule=None, dtype="fp32", seed=1234, kernels="auto"
):
    return ds_config(
        grad_accum=grad_accum,
        lr=lr,
        weight_decay=weight_decay,
        scheduler=schedule,
        dtype=dtype,
        zo2={"eps": 1e-3, "seed": seed, "num_perturbations": q, "kernels": kernels, "offload": offload},
    )


def observe(runner, what, phase="start"):
    """The blocks of every ``what`` operation ("upload", "compute", "writeback") as the runner issues it."""
    seen = []
    runner.add_observer(lambda w, b, p, stream: seen.append(b) if (w, p) == (what, phase) else None)
    return seen


def train(engine, data, device="cpu"):
    """Losses and g of every step; reads nothing from the parameters (no flush)."""
    engine.train()
    losses, gs = [], []
    for micro_batches in data:
        for mb in micro_batches:
            out = engine(**{k: v.to(device) for k, v in mb.items()})
            losses.append(out.loss.item())
            engine.backward(out.loss)
            engine.step()
        gs.append(engine.last_projected_grad)
    return losses, gs


def params_of(engine):
    engine.zo_runner.flush()  # offloaded blocks' last update is pending until flushed
    return {n: p.detach().to("cpu", copy=True) for n, p in engine.module.named_parameters()}


def trajectory(model, offload, data, device="cpu", **kw):
    engine, *_ = zo2_ds.initialize(model=model, config=make_config(offload, **kw))
    losses, gs = train(engine, data, device)
    engine.eval()
    mb = data[-1][0]
    eval_loss = engine(**{k: v.to(device) for k, v in mb.items()}).loss.item()
    return engine, losses, gs, eval_loss, params_of(engine)


def assert_same(a, b):
    _, losses_a, gs_a, eval_a, params_a = a
    _, losses_b, gs_b, eval_b, params_b = b
    assert losses_a == losses_b
    assert gs_a == gs_b
    assert eval_a == eval_b
    assert params_a.keys() == params_b.keys()
    for name in params_a:
        assert torch.equal(params_a[name], params_b[name]), f"{name} differs"


@pytest.mark.parametrize(
    "arch,tied,q,grad_accum,weight_decay,schedule,offload",
    [
        ("opt", True, 2, 2, 0.1, SCHEDULE, {}),
        ("opt", False, 1, 1, 0.0, None, {"prefetch_depth": 2}),
        ("gpt2", True, 1, 2, 0.0, SCHEDULE, {}),
        ("llama", False, 3, 1, 0.05, SCHEDULE, {"num_resident_blocks": 1}),
        ("llama", True, 1, 1, 0.0, None, {"prefetch_depth": 3}),
        ("qwen2", True, 2, 1, 0.0, None, {}),
        ("qwen2", False, 1, 3, 0.1, SCHEDULE, {"prefetch_depth": 2}),
        ("mistral", False, 2, 2, 0.0, SCHEDULE, {"num_resident_blocks": 2}),
        ("gpt2", False, 2, 1, 0.1, None, {"prefetch_depth": 0}),
        ("opt", True, 1, 2, 0.1, SCHEDULE, {"write_back_interval": 1}),
        ("llama", False, 2, 1, 0.0, SCHEDULE, {"write_back_interval": 3, "prefetch_depth": 0}),
        ("qwen2", True, 1, 1, 0.1, None, {"write_back_interval": 5, "num_resident_blocks": 1}),
    ],
)
def test_offload_on_equals_off_bit_exactly(arch, tied, q, grad_accum, weight_decay, schedule, offload):
    base = tiny_causal_lm(arch, tied=tied, vocab_size=VOCAB, layers=4)
    data = batches(4, grad_accum)
    kw = dict(q=q, grad_accum=grad_accum, weight_decay=weight_decay, schedule=schedule)
    off = trajectory(copy.deepcopy(base), {"enabled": False}, data, **kw)
    on = trajectory(copy.deepcopy(base), {"enabled": True, **offload}, data, **kw)
    assert_same(off, on)
    moved = sum(not torch.equal(p, dict(base.named_parameters())[n]) for n, p in on[4].items())
    assert moved > 0
    engine = on[0]
    if tied:
        assert engine.module.get_output_embeddings().weight is engine.module.get_input_embeddings().weight


def test_blocks_live_in_one_aligned_flat_buffer_per_block_rest_on_device():
    engine, *_ = zo2_ds.initialize(model=tiny_causal_lm("llama", layers=3), config=make_config({"enabled": True}))
    store = engine.zo_offload_store
    assert store.blocks.path == "model.layers" and store.num_resident == 0
    for b, block in enumerate(store.blocks.blocks):
        home = store.homes[b]
        assert home.dtype == torch.uint8 and home.dim() == 1
        base = home.data_ptr()
        for p in block.parameters():
            assert p.untyped_storage().data_ptr() == base  # a view of the block's buffer
            assert (p.data_ptr() - base) % store_mod.ALIGN_BYTES == 0
    runner = engine.zo_runner
    assert runner.num_slots == 3 and len(runner.device_buffers()["slot_ring"]) == 3


def test_runs_block_major_with_one_upload_per_block_per_step():
    engine, *_ = zo2_ds.initialize(model=tiny_causal_lm("opt", layers=3), config=make_config({"enabled": True}, q=2))
    runner = engine.zo_runner
    order = []
    for b, block in enumerate(runner.store.blocks.blocks):
        block.register_forward_pre_hook(lambda m, a, b=b: order.append((b, runner.current_pass)))
    uploads = observe(runner, "upload")
    train(engine, batches(2, 1))
    # Per step: each block once, all four passes (+z0, -z0, +z1, -z1) on it before the next block.
    one_step = [(b, j) for b in range(3) for j in range(4)]
    assert order == one_step * 2
    # Once per block per step; each step ends by uploading the next step's first blocks into the free slots
    # (the ring holds all three here): step 0's own uploads, then those for steps 1 and 2.
    assert uploads == [0, 1, 2] * 3
    assert runner.slot_owners == (0, 1, 2)
    assert runner.pending_blocks == [0, 1, 2]  # step 1's update waits for the next upload
    runner.flush()  # drops the blocks uploaded ahead (the masters may change next), streams each block once
    assert runner.pending_blocks == [] and runner.slot_owners == (None,) * 3
    assert uploads == [0, 1, 2] * 4


def test_next_steps_first_blocks_are_uploaded_during_the_step_end():
    """5 blocks, 3 slots: every step after the first finds blocks 0-2 uploaded already."""
    engine, *_ = zo2_ds.initialize(model=tiny_causal_lm("opt", layers=5), config=make_config({"enabled": True}))
    runner = engine.zo_runner
    uploads, in_run, at_start = observe(runner, "upload"), [], []
    runner.add_observer(lambda w, b, p, s: in_run.append(runner.running) if (w, p) == ("upload", "start") else None)
    runner.store.blocks.blocks[0].register_forward_pre_hook(
        lambda m, a: at_start.append(runner.slot_owners) if runner.current_pass == 0 else None
    )
    train(engine, batches(3, 1))
    assert uploads == [0, 1, 2, 3, 4, 0, 1, 2] + [3, 4, 0, 1, 2] * 2
    assert at_start == [(0, 1, 2)] * 3  # step 0 fills the ring at its start, later steps before it
    # The next step's blocks go up inside the run, as soon as blocks 3 and 4 free their slots (block 2's
    # slot is free earlier; it follows block 1 in upload order).
    assert all(in_run)


@pytest.mark.parametrize("interval", [1, 2])
def test_write_back_is_issued_as_soon_as_the_update_is_in_the_slot(interval):
    """A block's updated theta reaches its master while the block's own passes still run (not after)."""
    offload = {"enabled": True, "prefetch_depth": 0, "write_back_interval": interval}
    engine, *_ = zo2_ds.initialize(model=tiny_causal_lm("opt", layers=3), config=make_config(offload, q=2))
    runner, store = engine.zo_runner, engine.zo_offload_store
    seen, issued = [], set()
    runner.add_observer(
        lambda w, b, p, s: issued.add((b, engine.global_steps)) if (w, p) == ("writeback", "start") else None
    )

    def check(mod, args, b):
        if runner.current_pass == 1:
            slot = runner.ring.flat(b)  # the block's device copy
            seen.append((b, torch.equal(store.homes[b], slot), (b, engine.global_steps) in issued))

    for b, block in enumerate(store.blocks.blocks):
        block.register_forward_pre_hook(lambda m, a, b=b: check(m, a, b))
    train(engine, batches(2, 1))
    # Step 0 has nothing pending. In step 1, with interval 1 every block was written back at pass 0, before
    # pass 1 ran; with 2 only block 1 (its turn: (step + block) % 2 == 0), the others keep theta_0 at home.
    step1 = [(b, True, True) if interval == 1 or b == 1 else (b, False, False) for b in range(3)]
    assert seen == [(b, True, False) for b in range(3)] + step1


@pytest.mark.parametrize("interval", [1, 2, 3])
def test_write_backs_are_spread_over_steps_and_flush_writes_every_block(interval):
    offload = {"enabled": True, "write_back_interval": interval}
    engine, *_ = zo2_ds.initialize(model=tiny_causal_lm("llama", layers=6), config=make_config(offload))
    runner = engine.zo_runner
    written = observe(runner, "writeback")
    per_step = []
    for micro in batches(7, 1):
        before = len(written)
        train(engine, [micro])
        per_step.append(sorted(written[before:]))
    # Step 0 has nothing to write; later, each block every `interval` steps, 6 / interval blocks a step.
    assert per_step[0] == []
    for step, blocks in enumerate(per_step[1:], start=1):
        assert blocks == [b for b in range(6) if (step + b) % interval == 0], (step, blocks)
    assert all(runner.pending.count(b) <= interval for b in range(6))
    runner.flush()
    assert runner.pending_blocks == []


def test_state_dict_and_eval_see_flushed_updates():
    base = tiny_causal_lm("gpt2", layers=2)
    data = batches(2, 1)
    off, *_ = trajectory(copy.deepcopy(base), {"enabled": False}, data)
    engine, *_ = zo2_ds.initialize(model=copy.deepcopy(base), config=make_config({"enabled": True}))
    train(engine, data)
    assert engine.zo_runner.pending_blocks
    state = engine.module.state_dict()  # the model's own state_dict flushes (e.g. save_pretrained)
    assert not engine.zo_runner.pending_blocks
    for name, value in off.module.state_dict().items():
        assert torch.equal(state[name].cpu(), value.cpu()), name


def test_model_called_directly_streams_its_blocks():
    engine, *_ = zo2_ds.initialize(model=tiny_causal_lm("qwen2", layers=2), config=make_config({"enabled": True}))
    ids = torch.randint(0, VOCAB, (1, 6))
    engine.module.eval()
    with torch.no_grad():
        direct = engine.module(input_ids=ids).logits
    engine.eval()
    assert torch.equal(engine(input_ids=ids).logits, direct)


@pytest.mark.parametrize("granularity", ["block", "layer"])
def test_resume_mid_training_equals_uninterrupted(tmp_path, granularity):
    base = tiny_causal_lm("opt", tied=True, layers=3)
    data = batches(5, 2)
    kw = dict(q=2, grad_accum=2, schedule=SCHEDULE, weight_decay=0.1)
    offload = {"enabled": True, "granularity": granularity}
    full = trajectory(copy.deepcopy(base), offload, data, **kw)
    off = trajectory(copy.deepcopy(base), {"enabled": False}, data, **kw)
    assert_same(full, off)

    first, *_ = zo2_ds.initialize(model=copy.deepcopy(base), config=make_config(offload, **kw))
    head_losses, head_gs = train(first, data[:2])
    first.save_checkpoint(str(tmp_path), tag="step2")
    # The resumed engine starts from different weights: everything must come from the checkpoint.
    second, *_ = zo2_ds.initialize(
        model=tiny_causal_lm("opt", tied=True, layers=3, seed=9), config=make_config(offload, **kw)
    )
    assert second.zo_offload_store.granularity == granularity
    second.load_checkpoint(str(tmp_path), tag="step2")
    assert second.global_steps == 2
    tail_losses, tail_gs = train(second, data[2:])
    assert head_losses + tail_losses == full[1]
    assert head_gs + tail_gs == full[2]
    resumed = params_of(second)
    for name, value in full[4].items():
        assert torch.equal(resumed[name], value), name


def test_interrupt_mid_step_leaves_checkpoint_resumable(tmp_path):
    base = tiny_causal_lm("llama", layers=3)
    data = batches(4, 1)
    full = trajectory(copy.deepcopy(base), {"enabled": True}, data, q=2)

    engine, *_ = zo2_ds.initialize(model=copy.deepcopy(base), config=make_config({"enabled": True}, q=2))
    train(engine, data[:2])
    engine.save_checkpoint(str(tmp_path), tag="last")
    runner = engine.zo_runner
    block = runner.store.blocks.blocks[1]

    def interrupt(mod, args):
        if runner.current_pass == 2:
            raise KeyboardInterrupt

    handle = block.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(engine, data[2:3])
    handle.remove()
    # Nothing is left half-way: params point at their homes, no block is acquired, no thread is left.
    assert not runner.acquired_blocks and not runner.running
    for b, block_entries in enumerate(runner.store.entries):
        for e, v in zip(block_entries, runner.store.home_views[b]):
            assert e.param.data_ptr() == v.data_ptr()

    engine.load_checkpoint(str(tmp_path), tag="last")  # also forgets the interrupted micro-step's g
    losses, gs = train(engine, data[2:])
    assert losses == full[1][2:] and gs == full[2][2:]
    resumed = params_of(engine)
    for name, value in full[4].items():
        assert torch.equal(resumed[name], value), name


def test_failure_in_one_pass_propagates_and_leaves_parameters_clean():
    engine, *_ = zo2_ds.initialize(model=tiny_causal_lm("opt", layers=2), config=make_config({"enabled": True}))
    before = params_of(engine)
    block = engine.zo_runner.store.blocks.blocks[1]

    def boom(mod, args):
        if engine.zo_runner.current_pass == 1:
            raise ValueError("boom in pass 1")

    handle = block.register_forward_pre_hook(boom)
    engine.train()
    ids = torch.randint(0, VOCAB, (2, 8))
    with pytest.raises(ValueError, match="boom in pass 1"):
        engine(input_ids=ids, labels=ids)
    handle.remove()
    after = params_of(engine)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    out = engine(input_ids=ids, labels=ids)  # and the runner still works
    assert torch.isfinite(out.loss)


def test_budget_keeps_blocks_resident_and_bad_input_is_explained(monkeypatch):
    model = tiny_causal_lm("llama", layers=4)
    block_bytes = store_mod.block_nbytes(model.model.layers[0])
    engine, *_ = zo2_ds.initialize(
        model=model, config=make_config({"enabled": True, "max_gpu_memory": 2 * block_bytes + 7})
    )
    assert engine.zo_offload_store.num_resident == 2 and engine.zo_offload_store.streamed == [1, 3]  # spread out

    with pytest.raises(ValueError, match=r"zo2\.offload\.max_gpu_memory=.*smaller than one block"):
        zo2_ds.initialize(
            model=tiny_causal_lm("llama", layers=4), config=make_config({"enabled": True, "max_gpu_memory": "1KB"})
        )

    monkeypatch.setattr(hostmem, "available_host_bytes", lambda: 1000)
    with pytest.raises(ValueError, match=r"pinned host masters .* need .* GiB.*only 0\.00 GiB is available"):
        zo2_ds.initialize(model=tiny_causal_lm("llama", layers=4), config=make_config({"enabled": True}))
    # With a narrower transfer_dtype the host holds the narrow copies too (fp32 + bf16: half the blocks
    # more). The masters replace the model's storage block by block, so they need one block more; the
    # bf16 copies of 4 blocks need 2 more.
    monkeypatch.setattr(hostmem, "available_host_bytes", lambda: int(2.5 * block_bytes))
    zo2_ds.initialize(model=tiny_causal_lm("llama", layers=4), config=make_config({"enabled": True}))
    with pytest.raises(ValueError, match=r"masters of 4 streamed blocks and their transfer_dtype copies need"):
        zo2_ds.initialize(
            model=tiny_causal_lm("llama", layers=4), config=make_config({"enabled": True, "transfer_dtype": "bf16"})
        )
    monkeypatch.undo()

    class NoBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x).sum()

    with pytest.raises(ValueError, match=r"zo2\.offload\.blocks_attr"):
        zo2_ds.initialize(model=NoBlocks(), config=make_config({"enabled": True}))


def test_transfer_dtype_must_be_narrower_than_the_parameters():
    base = tiny_causal_lm("opt", layers=2)
    data = batches(2, 1)
    off = trajectory(copy.deepcopy(base), {"enabled": False}, data)
    same = trajectory(copy.deepcopy(base), {"enabled": True, "transfer_dtype": "fp32"}, data)
    assert_same(off, same)
    assert same[0].zo_offload_store.narrow is None
    for model_dtype, wanted in (("bf16", "fp32"), ("bf16", "fp16")):
        with pytest.raises(ValueError, match=rf"transfer_dtype='{wanted}' must be narrower.*torch\.bfloat16"):
            config = make_config({"enabled": True, "transfer_dtype": wanted}, dtype=model_dtype)
            zo2_ds.initialize(model=copy.deepcopy(base), config=config)
    big = copy.deepcopy(base)
    with torch.no_grad():
        big.model.decoder.layers[1].fc1.weight[0, 0] = 1e6
    with pytest.raises(ValueError, match=r"model\.decoder\.layers\.1\.fc1\.weight has values outside the range"):
        zo2_ds.initialize(model=big, config=make_config({"enabled": True, "transfer_dtype": "fp16"}))


def _mezo_update(theta, step, g, lr, wd, z):
    """One plain MeZO update of one fp32 tensor (the arithmetic of tests/test_engine.py's reference)."""
    q = len(g)
    direction = (g[0] / q) * z(step, 0)
    for i in range(1, q):
        direction += (g[i] / q) * z(step, i)
    return theta - lr * (direction + wd * theta)


def reference_narrow_transfer(
    model, data, *, blocks, exact_blocks, eps, seed, q, lr, wd, interval, narrow, unit_of=None
):
    """Plain MeZO where block b's forwards at step s see its exact weights when (s + b) % interval == 0,
    and otherwise its weights as of that step, rounded to ``narrow`` and widened, plus the updates since
    (in order, in fp32): the documented semantics of a narrower zo2.offload.transfer_dtype. ``unit_of``
    (parameter name -> streamed unit, at granularity "layer") replaces the block of each name; a name
    not in it is exact at every step.

    Independent of the runner: weights are written in place, the updates applied eagerly. Returns the
    reported losses, the g of every step and the final exact weights.
    """
    model.eval()
    named = dict(model.named_parameters())  # distinct tensors
    block_of = {n: int(n[len(blocks) + 1 :].split(".")[0]) for n in named if n.startswith(blocks + ".")}
    block_of = {n: b for n, b in block_of.items() if b not in exact_blocks} if unit_of is None else dict(unit_of)
    exact = {n: p.detach().clone() for n, p in named.items()}
    snap = {n: exact[n].to(narrow).float() for n in block_of}
    since = {b: [] for b in set(block_of.values())}

    def z_of(n):
        return lambda step, i: zo.generate_z(zo.z_seed(seed, step, i, zo.param_key(n)), named[n].shape)

    losses, gs = [], []
    for step, micro_batches in enumerate(data):
        theta = dict(exact)
        for n, b in block_of.items():
            if (step + b) % interval == 0:
                snap[n] = exact[n].to(narrow).float()
            else:
                t = snap[n]
                for s_, g_ in since[b]:
                    t = _mezo_update(t, s_, g_, lr, wd if t.dim() >= 2 else 0.0, z_of(n))
                theta[n] = t
        for b in since:
            if (step + b) % interval == 0:
                since[b] = []
        g_sum = None
        for mb in micro_batches:  # every micro-batch of a step sees the same weights
            plus, minus = [], []
            with torch.no_grad():
                for i in range(q):
                    for sign, out in ((1, plus), (-1, minus)):
                        for n, p in named.items():
                            p.copy_(theta[n].float() + (sign * eps) * z_of(n)(step, i))
                        out.append(model(**mb).loss)
            lp, lm = torch.stack(plus), torch.stack(minus)
            g = (lp.float() - lm.float()) / (2.0 * eps)
            g_sum = g if g_sum is None else g_sum + g
            losses.append(((lp.float().mean() + lm.float().mean()) / 2).item())
        g = (g_sum.float() / len(micro_batches)).tolist()
        gs.append(g)
        for n in named:
            exact[n] = _mezo_update(exact[n], step, g, lr, wd if exact[n].dim() >= 2 else 0.0, z_of(n))
        for b in since:
            since[b].append((step, g))
    return losses, gs, exact


@pytest.mark.parametrize(
    "arch,tied,q,grad_accum,interval,wd,narrow,offload",
    [
        ("opt", True, 1, 1, 3, 0.0, "bf16", {}),
        ("llama", False, 2, 2, 2, 0.1, "bf16", {"prefetch_depth": 0}),
        ("qwen2", True, 1, 1, 4, 0.0, "fp16", {"num_resident_blocks": 1}),
        ("gpt2", False, 1, 3, 5, 0.1, "bf16", {"prefetch_depth": 2}),
        ("mistral", True, 2, 2, 3, 0.0, "bf16", {"prefetch_depth": 1}),
    ],
)
def test_narrow_transfer_equals_its_reference_bit_exactly(arch, tied, q, grad_accum, interval, wd, narrow, offload):
    base = tiny_causal_lm(arch, tied=tied, vocab_size=VOCAB, layers=4)
    data = batches(7, grad_accum)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[narrow]
    cfg = {"enabled": True, "transfer_dtype": narrow, "write_back_interval": interval, **offload}
    kw = dict(q=q, grad_accum=grad_accum, weight_decay=wd)
    engine, *_ = zo2_ds.initialize(model=copy.deepcopy(base), config=make_config(cfg, **kw))
    resident = engine.zo_offload_store.resident
    losses, gs = train(engine, data)
    params = params_of(engine)

    assert resident == ({0} if offload.get("num_resident_blocks") else set())
    ref_losses, ref_gs, ref_params = reference_narrow_transfer(
        copy.deepcopy(base),
        data,
        blocks=engine.zo_offload_store.blocks.path,
        exact_blocks=resident,  # a resident block never crosses the link: exact weights at every step
        eps=1e-3,
        seed=1234,
        q=q,
        lr=2e-3,
        wd=wd,
        interval=interval,
        narrow=dtype,
    )
    assert losses == ref_losses
    assert gs == ref_gs
    for name, value in ref_params.items():
        assert torch.equal(params[name], value), name
    off = trajectory(copy.deepcopy(base), {"enabled": False}, data, **kw)
    assert losses != off[1]  # the narrow copies were used ...
    assert max(abs(a - b) for a, b in zip(losses, off[1])) < 1e-2  # ... and only rounded the weights


def test_narrow_transfer_recovers_from_a_wrong_prefetch_guess():
    """Without the engine's next_step hint, the copies uploaded ahead at the end of a micro-step are the
    wrong ones at every other step: they are uploaded again at acquire, and the trajectory is unchanged."""
    base = tiny_causal_lm("llama", tied=False, vocab_size=VOCAB, layers=4)
    data = batches(5, 2)
    cfg = make_config({"enabled": True, "transfer_dtype": "bf16", "write_back_interval": 2}, grad_accum=2)
    results, reissued = [], []
    for hint in (True, False):
        engine, *_ = zo2_ds.initialize(model=copy.deepcopy(base), config=cfg)
        runner = engine.zo_runner
        run, count = runner.run, [0]

        def run_without_hint(step, forward, next_step=None, run=run):
            return run(step, forward)  # next_step defaults to step + 1: wrong inside an accumulation

        def count_reuploads(what, b, phase, stream, runner=runner, count=count):
            if (what, phase) == ("upload", "start"):  # again, into the slot the block holds already
                count[0] += runner.slot_owners[runner.ring.slot_of[b]] == b

        if not hint:
            runner.run = run_without_hint
        runner.add_observer(count_reuploads)
        results.append((*train(engine, data), params_of(engine)))
        reissued.append(count[0])
    assert reissued[0] == 0 and reissued[1] > 0
    assert results[0][:2] == results[1][:2]
    for name, value in results[0][2].items():
        assert torch.equal(results[1][2][name], value), name


def test_cuda_graphs_flag_changes_nothing_on_cpu():
    base = tiny_causal_lm("opt", vocab_size=VOCAB, layers=2)
    data = batches(2, 1)
    plain = trajectory(copy.deepcopy(base), {"enabled": True}, data)
    flagged = trajectory(copy.deepcopy(base), {"enabled": True, "cuda_graphs": True}, data)
    assert flagged[0].zo_runner.graphs is None  # CUDA only
    assert_same(plain, flagged)


def test_narrow_conversion_per_parameter_equals_the_flat_one():
    """A block of one dtype converts as one flat kernel; mixed blocks convert parameter by parameter."""
    base = tiny_causal_lm("qwen2", vocab_size=VOCAB, layers=3)
    cfg = make_config({"enabled": True, "transfer_dtype": "bf16", "write_back_interval": 2}, q=2)
    runs = []
    for flat in (True, False):
        engine, *_ = zo2_ds.initialize(model=copy.deepcopy(base), config=cfg)
        narrow = engine.zo_offload_store.narrow
        assert narrow.flat == [True] * 3
        narrow.flat = [flat] * 3
        runs.append((*train(engine, batches(4, 1)), params_of(engine)))
    assert runs[0][:2] == runs[1][:2]
    for name, value in runs[0][2].items():
        assert torch.equal(runs[1][2][name], value), name


def test_narrow_copies_follow_the_masters_through_loads_and_flushes():
    base = tiny_causal_lm("opt", vocab_size=VOCAB, layers=4)
    cfg = make_config({"enabled": True, "transfer_dtype": "bf16", "write_back_interval": 3})
    engine, *_ = zo2_ds.initialize(model=copy.deepcopy(base), config=cfg)
    store, runner = engine.zo_offload_store, engine.zo_runner

    def check_copies():
        for b in store.streamed:
            assert not runner.pending.count(b)
            for e, n in zip(store.entries[b], store.narrow.entries[b]):
                assert torch.equal(n.view(store.narrow.homes[b]), e.view(store.homes[b]).to(n.dtype)), e.param

    check_copies()
    train(engine, batches(4, 1))
    runner.flush()  # writes every block back: the masters and (rounded on the device) their copies
    check_copies()
    remade = []
    remake = store.narrow_from_master
    store.narrow_from_master = lambda b: (remade.append(b), remake(b))
    engine.module.load_state_dict(base.state_dict())  # the masters change under the copies ...
    assert sorted(remade) == [0, 1, 2, 3]  # ... each block's is remade once, on the host
    check_copies()
    # From here on the engine is a fresh one built from those weights, at the same step.
    fresh, *_ = zo2_ds.initialize(model=copy.deepcopy(base), config=cfg)
    fresh.global_steps = engine.global_steps
    assert train(engine, batches(3, 1, seed=9)) == train(fresh, batches(3, 1, seed=9))
    assert params_of(engine).keys() == params_of(fresh).keys()
    for name, value in params_of(fresh).items():
        assert torch.equal(params_of(engine)[name], value), name


def test_narrow_transfer_resumes_as_the_run_that_saved(tmp_path):
    """save_checkpoint flushes (every block's copy is remade from its master); the resumed engine remakes
    its copies from the loaded masters the same way, so it continues as the run that saved."""
    base = tiny_causal_lm("llama", tied=False, vocab_size=VOCAB, layers=4)
    data = batches(6, 2)
    kw = dict(q=2, grad_accum=2, schedule=SCHEDULE, weight_decay=0.1)
    cfg = make_config({"enabled": True, "transfer_dtype": "bf16", "write_back_interval": 3}, **kw)
    first, *_ = zo2_ds.initialize(model=copy.deepcopy(base), config=cfg)
    head_losses, head_gs = train(first, data[:2])
    first.save_checkpoint(str(tmp_path), tag="step2")
    rest_losses, rest_gs = train(first, data[2:])
    second, *_ = zo2_ds.initialize(
        model=tiny_causal_lm("llama", tied=False, vocab_size=VOCAB, layers=4, seed=9), config=cfg
    )
    second.load_checkpoint(str(tmp_path), tag="step2")
    assert second.global_steps == 2
    assert train(second, data[2:]) == (rest_losses, rest_gs)
    final = params_of(first)
    for name, value in params_of(second).items():
        assert torch.equal(final[name], value), name


@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize("num_resident", [0, 2])
def test_device_bytes_are_the_ring_scratch_and_resident_blocks(depth, num_resident):
    """What the offloader allocates on the device, counted from its buffers, matches the budget formula."""
    model = tiny_causal_lm("opt", tied=True, layers=6)
    model.model.decoder.layers[0].fc1.weight.requires_grad_(False)  # frozen tensors need no scratch
    offload = {"enabled": True, "prefetch_depth": depth, "num_resident_blocks": num_resident}
    engine, *_ = zo2_ds.initialize(model=model, config=make_config(offload))
    runner, store = engine.zo_runner, engine.zo_offload_store
    budget = runner.device_bytes()
    streamed = [b for b in range(6) if b not in store.resident]
    buffers = runner.device_buffers()
    assert runner.num_slots == min(depth + 2, len(streamed)) == len(buffers["slot_ring"])
    block_bytes = max(store.sizes)
    assert budget["slot_ring"] == runner.num_slots * block_bytes == sum(s.numel() for s in buffers["slot_ring"])
    assert budget["resident_blocks"] == num_resident * block_bytes
    align = store_mod.ALIGN_BYTES
    trainable = [
        sum(-(-p.numel() * p.element_size() // align) * align for p in block.parameters() if p.requires_grad)
        for block in store.blocks.blocks
    ]
    assert budget["perturbation_scratch"] == max(trainable) == buffers["perturbation_scratch"][0].numel()
    embed = engine.module.get_input_embeddings().weight
    assert budget["outside_perturbed"] == embed.numel() * embed.element_size()  # the tied embedding / head

    # Allocated once: a step neither replaces nor adds device buffers of the offloader.
    def pointers():
        return {part: [t.data_ptr() for t in ts] for part, ts in runner.device_buffers().items()}

    before = pointers()
    train(engine, batches(2, 1))
    assert pointers() == before
    assert runner.device_bytes() == budget


def test_save_pretrained_and_destroy_keep_the_last_update(tmp_path):
    from safetensors.torch import load_file

    base = tiny_causal_lm("llama", tied=False, layers=3)
    data = batches(3, 1)
    off = trajectory(copy.deepcopy(base), {"enabled": False}, data)[4]

    engine, *_ = zo2_ds.initialize(model=copy.deepcopy(base), config=make_config({"enabled": True}))
    train(engine, data)
    assert engine.zo_runner.pending_blocks  # the last step's update is still pending
    engine.module.save_pretrained(tmp_path / "saved")
    assert not engine.zo_runner.pending_blocks
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    for name, value in off.items():
        assert torch.equal(saved[name], value), name

    # A submodule's state_dict (e.g. saving only the backbone) flushes too.
    engine, *_ = zo2_ds.initialize(model=copy.deepcopy(base), config=make_config({"enabled": True}))
    train(engine, data)
    backbone = engine.module.model.state_dict()
    assert not engine.zo_runner.pending_blocks
    for name, value in backbone.items():
        assert torch.equal(value, off["model." + name]), name

    # destroy() applies the pending update to the host masters before closing the runner.
    model = copy.deepcopy(base)
    engine, *_ = zo2_ds.initialize(model=model, config=make_config({"enabled": True}))
    train(engine, data)
    assert engine.zo_runner.pending_blocks
    engine.destroy()
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), off[name]), name


@pytest.mark.parametrize("offload", [False, True])
def test_wall_clock_breakdown(offload):
    config = make_config({"enabled": offload}, q=2)
    config["wall_clock_breakdown"] = True
    engine, *_ = zo2_ds.initialize(model=tiny_causal_lm("opt", layers=2), config=config)
    losses, _ = train(engine, batches(2, 1))
    engine.eval()
    ids = batches(1, 1)[0][0]["input_ids"]
    engine(input_ids=ids, labels=ids)
    assert len(losses) == 2 and engine.global_steps == 2


@pytest.mark.parametrize("offload", [False, True])
def test_flops_profiler_covers_every_pass(tmp_path, offload):
    """DeepSpeed's flops profiler at its step: one profile over the 2q passes (offloaded or not), and no
    backward lines (with wall_clock_breakdown DeepSpeed divides by the backward's latency, 0 here)."""
    from deepspeed.profiling.flops_profiler.profiler import FlopsProfiler

    base = tiny_causal_lm("opt", vocab_size=VOCAB, layers=3)
    data = batches(3, 1)
    plain = FlopsProfiler(copy.deepcopy(base).eval())
    plain.start_profile()
    with torch.no_grad():
        plain.model(**data[1][0])
    one_pass = plain.get_total_flops()
    plain.end_profile()

    out = tmp_path / "flops.txt"
    cfg = make_config({"enabled": offload}, q=2)
    cfg["wall_clock_breakdown"] = True
    cfg["flops_profiler"] = {"enabled": True, "profile_step": 1, "detailed": False, "output_file": str(out)}
    engine, *_ = zo2_ds.initialize(model=copy.deepcopy(base), config=cfg)
    losses, _ = train(engine, data)
    assert losses == trajectory(copy.deepcopy(base), {"enabled": False}, data, q=2)[1]  # profiling changes nothing
    text = out.read_text()
    from deepspeed.profiling.flops_profiler.profiler import number_to_string

    assert f"fwd flops per GPU:  {number_to_string(4 * one_pass)}".replace(" ", "") in text.replace(" ", "")
    assert "bwd latency" not in text.split("Notations")[-1].split("fwd latency:")[-1]


def test_hf_trainer_with_offload_equals_without(tmp_path):
    import json
    from pathlib import Path

    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class RandomTokens(Dataset):
        def __init__(self, n):
            self.ids = torch.randint(0, VOCAB, (n, 12), generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    shipped = json.loads((Path(__file__).resolve().parent.parent / "ds_configs" / "zo2_trainer.json").read_text())
    base = tiny_causal_lm("opt", tied=True, layers=3)
    runs = {}
    for offload in (False, True):
        ds = copy.deepcopy(shipped)
        ds["zo2"]["offload"] = {"enabled": offload}
        args = TrainingArguments(
            output_dir=str(tmp_path / str(offload)),
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            max_steps=3,
            learning_rate=1e-2,
            warmup_steps=1,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            deepspeed=ds,
            use_cpu=True,
            disable_tqdm=True,
        )
        model = copy.deepcopy(base)
        trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(48))
        trainer.train()
        engine = trainer.model_wrapped
        assert isinstance(engine, zo2_ds.ZOEngine)
        assert (engine.zo_config.offload.enabled, hasattr(engine, "zo_offload_store")) == (offload, offload)
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        runs[offload] = (losses, {n: v.detach().clone() for n, v in model.state_dict().items()})
        trainer.save_model(str(tmp_path / f"saved_{offload}"))
    assert len(runs[True][0]) == 3 and runs[True][0] == runs[False][0]
    for name, value in runs[False][1].items():
        assert torch.equal(runs[True][1][name], value), name
    assert any(not torch.equal(v, base.state_dict()[n]) for n, v in runs[True][1].items())


def test_parse_bytes():
    assert store_mod.parse_bytes("8GB") == 8 * 10**9
    assert store_mod.parse_bytes("1.5GiB") == int(1.5 * 2**30)
    assert store_mod.parse_bytes(1234) == 1234
    with pytest.raises(ValueError, match="max_gpu_memory"):
        store_mod.parse_bytes("lots")


def _check_multi_tensor_offload(device: str, dtype: str = "fp32", kernels_mode: str = "auto") -> None:
    """The offloader's CUDA path: one multi-tensor launch per block and pass (the first fusing the pending
    update), one update launch per block on flush, and the trajectory of offload off (the resident runner's
    multi-tensor kernels), bit for bit. Counts the launches by wrapping the kernels' entry points."""
    from zo2_ds import kernels

    calls: dict[str, list] = {"multi": [], "fused_multi": [], "update_multi": [], "single": []}
    wrapped = {
        "perturbed_into_multi": "multi",
        "update_and_perturb_multi_": "fused_multi",
        "apply_update_multi_": "update_multi",
        "perturbed_into": "single",
        "update_and_perturb_": "single",
        "apply_update_": "single",
    }
    originals = {name: getattr(kernels, name) for name in wrapped}

    def counting(name):
        def call(*args, **kwargs):
            calls[wrapped[name]].append(id(args[0]))  # the table (multi) or theta (single)
            return originals[name](*args, **kwargs)

        return call

    base = tiny_causal_lm("opt", tied=True, vocab_size=VOCAB, layers=3)
    data = batches(3, 1)
    kw = dict(q=2, weight_decay=0.1, schedule=SCHEDULE, dtype=dtype, kernels=kernels_mode)
    for name in wrapped:
        setattr(kernels, name, counting(name))
    try:
        off = trajectory(copy.deepcopy(base), {"enabled": False}, data, device=device, **kw)
        for key in calls:
            calls[key].clear()
        on = trajectory(copy.deepcopy(base), {"enabled": True, "write_back_interval": 1}, data, device=device, **kw)
    finally:
        for name, fn in originals.items():
            setattr(kernels, name, fn)
    assert_same(off, on)
    runner = on[0].zo_runner
    num_blocks = runner.store.num_blocks
    block_tables = runner.perturber.tables()
    assert all(isinstance(t, kernels.TensorTable) for t in block_tables), block_tables
    assert not calls["single"], "no per-tensor launch"
    # Launches on the blocks' tables (the others are the resident runner's, for tensors outside the blocks):
    # 3 steps of 2q = 4 passes; the first pass of steps 2 and 3 fuses the pending update, every other pass
    # only perturbs, one launch per block each; the eval forward applies the last update (one per block).
    # (write_back_interval 1: with more, an upload also re-applies the updates its master lacks.)
    tables = {id(t) for t in block_tables}
    counts = {k: sum(i in tables for i in v) for k, v in calls.items()}
    assert counts == {"multi": (3 * 4 - 2) * num_blocks, "fused_multi": 2 * num_blocks,
                      "update_multi": num_blocks, "single": 0}, counts  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_offload_multi_tensor_path_under_triton_interpreter():
    """The offloader's CUDA code path (multi-tensor tables per block, fused lazy update) run by Triton's
    CPU interpreter on CPU tensors: bit-identical to offload off, one launch per block and pass."""
    code = textwrap.dedent(
        f"""
        import runpy
        ns = runpy.run_path({str(Path(__file__))!r})
        ns["_check_multi_tensor_offload"]("cpu", kernels_mode="multi_tensor")  # the kernels, on CPU tensors
        print("ok")
        """
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    from zo2_ds.testing import free_port

    env.update(TRITON_INTERPRET="1", DS_ACCELERATOR="cpu", MASTER_PORT=str(free_port()))  # its own process group
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and "ok" in res.stdout, (res.stdout[-2000:], res.stderr[-3000:])


# -- CUDA: streams, events, pinned memory ---------------------------------------------------------------


def _delay_everything(engine, cycles):
    """Delay the compute stream at each block, and each upload / gather / write-back (through the runner's
    observer hook, on the stream the copy is queued on), to expose missing event waits."""
    runner = engine.zo_runner
    for block in runner.store.blocks.blocks:
        block.register_forward_pre_hook(lambda m, a: torch.cuda._sleep(cycles))

    def delay(what, block, phase, stream):
        if phase == "start" and what in ("upload", "gather", "writeback"):
            with torch.cuda.stream(stream):
                torch.cuda._sleep(cycles)

    runner.add_observer(delay)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("delay", [0, 2_000_000])
@pytest.mark.parametrize("depth,granularity", [(1, "block"), (0, "block"), (1, "layer"), (0, "layer")])
def test_cuda_offload_equals_in_gpu_bit_exactly(dtype, delay, depth, granularity):
    assert CUDA, "run with DS_ACCELERATOR=cuda"
    base = tiny_causal_lm("llama", tied=False, vocab_size=VOCAB, hidden=64, layers=5)
    data = batches(4, 2, seq=32)
    kw = dict(q=2, grad_accum=2, schedule=SCHEDULE, weight_decay=0.1, dtype=dtype)
    off = trajectory(copy.deepcopy(base), {"enabled": False}, data, device="cuda", **kw)
    offload = {"enabled": True, "prefetch_depth": depth, "granularity": granularity}
    engine, *_ = zo2_ds.initialize(model=copy.deepcopy(base), config=make_config(offload, **kw))
    store = engine.zo_offload_store
    assert store.granularity == granularity
    # Page-locked (cudaHostRegister'ed exactly, which torch's is_pinned() does not report) and host-resident.
    assert all(store.host_pinned) and all(home.device.type == "cpu" for home in store.homes)
    assert all(p.device.type == "cpu" for u in store.units for p in u.parameters())
    assert engine.module.get_input_embeddings().weight.device.type == "cuda"
    if delay:
        _delay_everything(engine, delay)
    losses, gs = train(engine, data, "cuda")
    engine.eval()
    mb = data[-1][0]
    eval_loss = engine(**{k: v.cuda() for k, v in mb.items()}).loss.item()
    assert_same(off, (engine, losses, gs, eval_loss, params_of(engine)))


@pytest.mark.cuda
@pytest.mark.parametrize(
    "arch,delay", [("llama", 0), ("llama", 2_000_000), ("opt", 0), ("gpt2", 0), ("qwen2", 0), ("mistral", 0)]
)
def test_cuda_graphs_equal_eager_in_gpu_bit_exactly(arch, delay):
    """zo2.offload.cuda_graphs: every block's passes replay from graphs after two steps, same bits."""
    assert CUDA, "run with DS_ACCELERATOR=cuda"
    base = tiny_causal_lm(arch, tied=arch != "llama", vocab_size=VOCAB, hidden=64, layers=4)
    data = batches(5, 2, seq=32)
    kw = dict(q=2, grad_accum=2, schedule=SCHEDULE, weight_decay=0.1, dtype="fp16")
    off = trajectory(copy.deepcopy(base), {"enabled": False}, data, device="cuda", **kw)
    engine, *_ = zo2_ds.initialize(
        model=copy.deepcopy(base), config=make_config({"enabled": True, "cuda_graphs": True}, **kw)
    )
    graphs = engine.zo_runner.graphs
    if delay:
        _delay_everything(engine, delay)
    losses, gs = train(engine, data, "cuda")
    replays = graphs.replays
    assert not graphs.eager, "a block fell back to eager"
    # 10 micro-steps x 4 passes x 4 blocks: a block's first pass runs eagerly, its second captures and replays.
    assert replays == (10 * 4 - 1) * 4, replays
    engine.eval()
    mb = data[-1][0]
    eval_loss = engine(**{k: v.cuda() for k, v in mb.items()}).loss.item()
    assert_same(off, (engine, losses, gs, eval_loss, params_of(engine)))


@pytest.mark.cuda
@pytest.mark.parametrize("depth", [1, 0])
def test_cuda_narrow_transfer_is_race_free_and_keeps_exact_masters(depth):
    """fp32 masters with bf16 transfers on the GPU: the same bits with every stream delayed, masters equal
    to the recorded g applied eagerly (kernels.apply_update_), losses within bf16 rounding of offload off."""
    assert CUDA, "run with DS_ACCELERATOR=cuda"
    base = tiny_causal_lm("llama", tied=False, vocab_size=VOCAB, hidden=64, layers=5)
    data = batches(5, 2, seq=32)
    kw = dict(q=2, grad_accum=2, weight_decay=0.1)
    cfg = {"enabled": True, "prefetch_depth": depth, "transfer_dtype": "bf16", "write_back_interval": 3}
    runs = []
    for delay in (0, 2_000_000):
        engine, *_ = zo2_ds.initialize(model=copy.deepcopy(base), config=make_config(cfg, **kw))
        assert engine.zo_offload_store.narrow is not None and engine.zo_runner.write_back_interval == 3
        if delay:
            _delay_everything(engine, delay)
        losses, gs = train(engine, data, "cuda")
        engine.eval()
        eval_loss = engine(**{k: v.cuda() for k, v in data[-1][0].items()}).loss.item()
        runs.append((engine, losses, gs, eval_loss, params_of(engine)))
    assert_same(runs[0], runs[1])
    _, losses, gs, _, params = runs[0]
    eager = {n: p.detach().cuda() for n, p in base.named_parameters()}
    for step, g in enumerate(gs):
        for n, theta in eager.items():
            seeds = [zo.z_seed(1234, step, i, zo.param_key(n)) for i in range(len(g))]
            wd = 0.1 if zo.uses_weight_decay(theta) else 0.0
            kernels.apply_update_(theta, seeds, [v / len(g) for v in g], 2e-3, wd)
    for n, theta in eager.items():
        assert torch.equal(params[n], theta.cpu()), n
    off = trajectory(copy.deepcopy(base), {"enabled": False}, data, device="cuda", **kw)
    assert losses != off[1] and max(abs(a - b) for a, b in zip(losses, off[1])) < 1e-2


@pytest.mark.cuda
def test_cuda_offload_one_multi_tensor_launch_per_block_and_pass():
    assert CUDA, "run with DS_ACCELERATOR=cuda"
    _check_multi_tensor_offload("cuda", "fp16")


@pytest.mark.cuda
def test_cuda_peak_memory_is_flat_and_blocks_never_all_on_gpu():
    assert CUDA
    base = tiny_causal_lm("opt", tied=True, vocab_size=VOCAB, hidden=1024, layers=24, dtype=torch.float16)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()  # what earlier tests in this process left behind
    engine, *_ = zo2_ds.initialize(model=base, config=make_config({"enabled": True}, dtype="fp16"))
    block_bytes = engine.zo_offload_store.sizes[0]
    data = batches(8, 1, seq=64)
    # Past write_back_interval (4) steps: with zo2.async_step a step's device coefficients (512 bytes) stay
    # alive until every block has written its update back, so their number grows over the first 4 steps.
    warm = engine.zo_runner.write_back_interval
    train(engine, data[:warm], "cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    peaks = []
    for step in data[warm:]:
        train(engine, [step], "cuda")
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
    assert max(peaks) == min(peaks), peaks
    # Slot ring + scratch + embeddings + activations + library workspaces: well under half of the 24 blocks.
    used = max(peaks) - before
    assert used < 12 * block_bytes, (used, block_bytes)


@pytest.mark.cuda
def test_cuda_budget_resident_blocks_bit_exact():
    assert CUDA
    base = tiny_causal_lm("mistral", tied=False, vocab_size=VOCAB, hidden=64, layers=4)
    data = batches(3, 1, seq=16)
    kw = dict(q=1, dtype="bf16")
    off = trajectory(copy.deepcopy(base), {"enabled": False}, data, device="cuda", **kw)
    on = trajectory(copy.deepcopy(base), {"enabled": True, "num_resident_blocks": 2}, data, device="cuda", **kw)
    assert on[0].zo_offload_store.homes[0].device.type == "cuda"
    assert_same(off, on)


# -- data parallel: every rank offloads on its own ------------------------------------------------------


def _dp_worker(out_dir: str, offload: dict, same_init: bool = False) -> None:
    """One rank (env RANK / WORLD_SIZE set by the test): train 3 steps on its shard, save what it ends with."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # Each rank starts from a different init: the broadcast from rank 0 (staged per block) must fix it.
    model = tiny_causal_lm("opt", layers=3, seed=0 if same_init else rank)
    cfg = make_config(offload, q=2, lr=5e-3, dtype="fp32")
    engine, *_ = zo2_ds.initialize(model=model, config=cfg)
    engine.train()
    losses, gs = [], []
    for micro_batches in batches(3, 1, micro_batch=2 * world):
        ids = micro_batches[0]["input_ids"][rank * 2 : (rank + 1) * 2].to(engine.device)
        out = engine(input_ids=ids, labels=ids)
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
        gs.append(engine.last_projected_grad)
    torch.save({"losses": losses, "gs": gs, "params": params_of(engine)}, os.path.join(out_dir, f"rank{rank}.pt"))


def _run_ranks(tmp_path, name: str, accelerator: str, offload: dict, same_init: bool = False) -> list[dict]:
    from zo2_ds.testing import run_ranks

    out = tmp_path / name
    out.mkdir()
    code = (
        f"import sys; sys.path.insert(0, {str(os.path.dirname(__file__))!r}); import test_offload; "
        f"test_offload._dp_worker({str(out)!r}, {offload!r}, {same_init})"
    )
    run_ranks(code, 2, accelerator)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _check_data_parallel(tmp_path, accelerator: str) -> None:
    """Offload on equals off on every rank; g is all-reduced (one trajectory); the broadcast from rank 0 also
    reaches the narrow transfer copies (ranks started from their own inits equal ranks started alike). Each
    rank keeps its own copy of the masters (partition "none"; "node": tests/test_offload_partition.py)."""
    on = _run_ranks(tmp_path, "on", accelerator, {"enabled": True, "partition": "none"})
    off = _run_ranks(tmp_path, "off", accelerator, {"enabled": False})
    for r in range(2):
        assert on[r]["losses"] == off[r]["losses"] and on[r]["gs"] == off[r]["gs"]
        for name, value in off[r]["params"].items():
            assert torch.equal(on[r]["params"][name], value), (r, name)
    assert on[0]["gs"] == on[1]["gs"]  # g is all-reduced: one trajectory on every rank
    for name, value in on[0]["params"].items():
        assert torch.equal(on[1]["params"][name], value), name
    # Sub-modules streamed (their layer norms on the device, broadcast with the embeddings): the same.
    layer = _run_ranks(tmp_path, "layer", accelerator, {"enabled": True, "granularity": "layer", "partition": "none"})
    for r in range(2):
        assert layer[r]["losses"] == off[r]["losses"] and layer[r]["gs"] == off[r]["gs"], r
        for name, value in off[r]["params"].items():
            assert torch.equal(layer[r]["params"][name], value), (r, name)
    narrow = {"enabled": True, "transfer_dtype": "bf16", "write_back_interval": 2, "partition": "none"}
    apart = _run_ranks(tmp_path, "narrow_apart", accelerator, narrow)
    alike = _run_ranks(tmp_path, "narrow_alike", accelerator, narrow, same_init=True)
    for r in range(2):
        assert apart[r]["losses"] == alike[r]["losses"] and apart[r]["gs"] == alike[r]["gs"], r
        for name, value in alike[r]["params"].items():
            assert torch.equal(apart[r]["params"][name], value), (r, name)
    assert apart[0]["losses"] != on[0]["losses"]  # the narrow copies were used


@pytest.mark.multiprocess
@pytest.mark.slow
def test_data_parallel_ranks_offload_on_their_own_and_match_offload_off(tmp_path):
    _check_data_parallel(tmp_path, "cpu")  # gloo


@pytest.mark.cuda
@pytest.mark.multiprocess
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cuda_data_parallel_over_nccl(tmp_path):
    """The same on 2 GPUs over NCCL: the blocks' pinned masters are broadcast through a device buffer."""
    _check_data_parallel(tmp_path, "cuda")
