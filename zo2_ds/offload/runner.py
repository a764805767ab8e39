"""OffloadRunner: the ZO step with the blocks streamed through a fixed ring of GPU slots.

Same interface as :class:`zo2_ds.perturb.ResidentRunner` (``run``, ``run_plain``, ``update``, ``flush``,
``close``) and the same arithmetic on every tensor (``zo.perturbed_into`` / ``zo.apply_update_`` on CPU; on
CUDA the multi-tensor kernels over one ``kernels.TensorTable`` per block, one launch per block and pass:
``update_and_perturb_multi_`` for the first pass, ``perturbed_into_multi`` for the others; z keyed by the
parameter's canonical name), so a trajectory with offloading is bit-identical to one without.

One step, for block b (streamed; a resident block is the same minus the copies):

    upload stream   : wait [slot free] and [slot read] of the slot's last block, wait b's last write-back
                      ->  copy pinned master -> slot                                       [uploaded]
    compute stream  : wait [uploaded]; theta = slot;
                      fused: apply step t-1's pending update to theta (lr of step t-1) and write
                      theta + eps z_0 into the perturbation scratch; pass (0,+) on block b;
                      theta - eps z_0 into the scratch; pass (0,-) on block b; ... all 2q passes
                      [slot free]
    write-back      : (when due, see write_back_interval) wait [updated];
                      copy slot -> pinned master  [slot read]                               [written]
                      -- issued as soon as the update is in the slot, so it overlaps b's own passes
    upload stream   : next block into the freed slot (prefetch_depth + 1 ahead of the computing block)

With a narrower ``transfer_dtype`` the upload may instead bring b's narrow copy into the slot's staging
buffer, which the compute stream widens into the slot after [uploaded]; a write-back then also narrows
the slot on the compute stream (before [updated]) and sends that copy after [slot read].

The 2q passes run block-major through :class:`~zo2_ds.offload.lockstep.LockStep`. Every step's update
of a block is deferred to its next upload (``update`` only records seeds, coefficients, lr and weight
decay); ``flush`` streams every block with a pending update through once (eval, checkpoints, the end of
training, and any ``state_dict`` / ``load_state_dict`` of the model). Parameters outside the blocks are
perturbed and updated eagerly by a ResidentRunner, which the lock-step points at each pass in turn.

Memory: the slot ring, the perturbation scratch buffer and the events are allocated once; nothing
is allocated per step by the offloader. The host never waits in the steady state: streams are ordered by
events only (``flush`` synchronises, once).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from zo2_ds import perturb, zo
from zo2_ds.offload.lockstep import LockStep, PassPool
from zo2_ds.offload.store import ALIGN_BYTES, BlockStore
from zo2_ds.offload.streams import Streams
from zo2_ds.perturb import ResidentRunner, UpdateGroup

__all__ = ["OffloadRunner"]

# ZO2_DS_PREFETCH_NEXT_STEP=0 stops uploading the next step's first blocks at the end of a step (benchmarks
# compare the two; see OffloadRunner._prefetch).
_PREFETCH_NEXT_STEP = os.environ.get("ZO2_DS_PREFETCH_NEXT_STEP", "1") != "0"

# A block tensor's pending update: the step's pass hashes (zo.z_pass_hash, one per perturbation, shared by
# every tensor of the step), coefs, lr and the group's weight decay (applied where zo.uses_weight_decay).
_Update = tuple[tuple[int, ...], list[float], float, float]
_Spec = tuple[int, int, float]  # step, perturbation index, scale


class OffloadRunner:
    """Built by ``ZOEngine._build_runner`` when ``zo2.offload.enabled``; ``engine.zo_offload_store`` holds the
    blocks' homes (built in ``ZOEngine._configure_distributed_model``)."""

    def __init__(self, engine: Any, cfg: Any, *, timeline: bool = False):
        store: BlockStore = engine.zo_offload_store
        self.store = store
        self.eps, self.seed = cfg.eps, cfg.seed
        self.device = store.device
        self.streams = Streams(enabled=None if self.device.type != "cpu" else False, timing=timeline)
        num_blocks = store.num_blocks

        in_blocks = store.param_ids
        key_of = {id(tp.param): tp.key for tp in engine.zo_params}
        self._in_blocks = in_blocks
        self.resident = ResidentRunner(
            engine.module, [tp for tp in engine.zo_params if id(tp.param) not in in_blocks], cfg.eps, cfg.seed
        )
        # Trainable entries of each block: (entry index, z key).
        self._train = [
            [(i, key_of[id(e.param)]) for i, e in enumerate(store.entries[b]) if id(e.param) in key_of]
            for b in range(num_blocks)
        ]
        self._entry_of = {
            id(e.param): (b, t)
            for b in range(num_blocks)
            for t, (i, _) in enumerate(self._train[b])
            for e in [store.entries[b][i]]
        }

        # Perturbation scratch: one block's trainable tensors at theta + scale z. One buffer serves every
        # pass (pass j+1 overwrites it after pass j's kernels, in compute-stream order): a second buffer
        # would let one kernel write both signs, at one more block of GPU memory.
        offsets, scratch_bytes = [], ALIGN_BYTES
        for b in range(num_blocks):
            off, block_offsets = 0, []
            for i, _ in self._train[b]:
                block_offsets.append(off)
                off += -(-store.entries[b][i].nbytes // ALIGN_BYTES) * ALIGN_BYTES
            offsets.append(block_offsets)
            # The multi-tensor kernels' layout (kernels.TensorTable: each tensor at a 64-element boundary)
            # needs no more for 1-, 2- and 4-byte dtypes; taken into account all the same.
            table_bytes = sum(
                -(-(e.nbytes // e.dtype.itemsize) // 64) * 64 * e.dtype.itemsize
                for e in (store.entries[b][i] for i, _ in self._train[b])
            )
            scratch_bytes = max(scratch_bytes, off, table_bytes)
        # The same buffer holds the perturbed copy of the largest unit outside the blocks (the tied embedding
        # / head): those units never run while a block does, so one buffer serves both (max, not sum).
        scratch_bytes = max(scratch_bytes, -(-self.resident.shared_bytes_wanted() // ALIGN_BYTES) * ALIGN_BYTES)
        self._scratch = torch.empty(scratch_bytes, dtype=torch.uint8, device=self.device)
        self.resident.share_scratch(self._scratch)
        self._pert_views = [
            [_view(self._scratch, off, store.entries[b][i]) for (i, _), off in zip(self._train[b], offsets[b])]
            for b in range(num_blocks)
        ]
        self._pert_views_torch = list(self._pert_views)
        self._scratch_typed: dict[torch.dtype, torch.Tensor] = {}

        # The slot ring, block b always in the same slot: one computing, prefetch_depth uploading ahead, and
        # one more so that a block's write-back overlaps the next upload instead of delaying it.
        streamed = store.streamed
        self.num_slots = min(cfg.offload.prefetch_depth + 2, len(streamed))
        slot_bytes = max((store.sizes[b] for b in streamed), default=0)
        self._slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(self.num_slots)]
        self._slot_of = {b: pos % self.num_slots for pos, b in enumerate(streamed)}
        self._dev_views = [
            store.views(b, self._slots[self._slot_of[b]]) if store.is_streamed(b) else store.home_views[b]
            for b in range(num_blocks)
        ]
        self._streamed = streamed

        # zo2.offload.transfer_dtype narrower than the masters (see _wants_full): a block comes up either as
        # its exact master (into its slot) or as its narrow copy into its slot's staging buffer, widened into
        # the slot by the compute stream when the block is acquired (so the staging buffer is free when the
        # slot is); a write-back also narrows the slot into one more staging buffer (compute stream, right
        # after the update) and copies that to the block's narrow host copy. No conversion kernel runs on a
        # copy stream: there it would wait for free SMs behind the forward's GEMMs and hold up every copy
        # queued behind it (H100, fp32 OPT-6.7B with bf16 transfers: 1.48x the transfer floor that way).
        narrow = store.narrow
        self._narrow = narrow
        self._stages: list[torch.Tensor] = []  # one per slot, then the write-back's
        if narrow is not None and streamed:
            stage_bytes = max(narrow.sizes[b] for b in streamed)
            self._stages = [
                torch.empty(stage_bytes, dtype=torch.uint8, device=self.device) for _ in range(self.num_slots + 1)
            ]
        self._wb_stage_free = self.streams.marker()
        self._full = [True] * num_blocks  # the copy in block b's slot is its exact master
        self._run_step: int | None = None  # the training step of the run in progress (None: plain)
        self._next_step: int | None = None  # the step of the next training run (for the wrapped prefetch)

        self._uploaded = [self.streams.marker() for _ in range(num_blocks)]
        self._updated = [self.streams.marker() for _ in range(self.num_slots)]
        self._slot_read = [self.streams.marker() for _ in range(self.num_slots)]  # its write-back's copy done
        self._slot_free = [self.streams.marker() for _ in range(self.num_slots)]
        self._written = [self.streams.marker() for _ in range(num_blocks)]
        self._slot_owner: list[int | None] = [None] * self.num_slots

        # Per block, the updates not yet in its master, oldest first: one entry per step, each a per-tensor
        # list (None for a tensor without update). A streamed block's master is rewritten every
        # write_back_interval uploads (staggered over the blocks); in between, each upload re-applies the
        # entries to the uploaded master in order, which gives the same bits as one update per step.
        self._pending: list[list[list[_Update | None]]] = [[] for _ in range(num_blocks)]
        interval = cfg.offload.write_back_interval
        self.write_back_interval = (4 if self.streams.enabled else 1) if interval == "auto" else interval
        self._acquired: set[int] = set()
        self._cursor: int | None = None  # next position in `streamed` to upload during a run
        # During a training run, positions past the end wrap to the next step's blocks (see _prefetch).
        self._wrap = False
        self._released: set[int] = set()  # blocks this run is done with (wrapped prefetch waits for them)
        self._compute: Any = None  # the compute stream, while a run is in progress
        self._sched: LockStep | None = None
        self._pool = PassPool()
        self._specs: list[_Spec | None] = []
        self._spec_hashes: list[int] = []  # zo.z_pass_hash of each spec of the run, computed once per run
        # CUDA multi-tensor path: one kernels.TensorTable per block over its trainable tensors in its device
        # home (the block's fixed slot, or its resident buffer), built at the block's first use and kept (the
        # keys differ per block, the pointers per slot: a block always lands in the same slot); the
        # perturbation then goes into the scratch in the table's layout. None: not built yet; False: the
        # per-tensor path (CPU, mixed dtypes, kernels off or failed).
        self._tables: list[Any] = [None] * num_blocks
        self._decay = [
            [zo.uses_weight_decay(store.entries[b][i].param) for i, _ in self._train[b]] for b in range(num_blocks)
        ]
        self.timeline: list[tuple[str, int, Any, Any]] | None = [] if timeline else None

        self.graphs = None
        if cfg.offload.cuda_graphs and self.streams.enabled and self.device.type == "cuda":
            from zo2_ds.offload.graphs import BlockGraphs

            self.graphs = BlockGraphs(store.blocks.blocks, lambda b: [e.param for e in store.entries[b]])

        self._handles = []
        for b, block in enumerate(store.blocks.blocks):
            self._handles.append(block.register_forward_pre_hook(self._make_pre_hook(b)))
            self._handles.append(block.register_forward_hook(self._make_post_hook(b), always_call=True))
        # Reading or writing the blocks' weights through a state_dict (save_pretrained, torch.save of a
        # state_dict, load_state_dict) flushes first, from the model or any module on the way to a block.
        # Loading a block's weights (a load_state_dict of the model recurses into every block once) remakes
        # its transfer_dtype copy.
        for b in store.streamed if store.narrow is not None else ():
            block = store.blocks.blocks[b]
            self._handles.append(block.register_load_state_dict_post_hook(lambda *_, b=b: self.masters_changed([b])))
        for mod in _holders_of_blocks(engine.module, store):
            self._handles.append(mod.register_state_dict_pre_hook(lambda *_: self.flush()))
            self._handles.append(mod.register_load_state_dict_pre_hook(lambda *_: self.flush()))
        self._module = engine.module

    # -- the runner interface --------------------------------------------------------------------
    def run(
        self, step: int, num_perturbations: int, forward: Callable[[], Any], next_step: int | None = None
    ) -> list[tuple[Any, Any]]:
        """[(output at theta + eps z_i, output at theta - eps z_i) for i in range(q)], block-major.

        ``next_step``: the step of the next training run (``step`` within a gradient accumulation, else
        step + 1, the default); it only steers which copy of a block the end of this run uploads ahead.
        """
        specs = [(step, i, sign * self.eps) for i in range(num_perturbations) for sign in (1, -1)]
        self._next_step = step + 1 if next_step is None else next_step
        outs = self._run(specs, forward)
        return [(outs[2 * i], outs[2 * i + 1]) for i in range(num_perturbations)]

    def run_plain(self, forward: Callable[[], Any]) -> Any:
        """One unperturbed forward with the blocks streamed (any pending update is applied on the way)."""
        return self._run([None], forward)[0]

    def update(self, step: int, coefs: Sequence[float], groups: Sequence[UpdateGroup]) -> None:
        """Eager for parameters outside the blocks; recorded for the blocks' next upload (lr of this step)."""
        if any(len(p) >= self.write_back_interval for p in self._pending):
            self.flush()  # updates without forwards in between: keep at most write_back_interval pending
        coefs = [float(c) for c in coefs]
        hashes = tuple(zo.z_pass_hash(self.seed, step, i) for i in range(len(coefs)))
        outside = []
        entries: dict[int, list[_Update | None]] = {}
        for group in groups:
            update: _Update = (hashes, coefs, group.lr, group.weight_decay)
            rest = []
            for p in group.params:
                where = self._entry_of.get(id(p))
                if where is None:
                    rest.append(p)
                    continue
                b, t = where
                if b not in entries:
                    entries[b] = [None] * len(self._train[b])
                entries[b][t] = update
            if rest:
                outside.append(UpdateGroup(tuple(rest), group.lr, group.weight_decay))
        for b, entry in entries.items():
            self._pending[b].append(entry)
        self.resident.update(step, coefs, outside)

    def flush(self) -> None:
        """Apply every pending block update now (streaming those blocks once); wait for all copies."""
        if self._sched is not None:
            return  # a state_dict taken inside a forward: nothing consistent to flush mid-step
        # Blocks uploaded ahead for the next step are dropped: the masters may be read or replaced next.
        self._drop_prefetched()
        for b in range(self.store.num_blocks):
            if self._pending[b]:
                self._acquire(b, None)
                self._release(b)
        self.streams.synchronize()

    def masters_changed(self, blocks: Sequence[int] | None = None) -> None:
        """The host masters of ``blocks`` (default: every streamed block) were written from outside the
        runner (``load_state_dict`` / ``load_checkpoint`` call it through each block's hook, after a flush):
        their transfer_dtype copies are remade from them on the host, as the flush before a save made them on
        the GPU (the same rounding), so a resumed run continues as the run that saved. Only matters with a
        narrower ``transfer_dtype``."""
        if self._narrow is not None:
            self._drop_prefetched()
            for b in self.store.streamed if blocks is None else blocks:
                self.store.narrow_from_master(b)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.graphs is not None:
            self.graphs.close()
            self.graphs = None
        self.resident.close()
        self._pool.close()

    def device_bytes(self) -> dict[str, int]:
        """Device memory the offloaded model holds for the whole run, by part, in bytes.

        Everything here is allocated once (at build, or at the first step for the perturbed copy) and
        reused: ``resident_blocks`` (the budget), ``slot_ring`` (``num_slots`` x the largest streamed
        block), ``perturbation_scratch`` (the largest block's trainable tensors at theta + eps z),
        ``outside_blocks`` (embeddings, head, norms, buffers) and ``outside_perturbed`` (the largest unit
        of trainable tensors outside the blocks, perturbed into a pooled copy: the tied embedding / head;
        0 where it goes into the perturbation scratch, which is sized for it: the multi-tensor path).
        Activations, logits and library workspaces come on top (launch/bench_offload.py estimates them).
        """
        store = self.store
        in_blocks = self._in_blocks
        outside = sum(
            p.numel() * p.element_size()
            for p in _distinct(self._module.parameters())
            if id(p) not in in_blocks and p.device.type == self.device.type
        )
        outside += sum(
            b.numel() * b.element_size() for b in self._module.buffers() if b.device.type == self.device.type
        )
        per_module = [
            sum(
                p.numel() * p.element_size()
                for p in _distinct(mod._parameters.values())
                if p is not None and p.requires_grad and id(p) not in in_blocks
            )
            for mod in self._module.modules()
        ]
        return {
            "resident_blocks": sum(store.sizes[b] for b in store.resident),
            "slot_ring": sum(slot.numel() for slot in self._slots),
            "perturbation_scratch": self._scratch.numel(),
            "transfer_staging": sum(t.numel() for t in self._stages),
            "outside_blocks": outside,
            "outside_perturbed": 0 if self._shares_scratch() else max(per_module, default=0),
        }

    def _shares_scratch(self) -> bool:
        return self.streams.enabled and perturb._MULTI_TENSOR["enabled"] and bool(self.resident.params)

    @property
    def pending_blocks(self) -> list[int]:
        return [b for b, p in enumerate(self._pending) if p]

    # -- one schedule ----------------------------------------------------------------------------
    def _run(self, specs: list[_Spec | None], forward: Callable[[], Any]) -> list[Any]:
        self._specs = specs
        self._run_step = None if specs[0] is None else specs[0][0]
        self._spec_hashes = [0 if s is None else zo.z_pass_hash(self.seed, s[0], s[1]) for s in specs]
        self._sched = LockStep(len(specs), self.store.num_blocks, on_turn=self._on_turn)
        self._cursor = 0
        self._wrap = specs[0] is not None and _PREFETCH_NEXT_STEP
        self._released.clear()
        # Every pass runs on the caller's stream (the lock-step threads enter it): looked up once per run.
        self._compute = self.streams.compute()
        ok = False
        self.resident.begin_passes()
        try:
            self._prefetch()
            outs = self._sched.run([forward] * len(specs), self._pool)
            ok = True
        finally:
            self._sched, self._cursor, self._wrap, self._compute = None, None, False, None
            self._run_step = None
            self.resident._active = None
            if not ok:
                self._recover()
        return outs

    def _drop_prefetched(self) -> None:
        """Forget blocks uploaded ahead that no forward holds: their slots are free once the copies land."""
        up = self.streams.upload
        for slot, owner in enumerate(self._slot_owner):
            if owner is not None and owner not in self._acquired:
                self._slot_free[slot].record(up)  # behind the upload into the slot
                self._slot_owner[slot] = None

    def _on_turn(self, j: int) -> None:
        # Parameters outside the blocks follow whichever pass holds the turn.
        self.resident._active = self._specs[j]

    def _recover(self) -> None:
        """After a failed forward: release acquired blocks (an applied update was written back at acquire),
        wait for every copy, point params home."""
        for b in sorted(self._acquired):
            self._release(b)
        self._drop_prefetched()
        self.streams.synchronize()
        for slot in range(self.num_slots):
            self._slot_owner[slot] = None
        for b in range(self.store.num_blocks):
            self.store.point_params_home(b)

    # -- hooks -----------------------------------------------------------------------------------
    def _make_pre_hook(self, b: int) -> Callable:
        def pre_hook(mod: torch.nn.Module, args: Any) -> None:
            sched = self._sched
            if sched is None:  # a forward outside the runner (model called directly): stream b plainly
                if b not in self._acquired:
                    self._drop_prefetched()
                self._acquire(b, None)
                return
            j = sched.enter_block(b)
            spec = self._specs[j]
            if j == 0:
                self._acquire(b, spec, self._spec_hashes[0])  # pending update fused with pass 0's perturbation
            elif spec is not None:
                self._perturb(b, None, spec, self._spec_hashes[j])
            if spec is not None:
                for (i, _), v in zip(self._train[b], self._pert_views[b]):
                    self.store.entries[b][i].param.data = v

        return pre_hook

    def _make_post_hook(self, b: int) -> Callable:
        def post_hook(mod: torch.nn.Module, args: Any, output: Any) -> None:
            sched = self._sched
            if sched is None:
                self._release(b)
                return
            if sched.aborted or b not in self._acquired:
                return  # _recover cleans up
            # The block's params stay bound to this pass's perturbed views until the next pass binds its
            # own (nothing outside the block's forward reads them); the last pass's release points them home.
            if sched.current_pass == sched.num_passes - 1:
                self._release(b)

        return post_hook

    # -- block lifecycle -------------------------------------------------------------------------
    def _acquire(self, b: int, spec: _Spec | None, pass_hash: int = 0) -> None:
        """Make block b computable: its upload done, params on the device, pending update applied, z_0 drawn."""
        streamed = self.store.is_streamed(b)
        compute = self._compute or self.streams.compute()
        entries = self._pending[b]
        if streamed:
            full = self._wants_full(b, None if spec is None else spec[0], len(entries))
            if self._slot_owner[self._slot_of[b]] != b:
                self._issue_upload(b, full)
            elif self._full[b] != full:  # uploaded ahead as the other copy (a gradient accumulation step)
                with self.streams.on(self.streams.upload):
                    self._copy_in(b, full)
            self._uploaded[b].wait(compute)
            if not full:  # the narrow copy is in the slot's staging buffer (every acquire follows its upload)
                with self.streams.on(compute):
                    self._convert(b, self._stages[self._slot_of[b]], to_narrow=False)
        self._trace("compute", b, compute, start=True)
        for e, v in zip(self.store.entries[b], self._dev_views[b]):
            e.param.data = v
        self._acquired.add(b)
        # The updates not in the master, oldest first, in place; the newest fused with pass 0's perturbation.
        for entry in entries[:-1]:
            self._update(b, entry)
        last = entries[-1] if entries else None
        if spec is not None:
            self._perturb(b, last, spec, pass_hash)
        elif last is not None:
            self._update(b, last)
        # A resident block's home is its device buffer: applied is stored. A streamed block's master is
        # rewritten now when due (a flush or plain run, write_back_interval entries, or its turn in the
        # staggered rotation); otherwise its entries stay, to be applied again at the next upload.
        interval = self.write_back_interval
        due = bool(entries) and (spec is None or len(entries) >= interval or (spec[0] + b) % interval == 0)
        if streamed and due:
            self._write_back(b)
        if entries and (not streamed or due):
            self._pending[b] = []
        self._prefetch()

    def _wants_full(self, b: int, step: int | None, pending: int) -> bool:
        """Whether block b's upload for a run at ``step`` (None: a plain forward or flush) must be its exact
        master. Always without a narrower transfer_dtype. With one: at b's write-back steps ((step + b) %
        write_back_interval == 0, or write_back_interval updates pending), in plain forwards and flushes;
        otherwise the narrow copy (the master at b's last write-back, rounded) comes up, and the pending
        updates are applied to it on the GPU as to the master."""
        if self._narrow is None or step is None:
            return True
        interval = self.write_back_interval
        return (step + b) % interval == 0 or pending >= interval

    def _write_back(self, b: int) -> None:
        """Copy block b's updated slot to its pinned master now, while its passes run.

        The passes never write the slot (they read it and write the perturbation scratch), so the slot
        holds the final theta of this step as soon as the update kernels are done: the copy overlaps b's
        own compute and the next upload, and the slot is free once b's passes finish (see _release).
        """
        slot = self._slot_of[b]
        wb = self.streams.writeback
        compute = self._compute or self.streams.compute()
        if self._narrow is not None:
            self._wb_stage_free.wait(compute)  # the previous write-back's narrow copy has left
            with self.streams.on(compute):
                self._convert(b, self._stages[-1], to_narrow=True)
        self._updated[slot].record(compute)
        with self.streams.on(wb):
            self._updated[slot].wait(wb)
            self._trace("writeback", b, wb, start=True)
            # The master is only read by the next upload of b (which waits for [written]) or after a flush.
            self.store.homes[b].copy_(self._slots[slot][: self.store.sizes[b]], non_blocking=True)
            self._slot_read[slot].record(wb)
            if self._narrow is not None:
                home = self._narrow.homes[b]
                home.copy_(self._stages[-1][: home.numel()], non_blocking=True)
                self._wb_stage_free.record(wb)
            self._trace("writeback", b, wb, start=False)
            self._written[b].record(wb)

    def _perturb(self, b: int, pending: list[_Update | None] | None, spec: _Spec, pass_hash: int) -> None:
        """theta (+ pending update, in place) -> theta + scale z_i into the scratch views
        (``pass_hash`` = zo.z_pass_hash(seed, step, index) of ``spec``)."""
        scale = spec[2]
        table = self._table(b)
        if table:
            update = _block_update(pending)
            if pending is None or update is not None:
                from zo2_ds import kernels

                flat = self._scratch_flat(table)
                try:
                    if update is None:
                        kernels.perturbed_into_multi(table, flat, pass_hash, scale)
                    else:
                        kernels.update_and_perturb_multi_(table, update, pass_hash, (scale,), (flat,))
                    return
                except Exception as exc:  # noqa: BLE001 - triton compile failures; nothing was launched
                    self._multi_failed(exc)
            else:  # tensors of one block in groups of different lr / weight decay: tensor by tensor
                self._pert_views[b] = self._pert_views_torch[b]
                self._tables[b] = False
        views = self._dev_views[b]
        outs = self._pert_views[b]
        for t, (i, key) in enumerate(self._train[b]):
            upd = _tensor_update(pending[t], self._decay[b][t], key) if pending is not None else None
            seed = zo.z_seed_from_pass(pass_hash, key)
            _update_and_perturb(views[i], upd, seed, (scale,), (outs[t],))

    def _update(self, b: int, pending: list[_Update | None]) -> None:
        """Apply block b's pending update in place (no perturbation: a plain forward or a flush)."""
        table = self._table(b)
        update = _block_update(pending) if table else None
        if update is not None:
            from zo2_ds import kernels

            try:
                kernels.apply_update_multi_(table, *update)
                return
            except Exception as exc:  # noqa: BLE001 - as in _perturb
                self._multi_failed(exc)
        views = self._dev_views[b]
        for t, ((i, key), upd) in enumerate(zip(self._train[b], pending)):
            if upd is not None:
                zo.apply_update_(views[i], *_tensor_update(upd, self._decay[b][t], key))

    def _table(self, b: int) -> Any:
        """Block b's kernels.TensorTable (built at its first use), or False for the per-tensor path."""
        table = self._tables[b]
        if table is None:
            if not perturb._MULTI_TENSOR["enabled"] or not self._train[b]:
                table = False
            else:
                views = self._dev_views[b]
                table = perturb._kernel_table(
                    [views[i] for i, _ in self._train[b]], [key for _, key in self._train[b]], self._decay[b]
                )
            if table and table.scratch_numel * table._dummy.element_size() > self._scratch.numel():
                table = False  # cannot happen with the scratch sized in __init__; kept as a guard
            if table:
                self._pert_views[b] = table.views(self._scratch_flat(table))
            self._tables[b] = table
        return table

    def _scratch_flat(self, table: Any) -> torch.Tensor:
        """The perturbation scratch as a flat tensor of the table's dtype (a view, made once per dtype)."""
        flat = self._scratch_typed.get(table.dtype)
        if flat is None:
            size = self._scratch.numel() // table._dummy.element_size()
            flat = self._scratch_typed[table.dtype] = self._scratch[: size * table._dummy.element_size()].view(
                table.dtype
            )
        return flat

    def _multi_failed(self, exc: Exception) -> None:
        perturb._multi_tensor_failed(exc)
        self._tables = [False] * len(self._tables)
        self._pert_views = list(self._pert_views_torch)

    def _release(self, b: int) -> None:
        """All passes are done with block b: point its params home, free its slot (behind its write-back, if
        one was issued), upload the next."""
        self._acquired.discard(b)
        self._released.add(b)
        compute = self._compute or self.streams.compute()
        self._trace("compute", b, compute, start=False)
        if not self.store.is_streamed(b):
            for e, v in zip(self.store.entries[b], self.store.home_views[b]):
                e.param.data = v  # undo the perturbed binding; the home is the device buffer itself
            return
        slot = self._slot_of[b]
        self.store.point_params_home(b)
        # The slot's next upload also waits for [slot read], the copy of b's write-back out of it (if any):
        # not for the whole write-back stream, which may still be sending b's narrow copy from its staging.
        self._slot_free[slot].record(compute)
        self._slot_owner[slot] = None
        self._prefetch()

    def _issue_upload(self, b: int, full: bool = True) -> None:
        slot = self._slot_of[b]
        if self._slot_owner[slot] is not None:
            raise RuntimeError(f"zo2.offload: slot {slot} still holds block {self._slot_owner[slot]} (internal error)")
        up = self.streams.upload
        with self.streams.on(up):
            # The slot is reused only after its last reader (compute) or writer (write-back) finished, and
            # b's master only after its last write-back landed.
            self._slot_free[slot].wait(up)
            self._slot_read[slot].wait(up)
            self._written[b].wait(up)
            self._copy_in(b, full)
        self._slot_owner[slot] = b

    def _copy_in(self, b: int, full: bool) -> None:
        """On the upload stream: block b's exact master into its slot, or its narrow copy into the slot's
        staging buffer (widened into the slot at acquire)."""
        up = self.streams.upload
        self._trace("upload", b, up, start=True)
        slot = self._slot_of[b]
        if full:
            self._slots[slot][: self.store.sizes[b]].copy_(self.store.homes[b], non_blocking=True)
        else:  # the slot's staging buffer was widened from before the slot was freed
            home = self._narrow.homes[b]
            self._stages[slot][: home.numel()].copy_(home, non_blocking=True)
        self._trace("upload", b, up, start=False)
        self._uploaded[b].record(up)
        self._full[b] = full

    def _convert(self, b: int, stage: torch.Tensor, to_narrow: bool) -> None:
        """Block b's slot <-> its narrow copy in ``stage``: one flat kernel when the layouts match element for
        element (a block of one dtype), else one per parameter."""
        narrow = self._narrow
        flat = self._slots[self._slot_of[b]]
        if narrow.flat[b]:
            wide_dtype = self.store.entries[b][0].dtype
            wide = flat[: self.store.sizes[b]].view(wide_dtype)
            small = stage[: narrow.sizes[b]].view(narrow.dtype)
            pairs = [(wide, small)]
        else:
            pairs = [(v, n.view(stage)) for v, n in zip(self._dev_views[b], narrow.entries[b])]
        for wide, small in pairs:
            if to_narrow:
                small.copy_(wide)
            else:
                wide.copy_(small)

    def _prefetch(self) -> None:
        """During a run: upload the next streamed blocks in order while their slots are free.

        In a training run the order continues into the next step's blocks (position n + k is block k of the
        next step): a slot freed by one of the last blocks of this step takes one of the first of the next
        at once, so the link keeps working through the end of the step and the host's work between steps
        (the g sync, the update bookkeeping, the next forward's preamble), which otherwise leaves it idle.
        By then block k is done for this step, its write-back is ordered before the upload, and the next
        step applies its pending updates at acquire. The last block's release happens inside the run, so
        every free slot is taken before the run returns. Anything but the next training run drops these
        copies first (``_drop_prefetched``).
        """
        if self._cursor is None:
            return
        n = len(self._streamed)
        end = 2 * n if self._wrap else n
        while self._cursor < end:
            b = self._streamed[self._cursor % n]
            if self._cursor >= n and b not in self._released:
                return  # still to run (or running) in this step: its next-step copy waits for its release
            owner = self._slot_owner[self._slot_of[b]]
            if owner == b:
                self._cursor += 1
                continue
            if owner is not None:
                return
            if self._cursor < n:
                step, pending = self._run_step, len(self._pending[b])
            else:  # the next run's copy: its step, and this step's update pending on top
                step = self._next_step
                pending = len(self._pending[b]) + (step != self._run_step)
            self._issue_upload(b, self._wants_full(b, step, pending))
            self._cursor += 1

    def _trace(self, what: str, b: int, stream: Any, start: bool) -> None:
        if self.timeline is None or not self.streams.enabled:
            return
        from deepspeed.accelerator import get_accelerator

        event = get_accelerator().Event(enable_timing=True)
        event.record(stream)
        self.timeline.append((what, b, "start" if start else "end", event))


def _distinct(params: Any) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for p in params:
        if p is not None:
            seen.setdefault(id(p), p)
    return list(seen.values())


def _holders_of_blocks(model: torch.nn.Module, store: BlockStore) -> list[torch.nn.Module]:
    """The model, every module on the path to its block list, the list and the blocks themselves."""
    path = store.blocks.path.split(".") if store.blocks.path else []
    holders = [model]
    for i in range(len(path)):
        holders.append(model.get_submodule(".".join(path[: i + 1])))
    holders.extend(store.blocks.blocks)
    return list({id(m): m for m in holders}.values())


def _block_update(pending: list[_Update | None] | None) -> tuple[tuple[int, ...], list[float], float, float] | None:
    """The block's pending update as one multi-tensor update (pass hashes, coefs, lr, weight decay), or None
    when there is none or its tensors differ in lr / weight decay / step (the per-tensor path then)."""
    if not pending:
        return None
    first = pending[0]
    if first is None or any(u is not first and u != first for u in pending):
        return None
    return first


def _tensor_update(
    update: _Update | None, decays: bool, key: int
) -> tuple[list[int], list[float], float, float] | None:
    """One tensor's pending update as zo.apply_update_'s (seeds, coefs, lr, weight decay)."""
    if update is None:
        return None
    hashes, coefs, lr, wd = update
    return [zo.z_seed_from_pass(h, key) for h in hashes], coefs, lr, (wd if decays else 0.0)


def _view(flat: torch.Tensor, offset: int, entry: Any) -> torch.Tensor:
    return flat[offset : offset + entry.nbytes].view(entry.dtype).view(entry.shape)


def _update_and_perturb(
    theta: torch.Tensor, update: _Update | None, seed: int, scales: tuple[float, ...], outs: tuple[torch.Tensor, ...]
) -> None:
    """Apply ``update`` to theta in place (if any), then ``outs[j] = theta + scales[j] z(seed)``.

    On CUDA the fused kernel reads theta once; it is bit-identical to the separate calls used elsewhere.
    """
    if zo._use_kernels(theta):
        from zo2_ds import kernels

        if hasattr(kernels, "update_and_perturb_"):
            kernels.update_and_perturb_(theta, update, seed, scales, outs)
            return
    if update is not None:
        zo.apply_update_(theta, *update)
    for scale, out in zip(scales, outs):
        zo.perturbed_into(out, theta, seed, scale)
