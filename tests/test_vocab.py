"""zo2_ds.vocab: the embedding gathered perturbed, the head and loss over vocabulary chunks.

CPU: the chunked loss against transformers' (fp32, tight tolerance); the gathered rows against perturbing
the whole embedding (bit-exact, through the engine's plain MeZO reference in tests/test_engine.py and here);
offload on == off bit-exactly with ``zo2.vocab_chunks`` forced on; the engine with it on against the plain
MeZO reference within rounding; where the rule applies and what the forwards return. CUDA (marked): the same
in fp16 / bf16, with the compute stream delayed.
"""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

import zo2_ds
from zo2_ds import vocab, zo
from zo2_ds.config import ZO2Config
from zo2_ds.perturb import ResidentRunner, trainable_params
from zo2_ds.testing import ds_config, run_checks_in_triton_interpreter, tiny_causal_lm

ForCausalLMLoss = pytest.importorskip("transformers.loss.loss_utils").ForCausalLMLoss
VOCAB = 96
CUDA = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 vocabulary rows at the tests' 24 tokens: six chunks of a 96-word head."""
    monkeypatch.setattr(vocab, "HEAD_CHUNK_LOGIT_BYTES", 4 * 24 * 16)


def _batches(num_steps, micro_batch=2, seq=12, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(0, VOCAB, (micro_batch, seq), generator=gen)), "labels": ids}
            for _ in range(num_steps)]  # fmt: skip


def _train(model, zo2, data, device="cpu", dtype="fp32"):
    """Losses of every step, the returned logits of the last, eval loss and logits, the final parameters."""
    config = ds_config(lr=2e-3, weight_decay=0.05, dtype=dtype, zo2={"eps": 1e-3, "seed": 7, **zo2})
    engine, *_ = zo2_ds.initialize(model=model, config=config)
    engine.train()
    losses = []
    for mb in data:
        out = engine(**{k: v.to(device) for k, v in mb.items()})
        losses.append(out.loss.item())
        engine.backward(out.loss)
        engine.step()
    engine.eval()
    evaluated = engine(**{k: v.to(device) for k, v in data[-1].items()})
    engine.zo_runner.flush()
    params = {n: p.detach().to("cpu", copy=True) for n, p in engine.module.named_parameters()}
    heads = len(getattr(engine.zo_runner, "resident", engine.zo_runner).vocab.chunked_heads())
    engine.destroy()
    return losses, out.logits, evaluated.loss.item(), evaluated.logits, params, heads


@pytest.mark.parametrize("num_items", [None, 17])
def test_chunked_loss_is_transformers_loss_within_rounding(small_chunks, num_items):
    gen = torch.Generator().manual_seed(0)
    for batch, seq, width, vocab_size in ((2, 12, 16, 96), (3, 8, 24, 101), (1, 24, 100, 40)):
        hidden = torch.randn(batch, seq, width, generator=gen)
        weight = torch.randn(vocab_size, width, generator=gen)
        labels = torch.randint(0, vocab_size, (batch, seq), generator=gen)
        labels[0, :3] = -100
        nib = None if num_items is None else torch.tensor(num_items)
        expected = ForCausalLMLoss(hidden @ weight.T, labels, vocab_size, num_items_in_batch=nib)
        chunks = []

        def chunk_logits(h, start, end, weight=weight, chunks=chunks):
            chunks.append((start, end))
            return h @ weight[start:end].T

        got = vocab.chunked_head_loss(hidden, vocab_size, chunk_logits, labels, num_items_in_batch=nib)
        assert torch.allclose(got, expected, rtol=2e-6, atol=0), (got.item(), expected.item())
        assert chunks[0][0] == 0 and chunks[-1][1] == vocab_size and (vocab_size <= 16 or len(chunks) > 1)
    labels = labels.masked_fill(labels == -100, 3)
    for kwargs in ({"ignore_index": 3}, {"shift_labels": labels.roll(-1, 1)}):
        expected = ForCausalLMLoss(hidden @ weight.T, labels, vocab_size, **kwargs)
        got = vocab.chunked_head_loss(hidden, vocab_size, lambda h, a, b: h @ weight[a:b].T, labels, **kwargs)
        assert torch.allclose(got, expected, rtol=2e-6, atol=0), kwargs


def test_chunk_rows_start_on_a_z_group_and_follow_the_tokens():
    assert vocab.head_chunk_rows(2048, 152064, 3584) == 4096  # 32 MiB of fp32 logits; 3584 rows x 8 = 7 groups
    assert vocab.head_chunk_rows(2048, 152064, 3584) * 3584 % 4096 == 0
    assert vocab.head_chunk_rows(2048 * 9, 152064, 3584) == 448  # 455 rows fit: 56 groups' worth
    assert vocab.head_chunk_rows(2048 * 1024, 152064, 3584) == 4  # fewer than a group's worth: as they come
    assert vocab.head_chunk_rows(4, 50, 16) == 50  # never more than the vocabulary


def test_embedding_gathers_perturbed_rows_without_scratch():
    model = tiny_causal_lm("qwen2", tied=False, vocab_size=VOCAB).eval()
    params = trainable_params(model)
    runner = ResidentRunner(model, params, ZO2Config(eps=0.1, seed=3))
    embed = model.get_input_embeddings()
    assert runner.vocab.gathers(embed) and not runner.vocab.gathers(model.get_output_embeddings())
    seen = {}
    embed.register_forward_hook(lambda mod, args, out: seen.setdefault("rows", out.clone()))
    embed.register_forward_pre_hook(lambda mod, args: seen.update(weight=mod.weight))  # returns None: args kept
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad(), runner.perturbed(2, 1, -1):
        model(input_ids=ids)
    name = next(tp.name for tp in params if tp.param is embed.weight)
    z = zo.generate_z(zo.z_seed(3, 2, 1, zo.param_key(name)), embed.weight.shape)
    assert seen["weight"] is embed.weight, "no perturbed copy of the embedding"
    assert all(n == 0 for n in runner.scratch.storage_bytes())
    assert torch.equal(seen["rows"], (embed.weight + -0.1 * z)[ids])
    only_embed = pytest.warns(UserWarning, match="not used by their module")  # the blocks did not run
    with only_embed, torch.no_grad(), runner.perturbed(2, 1, -1):  # by keyword: the pre-hook cannot see the ids
        assert torch.equal(embed(input=ids), (embed.weight + -0.1 * z)[ids])
    runner.close()


@pytest.mark.parametrize("arch,tied", [("qwen2", False), ("opt", True), ("llama", False)])
def test_offload_on_equals_off_with_chunks_and_logits_are_absent(small_chunks, arch, tied):
    base = tiny_causal_lm(arch, tied=tied, vocab_size=VOCAB)
    data = _batches(3)
    runs = [
        _train(copy.deepcopy(base), {"vocab_chunks": True, "num_perturbations": 2, "offload": offload}, data)
        for offload in ({"enabled": False}, {"enabled": True}, {"enabled": True, "granularity": "layer"})
    ]
    for losses, logits, eval_loss, eval_logits, params, _ in runs:
        assert logits is None, "training forwards return no logits"
        assert eval_logits is not None and eval_logits.shape[-1] == VOCAB, "eval keeps the whole head"
        assert (losses, eval_loss) == (runs[0][0], runs[0][2])
        for name, p in params.items():
            assert torch.equal(p, runs[0][4][name]), name
    assert runs[1][5] == 1, "the offloader's resident runner chunks the head"


@pytest.mark.parametrize("arch,tied", [("qwen2", False), ("opt", True)])
def test_chunks_follow_the_plain_mezo_reference_within_rounding(small_chunks, arch, tied):
    from test_engine import reference_mezo  # tests/test_engine.py: MeZO written out, HF's own loss

    base = tiny_causal_lm(arch, tied=tied, vocab_size=VOCAB)
    data = _batches(4)
    reference = copy.deepcopy(base)
    ref_losses = reference_mezo(
        reference, [[mb] for mb in data], eps=1e-3, seed=7, q=1, lr_of_step=lambda t: 2e-3, weight_decay=0.05
    )
    losses, logits, _, _, params, heads = _train(copy.deepcopy(base), {"vocab_chunks": True}, data)
    assert heads == 1 and logits is None
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    moved = 0
    for name, r in reference.named_parameters():
        assert torch.allclose(params[name], r, rtol=0, atol=1e-5), name
        moved += int(not torch.equal(r, dict(base.named_parameters())[name]))
    assert moved, "training moved the parameters"


def test_where_the_head_is_chunked(monkeypatch):
    def heads(model, switch):
        runner = ResidentRunner(model, trainable_params(model), ZO2Config(vocab_chunks=switch))
        try:
            return len(runner.vocab.chunked_heads())
        finally:
            runner.close()

    qwen = tiny_causal_lm("qwen2", tied=False, vocab_size=VOCAB)
    assert (heads(qwen, "auto"), heads(qwen, True), heads(qwen, False)) == (0, 1, 0), "auto: the tiny head is small"
    head_bytes = VOCAB * 16 * 4
    monkeypatch.setattr(vocab, "HEAD_CHUNK_MIN_BYTES", head_bytes)
    assert heads(qwen, "auto") == 1
    monkeypatch.setattr(vocab, "HEAD_CHUNK_MIN_BYTES", head_bytes + 1)
    assert heads(qwen, "auto") == 0
    custom = tiny_causal_lm("qwen2", tied=False, vocab_size=VOCAB)
    custom.loss_function = lambda logits, labels, vocab_size, **kw: logits.float().mean()
    assert heads(custom, True) == 0, "a model with its own loss keeps its logits"
    capped = tiny_causal_lm("qwen2", tied=False, vocab_size=VOCAB)
    capped.config.final_logit_softcapping = 30.0
    assert heads(capped, True) == 0, "a model that changes its logits before the loss keeps them"
    frozen = tiny_causal_lm("qwen2", tied=False, vocab_size=VOCAB)
    frozen.lm_head.weight.requires_grad_(False)
    assert heads(frozen, True) == 0, "a frozen head is not perturbed at all"


def test_training_forwards_without_labels_keep_the_whole_head(small_chunks):
    model = tiny_causal_lm("qwen2", tied=False, vocab_size=VOCAB)
    runner = ResidentRunner(model.eval(), trainable_params(model), ZO2Config(vocab_chunks=True, eps=0.1))
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad(), runner.perturbed(0, 0, 1):
        without = model(input_ids=ids)
        with_labels = model(input_ids=ids, labels=ids)
        positional = model(ids, None, None, None, None, ids)  # labels by position
    assert without.logits.shape == (2, 12, VOCAB) and with_labels.logits is None and positional.logits is None
    assert with_labels.loss == positional.loss
    expected = ForCausalLMLoss(without.logits, ids, VOCAB)
    assert torch.allclose(with_labels.loss, expected, rtol=2e-6, atol=0)
    runner.close()
    assert "_loss_function" not in model.__dict__, "close() gives the model its own loss back"


def scale_logits_before_the_loss(model):
    """``model`` (an untied qwen2 of tiny_causal_lm), its forward changed to double the logits before the loss."""

    class Scaled(type(model)):
        def forward(self, input_ids=None, labels=None, **kwargs):
            logits = self.lm_head(self.model(input_ids=input_ids).last_hidden_state) * 2.0  # a new tensor
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
            return {"loss": loss, "logits": logits}

    model.__class__ = Scaled
    return model


def test_a_model_that_changes_its_logits_is_refused_with_the_key(small_chunks):
    model = scale_logits_before_the_loss(tiny_causal_lm("qwen2", tied=False, vocab_size=VOCAB))
    runner = ResidentRunner(model.eval(), trainable_params(model), ZO2Config(vocab_chunks=True))
    ids = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad(), runner.perturbed(0, 0, 1), pytest.raises(RuntimeError, match="zo2.vocab_chunks"):
        model(input_ids=ids, labels=ids)
    runner.close()


def _check_kernel_paths(device: str, dtype: torch.dtype) -> None:
    """On the fused kernels (zo2.kernels "multi_tensor"): the gathered embedding's rows are the whole kernel
    perturbation's, and the chunked loss (aligned chunks: the slice kernel; ragged ones: the gather kernel)
    follows the whole head's loss."""
    from zo2_ds import kernels

    model = tiny_causal_lm("qwen2", tied=False, vocab_size=VOCAB, hidden=64, dtype=dtype).to(device).eval()
    params = trainable_params(model)
    ids = torch.randint(0, VOCAB, (2, 12), device=device)
    losses, seen = {}, {}
    for rows in (16, 64):  # 64 rows of 64: every chunk starts on a z group
        vocab.HEAD_CHUNK_LOGIT_BYTES = 4 * 24 * rows
        for chunks in (False, True):
            cfg = ZO2Config(eps=1e-2, seed=5, kernels="multi_tensor", vocab_chunks=chunks)
            runner = ResidentRunner(model, params, cfg)
            hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.update(rows=out.clone()))
            with torch.no_grad(), runner.perturbed(3, 0, -1):
                out = model(input_ids=ids, labels=ids)
            hook.remove()
            runner.close()
            assert (out.logits is None) == chunks
            losses[rows, chunks] = out.loss.float().item()
        embed = model.get_input_embeddings().weight
        whole = kernels.perturbed_into(torch.empty_like(embed), embed, zo.z_seed(5, 3, 0, params[0].key), -1e-2)
        assert params[0].param is embed and torch.equal(seen["rows"], whole[ids])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert losses[16, True] == pytest.approx(losses[16, False], rel=tol)
    assert losses[64, True] == pytest.approx(losses[64, False], rel=tol)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_kernel_paths_under_triton_interpreter():
    run_checks_in_triton_interpreter(__file__, 'ns["_check_kernel_paths"]("cpu", torch.float32)')


# -- CUDA ------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_kernel_paths(monkeypatch, dtype):
    assert CUDA, "run with DS_ACCELERATOR=cuda"
    monkeypatch.setattr(vocab, "HEAD_CHUNK_LOGIT_BYTES", vocab.HEAD_CHUNK_LOGIT_BYTES)  # restored afterwards
    _check_kernel_paths("cuda", dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("arch,tied", [("qwen2", False), ("opt", True)])
@pytest.mark.parametrize("rows", [16, 64])  # 64 rows of 64: chunks on z groups (the slice kernel)
def test_cuda_chunks_offload_on_equals_off_and_follow_the_whole_head(monkeypatch, dtype, arch, tied, rows):
    assert CUDA, "run with DS_ACCELERATOR=cuda"
    monkeypatch.setattr(vocab, "HEAD_CHUNK_LOGIT_BYTES", 4 * 24 * rows)
    from zo2_ds.models import find_blocks

    base = tiny_causal_lm(arch, tied=tied, vocab_size=VOCAB, hidden=64, layers=3)
    for block in find_blocks(base).blocks:  # a slow compute stream exposes missing event waits
        block.register_forward_pre_hook(lambda m, a: torch.cuda._sleep(1_000_000))
    data = _batches(3)
    whole = _train(copy.deepcopy(base), {"vocab_chunks": False}, data, "cuda", dtype)
    runs = [  # the head resident (streamed: tests/test_offload_head.py)
        _train(
            copy.deepcopy(base),
            {"vocab_chunks": True, "offload": {"stream_head": False, **offload}},
            data,
            "cuda",
            dtype,
        )  # fmt: skip
        for offload in ({"enabled": False}, {"enabled": True}, {"enabled": True, "granularity": "layer"})
    ]
    for losses, logits, eval_loss, _, params, heads in runs:
        assert logits is None and heads == 1
        assert (losses, eval_loss) == (runs[0][0], runs[0][2])
        assert all(torch.equal(p, runs[0][4][n]) for n, p in params.items())
    assert runs[0][2] == pytest.approx(whole[2], rel=2e-2)  # fp16 / bf16 logits: the rounding differs
    assert runs[0][0] == pytest.approx(whole[0], rel=2e-2)
