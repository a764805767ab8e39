"""Vocabulary-sized tensors outside the blocks, perturbed without a whole perturbed copy.

The resident runner perturbs a unit by writing ``theta + scale * z`` for all of its tensors into scratch. For an
embedding and an untied head of a large vocabulary (Qwen2.5-7B: 152064 x 3584, 1.02 GiB each) that scratch is
the largest buffer of an offloaded step, and the head's output, the logits, the next largest. Two forwards
need less, because z of any element can be drawn alone (on the kernels z is counter-based, keyed by the
element's flat index: :mod:`zo2_ds.kernels`; torch's generator is sequential, so the torch path draws z
whole, which is what it did before):

- **Gather.** A plain ``nn.Embedding`` (``max_norm`` unset) whose only trainable tensor is its weight runs its
  forward on the clean weight, so its output holds ``W[ids]``; the post-hook turns those rows into
  ``(W + s z)[ids]`` in place (:meth:`zo2_ds.ops.Ops.perturbed_gather_`). Same bits as perturbing W then
  gathering; no scratch. Always on (a call by keyword, which the pre-hook cannot see, takes the whole path).
- **Head chunks.** For an HF causal LM whose loss is the stock causal-LM one (or the lean loss of
  :mod:`zo2_ds.loss`), with a bias-free ``nn.Linear`` head, in a perturbed forward given ``labels``: the
  head's weight is swapped for zero rows, so its "logits" are empty and cost nothing, and the loss is
  computed from the head's input over chunks of vocabulary rows (:func:`chunked_head_loss`): each chunk of
  W perturbed into a chunk-sized buffer, its logits, an online log-sum-exp, the target's logit. Neither the
  whole perturbed head nor the logits exist; the forward returns ``logits=None``. The value differs from
  HF's in rounding only. ``zo2.vocab_chunks`` decides where ("auto": heads of >= 256 MiB, so small models
  keep HF's bits); evaluation and forwards without labels keep the whole path and full logits.

The chunk layout depends on the number of tokens and the head's shape only (never on which buffer is
free), so the offloaded and the resident runner compute the same bits.
"""

from __future__ import annotations

import inspect
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from zo2_ds import zo
from zo2_ds.loss import lean_causal_lm_loss, stock_causal_lm_loss
from zo2_ds.ops import Ops
from zo2_ds.scratch import ScratchPool

__all__ = ["HEAD_CHUNK_MIN_BYTES", "HEAD_CHUNK_LOGIT_BYTES", "HEAD_CHUNK_WEIGHT_BYTES", "VocabPaths", "OnlineLoss",
           "chunked_head_loss", "head_chunk_rows", "z_group_rows", "is_gathered", "chunks_head",
           "labels_index", "take_captured", "loss_options"]  # fmt: skip

# "auto" chunks heads of at least this many bytes (Qwen2.5-7B's 1.02 GiB, OPT-6.7B's 0.38 GiB; not OPT-1.3B's
# 0.19 GiB nor the test models).
HEAD_CHUNK_MIN_BYTES = 256 << 20
# fp32 bytes of one chunk of logits: 4096 vocabulary rows at 2048 tokens.
HEAD_CHUNK_LOGIT_BYTES = 32 << 20
# Bytes of the head's weight in one chunk (fewer tokens would otherwise make larger chunks of it: 64 tokens, a
# quarter of Qwen2.5-7B's head).
HEAD_CHUNK_WEIGHT_BYTES = 32 << 20
_Z_GROUP = 4096  # elements of one Philox group of z (zo2_ds.kernels: 4 x ROW): chunks start on one


def is_gathered(module: nn.Module, params: Sequence[nn.Parameter]) -> bool:
    """Whether a unit of ``module`` owning ``params`` is perturbed by gathering rows (see the module docstring)."""
    return type(module) is nn.Embedding and module.max_norm is None and len(params) == 1 and params[0] is module.weight


def chunks_head(model: nn.Module, head: nn.Module, switch: bool | str) -> bool:
    """Whether ``head`` (a unit's module) is ``model``'s output embedding and takes the chunked loss."""
    if switch is False or not isinstance(head, nn.Linear) or head.bias is not None:
        return False
    get_head = getattr(model, "get_output_embeddings", None)
    try:
        if not callable(get_head) or get_head() is not head:
            return False
        loss = model.loss_function
    except Exception:  # noqa: BLE001 - an HF model that cannot answer: leave it alone
        return False
    if loss is not lean_causal_lm_loss and (loss is None or loss is not stock_causal_lm_loss()):
        return False
    config = getattr(model, "config", None)
    if any(getattr(config, k, None) is not None for k in ("final_logit_softcapping", "logit_scale")):
        return False  # the model changes its logits before the loss
    return switch is True or head.weight.numel() * head.weight.element_size() >= HEAD_CHUNK_MIN_BYTES


def head_chunk_rows(tokens: int, vocab: int, hidden: int, itemsize: int = 2) -> int:
    """Vocabulary rows per chunk: about :data:`HEAD_CHUNK_LOGIT_BYTES` of fp32 logits and at most
    :data:`HEAD_CHUNK_WEIGHT_BYTES` of the head's weight (``itemsize`` bytes an element), a multiple of the rows
    of one z group where that many fit (then every chunk starts on a group: the kernels' one-pass slice)."""
    align = z_group_rows(hidden)
    rows = max(1, min(HEAD_CHUNK_LOGIT_BYTES // (4 * max(tokens, 1)), HEAD_CHUNK_WEIGHT_BYTES // (hidden * itemsize)))
    if rows >= align:
        rows = rows // align * align
    return min(rows, vocab)


def z_group_rows(hidden: int) -> int:
    """The fewest rows of ``hidden`` elements that span whole z groups (a chunk of a multiple of them starts on
    a group wherever the previous ones ended)."""
    return _Z_GROUP // math.gcd(hidden, _Z_GROUP)


class OnlineLoss:
    """HF's causal-LM loss of ``logits = hidden @ W.T`` reduced chunk by chunk of W's rows (:meth:`add`, in order)
    to an online log-sum-exp and the target's logit, in fp32; :meth:`loss` when every row was added."""

    def __init__(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor | None,
        num_items_in_batch: torch.Tensor | int | None = None,
        ignore_index: int = -100,
        shift_labels: torch.Tensor | None = None,
    ):
        if shift_labels is None:
            labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
            shift_labels = labels[..., 1:]
        self.hidden = h = hidden.reshape(-1, hidden.shape[-1])
        self.target = shift_labels.reshape(-1).to(h.device)
        if self.target.numel() != h.shape[0]:
            raise ValueError(f"zo2 loss: {h.shape[0]} positions of hidden states but {self.target.numel()} labels")
        self.tokens = tokens = h.shape[0]
        self.peak = torch.full((tokens,), -math.inf, dtype=torch.float32, device=h.device)
        self.total = torch.zeros(tokens, dtype=torch.float32, device=h.device)
        self.picked = torch.zeros(tokens, dtype=torch.float32, device=h.device)
        self.ignore_index, self.num_items_in_batch = ignore_index, num_items_in_batch

    def add(self, logits: torch.Tensor, start: int, end: int) -> None:
        """Reduce the logits of rows ``[start, end)`` (consumed: they are overwritten)."""
        logits = logits.float()
        target = self.target
        at = (target - start).clamp(0, end - start - 1).unsqueeze(1)
        hit = (target >= start) & (target < end)
        self.picked = torch.where(hit, logits.gather(1, at).squeeze(1), self.picked)
        new_peak = torch.maximum(self.peak, logits.amax(1))
        self.total = self.total * torch.exp(self.peak - new_peak) + logits.sub_(new_peak.unsqueeze(1)).exp_().sum(1)
        self.peak = new_peak

    def loss(self) -> torch.Tensor:
        ignored = self.target == self.ignore_index
        losses = torch.where(ignored, 0.0, self.peak + torch.log(self.total) - self.picked)
        num_items = self.num_items_in_batch
        if num_items is None:
            return losses.sum() / (~ignored).sum()
        if torch.is_tensor(num_items):
            num_items = num_items.to(losses.device)
        return losses.sum() / num_items


def chunked_head_loss(
    hidden: torch.Tensor,
    vocab: int,
    chunk_logits: Callable[[torch.Tensor, int, int], torch.Tensor],
    labels: torch.Tensor | None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    itemsize: int = 2,
) -> torch.Tensor:
    """HF's causal-LM loss of ``logits = hidden @ W.T`` without the logits: ``chunk_logits(h, start, end)`` returns
    the logits of rows ``[start, end)`` of W (``h``: hidden as [tokens, width]); they are reduced chunk by
    chunk (:class:`OnlineLoss`; chunks of :func:`head_chunk_rows`, W of ``itemsize`` bytes an element)."""
    acc = OnlineLoss(hidden, labels, num_items_in_batch, ignore_index, shift_labels)
    step = head_chunk_rows(acc.tokens, vocab, acc.hidden.shape[1], itemsize)
    for start in range(0, vocab, step):
        end = min(start + step, vocab)
        acc.add(chunk_logits(acc.hidden, start, end), start, end)
    return acc.loss()


class _Head:
    """One chunked head: its model, the tensor, the loss it replaced, and the hooks that arm and capture."""

    def __init__(self, model: nn.Module, head: nn.Module, key: int, labels_index: int | None):
        self.model, self.head, self.key, self.labels_index = model, head, key, labels_index
        self.previous = model.__dict__.get("_loss_function")  # None: the class's own loss_function
        self.loss = model.loss_function  # what runs when the head is not chunked


class VocabPaths:
    """The gather and head-chunk paths of one :class:`~zo2_ds.perturb.ResidentRunner` (see the module docstring).

    The runner asks :meth:`perturb` in a unit's pre-hook (None: perturb the whole unit as usual) and calls
    :meth:`finish` in its post-hook. State of a pass (an armed head, its perturbation, its captured input) is
    per thread: the offloader runs each pass in its own thread, one segment at a time.
    """

    def __init__(self, module: nn.Module, units: Sequence[tuple[nn.Module, Sequence[Any]]], switch: bool | str,
                 ops: Ops, scratch: ScratchPool):  # fmt: skip
        self.ops, self.scratch = ops, scratch
        self._state = threading.local()
        self._gather: dict[int, int] = {}  # id(embedding) -> z key
        self._heads: dict[int, _Head] = {}  # id(head module) -> _Head
        models = [m for m in module.modules() if callable(getattr(m, "get_output_embeddings", None))]
        for mod, tensors in units:
            if is_gathered(mod, [tp.param for tp in tensors]):
                self._gather[id(mod)] = tensors[0].key
            elif len(tensors) == 1 and tensors[0].param is getattr(mod, "weight", None):
                model = next((m for m in models if chunks_head(m, mod, switch)), None)
                if model is not None:
                    self._heads[id(mod)] = _Head(model, mod, tensors[0].key, labels_index(model))
        self._handles = []
        for head in self._heads.values():
            head.model._loss_function = self._loss_of(head)
            self._handles.append(head.model.register_forward_pre_hook(self._arm(head), with_kwargs=True))
            self._handles.append(head.model.register_forward_hook(self._disarm(head), always_call=True))
            self._handles.append(head.head.register_forward_hook(self._capture))

    def gathers(self, module: nn.Module) -> bool:
        """Whether ``module`` (a unit's) gathers its perturbed rows."""
        return id(module) in self._gather

    def chunked_heads(self) -> list[nn.Module]:
        """The heads that take the chunked loss in training forwards with labels."""
        return [head.head for head in self._heads.values()]

    def takes_whole(self, module: nn.Module) -> bool:
        """False for a unit perturbed by gather or in chunks in every training forward that allows it (its
        whole perturbed copy is then the exception: it needs no share of the offloader's scratch)."""
        return id(module) not in self._gather and id(module) not in self._heads

    # -- the runner's hooks ----------------------------------------------------------------------------
    def perturb(self, module: nn.Module, args: Any, pass_hash: int, scale: float) -> list[torch.Tensor] | None:
        """The values to swap in for the unit's one tensor in this perturbed forward, or None (the whole path)."""
        state = self._state
        if not (args and torch.is_tensor(args[0])):  # called by keyword: the hooks cannot see the input
            return None
        key = self._gather.get(id(module))
        if key is not None:
            state.gather = (zo.z_seed_from_pass(pass_hash, key), scale)
            return [module.weight]  # the forward gathers clean rows; finish() perturbs them
        head = self._heads.get(id(module))
        if head is not None and getattr(state, "armed", None) is head:
            state.pass_ = (head, zo.z_seed_from_pass(pass_hash, head.key), scale)
            return [module.weight[:0]]  # zero rows: the head's "logits" are empty
        return None

    def finish(self, module: nn.Module, args: Any, output: Any) -> None:
        """After a gathering embedding's forward: its output rows perturbed in place."""
        gather = getattr(self._state, "gather", None)
        if gather is not None and id(module) in self._gather:
            self._state.gather = None
            if output is not None:  # None: the forward raised
                self.ops.perturbed_gather_(output, module.weight, args[0], *gather)

    # -- hooks on the HF model and its head ------------------------------------------------------------
    def _arm(self, head: _Head) -> Callable:
        def pre_hook(model: nn.Module, args: Any, kwargs: dict) -> None:
            labels = kwargs.get("labels")
            if labels is None and head.labels_index is not None and len(args) > head.labels_index:
                labels = args[head.labels_index]
            self._state.armed = head if labels is not None else None
            self._state.pass_ = None

        return pre_hook

    def _disarm(self, head: _Head) -> Callable:
        def post_hook(model: nn.Module, args: Any, output: Any) -> None:
            chunked = getattr(self._state, "pass_", None) is not None
            self._state.armed = self._state.pass_ = self._state.hidden = None
            if chunked and hasattr(output, "logits"):
                output["logits"] = None  # they were never computed

        return post_hook

    def _capture(self, module: nn.Module, args: Any, output: Any) -> None:
        if getattr(self._state, "pass_", None) is not None:
            self._state.hidden, self._state.logits = args[0], output

    def _loss_of(self, head: _Head) -> Callable:
        def loss_function(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, **kwargs: Any) -> Any:
            hidden = take_captured(self._state, logits, head.model, "zo2.vocab_chunks")
            if hidden is None:
                return head.loss(logits, labels, vocab_size, **kwargs)
            _, seed, scale = self._state.pass_
            return self._chunked_loss(head, hidden, labels, seed, scale, **loss_options(kwargs))

        return loss_function

    def _chunked_loss(self, head: _Head, hidden: torch.Tensor, labels: Any, seed: int, scale: float,
                      **kwargs: Any) -> torch.Tensor:  # fmt: skip
        weight = head.head.weight
        vocab, width = weight.shape
        fused = self.ops.fused(weight)
        z = None if fused else self.ops.generate_z(seed, weight.shape, weight.device)  # torch: drawn once
        rows = head_chunk_rows(hidden.numel() // width, vocab, width, weight.element_size())
        buf = self.scratch.take_lent(weight.device, weight.dtype, rows * width)
        flat = buf if buf is not None else torch.empty(rows * width, dtype=weight.dtype, device=weight.device)

        def chunk_logits(h: torch.Tensor, start: int, end: int) -> torch.Tensor:
            part = flat[: (end - start) * width].view(end - start, width)
            self.ops.perturbed_rows_into(part, weight, start, seed, scale, z)
            return nn.functional.linear(h, part)

        try:
            return chunked_head_loss(hidden, vocab, chunk_logits, labels, itemsize=weight.element_size(), **kwargs)
        finally:
            if buf is not None:
                self.scratch.give_back(buf)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for head in self._heads.values():
            if head.previous is None:
                head.model.__dict__.pop("_loss_function", None)
            else:
                head.model._loss_function = head.previous
        self._heads.clear()


def take_captured(state: Any, logits: Any, model: nn.Module, key: str) -> torch.Tensor | None:
    """At the loss call: the head's input captured in this pass's ``state`` (then forgotten), or None where this
    pass's head was not chunked. Raises, naming ``key``, where the model changed the head's output on its way."""
    hidden = getattr(state, "hidden", None)
    if hidden is None:
        return None
    if logits is not state.logits:
        raise RuntimeError(
            f"{key}: {type(model).__name__} changes its logits before the loss, which the chunked head cannot "
            f"follow; set {key} to false"
        )
    state.hidden = state.logits = None
    return hidden


def loss_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The loss call's keyword arguments :class:`OnlineLoss` takes."""
    return {k: kwargs[k] for k in ("num_items_in_batch", "ignore_index", "shift_labels") if k in kwargs}


def labels_index(model: nn.Module) -> int | None:
    """Position of ``labels`` among the positional arguments of the model's forward (None if it has none)."""
    names = [p.name for p in inspect.signature(model.forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]  # fmt: skip
    return names.index("labels") if "labels" in names else None
