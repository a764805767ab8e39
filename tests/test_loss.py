"""zo2_ds.loss: the chunked causal-LM loss equals transformers' ForCausalLMLoss bit for bit."""

from __future__ import annotations

import pytest
import torch

from zo2_ds import loss as lean
from zo2_ds.testing import tiny_causal_lm

ForCausalLMLoss = pytest.importorskip("transformers.loss.loss_utils").ForCausalLMLoss


def _cases(device: str, dtypes: tuple[torch.dtype, ...]):
    gen = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        for batch, seq, vocab in ((2, 33, 1000), (3, 50, 1003), (1, 700, 4099)):
            logits = (torch.randn(batch, seq, vocab, generator=gen) * 3).to(dtype).to(device)
            labels = torch.randint(0, vocab, (batch, seq), generator=gen)
            labels[0, :5] = -100
            yield logits, labels.to(device), vocab


@pytest.mark.parametrize("num_items", [None, 17])
def test_lean_loss_is_bit_identical_on_cpu(monkeypatch, num_items):
    monkeypatch.setattr(lean, "CHUNK_BYTES", 4 * 1003 * 7)  # 7 rows a chunk: many chunks, a ragged last one
    for logits, labels, vocab in _cases("cpu", (torch.float32, torch.bfloat16, torch.float16)):
        nib = None if num_items is None else torch.tensor(num_items)
        expected = ForCausalLMLoss(logits, labels, vocab, num_items_in_batch=nib)
        got = lean.lean_causal_lm_loss(logits, labels, vocab, num_items_in_batch=nib)
        assert torch.equal(got, expected), (logits.dtype, logits.shape, got.item(), expected.item())


def test_lean_loss_ignore_index_zero_and_shift_labels():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 9, 50, generator=gen)
    labels = torch.randint(0, 50, (2, 9), generator=gen)
    labels[1, 3] = 0
    for kwargs in ({"ignore_index": 0}, {"shift_labels": labels.roll(-1, 1)}):
        expected = ForCausalLMLoss(logits, labels, 50, **kwargs)
        assert torch.equal(lean.lean_causal_lm_loss(logits, labels, 50, **kwargs), expected)


def test_lean_loss_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="rows of logits"):
        lean.lean_causal_lm_loss(
            torch.zeros(1, 4, 10),
            torch.zeros(1, 4, dtype=torch.long),
            10,
            shift_labels=torch.zeros(1, 3, dtype=torch.long),
        )


def test_install_replaces_only_the_stock_loss():
    model = tiny_causal_lm("llama", tied=False)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    expected = model(input_ids=ids, labels=ids).loss
    changed = lean.install_lean_loss(model)
    assert changed == [model] and model.loss_function is lean.lean_causal_lm_loss
    assert torch.equal(model(input_ids=ids, labels=ids).loss, expected)
    assert lean.install_lean_loss(model) == []  # already ours: left alone
    lean.uninstall_lean_loss(changed)
    assert model.loss_function is ForCausalLMLoss

    def custom(*args, **kwargs):
        return torch.tensor(0.0)

    model.loss_function = custom
    assert lean.install_lean_loss(model) == [] and model.loss_function is custom


@pytest.mark.cuda
@pytest.mark.parametrize("num_items", [None, 17])
def test_lean_loss_is_bit_identical_on_cuda(monkeypatch, num_items):
    monkeypatch.setattr(lean, "CHUNK_BYTES", 4 * 1003 * 7)
    for logits, labels, vocab in _cases("cuda", (torch.float32, torch.bfloat16, torch.float16)):
        nib = None if num_items is None else torch.tensor(num_items)
        expected = ForCausalLMLoss(logits, labels, vocab, num_items_in_batch=nib)
        got = lean.lean_causal_lm_loss(logits, labels, vocab, num_items_in_batch=nib)
        assert torch.equal(got, expected), (logits.dtype, logits.shape, got.item(), expected.item())
