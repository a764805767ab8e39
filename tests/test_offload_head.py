"""zo2.offload.stream_head: the untied head streamed from a pinned master in row chunks (zo2_ds/offload/head.py).

CPU: offload on with the head streamed equals offload off (the head resident, its loss in vocabulary chunks)
bit-exactly, with q > 1, accumulation, weight decay, a schedule, both granularities and a write-back interval;
the head crosses once per training run and once per other forward; a stream cut short applies no update twice;
a resumed run equals an uninterrupted one; forwards without labels get the perturbed logits; bad settings are
refused naming the key. The kernels' part updates and perturbations against the whole tensor's (torch path here,
the kernels under @cuda and the interpreter). CUDA (marked): the same equivalence in fp16 / bf16 with a delayed
compute stream.
"""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch
from test_offload import SCHEDULE, assert_same, batches, make_config, params_of, train
from test_vocab import scale_logits_before_the_loss

import zo2_ds
from zo2_ds import vocab
from zo2_ds.offload import head as head_mod
from zo2_ds.ops import Ops
from zo2_ds.perturb import trainable_params
from zo2_ds.testing import run_checks_in_triton_interpreter, tiny_causal_lm

VOCAB = 96
CUDA = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 vocabulary rows at the tests' 24 tokens, and at most 16 rows of an fp32 head of width 16
    whatever the tokens: six chunks of a 96-word head."""
    monkeypatch.setattr(vocab, "HEAD_CHUNK_LOGIT_BYTES", 4 * 24 * 16)
    monkeypatch.setattr(vocab, "HEAD_CHUNK_WEIGHT_BYTES", 16 * 16 * 4)


def _chunked(offload, **kw):
    return {"vocab_chunks": True, "offload": offload, **kw}


def _trajectory(model, offload, data, device="cpu", **kw):
    """test_offload.trajectory with zo2.vocab_chunks on (the head takes the chunked loss in both runs)."""
    config = make_config(offload, **kw)
    config["zo2"]["vocab_chunks"] = True
    engine, *_ = zo2_ds.initialize(model=model, config=config)
    losses, gs = train(engine, data, device)
    engine.eval()
    mb = data[-1][0]
    eval_loss = engine(**{k: v.to(device) for k, v in mb.items()}).loss.item()
    return engine, losses, gs, eval_loss, params_of(engine)


def _count_streams(runner):
    streams = []
    original = runner.head._stream
    runner.head._stream = lambda rows, visit: (streams.append(rows), original(rows, visit))[1]
    return streams


@pytest.mark.parametrize(
    "arch,q,grad_accum,weight_decay,schedule,offload",
    [
        ("qwen2", 2, 2, 0.1, SCHEDULE, {}),
        ("llama", 1, 1, 0.0, None, {"granularity": "layer", "write_back_interval": 3}),
        ("qwen2", 3, 1, 0.05, SCHEDULE, {"num_resident_blocks": 1, "prefetch_depth": 0}),
    ],
)
def test_streamed_head_equals_the_resident_head_bit_exactly(small_chunks, arch, q, grad_accum, weight_decay, schedule,
                                                            offload):  # fmt: skip
    base = tiny_causal_lm(arch, tied=False, vocab_size=VOCAB, layers=3)
    data = batches(4, grad_accum)
    kw = dict(q=q, grad_accum=grad_accum, weight_decay=weight_decay, schedule=schedule)
    off = _trajectory(copy.deepcopy(base), {"enabled": False}, data, **kw)
    on = _trajectory(copy.deepcopy(base), {"enabled": True, "stream_head": True, **offload}, data, **kw)
    assert_same(off, on)
    runner = on[0].zo_runner
    head = on[0].module.get_output_embeddings().weight
    assert runner.head is not None and head.data_ptr() == runner.head.master.data_ptr(), "the head lives on the host"
    assert not any(p is head for p in runner.resident.params), "the resident runner leaves it alone"
    assert not torch.equal(on[4]["lm_head.weight"], dict(base.named_parameters())["lm_head.weight"]), "it trains"
    assert base.config.hidden_size == 16
    assert [b.numel() for b in runner.device_buffers()["head_chunks"]] == [16 * 16] * 2  # two chunks of 16 rows


def test_the_head_crosses_once_per_run_and_once_per_other_forward(small_chunks):
    engine, *_ = zo2_ds.initialize(model=tiny_causal_lm("qwen2", tied=False, vocab_size=VOCAB, layers=2),
                                   config=make_config({"enabled": True, "stream_head": True}, q=2))  # fmt: skip
    runner = engine.zo_runner
    streams = _count_streams(runner)
    ids = torch.randint(0, VOCAB, (2, 12))
    engine.train()
    for _ in range(2):
        out = engine(input_ids=ids, labels=ids)  # 4 passes, one stream
        engine.backward(out.loss)
        engine.step()
    assert out.logits is None and len(streams) == 2
    assert len(runner.head.pending) == 1, "the last update waits for the next stream"
    engine.eval()  # flushes: one stream applies the pending update
    assert len(streams) == 3 and not runner.head.pending
    evaluated = engine(input_ids=ids, labels=ids)
    assert evaluated.logits.shape == (2, 12, VOCAB) and len(streams) == 4
    with torch.no_grad():
        direct = engine.module(input_ids=ids).logits  # outside the runner
    assert torch.equal(direct, evaluated.logits) and len(streams) == 5


def test_forwards_without_labels_get_the_perturbed_logits(small_chunks):
    base = tiny_causal_lm("qwen2", tied=False, vocab_size=VOCAB, layers=2)
    ids = torch.randint(0, VOCAB, (2, 12))
    seen = {}
    for name, offload in (("off", {"enabled": False}), ("on", {"enabled": True, "stream_head": True})):
        engine, *_ = zo2_ds.initialize(model=copy.deepcopy(base), config=make_config(offload, q=1))
        streams = _count_streams(engine.zo_runner) if name == "on" else []
        model = engine.module
        with torch.no_grad():
            pairs = engine.zo_runner.run(0, lambda j, model=model: model(input_ids=ids).logits.clone())
        seen[name] = pairs[0]
        assert name == "off" or len(streams) == 2, "each pass streams the head for its own logits"
        engine.destroy()
    for on, off in zip(seen["on"], seen["off"]):
        assert on.shape == (2, 12, VOCAB)
        assert torch.allclose(on, off, rtol=0, atol=1e-5)  # chunked matmuls: rounding only
    assert not torch.allclose(seen["on"][0], seen["on"][1], atol=1e-4), "the two passes are perturbed apart"


def test_a_stream_cut_short_applies_no_update_twice(small_chunks, monkeypatch):
    base = tiny_causal_lm("qwen2", tied=False, vocab_size=VOCAB, layers=2)
    data = batches(3, 1)
    reference = _trajectory(copy.deepcopy(base), {"enabled": False}, data[:2], q=2)
    config = make_config({"enabled": True, "stream_head": True}, q=2)
    engine, *_ = zo2_ds.initialize(model=copy.deepcopy(base), config=config)
    train(engine, data[:2])
    calls = []
    add = vocab.OnlineLoss.add

    def failing_add(self, logits, start, end):
        calls.append(start)
        if start == 48:  # the fourth chunk of the first pass: three chunks are updated and written back
            raise KeyboardInterrupt
        return add(self, logits, start, end)

    monkeypatch.setattr(vocab.OnlineLoss, "add", failing_add)
    engine.train()
    with pytest.raises(KeyboardInterrupt):
        engine(**data[2][0])
    monkeypatch.setattr(vocab.OnlineLoss, "add", add)
    head = engine.zo_runner.head
    assert head._done_rows == 64 and head.pending, "the stream stopped with part of the master updated"
    params = params_of(engine)  # the flush finishes the rows the stream did not reach
    for name, value in reference[4].items():
        assert torch.equal(params[name], value), name


def test_resumed_run_with_a_streamed_head_equals_uninterrupted(small_chunks, tmp_path):
    base = tiny_causal_lm("qwen2", tied=False, vocab_size=VOCAB, layers=2)
    data = batches(4, 1)
    offload = {"enabled": True, "stream_head": True}
    full = _trajectory(copy.deepcopy(base), offload, data, q=2)
    config = make_config(offload, q=2)
    config["zo2"]["vocab_chunks"] = True
    first, *_ = zo2_ds.initialize(model=copy.deepcopy(base), config=copy.deepcopy(config))
    head_losses, _ = train(first, data[:2])
    first.save_checkpoint(str(tmp_path), tag="step2")
    second, *_ = zo2_ds.initialize(model=tiny_causal_lm("qwen2", tied=False, vocab_size=VOCAB, layers=2, seed=9),
                                   config=copy.deepcopy(config))  # fmt: skip
    second.load_checkpoint(str(tmp_path), tag="step2")
    tail_losses, _ = train(second, data[2:])
    assert head_losses + tail_losses == full[1]
    resumed = params_of(second)
    for name, value in full[4].items():
        assert torch.equal(resumed[name], value), name


def test_where_the_head_streams_and_bad_settings_are_refused():
    untied = tiny_causal_lm("qwen2", tied=False, vocab_size=VOCAB, layers=2)
    tied = tiny_causal_lm("opt", tied=True, vocab_size=VOCAB, layers=2)
    params = {m: trainable_params(m) for m in (untied, tied)}
    pick = head_mod.streamed_head
    assert pick(untied, params[untied], True, True, "cpu").param is untied.lm_head.weight
    assert pick(untied, params[untied], "auto", True, "cpu") is None, "auto: CUDA only (nothing to save on a CPU)"
    assert pick(untied, params[untied], "auto", "auto", "cuda") is None, "auto: heads of 256 MiB and more"
    assert pick(untied, params[untied], "auto", True, "cuda").param is untied.lm_head.weight
    assert pick(untied, params[untied], False, True, "cuda") is None
    with pytest.raises(ValueError, match="zo2.offload.stream_head.*tied"):
        pick(tied, params[tied], True, True, "cpu")
    with pytest.raises(ValueError, match="zo2.offload.stream_head.*chunked loss"):
        pick(untied, params[untied], True, False, "cpu")
    with pytest.raises(ValueError, match="stream_head"):
        zo2_ds.initialize(model=copy.deepcopy(tied), config=make_config({"enabled": True, "stream_head": True}))


def test_a_model_that_changes_its_logits_is_refused_with_the_key(small_chunks):
    model = scale_logits_before_the_loss(tiny_causal_lm("qwen2", tied=False, vocab_size=VOCAB, layers=2))
    engine, *_ = zo2_ds.initialize(model=model, config=make_config({"enabled": True, "stream_head": True}))
    ids = torch.randint(0, VOCAB, (1, 5))
    engine.train()
    with pytest.raises(RuntimeError, match="zo2.offload.stream_head"):
        engine(input_ids=ids, labels=ids)
    assert not engine.zo_runner.running and not engine.zo_runner.acquired_blocks, "the run unwound cleanly"


def _check_parts(device: str, dtype: torch.dtype, mode: str) -> None:
    """Updates and perturbations of row ranges equal those rows of the whole tensor's, bit for bit."""
    ops = Ops(mode)
    gen = torch.Generator().manual_seed(0)
    for shape, rows in (((96, 64), 16), ((40, 1024), 4), ((300, 96), 128)):
        theta = torch.randn(shape, generator=gen).to(device, dtype)
        update = ((11, 12), (0.5, -1.25), 1e-2, 0.1)
        whole = ops.apply_update_(theta.clone(), *update)
        perturbed = ops.perturbed_into(torch.empty_like(theta), theta, 99, -1e-2)
        for start in range(0, shape[0], rows):
            part = theta[start : start + rows].clone()
            out = torch.empty_like(part)
            got = ops.perturbed_part_into(out, part, start, shape, 99, -1e-2)
            assert torch.equal(got, perturbed[start : start + rows])
            if ops.fused(part) and start * shape[1] % 4096:
                with pytest.raises(ValueError, match="z group"):  # the kernels update parts on z groups only
                    ops.apply_update_part_(part, start, shape, update)
                continue
            assert torch.equal(ops.apply_update_part_(part, start, shape, update), whole[start : start + rows])


def test_part_updates_and_perturbations_equal_the_whole_tensor_torch():
    _check_parts("cpu", torch.float32, "torch")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_part_updates_and_perturbations_equal_the_whole_tensor_under_triton_interpreter():
    run_checks_in_triton_interpreter(__file__, 'ns["_check_parts"]("cpu", torch.float32, "per_tensor")')


def test_lockstep_gathers_every_pass_before_any_goes_on():
    from zo2_ds.offload.lockstep import LockStep

    order = []
    sched = LockStep(3, 1)

    def forward(j):
        sched.enter_block(0)
        order.append(("block", j))
        sched.gather_passes()
        order.append(("gathered", j))
        return j

    assert sched.run([lambda j=j: forward(j) for j in range(3)]) == [0, 1, 2]
    assert order == [("block", 0), ("block", 1), ("block", 2), ("gathered", 0), ("gathered", 1), ("gathered", 2)]
    skipping = LockStep(2, 1)

    def skip(j):
        skipping.enter_block(0)
        if j == 1:
            skipping.gather_passes()

    with pytest.raises(RuntimeError, match="did not reach the head's loss|head's loss"):
        skipping.run([lambda j=j: skip(j) for j in range(2)])


# -- CUDA ------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_part_kernels(dtype):
    assert CUDA, "run with DS_ACCELERATOR=cuda"
    _check_parts("cuda", dtype, "per_tensor")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("rows", [16, 64])  # 64 rows of 64: the loss's chunks start on z groups
def test_cuda_streamed_head_equals_the_resident_head(monkeypatch, dtype, rows):
    assert CUDA, "run with DS_ACCELERATOR=cuda"
    monkeypatch.setattr(vocab, "HEAD_CHUNK_LOGIT_BYTES", 4 * 24 * rows)
    from zo2_ds.models import find_blocks

    base = tiny_causal_lm("qwen2", tied=False, vocab_size=VOCAB, hidden=64, layers=3)
    for block in find_blocks(base).blocks:  # a slow compute stream exposes missing event waits
        block.register_forward_pre_hook(lambda m, a: torch.cuda._sleep(1_000_000))
    base.lm_head.register_forward_pre_hook(lambda m, a: torch.cuda._sleep(2_000_000))
    data = batches(3, 2)
    kw = dict(q=2, grad_accum=2, weight_decay=0.1, schedule=SCHEDULE, dtype=dtype)
    off = _trajectory(copy.deepcopy(base).cuda(), {"enabled": False}, data, "cuda", **kw)
    on = _trajectory(copy.deepcopy(base).cuda(), {"enabled": True, "stream_head": True}, data, "cuda", **kw)
    assert on[0].zo_runner.head is not None and on[0].module.lm_head.weight.device.type == "cpu"
    assert (on[1], on[2]) == (off[1], off[2]), "training losses and g: the same bits"
    assert all(torch.equal(p, off[4][n]) for n, p in on[4].items())
    assert on[3] == pytest.approx(off[3], rel=1e-2)  # eval: the logits of chunked matmuls, rounding only
