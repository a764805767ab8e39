"""CUDA graphs of the blocks' forwards (``zo2.offload.cuda_graphs``): the host cost of a block's pass
becomes a few copies and one graph launch instead of the HF layer's Python.

A small offloaded model is host-bound: each block runs 2q passes of HF's layer code (some 30-40 torch
calls each) for about 1 ms of kernels, and the GPU waits for the host. The block's forward is replayed
from a graph instead, captured per *signature*: the shapes, dtypes and other values of its arguments,
grad mode, the module's training flag and the addresses of its parameters (the perturbed copy in the
runner's scratch buffer, or its slot: fixed per block, so one graph serves every step).

- The first call with a signature runs eagerly (lazy initialisations, autotuning); the second captures
  and replays; later ones replay. A block keeps at most :data:`MAX_GRAPHS_PER_BLOCK` graphs (varying
  sequence lengths); beyond that, and for anything that fails to capture, it runs eagerly.
- All blocks share the static input buffers of a signature (inputs are copied in just before a replay,
  and replays run one at a time on the compute stream), one memory pool, and static output buffers into
  which the graph copies its result; the caller gets a copy of those (the 2q passes interleave block by
  block, so each pass's hidden state must be its own).
- Only under ``no_grad`` (the ZO passes and eval); a forward with autograd on runs eagerly.

Replay runs the same kernels as the eager forward, so results are the same bits (the CUDA tests compare
graphs on and off against the in-GPU engine).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["BlockGraphs", "MAX_GRAPHS_PER_BLOCK"]

logger = logging.getLogger(__name__)

MAX_GRAPHS_PER_BLOCK = 4


class _Graph:
    __slots__ = ("graph", "inputs", "outputs", "out_spec", "out_leaves")

    def __init__(self) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.out_spec: Any = None
        self.out_leaves: list[Any] = []


class BlockGraphs:
    """Installs a graphed ``forward`` on each block (an instance attribute; the module's hooks still run)."""

    def __init__(self, blocks: Sequence[torch.nn.Module], params_of: Callable[[int], Sequence[torch.Tensor]]):
        self._blocks = list(blocks)
        self._params_of = params_of
        self._pool = torch.cuda.graph_pool_handle()
        self._capture_stream = torch.cuda.Stream()
        self._static_inputs: dict[Any, list[torch.Tensor]] = {}  # per input layout, shared by all blocks
        self._static_outputs: dict[Any, torch.Tensor] = {}  # per (shape, dtype, position), shared
        self._graphs: list[dict[Any, _Graph | None]] = [{} for _ in self._blocks]  # None: seen once (eager)
        self._eager: list[bool] = [False] * len(self._blocks)  # block gave up on graphs
        self._originals = [block.forward for block in self._blocks]
        self.replays = 0  # counted for tests and benchmarks
        for b, block in enumerate(self._blocks):
            block.forward = self._make_forward(b)

    @property
    def eager(self) -> bool:
        """True once any block has given up on graphs (a failed capture turns them off for every block)."""
        return any(self._eager)

    def close(self) -> None:
        for block in self._blocks:
            if "forward" in block.__dict__:
                del block.forward
        self._graphs = [{} for _ in self._blocks]
        self._static_inputs.clear()
        self._static_outputs.clear()

    def _make_forward(self, b: int) -> Callable:
        original = self._originals[b]

        def forward(*args: Any, **kwargs: Any) -> Any:
            if self._eager[b] or torch.is_grad_enabled():
                return original(*args, **kwargs)
            leaves, spec = pytree.tree_flatten((args, kwargs))
            key = self._signature(b, leaves, spec)
            if key is None:
                return original(*args, **kwargs)
            graphs = self._graphs[b]
            entry = graphs.get(key, False)
            if entry is False:  # first time: eager (warm-up)
                if len(graphs) >= MAX_GRAPHS_PER_BLOCK:
                    return original(*args, **kwargs)
                graphs[key] = None
                return original(*args, **kwargs)
            if entry is None:
                entry = self._capture(b, key, leaves, spec)
                if entry is None:
                    return original(*args, **kwargs)
                graphs[key] = entry
            return self._replay(entry, leaves)

        return forward

    def _signature(self, b: int, leaves: list[Any], spec: Any) -> Any:
        parts: list[Any] = [spec, self._blocks[b].training]
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                if leaf.requires_grad or leaf.device.type != "cuda":
                    return None
                parts.append((tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device))
            else:
                try:
                    hash(leaf)
                except TypeError:
                    return None
                parts.append((type(leaf), leaf))
        parts.append(tuple(p.data_ptr() for p in self._params_of(b)))
        key = tuple(parts)
        try:
            hash(key)
        except TypeError:  # e.g. a tree spec with unhashable context: no graph
            return None
        return key

    def _input_buffers(self, key: Any, leaves: list[Any]) -> list[torch.Tensor]:
        layout = key[2:-1]  # the leaves' descriptions (shared across blocks with the same inputs)
        buffers = self._static_inputs.get(layout)
        if buffers is None:
            buffers = [_like(t) for t in leaves if isinstance(t, torch.Tensor)]
            self._static_inputs[layout] = buffers
        return buffers

    def _capture(self, b: int, key: Any, leaves: list[Any], spec: Any) -> _Graph | None:
        entry = _Graph()
        entry.inputs = self._input_buffers(key, leaves)
        static_iter = iter(entry.inputs)
        static_leaves = [next(static_iter) if isinstance(x, torch.Tensor) else x for x in leaves]
        args, kwargs = pytree.tree_unflatten(static_leaves, spec)
        for buf, x in zip(entry.inputs, (x for x in leaves if isinstance(x, torch.Tensor))):
            buf.copy_(x)
        # No garbage collection while capturing: a finalizer that runs then (an old engine's pinned buffers
        # unregistering, an event destroyed) would be a call the capture forbids and would invalidate it.
        gc_was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()
        side = self._capture_stream
        try:
            # One eager run in this thread on the capture stream first: per-thread and per-stream lazy set-up
            # (library handles, workspaces) must not happen inside the capture.
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._originals[b](*args, **kwargs)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(entry.graph, pool=self._pool, stream=side, capture_error_mode="thread_local"):
                out = self._originals[b](*args, **kwargs)
                out_leaves, entry.out_spec = pytree.tree_flatten(out)
                for pos, leaf in enumerate(out_leaves):
                    if isinstance(leaf, torch.Tensor):
                        slot = (tuple(leaf.shape), leaf.dtype, pos)
                        static = self._static_outputs.get(slot)
                        if static is None:
                            static = self._static_outputs[slot] = torch.empty(
                                leaf.shape, dtype=leaf.dtype, device=leaf.device
                            )
                        static.copy_(leaf)
                        entry.outputs.append(static)
                        entry.out_leaves.append(None)
                    else:
                        entry.out_leaves.append(leaf)
            del out, out_leaves
        except Exception as exc:  # noqa: BLE001 - a layer that cannot be captured: every block runs eagerly
            # (a failed capture can leave the graph pool mid-recording; no further capture is attempted)
            self._eager = [True] * len(self._blocks)
            logger.warning(
                "zo2.offload.cuda_graphs: capture of block %d failed, blocks run eagerly: %s", b, exc, exc_info=True
            )
            return None
        finally:
            if gc_was_enabled:
                gc.enable()
        return entry

    def _replay(self, entry: _Graph, leaves: list[Any]) -> Any:
        for buf, x in zip(entry.inputs, (x for x in leaves if isinstance(x, torch.Tensor))):
            buf.copy_(x)
        entry.graph.replay()
        self.replays += 1
        outputs = iter(entry.outputs)
        out = [next(outputs).clone() if leaf is None else leaf for leaf in entry.out_leaves]
        return pytree.tree_unflatten(out, entry.out_spec)


def _like(t: torch.Tensor) -> torch.Tensor:
    """A buffer with ``t``'s strides (the graph sees what the eager forward saw), dense where ``t`` is an
    expanded view (a stride of 0 over a dimension longer than 1 cannot be written to)."""
    if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
