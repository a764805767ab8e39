"""The untied head of a large vocabulary, streamed from pinned host memory in row chunks (``zo2.offload.stream_head``).

With the blocks streamed, an untied head is the largest tensor left on the GPU (Qwen2.5-7B: 152064 x 3584, 1.02
GiB). Its weight lives in a pinned host master instead, and every use streams it through two chunk buffers of a
few thousand rows (the chunks of :func:`zo2_ds.vocab.head_chunk_rows`):

- **Training forwards with labels** (the head takes the chunked loss, :mod:`zo2_ds.vocab`): the head's forward
  only records its input; each pass's loss call keeps the hidden states and waits until every pass of the run
  has reached it (:meth:`~zo2_ds.offload.lockstep.LockStep.gather_passes`). The first pass to go on streams the
  head once: per chunk, the upload, the pending updates applied (oldest first) and the chunk written back to the
  master, then every pass's perturbed rows, logits and online log-sum-exp. Each pass then returns its own loss.
  So the head crosses the link once per run, as a block does, and the loss of each pass has the same bits as
  the resident runner's chunked loss (the same chunks, the same kernels, the same order within a pass).
- **Other forwards** (eval, generation, forwards without labels): the head's output is the full logits,
  computed chunk by chunk (perturbed in a perturbed forward): the same values, but not the same bits as one
  matmul over the whole head (the matmuls' shapes differ), and one stream of the head per forward.

Updates are recorded (:meth:`HeadStream.record`) and applied at the head's next stream (or :meth:`flush`), like
a block's; the head is written back every time (its write-back interval is 1). Each chunk of the update starts
on a z group (:func:`zo2_ds.vocab.z_group_rows`), so it has the bits of the whole tensor's update. A stream cut
short (an exception) remembers how far the master holds the updates.

Device memory: the two chunk buffers (``head_chunks`` in the device budget) and the chunk's perturbed copy in
the offloader's perturbation scratch; the hidden states of each pass (tokens x width) wait for the stream.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from deepspeed.accelerator import get_accelerator
from torch import nn

from zo2_ds import zo
from zo2_ds.offload.hostmem import pinned_host_buffer
from zo2_ds.offload.streams import Streams
from zo2_ds.ops import Ops, Update
from zo2_ds.perturb import TrainableParam
from zo2_ds.scratch import ScratchPool
from zo2_ds.vocab import (
    OnlineLoss,
    chunks_head,
    head_chunk_rows,
    labels_index,
    loss_options,
    take_captured,
    z_group_rows,
)

__all__ = ["HeadStream", "streamed_head", "stream_rows"]

# (pass hash, scale) of the perturbed forward in progress in this thread, or None (an unperturbed forward), and
# the run's LockStep (None outside a run).
Context = Callable[[], tuple[tuple[int, float] | None, Any]]


def streamed_head(
    module: nn.Module, params: Sequence[TrainableParam], switch: bool | str, vocab_chunks: bool | str, device: Any
) -> TrainableParam | None:
    """The trainable tensor of ``module``'s head when it streams (``zo2.offload.stream_head``), else None.

    It streams when the head takes the chunked loss (:func:`zo2_ds.vocab.chunks_head` under ``vocab_chunks``; true:
    any size), no other module uses its weight (untied) and, for "auto", the device has streams (CUDA)."""
    if switch is False:
        return None
    for model, head in _output_embeddings(module):
        tp = next((tp for tp in params if tp.param is getattr(head, "weight", None)), None)
        if tp is None:
            continue
        chunked = chunks_head(model, head, True if switch is True and vocab_chunks is not False else vocab_chunks)
        untied = len(tp.uses) == 1
        if chunked and untied and (switch is True or torch.device(device).type == "cuda"):
            return tp
        if switch is True:
            why = "is tied to another module's weight" if not untied else "does not take the chunked loss"
            raise ValueError(
                f"zo2.offload.stream_head: the head {tp.name} {why}; streaming it needs an untied, bias-free "
                "nn.Linear head of an HF causal LM with its stock loss and zo2.vocab_chunks not false (set "
                'zo2.offload.stream_head to "auto" or false)'
            )
    if switch is True:
        raise ValueError("zo2.offload.stream_head: the model has no trainable output embedding (get_output_embeddings)")
    return None


def stream_rows(tokens: int, shape: Sequence[int], itemsize: int, align: int) -> int:
    """Rows per streamed chunk of a head of ``shape``: the loss's chunks (:func:`~zo2_ds.vocab.head_chunk_rows`, so
    each pass's loss has the resident runner's bits), or as many of them as start every chunk on a z group (``align``
    rows: :func:`~zo2_ds.vocab.z_group_rows` on the kernels, whose update of a part needs it; 1 on the torch path)."""
    vocab, width = shape
    return min(math.lcm(head_chunk_rows(tokens, vocab, width, itemsize), align), vocab)


def _output_embeddings(module: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(model, its head) for every HF model in ``module`` that names an output embedding."""
    found = []
    for model in module.modules():
        get_head = getattr(model, "get_output_embeddings", None)
        try:
            head = get_head() if callable(get_head) else None
        except Exception:  # noqa: BLE001 - an HF model that cannot answer: it has no head for us
            head = None
        if head is not None:
            found.append((model, head))
    return found


class HeadStream:
    """The streamed head of one offloaded model (see the module docstring); built by the OffloadRunner."""

    def __init__(
        self,
        module: nn.Module,
        tp: TrainableParam,
        ops: Ops,
        streams: Streams,
        scratch: ScratchPool,
        context: Context,
    ):
        self.tp, self.ops, self.streams, self.scratch, self._context = tp, ops, streams, scratch, context
        self.head = head = tp.uses[0][0]
        self.model = next(model for model, h in _output_embeddings(module) if h is head)
        weight = tp.param
        self.shape, self.dtype, self.device = tuple(weight.shape), weight.dtype, weight.device
        vocab, width = self.shape
        buf, _ = pinned_host_buffer(get_accelerator(), weight.numel() * weight.element_size())
        self.master = buf.view(weight.dtype).view(self.shape)
        self.master.copy_(weight.data)
        weight.data = self.master  # state_dict and checkpoints see the master
        get_accelerator().empty_cache()  # the device copy's memory goes back to the device, not to the cache
        self._empty = torch.empty(0, width, dtype=self.dtype, device=self.device)  # what the head's forward reads
        self._align = z_group_rows(width) if ops.fused(self._empty) else 1
        # The two chunk buffers: chunks of the most rows any token count asks for (the weight's cap), made now so
        # that they are in the device budget; grown only where z's alignment asks for more rows.
        self.buffers: list[torch.Tensor] = []
        for i in range(2):
            self._buffer(i, self._rows(1) * width)
        self._ready = [streams.marker(), streams.marker()]
        self._free = [streams.marker(), streams.marker()]
        self._written = [streams.marker(), streams.marker()]
        self._updated = streams.marker()
        self.pending: list[Update] = []  # updates not in the master, oldest first (seeds of this tensor)
        self._done_rows = 0  # rows [0, this) of the master already hold the pending updates (a cut-short stream)
        self._last_rows = 0  # rows a chunk of the last stream
        self._state = threading.local()
        self._stash: dict[int, tuple[OnlineLoss, int, float]] = {}  # pass -> its loss so far, z seed, scale
        self._losses: dict[int, torch.Tensor] = {}
        self._labels_index = labels_index(self.model)
        self._previous_loss = self.model.__dict__.get("_loss_function")
        self._loss = self.model.loss_function
        self.model._loss_function = self._loss_call
        self._handles = [
            self.model.register_forward_pre_hook(self._arm, with_kwargs=True),
            self.model.register_forward_hook(self._disarm, always_call=True),
            head.register_forward_pre_hook(self._head_pre),
            head.register_forward_hook(self._head_post, with_kwargs=True, always_call=True),
        ]

    # -- for the runner ------------------------------------------------------------------------------
    def record(self, pass_hashes: Sequence[int], coefs: Sequence[float], lr: float, weight_decay: float) -> None:
        """One step's update, applied at the next stream (weight decay as MeZO's: 2-D tensors only)."""
        if self._done_rows:  # a stream was cut short: finish applying the older updates first
            self.flush()
        seeds = tuple(zo.z_seed_from_pass(h, self.tp.key) for h in pass_hashes)
        wd = weight_decay if zo.uses_weight_decay(self.tp.param) else 0.0
        self.pending.append((seeds, zo.kept_coefs(coefs), float(lr), float(wd)))

    def flush(self) -> None:
        """Apply the pending updates to the master now (one stream of the head); the caller synchronizes."""
        if self.pending:
            self._stream(self._last_rows or self._rows(1), None)  # chunks that fit the buffers, if any

    def begin_run(self) -> None:
        self._stash.clear()
        self._losses.clear()

    def device_buffers(self) -> list[torch.Tensor]:
        return list(self.buffers)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._previous_loss is None:
            self.model.__dict__.pop("_loss_function", None)
        else:
            self.model._loss_function = self._previous_loss
        self.buffers.clear()

    # -- the stream ------------------------------------------------------------------------------------
    def _rows(self, tokens: int) -> int:
        return stream_rows(tokens, self.shape, self.master.element_size(), self._align)

    def _buffer(self, i: int, numel: int) -> torch.Tensor:
        while len(self.buffers) <= i:
            self.buffers.append(torch.empty(0, dtype=self.dtype, device=self.device))
        if self.buffers[i].numel() < numel:
            self.streams.synchronize()  # the old buffer may still be read or written by a side stream
            self.buffers[i] = torch.empty(numel, dtype=self.dtype, device=self.device)
        return self.buffers[i]

    def _stream(self, rows: int, visit: Callable[[int, int, torch.Tensor], None] | None) -> None:
        """Every chunk of ``rows`` rows once, in order: uploaded (the next one's upload issued before this one's
        work), brought up to date and written back when updates are pending, then ``visit(start, end, chunk)``."""
        vocab, width = self.shape
        streams, compute = self.streams, self.streams.compute()
        self._last_rows = rows
        for i in range(2):
            self._buffer(i, min(rows, vocab) * width)
        pending = self.pending
        zs = None  # the torch path draws each update's z whole, once per stream
        if pending and not self.ops.fused(self._empty):
            zs = [[zo.generate_z(s, self.shape, self.device) for s in update[0]] for update in pending]
        starts = list(range(0, vocab, rows))

        def upload(i: int) -> torch.Tensor:
            start, k = starts[i], i % 2
            n = min(rows, vocab - start)
            chunk = self.buffers[k][: n * width].view(n, width)
            with streams.on(streams.upload):
                self._free[k].wait(streams.upload)
                self._written[k].wait(streams.upload)
                chunk.copy_(self.master[start : start + n], non_blocking=True)
                self._ready[k].record(streams.upload)
            return chunk

        following = upload(0)
        for i, start in enumerate(starts):
            chunk, k = following, i % 2
            if i + 1 < len(starts):
                following = upload(i + 1)
            self._ready[k].wait(compute)
            end = start + chunk.shape[0]
            if pending and start >= self._done_rows:
                for u, update in enumerate(pending):
                    self.ops.apply_update_part_(chunk, start, self.shape, update, None if zs is None else zs[u])
                self._updated.record(compute)
                with streams.on(streams.writeback):
                    self._updated.wait(streams.writeback)
                    self.master[start:end].copy_(chunk, non_blocking=True)
                    self._written[k].record(streams.writeback)
                self._done_rows = end
            if visit is not None:
                visit(start, end, chunk)
            self._free[k].record(compute)
        if pending:
            self.pending, self._done_rows = [], 0

    def _perturbed(self, chunk: torch.Tensor, start: int, seed: int, scale: float, z: Any) -> torch.Tensor:
        """The chunk's rows perturbed, in the offloader's scratch when it is free and large enough."""
        buf = self.scratch.take_lent(chunk.device, chunk.dtype, chunk.numel())
        out = torch.empty_like(chunk) if buf is None else buf[: chunk.numel()].view(chunk.shape)
        self.ops.perturbed_part_into(out, chunk, start, self.shape, seed, scale, z)
        if buf is not None:
            self.scratch.give_back(buf)  # the compute stream reads it before any later write: in issue order
        return out

    def _z(self, seed: int) -> torch.Tensor | None:
        return None if self.ops.fused(self._empty) else zo.generate_z(seed, self.shape, self.device)

    # -- the losses of a run's passes --------------------------------------------------------------------
    def _losses_of_stash(self) -> None:
        """Stream the head once for every pass that kept its hidden states: each pass's chunked loss."""
        stash = list(self._stash.items())
        self._stash.clear()
        tokens = stash[0][1][0].tokens
        if any(acc.tokens != tokens for _, (acc, _, _) in stash):
            raise RuntimeError("zo2.offload.stream_head: the passes of one run have different token counts")
        loss_rows = head_chunk_rows(tokens, self.shape[0], self.shape[1], self.master.element_size())
        zs = [self._z(seed) for _, (_, seed, _) in stash]

        def visit(start: int, end: int, chunk: torch.Tensor) -> None:
            for a in range(start, end, loss_rows):
                b = min(a + loss_rows, end)
                for (_, (acc, seed, scale)), z in zip(stash, zs):
                    part = self._perturbed(chunk[a - start : b - start], a, seed, scale, z)
                    acc.add(nn.functional.linear(acc.hidden, part), a, b)

        self._stream(self._rows(tokens), visit)
        for j, (acc, _, _) in stash:
            self._losses[j] = acc.loss()

    def _logits(self, hidden: torch.Tensor, perturbation: tuple[int, float] | None) -> torch.Tensor:
        """The head's output (full logits), chunk by chunk; perturbed by (z seed, scale) when given."""
        h = hidden.reshape(-1, hidden.shape[-1])
        vocab = self.shape[0]
        out: list[torch.Tensor] = []
        z = None if perturbation is None else self._z(perturbation[0])

        def visit(start: int, end: int, chunk: torch.Tensor) -> None:
            weight = chunk if perturbation is None else self._perturbed(chunk, start, *perturbation, z)
            logits = nn.functional.linear(h, weight)
            if not out:
                out.append(torch.empty(h.shape[0], vocab, dtype=logits.dtype, device=logits.device))
            out[0][:, start:end] = logits

        self._stream(self._rows(h.shape[0]), visit)
        return out[0].view(*hidden.shape[:-1], vocab)

    # -- hooks on the model, its head and its loss -------------------------------------------------------
    def _arm(self, model: nn.Module, args: Any, kwargs: dict) -> None:
        labels = kwargs.get("labels")
        if labels is None and self._labels_index is not None and len(args) > self._labels_index:
            labels = args[self._labels_index]
        state = self._state
        state.armed, state.chunked, state.hidden, state.logits = labels is not None, False, None, None

    def _disarm(self, model: nn.Module, args: Any, output: Any) -> None:
        state = self._state
        chunked = getattr(state, "chunked", False)
        state.armed = state.chunked = False
        state.hidden = state.logits = None
        if chunked and hasattr(output, "logits"):
            output["logits"] = None  # they were never computed

    def _head_pre(self, head: nn.Module, args: Any) -> None:
        state = self._state
        head._parameters["weight"] = self._empty  # the forward computes empty logits; the post-hook does the work
        spec, _ = self._context()
        state.perturbation = None if spec is None else (zo.z_seed_from_pass(spec[0], self.tp.key), spec[1])
        state.chunked = spec is not None and getattr(state, "armed", False)

    def _head_post(self, head: nn.Module, args: Any, kwargs: dict, output: Any) -> Any:
        head._parameters["weight"] = self.tp.param
        if output is None:  # the forward raised
            return None
        hidden = args[0] if args else kwargs["input"]
        state = self._state
        if getattr(state, "chunked", False):
            state.hidden, state.logits = hidden, output
            return None
        return self._logits(hidden, state.perturbation)

    def _loss_call(self, logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, **kwargs: Any) -> Any:
        state = self._state
        hidden = take_captured(state, logits, self.model, "zo2.offload.stream_head")
        if hidden is None:
            return self._loss(logits, labels, vocab_size, **kwargs)
        acc = OnlineLoss(hidden, labels, **loss_options(kwargs))
        _, sched = self._context()
        j = 0 if sched is None else sched.current_pass
        self._stash[j] = (acc, *state.perturbation)
        if sched is not None:
            sched.gather_passes()  # every pass keeps its hidden states before the head streams
        if j not in self._losses:
            self._losses_of_stash()
        return self._losses.pop(j)
