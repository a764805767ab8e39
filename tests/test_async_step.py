"""``zo2.async_step``: g stays on the device, the update reads its coefficients there, a non-finite step is
skipped there, and the host reads each step's figures one step late (or when asked).

On CPU "auto" resolves to off, so these tests switch it on explicitly: the arithmetic is the same (the torch
path takes the device coefficients as 0-d tensors), and what is tested is that the trajectory, the skip and
the bookkeeping equal the synchronised step's. The kernels' side (the gate read from the coefficient
tensor) is checked in tests/test_kernels.py, under Triton's interpreter and on CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from test_offload import SCHEDULE, batches, make_config

import zo2_ds
from zo2_ds import vocab, zo
from zo2_ds.figures import resolve_async_step
from zo2_ds.testing import free_port, tiny_causal_lm

CASES = [  # (arch, q, grad_accum, weight_decay, schedule, offload)
    ("opt", 3, 2, 0.1, SCHEDULE, {}),
    ("llama", 2, 1, 0.05, None, {"enabled": True, "write_back_interval": 3}),
    ("qwen2", 1, 2, 0.0, SCHEDULE, {"enabled": True, "num_resident_blocks": 1, "prefetch_depth": 2}),
]


def config(async_step, offload, *, zo2=None, **kw):
    cfg = make_config(offload, **kw)
    cfg["zo2"].update(async_step=async_step, **(zo2 or {}))
    return cfg


def run(async_step, arch, data, offload, *, nan_at=(), device="cpu", **kw):
    """Train without reading any figure on the way (as a loop that only steps); ``nan_at``: steps whose
    loss is made non-finite (the head's output times inf). Returns the engine, the step losses as the
    forward returned them, and the parameters after a flush."""
    model = tiny_causal_lm(arch, tied=False, vocab_size=96, layers=3)
    poison = {"on": False}
    model.get_output_embeddings().register_forward_hook(lambda m, a, out: out * float("inf") if poison["on"] else out)
    engine, *_ = zo2_ds.initialize(model=model, config=config(async_step, offload, **kw))
    engine.train()
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skip's warning is checked by the tests that want it
        for step, micro_batches in enumerate(data):
            poison["on"] = step in nan_at
            for mb in micro_batches:
                out = engine(**{k: v.to(device) for k, v in mb.items()})
                losses.append(out.loss.detach())
                engine.backward(out.loss)
                engine.step()
    engine.zo_runner.flush()
    params = {n: p.detach().to("cpu", copy=True) for n, p in engine.module.named_parameters()}
    return engine, [v.item() for v in losses], params


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


@pytest.mark.parametrize("arch,q,grad_accum,weight_decay,schedule,offload", CASES)
def test_async_step_follows_the_synchronised_step_bit_exactly(arch, q, grad_accum, weight_decay, schedule, offload):
    data = batches(5, grad_accum, seed=3)
    kw = dict(q=q, grad_accum=grad_accum, weight_decay=weight_decay, schedule=schedule)
    synced, losses_s, params_s = run(False, arch, data, offload, **kw)
    lagged, losses_a, params_a = run(True, arch, data, offload, **kw)
    assert not synced.zo_async_step and lagged.zo_async_step
    assert losses_a == losses_s
    assert_same_params(params_a, params_s)
    # The last step's figures were not read yet; asking reads them, and they are the synchronised ones.
    assert lagged.zo_figures.pending and not synced.zo_figures.pending
    assert lagged.last_projected_grad == synced.last_projected_grad
    assert lagged.last_loss == synced.last_loss and not lagged.zo_figures.pending
    assert lagged.get_lr() == synced.get_lr() and lagged.global_steps == synced.global_steps == 5
    for engine in (synced, lagged):
        engine.destroy()


def test_async_step_with_the_streamed_head(monkeypatch):
    """The streamed head keeps device coefficients in its pending updates and applies them per chunk."""
    monkeypatch.setattr(vocab, "HEAD_CHUNK_LOGIT_BYTES", 4 * 24 * 16)  # six chunks of 16 rows
    monkeypatch.setattr(vocab, "HEAD_CHUNK_WEIGHT_BYTES", 16 * 16 * 4)
    data = batches(4, 1, seed=4)
    kw = dict(q=2, weight_decay=0.1, schedule=SCHEDULE, zo2={"vocab_chunks": True})
    offload = {"enabled": True, "stream_head": True, "write_back_interval": 2}
    synced, losses_s, params_s = run(False, "qwen2", data, offload, **kw)
    lagged, losses_a, params_a = run(True, "qwen2", data, offload, **kw)
    assert lagged.zo_runner.head is not None
    assert losses_a == losses_s
    assert_same_params(params_a, params_s)


@pytest.mark.parametrize("offload", [{}, {"enabled": True, "write_back_interval": 2}])
def test_async_step_skips_a_non_finite_step_on_the_device(offload):
    """The gated update of a NaN step is a no-op bit for bit (weight decay included): the parameters equal
    the synchronised run's, which skips the update on the host. The skip is counted and warned one step
    late; DeepSpeed's skipped_steps stays 0 (the lr schedule advances over the step, see zo2.async_step)."""
    data = batches(4, 1, seed=5)
    kw = dict(q=2, weight_decay=0.1)
    synced, losses_s, params_s = run(False, "opt", data, offload, nan_at=(1,), **kw)
    lagged, losses_a, params_a = run(True, "opt", data, offload, nan_at=(1,), **kw)
    assert not all(map(torch.isfinite, map(torch.tensor, losses_a)))
    assert [str(v) for v in losses_a] == [str(v) for v in losses_s]  # the same, NaN included
    assert_same_params(params_a, params_s)
    assert synced.zo_skipped_steps == lagged.zo_skipped_steps == 1
    assert synced.skipped_steps == 1 and lagged.skipped_steps == 0

    # The warning names the skipped step, and comes at the next step's boundary.
    engine, *_ = zo2_ds.initialize(model=tiny_causal_lm("opt", tied=False), config=config(True, offload, **kw))
    engine.train()
    head = engine.module.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, a, out: out * float("inf"))
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    mb = data[0][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is read (nor warned) at the NaN step itself
        engine.backward(engine(**mb).loss)
        engine.step()
    handle.remove()
    with pytest.warns(UserWarning, match=r"non-finite projected gradient .* at step 0; update skipped"):
        engine.backward(engine(**mb).loss)
        engine.step()
    assert engine.zo_figures.skipped == 1
    engine.zo_runner.flush()
    assert any(not torch.equal(p, before[n]) for n, p in engine.module.named_parameters())  # step 1 updated
    engine.destroy()


def test_async_step_reports_every_step_once(tmp_path):
    """The monitor gets one row per step, the last one at destroy, with the step's own sample count."""
    cfg = config(True, {}, q=2)
    cfg["csv_monitor"] = {"enabled": True, "output_path": str(tmp_path), "job_name": "zo"}
    engine, *_ = zo2_ds.initialize(model=tiny_causal_lm("opt"), config=cfg)
    engine.train()
    losses = []
    for micro_batches in batches(3, 1, seed=2):
        out = engine(**micro_batches[0])
        losses.append(out.loss.detach())
        engine.backward(out.loss)
        engine.step()
    rows = lambda: (tmp_path / "zo" / "Train_Samples_train_loss.csv").read_text().strip().splitlines()  # noqa: E731
    assert len(rows()) == 1 + 2  # header, steps 1 and 2; step 3 is still on the device
    engine.destroy()
    got = rows()[1:]
    assert [int(r.split(",")[0]) for r in got] == [2, 4, 6]  # global_samples after each step (micro-batch 2)
    assert [float(r.split(",")[1]) for r in got] == pytest.approx([v.item() for v in losses])


def test_async_step_resolution_and_errors():
    cpu = make_config({})["zo2"]
    assert resolve_async_step(zo2_ds.parse_zo2_config({"zo2": cpu})) is False  # CPU: no streams
    assert resolve_async_step(zo2_ds.parse_zo2_config({"zo2": {**cpu, "async_step": True}})) is True
    pp = {**cpu, "perturbation_parallel": 2, "num_perturbations": 1}
    assert resolve_async_step(zo2_ds.parse_zo2_config({"zo2": pp})) is False
    with pytest.raises(ValueError, match="zo2.async_step=true cannot be used with zo2.perturbation_parallel"):
        zo2_ds.parse_zo2_config({"zo2": {**pp, "async_step": True}})


def test_device_coefs_gate_the_torch_update():
    """zo.step_coefs: g / q in fp32 and the gate 1.0, or all zeros for a non-finite g; the torch update with
    them equals the update with those values as floats, and with gate 0 leaves theta's bits alone."""
    torch.manual_seed(0)
    theta = torch.randn(7, 5)
    seeds = [zo.z_seed(3, 1, i, 99) for i in range(3)]
    g = torch.tensor([0.3, -1.7, 2.2])
    coefs = zo.step_coefs(g)
    assert len(coefs) == 3 and coefs.gate().item() == 1.0
    assert coefs.values[:3].tolist() == (g / 3).tolist()
    a, b = theta.clone(), theta.clone()
    zo.apply_update_(a, seeds, coefs, 1e-2, 0.1)
    zo.apply_update_(b, seeds, (g / 3).tolist(), 1e-2, 0.1)
    assert torch.equal(a, b) and not torch.equal(a, theta)
    skipped = zo.step_coefs(torch.tensor([0.3, float("nan"), 2.2]))
    assert skipped.values.tolist() == [0.0, 0.0, 0.0, 0.0]
    c = theta.clone()
    zo.apply_update_(c, seeds, skipped, 1e-2, 0.1)
    assert torch.equal(c, theta)
    with pytest.raises(ValueError, match="q \\+ 1"):
        zo.DeviceCoefs(torch.tensor([1.0]))


def _cuda_check(offload):
    data = batches(5, 2, seed=6)
    kw = dict(q=2, grad_accum=2, weight_decay=0.1, dtype="fp16", device="cuda", nan_at=(2,))
    synced, losses_s, params_s = run(False, "opt", data, offload, **kw)
    lagged, losses_a, params_a = run(True, "opt", data, offload, **kw)
    assert resolve_async_step(lagged.zo_config) or lagged.zo_config.async_step is True
    assert [str(v) for v in losses_a] == [str(v) for v in losses_s]
    assert_same_params(params_a, params_s)
    assert synced.zo_skipped_steps == lagged.zo_skipped_steps == 1


def test_step_figures_come_one_step_late_and_the_guard_counts_each_once():
    """zo_step_figures(wait=False) gives the steps read so far (the one before the last with async_step);
    wait=True reads the last too. NonFiniteGuard counts every step once, whichever way it arrives."""
    from zo2_ds.checkpoint import NonFiniteError, NonFiniteGuard

    engine, *_ = zo2_ds.initialize(model=tiny_causal_lm("opt", tied=False), config=config(True, {}, q=1))
    engine.train()
    head = engine.module.get_output_embeddings()
    data = batches(6, 1, seed=8)
    guard = NonFiniteGuard(max_consecutive=3)
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step, micro_batches in enumerate(data, 1):
            if step == 3:  # steps 3.. are all non-finite
                head.register_forward_hook(lambda m, a, out: out * float("inf"))
            engine.backward(engine(**micro_batches[0]).loss)
            engine.step()
            try:
                guard.check(engine, wait=False)
            except NonFiniteError as exc:
                raised = (step, str(exc))
                break
            seen += [f.step for f in engine.zo_step_figures(since=seen[-1] if seen else -1, wait=False)]
            assert seen == list(range(1, step))  # one step behind, none lost
    # Steps 3, 4, 5 skipped: the guard sees step 5 at step 6's boundary.
    assert raised[0] == 6 and "the last 3 steps (3..5)" in raised[1]
    figures = engine.zo_step_figures(since=5)
    assert [f.step for f in figures] == [6] and figures[0].skipped_steps == 4
    engine.destroy()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("offload", [{}, {"enabled": True, "write_back_interval": 2}])
def test_async_step_on_cuda_follows_the_synchronised_step(offload):
    """On CUDA (the Triton kernels read the coefficients and the gate from the device), fp16: async equals
    the synchronised step bit for bit, a NaN step included. In a child process, so that this one stays off
    the GPU (NVML counts the whole device: test_estimate's check reads it)."""
    here = os.path.dirname(__file__)
    code = f"import sys; sys.path.insert(0, {here!r}); import test_async_step as t; t._cuda_check({offload!r})"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cuda", PYTHONPATH=os.pathsep.join([str(Path(here).parent), env.get("PYTHONPATH", "")]))
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
