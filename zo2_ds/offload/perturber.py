"""The blocks' arithmetic on the device: a block's pending updates applied in place in its slot, and its
perturbed copy (theta + scale z) written into one shared scratch buffer.

On CUDA with the multi-tensor kernels: one :class:`~zo2_ds.kernels.TensorTable` per block over its
trainable tensors in their device home (the block's fixed slot, or its resident buffer), built at the
block's first use and kept (the keys differ per block, the pointers per slot: a block always lands in the
same slot), one launch per block and pass (``update_and_perturb_multi_`` for the first pass,
``perturbed_into_multi`` for the others); the perturbation then goes into the scratch in the table's
layout. Elsewhere (CPU, mixed dtypes or lr groups in a block, kernels off or failed) tensor by tensor
through the same dispatch (:class:`zo2_ds.ops.Ops`), with the same bits.
"""

from __future__ import annotations

from typing import Any

import torch

from zo2_ds import zo
from zo2_ds.offload.pending import Entry, block_update, tensor_update
from zo2_ds.offload.store import ALIGN_BYTES, BlockStore
from zo2_ds.ops import Ops

__all__ = ["BlockPerturber", "scratch_layout"]


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES


class BlockPerturber:
    """Per block: its trainable tensors (entry index, z key), their device views and perturbed views."""

    def __init__(
        self,
        store: BlockStore,
        trained: list[list[tuple[int, int]]],
        dev_views: list[list[torch.Tensor]],
        ops: Ops,
        outside_bytes: int,
    ):
        self.store, self.trained, self.dev_views, self.ops = store, trained, dev_views, ops
        num_blocks = store.num_blocks
        offsets, scratch_bytes = scratch_layout(store, trained, outside_bytes)
        self.scratch = torch.empty(scratch_bytes, dtype=torch.uint8, device=store.device)
        self._views_torch = [
            [_view(self.scratch, off, store.entries[b][i]) for (i, _), off in zip(trained[b], offsets[b])]
            for b in range(num_blocks)
        ]
        self.views = list(self._views_torch)  # each block's perturbed tensors (in the table's layout if any)
        self._typed: dict[torch.dtype, torch.Tensor] = {}
        self._tables: list[Any] = [None] * num_blocks  # None: not built yet; False: the per-tensor path
        self._decay = [
            [zo.uses_weight_decay(store.entries[b][i].param) for i, _ in trained[b]] for b in range(num_blocks)
        ]

    def bind(self, b: int) -> None:
        """Point block b's trainable parameters at their perturbed copies (for the pass about to run)."""
        entries = self.store.entries[b]
        for (i, _), v in zip(self.trained[b], self.views[b]):
            entries[i].param.data = v

    def perturb(self, b: int, pending: Entry | None, scale: float, pass_hash: int) -> None:
        """theta (+ ``pending``, applied in place) -> theta + scale z into the scratch views
        (``pass_hash`` = zo.z_pass_hash(seed, step, index) of the pass)."""
        table = self._table(b)
        if table:
            update = block_update(pending)
            if pending is None or update is not None:
                flat = self._flat(table)
                if update is None:
                    if self.ops.perturbed_into_multi(table, flat, pass_hash, scale):
                        return
                elif self.ops.update_and_perturb_multi_(table, update, pass_hash, scale, flat):
                    return
                self._per_tensor_from_now()
            else:  # tensors of one block in groups of different lr / weight decay: tensor by tensor
                self.views[b] = self._views_torch[b]
                self._tables[b] = False
        views, outs = self.dev_views[b], self.views[b]
        for t, (i, key) in enumerate(self.trained[b]):
            upd = tensor_update(pending[t], self._decay[b][t], key) if pending is not None else None
            seed = zo.z_seed_from_pass(pass_hash, key)
            self.ops.update_and_perturb_(views[i], upd, seed, (scale,), (outs[t],))

    def update(self, b: int, pending: Entry) -> None:
        """Apply block b's ``pending`` update in place (no perturbation: a plain forward, a flush, or an older
        entry re-applied at upload)."""
        table = self._table(b)
        update = block_update(pending) if table else None
        if update is not None:
            if self.ops.apply_update_multi_(table, *update):
                return
            self._per_tensor_from_now()
        views = self.dev_views[b]
        for t, ((i, key), upd) in enumerate(zip(self.trained[b], pending)):
            if upd is not None:
                self.ops.apply_update_(views[i], *tensor_update(upd, self._decay[b][t], key))

    def forget_tables(self) -> None:
        """The blocks' device views moved (the ring's order changed): rebuild each table at its next use."""
        self._tables = [None if t is not False else False for t in self._tables]
        self.views = list(self._views_torch)

    def tables(self) -> list[Any]:
        """Each block's TensorTable (None before its first use, False on the per-tensor path)."""
        return list(self._tables)

    def _table(self, b: int) -> Any:
        """Block b's kernels.TensorTable (built at its first use), or False for the per-tensor path."""
        table = self._tables[b]
        if table is None:
            views = self.dev_views[b]
            tensors = [views[i] for i, _ in self.trained[b]]
            table = self.ops.table(tensors, [key for _, key in self.trained[b]], self._decay[b]) or False
            if table:
                itemsize = tensors[0].element_size()
                assert table.scratch_numel * itemsize <= self.scratch.numel(), "scratch sized for every block"
                self.views[b] = table.views(self._flat(table))
            self._tables[b] = table
        return table

    def _flat(self, table: Any) -> torch.Tensor:
        """The perturbation scratch as a flat tensor of the table's dtype (a view, made once per dtype)."""
        flat = self._typed.get(table.dtype)
        if flat is None:
            flat = self._typed[table.dtype] = Ops.flat_view(self.scratch, table.dtype)
        return flat

    def _per_tensor_from_now(self) -> None:
        """The multi-tensor kernels failed (the dispatch warned and turned them off): drop every table."""
        self._tables = [False] * len(self._tables)
        self.views = list(self._views_torch)


def scratch_layout(
    store: BlockStore, trained: list[list[tuple[int, int]]], outside_bytes: int
) -> tuple[list[list[int]], int]:
    """Each block's trainable tensors' byte offsets in the perturbation scratch, and the scratch's size.

    The scratch holds one block's trainable tensors at theta + scale z. One buffer serves every pass (pass
    j+1 overwrites it after pass j's kernels, in compute-stream order): a second buffer would let one kernel
    write both signs, at one more block of GPU memory. It also holds the perturbed copy of the largest unit
    outside the blocks (``outside_bytes``: the tied embedding / head, or a block's layer norm at granularity
    "layer"), which never runs while a block's own forward does (max, not sum).
    """
    offsets, scratch_bytes = [], ALIGN_BYTES
    for b in range(store.num_blocks):
        off, block_offsets = 0, []
        for i, _ in trained[b]:
            block_offsets.append(off)
            off += _aligned(store.entries[b][i].nbytes)
        offsets.append(block_offsets)
        # The multi-tensor kernels' layout (kernels.TensorTable: each tensor at a 64-element boundary)
        # needs no more for 1-, 2- and 4-byte dtypes; taken into account all the same.
        table_bytes = sum(
            -(-(e.nbytes // e.dtype.itemsize) // 64) * 64 * e.dtype.itemsize
            for e in (store.entries[b][i] for i, _ in trained[b])
        )
        scratch_bytes = max(scratch_bytes, off, table_bytes)
    return offsets, max(scratch_bytes, _aligned(outside_bytes))


def _view(flat: torch.Tensor, offset: int, entry: Any) -> torch.Tensor:
    return flat[offset : offset + entry.nbytes].view(entry.dtype).view(entry.shape)
