"""A causal-LM loss with the value of transformers' ``ForCausalLMLoss`` and a fraction of its memory.

HF's causal-LM loss upcasts the whole logits tensor to fp32 and then has ``cross_entropy`` build a second
fp32 tensor of the same size (the log-softmax), so the loss tail of a forward holds the logits three
times over: for OPT-13B at 1x2048 in fp16, 0.19 GiB of logits become 0.96 GiB at the loss. With the
blocks offloaded that tail is a large share of the GPU memory of a step.

:func:`lean_causal_lm_loss` computes the same number from the same operations, in row chunks:

    logp_i   = log_softmax(logits[rows].float(), dim=1)[target_i]      (one chunk of rows at a time)
    loss     = nll_loss(logp[:, None], 0 / ignore_index, reduction)     (the reduction cross_entropy runs)

``cross_entropy`` is ``nll_loss(log_softmax(x))``; a row's log-softmax does not depend on the other rows,
and ``nll_loss`` reduces the picked values in an order that depends on the number of rows only, so the
result is bit-identical to HF's (tests/test_loss.py checks this on CPU, and on CUDA where present). The
peak is the model-dtype logits plus one chunk.

:func:`install_lean_loss` puts it on every HF model inside a module whose loss is the stock
``ForCausalLM`` one (a model with its own loss function keeps it); the engine does this at build.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["CHUNK_BYTES", "lean_causal_lm_loss", "install_lean_loss", "uninstall_lean_loss", "stock_causal_lm_loss"]

# fp32 bytes of one chunk of log-softmax rows (OPT's 50272-word vocabulary: 166 rows).
CHUNK_BYTES = 32 << 20


def lean_causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """``transformers.loss.loss_utils.ForCausalLMLoss``, computed chunk by chunk (same signature, same bits)."""
    if shift_labels is None:
        labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:].contiguous()
    logits = logits.reshape(-1, vocab_size)
    target = shift_labels.reshape(-1).to(logits.device)
    rows = logits.shape[0]
    if target.numel() != rows:
        raise ValueError(f"zo2 loss: {rows} rows of logits but {target.numel()} labels")
    ignored = target == ignore_index
    # nll_loss takes the picked log-probabilities as a [rows, width] input and a target that selects
    # column `col` (or ignore_index), so it runs its own reduction over them: the bits of cross_entropy.
    col = 0 if ignore_index != 0 else 1
    picked = torch.zeros(rows, col + 1, dtype=torch.float32, device=logits.device)
    safe = target.masked_fill(ignored, 0).unsqueeze(1)
    step = max(1, CHUNK_BYTES // (4 * max(vocab_size, 1)))
    for start in range(0, rows, step):
        end = min(start + step, rows)
        logp = torch.log_softmax(logits[start:end].float(), dim=1)
        picked[start:end, col] = logp.gather(1, safe[start:end]).squeeze(1)
        del logp
    select = torch.full_like(target, col).masked_fill(ignored, ignore_index)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = nn.functional.nll_loss(picked, select, ignore_index=ignore_index, reduction=reduction)
    if reduction == "sum":
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def stock_causal_lm_loss() -> Any:
    """transformers' ``ForCausalLMLoss`` (None where transformers has no loss registry)."""
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING
    except ImportError:  # a transformers without the loss registry: nothing to replace
        return None
    return LOSS_MAPPING.get("ForCausalLM")


def install_lean_loss(module: nn.Module) -> list[nn.Module]:
    """Set :func:`lean_causal_lm_loss` as the loss of each HF model in ``module`` that uses the stock causal-LM
    loss; returns the models changed (for :func:`uninstall_lean_loss`)."""
    stock = stock_causal_lm_loss()
    if stock is None:
        return []
    changed = []
    for sub in module.modules():
        if "_loss_function" in sub.__dict__ or not _has_loss_property(type(sub)):
            continue  # a loss set by the user (or already ours), or not an HF model
        get_head = getattr(sub, "get_output_embeddings", None)
        try:
            has_head = callable(get_head) and get_head() is not None
            current = sub.loss_function
        except Exception:  # noqa: BLE001 - an HF model that cannot answer: leave it alone
            continue
        if has_head and current is stock:
            sub._loss_function = lean_causal_lm_loss
            changed.append(sub)
    return changed


def _has_loss_property(cls: type) -> bool:
    return any(isinstance(k.__dict__.get("loss_function"), property) for k in cls.__mro__)


def uninstall_lean_loss(models: list[nn.Module]) -> None:
    for model in models:
        if model.__dict__.get("_loss_function") is lean_causal_lm_loss:
            del model._loss_function
