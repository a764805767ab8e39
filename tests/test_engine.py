"""ZOEngine against an independent plain MeZO reference, exact restore, resume, bad input."""

from __future__ import annotations

import copy
import math

import deepspeed
import pytest
import torch
from deepspeed.runtime import lr_schedules

import zo2_ds
from zo2_ds import zo
from zo2_ds.testing import ds_config, tiny_causal_lm

VOCAB = 96
SCHEDULE = {
    "type": "WarmupLR",
    "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 2e-3, "warmup_num_steps": 3, "warmup_type": "linear"},
}


def batches(num_steps: int, grad_accum: int, micro_batch: int = 2, seq: int = 12, seed: int = 1) -> list:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_steps):
        step = []
        for _ in range(grad_accum):
            ids = torch.randint(0, VOCAB, (micro_batch, seq), generator=gen)
            step.append({"input_ids": ids, "labels": ids})
        out.append(step)
    return out


def reference_mezo(model, data, *, eps, seed, q, lr_of_step, weight_decay):
    """Plain MeZO written out: perturb in place, two forwards, restore from a saved copy, update.

    Independent of the engine's hooks, runners and DeepSpeed; it shares only the z generator.
    Returns the reported losses (mean of L+ and L-) of every micro-batch.
    """
    model.eval()  # MeZO runs its perturbed forwards without dropout
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # distinct tensors
    losses = []

    def z(name, step, i, p):
        return zo.generate_z(zo.z_seed(seed, step, i, zo.param_key(name)), p.shape)

    for step, micro_batches in enumerate(data):
        g_sum = None
        for mb in micro_batches:
            clean = {n: p.detach().clone() for n, p in named}
            plus, minus = [], []
            with torch.no_grad():
                for i in range(q):
                    for n, p in named:
                        p.copy_(clean[n].float() + eps * z(n, step, i, p))
                    plus.append(model(**mb).loss)
                    for n, p in named:
                        p.copy_(clean[n].float() + (-eps) * z(n, step, i, p))
                    minus.append(model(**mb).loss)
                    for n, p in named:
                        p.copy_(clean[n])
            lp, lm = torch.stack(plus), torch.stack(minus)
            g = (lp.float() - lm.float()) / (2.0 * eps)
            g_sum = g if g_sum is None else g_sum + g
            losses.append(((lp.float().mean() + lm.float().mean()) / 2).item())
        g_mean = (g_sum.float() / len(micro_batches)).tolist()
        lr = lr_of_step(step)
        with torch.no_grad():
            for n, p in named:
                direction = (g_mean[0] / q) * z(n, step, 0, p)
                for i in range(1, q):
                    direction += (g_mean[i] / q) * z(n, step, i, p)
                wd = weight_decay if p.dim() >= 2 else 0.0
                master = p.float()
                p.copy_(master - lr * (direction + wd * master))
    return losses


def lr_schedule_from_deepspeed(params: dict, num_steps: int) -> list[float]:
    """The lr DeepSpeed's WarmupLR gives at each step, read off the scheduler on a throwaway optimizer."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=params["warmup_max_lr"])
    sched = lr_schedules.WarmupLR(opt, **params)
    lrs = []
    for _ in range(num_steps):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    return lrs


def run_engine(model, config, data):
    engine, *_ = zo2_ds.initialize(model=model, config=config)
    engine.train()
    losses = []
    for micro_batches in data:
        for mb in micro_batches:
            out = engine(**mb)
            losses.append(out.loss.item())
            engine.backward(out.loss)
            engine.step()
    return engine, losses


@pytest.mark.parametrize(
    "arch,tied,q,grad_accum,weight_decay,schedule",
    [
        ("opt", True, 3, 2, 0.1, SCHEDULE),  # tied embedding/lm_head, n-SPSA, accumulation, wd, warmup
        ("gpt2", True, 1, 1, 0.0, None),
        ("llama", False, 2, 3, 0.05, SCHEDULE),
    ],
)
def test_engine_matches_plain_mezo_reference_bit_exactly(arch, tied, q, grad_accum, weight_decay, schedule):
    num_steps, eps, seed = 4, 1e-3, 1234
    base = tiny_causal_lm(arch, tied=tied, vocab_size=VOCAB)
    ref_model = copy.deepcopy(base)
    data = batches(num_steps, grad_accum)
    lr = 2e-3
    lrs = lr_schedule_from_deepspeed(schedule["params"], num_steps) if schedule else [lr] * num_steps
    ref_losses = reference_mezo(
        ref_model, data, eps=eps, seed=seed, q=q, lr_of_step=lambda t: lrs[t], weight_decay=weight_decay
    )

    config = ds_config(
        grad_accum=grad_accum,
        lr=lr,
        weight_decay=weight_decay,
        scheduler=schedule,
        zo2={"eps": eps, "seed": seed, "num_perturbations": q},
    )
    engine, losses = run_engine(base, config, data)

    assert engine.global_steps == num_steps
    assert losses == ref_losses
    moved = 0
    for (name, p), (_, r) in zip(engine.module.named_parameters(), ref_model.named_parameters()):
        assert torch.equal(p, r), f"{name} differs from the reference"
        assert p.grad is None
        moved += int(
            not torch.equal(p, dict(tiny_causal_lm(arch, tied=tied, vocab_size=VOCAB).named_parameters())[name])
        )
    assert moved > 0, "training did not change any parameter"
    if tied:
        assert engine.module.get_output_embeddings().weight is engine.module.get_input_embeddings().weight


def test_no_optimizer_state_and_no_grads():
    model = tiny_causal_lm("opt")
    engine, optimizer, _, _ = zo2_ds.initialize(model=model, config=ds_config())
    assert isinstance(engine, zo2_ds.ZOEngine) and isinstance(optimizer, zo2_ds.ZOOptimizer)
    _, _ = run_engine_steps(engine, 2)
    assert len(optimizer.state) == 0
    assert all(p.grad is None for p in engine.module.parameters())


def run_engine_steps(engine, n, seed=5):
    engine.train()
    losses = []
    for micro_batches in batches(n, 1, seed=seed):
        out = engine(**micro_batches[0])
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
    return engine, losses


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_perturbed_forward_restores_parameters_exactly(dtype):
    model = tiny_causal_lm("opt")
    engine, *_ = zo2_ds.initialize(model=model, config=ds_config(dtype=dtype, zo2={"eps": 0.3, "num_perturbations": 2}))
    expected = torch.bfloat16 if dtype == "bf16" else torch.float32
    assert all(p.dtype == expected for p in engine.module.parameters())
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    engine.train()
    ids = torch.randint(0, VOCAB, (2, 10))
    for _ in range(3):
        out = engine(input_ids=ids, labels=ids)
        assert math.isfinite(out.loss.item())
    for n, p in engine.module.named_parameters():
        assert torch.equal(p, before[n]), n
        assert isinstance(
            engine.module.get_submodule(n.rsplit(".", 1)[0])._parameters[n.rsplit(".", 1)[1]], torch.nn.Parameter
        )


def test_failed_forward_leaves_parameters_clean():
    model = tiny_causal_lm("opt")
    engine, *_ = zo2_ds.initialize(model=model, config=ds_config())
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    engine.train()
    bad = torch.full((2, 5), VOCAB + 10)  # out-of-range token ids: the embedding raises mid-forward
    with pytest.raises(IndexError):
        engine(input_ids=bad, labels=bad)
    for n, p in engine.module.named_parameters():
        assert torch.equal(p, before[n]), n


def test_perturbed_passes_run_without_dropout_and_keep_each_modules_mode():
    model = tiny_causal_lm("opt")
    engine, *_ = zo2_ds.initialize(model=model, config=ds_config())
    engine.train()
    frozen_part = engine.module.model.decoder.final_layer_norm
    frozen_part.eval()  # the user's choice for one submodule: kept after the step
    seen = []
    handle = engine.module.model.decoder.layers[0].register_forward_pre_hook(
        lambda m, a: seen.append(any(x.training for x in engine.module.modules()))
    )
    ids = torch.randint(0, VOCAB, (2, 10))
    out = engine(input_ids=ids, labels=ids)
    engine.backward(out.loss)
    engine.step()
    handle.remove()
    assert seen == [False, False]  # every module in eval mode during both passes
    assert not frozen_part.training
    assert all(m.training for m in engine.module.modules() if m is not frozen_part)


def test_eval_mode_runs_one_plain_forward():
    model = tiny_causal_lm("opt")
    engine, *_ = zo2_ds.initialize(model=model, config=ds_config())
    ids = torch.randint(0, VOCAB, (2, 10))
    calls = []
    handle = engine.module.register_forward_hook(lambda *a: calls.append(1))
    engine.eval()
    out = engine(input_ids=ids, labels=ids)
    assert len(calls) == 1
    model.eval()
    with torch.no_grad():
        assert torch.equal(out.loss, model(input_ids=ids, labels=ids).loss)
    calls.clear()
    engine.train()
    engine(input_ids=ids, labels=ids)
    assert len(calls) == 2  # the + and - passes
    handle.remove()


def test_resumed_run_equals_uninterrupted(tmp_path):
    config = ds_config(lr=2e-3, scheduler=SCHEDULE, zo2={"seed": 7, "num_perturbations": 2})
    data = batches(6, 1, seed=11)

    full, full_losses = run_engine(tiny_causal_lm("opt"), config, data)

    first, first_losses = run_engine(tiny_causal_lm("opt"), config, data[:3])
    first.save_checkpoint(str(tmp_path), tag="step3")
    # A fresh model with a different init: everything must come from the checkpoint.
    resumed, *_ = zo2_ds.initialize(model=tiny_causal_lm("opt", seed=99), config=config)
    load_path, client_state = resumed.load_checkpoint(str(tmp_path))
    assert load_path is not None and resumed.global_steps == 3
    resumed.train()
    resumed_losses = []
    for micro_batches in data[3:]:
        out = resumed(**micro_batches[0])
        resumed.backward(out.loss)
        resumed.step()
        resumed_losses.append(out.loss.item())

    assert first_losses + resumed_losses == full_losses
    assert resumed.get_lr() == full.get_lr()
    for (n, p), (_, r) in zip(resumed.module.named_parameters(), full.module.named_parameters()):
        assert torch.equal(p, r), n


def test_non_finite_loss_skips_the_update():
    class Exploding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            return (self.w * x).sum() * torch.tensor(float("inf"))

    model = Exploding()
    engine, *_ = zo2_ds.initialize(model=model, config=ds_config())
    engine.train()
    with pytest.warns(UserWarning, match="non-finite"):
        out = engine(torch.ones(3))
        engine.backward(out)
        engine.step()
    assert torch.equal(model.w.detach(), torch.ones(3))
    assert engine.zo_skipped_steps == 1 and engine.skipped_steps == 1 and engine.global_steps == 1


def test_forward_without_loss_is_a_clear_error():
    model = tiny_causal_lm("opt")
    engine, *_ = zo2_ds.initialize(model=model, config=ds_config())
    engine.train()
    ids = torch.randint(0, VOCAB, (2, 6))
    with pytest.raises(TypeError, match="labels="):
        engine(input_ids=ids)  # no labels: the HF output has loss=None


def test_frozen_parameters_are_not_touched():
    model = tiny_causal_lm("opt")
    frozen = [n for n, p in model.named_parameters() if "layers.0." in n]
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine, _ = run_engine_steps(zo2_ds.initialize(model=model, config=ds_config())[0], 2)
    for n, p in engine.module.named_parameters():
        if n in frozen:
            assert torch.equal(p, before[n]), n
    assert any(not torch.equal(p, before[n]) for n, p in engine.module.named_parameters() if n not in frozen)


def test_config_flag_route_and_plain_deepspeed_untouched():
    on, *_ = deepspeed.initialize(model=tiny_causal_lm("opt"), config=ds_config())
    assert isinstance(on, zo2_ds.ZOEngine)
    off_cfg = ds_config(zo2={"enabled": False})
    off, *_ = deepspeed.initialize(model=tiny_causal_lm("opt"), config=off_cfg)
    assert type(off) is deepspeed.DeepSpeedEngine
    no_block = ds_config()
    del no_block["zo2"]
    plain, *_ = deepspeed.initialize(model=tiny_causal_lm("opt"), config=no_block)
    assert type(plain) is deepspeed.DeepSpeedEngine


def test_missing_learning_rate_is_a_clear_error():
    config = ds_config()
    del config["optimizer"]
    with pytest.raises(ValueError, match="learning rate"):
        zo2_ds.initialize(model=tiny_causal_lm("opt"), config=config)


def test_zero_stage_is_rejected():
    with pytest.raises(ValueError, match="zero_optimization.stage=2"):
        zo2_ds.initialize(model=tiny_causal_lm("opt"), config=ds_config(zero_optimization={"stage": 2}))


def test_monitor_receives_loss_lr_and_g(tmp_path):
    config = ds_config(
        csv_monitor={"enabled": True, "output_path": str(tmp_path), "job_name": "zo"}, zo2={"num_perturbations": 2}
    )
    engine, _ = run_engine_steps(zo2_ds.initialize(model=tiny_causal_lm("opt"), config=config)[0], 3)
    files = {p.name: p for p in (tmp_path / "zo").glob("*.csv")}
    for name in ("Train_Samples_train_loss.csv", "Train_Samples_lr.csv", "Train_Samples_zo_projected_grad_1.csv"):
        assert name in files, sorted(files)
    rows = files["Train_Samples_train_loss.csv"].read_text().strip().splitlines()
    assert len(rows) == 1 + 3  # header + one row per step
    assert float(rows[-1].split(",")[1]) == pytest.approx(engine.last_loss)


def test_dict_output_with_loss_is_accepted():
    class DictLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            return {"loss": ((self.w * x) ** 2).sum(), "extra": x}

    engine, *_ = zo2_ds.initialize(model=DictLoss(), config=ds_config(lr=0.1))
    engine.train()
    out = engine(torch.ones(3))
    assert set(out) == {"loss", "extra"} and out["loss"].shape == ()
    engine.backward(out["loss"])
    engine.step()
    assert not torch.equal(engine.module.w.detach(), torch.ones(3))


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("synchronized", [None, True])
def test_throughput_timer_starts_once_per_step_and_syncs_only_when_asked(offload, synchronized, monkeypatch):
    """DeepSpeed starts its throughput timer in every forward; a ZO step (2q = 4 forwards) starts it once, and
    without the device-wide synchronise per start unless the config asks for it."""
    from deepspeed.utils.timer import ThroughputTimer

    timers = {} if synchronized is None else {"timers": {"throughput": {"synchronized": synchronized}}}
    config = ds_config(zo2={"num_perturbations": 2, "offload": {"enabled": offload}}, **timers)
    engine, *_ = zo2_ds.initialize(model=tiny_causal_lm("opt", layers=2), config=config)
    assert engine.tput_timer.config.synchronized is bool(synchronized)
    starts = []
    original = ThroughputTimer.start
    monkeypatch.setattr(ThroughputTimer, "start", lambda self: (starts.append(engine.global_steps), original(self)))
    run_engine_steps(engine, 3)
    assert starts == [0, 1, 2]  # once per ZO forward, not once per pass
