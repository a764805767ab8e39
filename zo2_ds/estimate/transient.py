"""The GPU memory estimated on top of the exact parts (see :mod:`zo2_ds.estimate`): one block's forward
activations, the logits of one pass and the loss's transient chunk."""

from __future__ import annotations

from torch import nn

from zo2_ds.config import ZO2Config
from zo2_ds.estimate.budget import chunked_head_shape
from zo2_ds.estimate.meta_model import model_dims
from zo2_ds.loss import CHUNK_BYTES
from zo2_ds.vocab import head_chunk_rows

__all__ = ["transient_bytes"]


def transient_bytes(
    net: nn.Module,
    config: ZO2Config,
    parts: dict[str, int],
    tokens: int,
    itemsize: int,
    passes: int,
    granularity: str | None,
) -> tuple[int, int, int]:
    """One block's activations, the logits and the loss's chunk, in bytes, for ``passes`` forwards per rank and
    step of ``tokens`` tokens each in a dtype of ``itemsize`` bytes; ``parts``: the exact device parts (the
    offloader's, whose perturbation scratch the head's chunks borrow), ``granularity``: the offloader's, or None."""
    dims = model_dims(net)
    head = chunked_head_shape(net, config)
    if head is None:
        logits_bytes, loss_bytes = tokens * dims["vocab"] * itemsize, _loss_chunk_bytes(tokens, dims["vocab"])
    else:
        lent = parts["perturbation_scratch"] if config.offload.enabled else 0  # the offloader lends its scratch
        logits_bytes, loss_bytes = 0, _head_chunk_bytes(tokens, head, itemsize, lent)
        if parts.get("head_chunks"):  # a streamed head: every pass's hidden states and sums wait for its stream
            loss_bytes += (passes - 1) * tokens * head[1] * itemsize + passes * 3 * tokens * 4
    mlp_tensors = 3 if _gated_mlp(net) else 2
    if granularity == "layer":
        mlp_tensors += passes - 1  # one held per waiting pass (see zo2_ds.estimate)
    return mlp_tensors * tokens * dims["ffn"] * itemsize, logits_bytes, loss_bytes


def _loss_chunk_bytes(tokens: int, vocab: int) -> int:
    """zo2_ds.loss's largest transient: one chunk of rows in fp32 and its log-softmax."""
    rows = min(tokens, max(1, CHUNK_BYTES // (4 * vocab)))
    return 2 * rows * vocab * 4


def _head_chunk_bytes(tokens: int, head: tuple[int, int], itemsize: int, lent_bytes: int) -> int:
    """zo2_ds.vocab's transient: one chunk's perturbed rows of the head (none of its own where the offloader's
    scratch of ``lent_bytes`` holds them), its logits in the model dtype and in fp32."""
    vocab, width = head
    rows = head_chunk_rows(tokens, vocab, width, itemsize)
    weight = rows * width * itemsize
    logits = rows * tokens * (4 + (itemsize if itemsize != 4 else 0))
    return (0 if weight <= lent_bytes else weight) + logits


def _gated_mlp(net: nn.Module) -> bool:
    """Llama-style MLP (gate, up, down: three t x ffn tensors at its peak) rather than fc1 / act / fc2."""
    return any(name.endswith("gate_proj") for name, _ in net.named_modules())
