"""OffloadRunner: the ZO step with the blocks streamed through a fixed ring of GPU slots (the facade).

It satisfies :class:`zo2_ds.runner.ZORunner`, as :class:`zo2_ds.perturb.ResidentRunner` does, with the same
arithmetic on every tensor (through :class:`zo2_ds.ops.Ops`; z keyed by the parameter's canonical name),
so a trajectory with offloading is bit-identical to one without. It composes:

- :class:`~zo2_ds.offload.ring.SlotRing`: the slots, uploads, write-backs and the prefetch order;
- :mod:`~zo2_ds.offload.pending`: the pending-update log and the write-back / exact-copy rules;
- :mod:`~zo2_ds.offload.narrow`: the narrow-copy path (``transfer_dtype``) or its no-op twin;
- :class:`~zo2_ds.offload.perturber.BlockPerturber`: the blocks' update and perturbation kernels;
- :class:`~zo2_ds.offload.lockstep.LockStep`: the 2q passes run block-major;
- :mod:`~zo2_ds.offload.trace`: observers, the timeline and the device-byte accounting.

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

Every step's update of a block is deferred to its next upload (``update`` only records seeds, coefficients,
lr and weight decay); ``flush`` streams every block with a pending update through once (eval, checkpoints,
the end of training, and any ``state_dict`` / ``load_state_dict`` of the model). Parameters outside the
blocks are perturbed and updated eagerly by a ResidentRunner, which follows whichever pass holds the turn.

Memory: the slot ring, the perturbation scratch buffer and the events are allocated once; nothing is
allocated per step by the offloader. The host never waits in the steady state: streams are ordered by
events only (``flush`` synchronises, once).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from zo2_ds import zo
from zo2_ds.config import ZO2Config
from zo2_ds.offload import hooks, sizing
from zo2_ds.offload import pending as rules
from zo2_ds.offload.head import HeadStream, streamed_head
from zo2_ds.offload.lockstep import LockStep, PassPool
from zo2_ds.offload.narrow import narrow_copies
from zo2_ds.offload.perturber import BlockPerturber, scratch_layout
from zo2_ds.offload.ring import SlotRing
from zo2_ds.offload.store import BlockStore
from zo2_ds.offload.streams import Streams
from zo2_ds.offload.trace import Observer, Timeline, Tracer, device_bytes
from zo2_ds.ops import Ops
from zo2_ds.perturb import ResidentRunner, TrainableParam, UpdateGroup

__all__ = ["OffloadRunner"]


class OffloadRunner:
    """Built by the engine when ``zo2.offload.enabled``, from the model, its trainable tensors, the block store
    (:func:`zo2_ds.offload.build_store`) and the ``zo2`` config; ``ops``: the kernel dispatch (default: the
    one ``config.kernels`` names), shared with the ResidentRunner it builds for the tensors outside the
    blocks."""

    def __init__(
        self,
        module: torch.nn.Module,
        params: Sequence[TrainableParam],
        store: BlockStore,
        config: ZO2Config,
        *,
        ops: Ops | None = None,
    ):
        self.store, self.config = store, config
        self.ops = ops if ops is not None else Ops(config.kernels)
        self.streams = Streams(enabled=None if store.device.type != "cpu" else False)
        self.tracer = Tracer()
        self._module = module
        in_blocks = self._in_blocks = store.param_ids
        outside = [tp for tp in params if id(tp.param) not in in_blocks]
        head = streamed_head(module, outside, config.offload.stream_head, config.vocab_chunks, store.device)
        outside = [tp for tp in outside if tp is not head]
        self.resident = ResidentRunner(module, outside, config, self.ops, group_blocks=False)
        key_of = {id(tp.param): tp.key for tp in params}
        # Trainable entries of each block: (entry index, z key); where: param id -> (block, index among them).
        trained = [
            [(i, key_of[id(e.param)]) for i, e in enumerate(store.entries[b]) if id(e.param) in key_of]
            for b in range(store.num_blocks)
        ]
        self._where = {
            id(store.entries[b][i].param): (b, t)
            for b in range(store.num_blocks)
            for t, (i, _) in enumerate(trained[b])
        }
        self._num_trained = [len(t) for t in trained]

        # The slot ring, block b always in the same slot: one computing, prefetch_depth uploading ahead, and
        # one more so that a block's write-back overlaps the next upload instead of delaying it.
        offload = config.offload
        self.num_slots = min(sizing.prefetch_depth(offload.prefetch_depth, store) + 2, len(store.streamed))
        outside_bytes = self.resident.shared_bytes_wanted()
        sizing.check_device_memory(store, self.num_slots, scratch_layout(store, trained, outside_bytes)[1])
        self.narrow = narrow_copies(store, self.num_slots, self.streams)
        self.ring = SlotRing(store, self.num_slots, self.streams, self.narrow, self.tracer, offload.prefetch_next_step)
        self.perturber = BlockPerturber(store, trained, self.ring.dev_views, self.ops, outside_bytes)
        self.resident.share_scratch(self.perturber.scratch)
        # The untied head of a large vocabulary, streamed in row chunks (zo2_ds/offload/head.py).
        self.head = None if head is None else HeadStream(module, head, self.ops, self.streams, self.resident.scratch,
                                                         self._head_context)  # fmt: skip
        self.pending = rules.PendingLog(store.num_blocks)
        self.write_back_interval = rules.resolve_interval(offload.write_back_interval, self.streams.enabled)

        self._acquired: set[int] = set()
        self._run_step: int | None = None  # the training step of the run in progress (None: plain)
        self._next_step: int | None = None  # the step of the next training run (for the wrapped prefetch)
        self._compute: Any = None  # the compute stream, while a run is in progress
        self._sched: LockStep | None = None
        self._pool = PassPool()
        self._specs: list[zo.PassSpec | None] = []
        self._spec_hashes: list[int] = []  # zo.z_pass_hash of each spec of the run, computed once per run
        # The order the forward calls the units: list order for whole blocks; at granularity "layer" learned
        # from the first run (sub-modules need not be called in the order they are registered), which
        # uploads each unit at its acquire instead of ahead (see _learn_order).
        self._order: list[int] | None = list(range(store.num_blocks)) if store.granularity == "block" else None

        self.graphs = None
        if offload.cuda_graphs and self.streams.enabled and store.device.type == "cuda":
            from zo2_ds.offload.graphs import BlockGraphs

            self.graphs = BlockGraphs(store.units, lambda b: [e.param for e in store.entries[b]])
        self._handles = hooks.install(
            module,
            store,
            enter=self._enter_block,
            leave=self._leave_block,
            flush=self.flush,
            masters_changed=self.masters_changed,
            at_home=lambda b, acquired=self._acquired: b not in acquired,  # outlives the runner: not self
        )

    # -- the runner interface (zo2_ds.runner.ZORunner) ------------------------------------------------
    def run(self, step: int, forward: Callable[[int], Any], next_step: int | None = None) -> list[tuple[Any, Any]]:
        """[(forward(2i) at theta + eps z_i, forward(2i + 1) at theta - eps z_i) for i in range(q)], block-major.

        ``next_step``: the step of the next training run (``step`` within a gradient accumulation, else
        step + 1, the default); it only steers which copy of a block the end of this run uploads ahead.
        """
        outs = self.run_passes(step, forward, range(2 * self.config.num_perturbations), next_step)
        return list(zip(outs[0::2], outs[1::2]))

    def run_passes(
        self, step: int, forward: Callable[[int], Any], passes: Sequence[int], next_step: int | None = None
    ) -> list[Any]:
        """[forward(j) for j in ``passes``], block-major (a subset of the step's passes:
        ``zo2.perturbation_parallel``); the first of them carries the fused pending update."""
        specs = zo.pass_specs(step, self.config.num_perturbations, self.config.eps)
        passes = list(passes)
        self._next_step = step + 1 if next_step is None else next_step
        return self._run([specs[j] for j in passes], lambda k: forward(passes[k]))

    def run_plain(self, forward: Callable[[], Any]) -> Any:
        """One unperturbed forward with the blocks streamed (any pending update is applied on the way)."""
        return self._run([None], lambda _: forward())[0]

    def update(self, step: int, coefs: Sequence[float], groups: Sequence[UpdateGroup]) -> None:
        """Eager for parameters outside the blocks; recorded for the blocks' next upload (lr of this step)."""
        if self.pending.longest() >= self.write_back_interval:
            self.flush()  # updates without forwards in between: keep at most write_back_interval pending
        coefs = zo.kept_coefs(coefs)
        hashes = tuple(zo.z_pass_hash(self.config.seed, step, i) for i in range(len(coefs)))
        entries, outside = rules.split_step_update(groups, self._where, self._num_trained, hashes, coefs)
        for b, entry in entries.items():
            self.pending.record(b, entry)
        head = None if self.head is None else self.head.tp.param
        for g, ps in outside:
            if any(p is head for p in ps):
                self.head.record(hashes, coefs, g.lr, g.weight_decay)
        rest = [UpdateGroup(tuple(p for p in ps if p is not head), g.lr, g.weight_decay) for g, ps in outside]
        self.resident.update(step, coefs, rest)

    def flush(self) -> None:
        """Apply every pending block update now (streaming those blocks once); wait for all copies."""
        if self._sched is not None:
            return  # a state_dict taken inside a forward: nothing consistent to flush mid-step
        # Blocks uploaded ahead for the next step are dropped: the masters may be read or replaced next.
        self.ring.drop_prefetched(self._acquired)
        for b in self.pending.blocks:
            self._acquire(b, None)
            self._release(b)
        if self.head is not None:
            self.head.flush()
        self.streams.synchronize()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.graphs is not None:
            self.graphs.close()
            self.graphs = None
        if self.head is not None:
            self.head.close()
        self.resident.close()
        self._pool.close()

    # -- for the store's owners, benchmarks and tests ---------------------------------------------------
    def masters_changed(self, blocks: Sequence[int] | None = None) -> None:
        """The host masters of ``blocks`` (default: every streamed block) were written from outside the
        runner (``load_state_dict`` / ``load_checkpoint`` call it through each block's hook, after a flush):
        their transfer_dtype copies are remade from them on the host, as the flush before a save made them on
        the GPU (the same rounding), so a resumed run continues as the run that saved. Only matters with a
        narrower ``transfer_dtype``. With partitioned masters a load remakes them itself; called directly, this
        gathers each unit (a collective: every rank of the node calls it)."""
        if self.narrow.enabled:
            self.ring.drop_prefetched(self._acquired)
            for b in self.store.streamed if blocks is None else blocks:
                self.store.narrow_from_master(b)

    def device_buffers(self) -> dict[str, list[torch.Tensor]]:
        """The offloader's own device buffers by part, allocated once at build and reused every step."""
        return {
            "slot_ring": list(self.ring.slots),
            "perturbation_scratch": [self.perturber.scratch],
            "transfer_staging": list(self.narrow.buffers),
            "head_chunks": [] if self.head is None else self.head.device_buffers(),
        }

    def device_bytes(self) -> dict[str, int]:
        """Device memory the offloaded model holds for the whole run, by part, in bytes: ``resident_blocks``
        (the budget), ``slot_ring`` (``num_slots`` x the largest streamed block), ``perturbation_scratch``,
        ``transfer_staging``, ``outside_blocks`` and ``outside_perturbed`` (see
        :func:`zo2_ds.offload.trace.device_bytes`). Activations, logits and library workspaces come on top."""
        store = self.store
        shares = self.streams.enabled and self.ops.multi_tensor and bool(self.resident.params)
        resident = sum(store.sizes[b] for b in store.resident)
        streamed = None if self.head is None else self.head.head

        def whole(mod: torch.nn.Module) -> bool:
            return mod is not streamed and self.resident.vocab.takes_whole(mod)

        # A streamed head's master is host memory, as the blocks' are (it counts on a CPU device otherwise).
        elsewhere = self._in_blocks if self.head is None else self._in_blocks | {id(self.head.tp.param)}
        return device_bytes(self._module, elsewhere, store.device, self.device_buffers(), resident, shares, whole)

    def add_observer(self, observer: Observer) -> Callable[[], None]:
        """Call ``observer(what, block, phase, stream)`` as the schedule is issued (see
        :mod:`zo2_ds.offload.trace`); returns a function that removes it."""
        self.tracer.observers.append(observer)
        return lambda: self.tracer.observers.remove(observer)

    @contextlib.contextmanager
    def recording_timeline(self) -> Iterator[Timeline]:
        """Within the context, record a timed event at each upload / compute / write-back start and end:
        ``with runner.recording_timeline() as tl: <one step>``; then synchronise and read ``tl.events``."""
        timeline = Timeline()
        remove = self.add_observer(timeline)
        try:
            yield timeline
        finally:
            remove()

    @property
    def pending_blocks(self) -> list[int]:
        """The blocks whose masters lack at least one update."""
        return self.pending.blocks

    @property
    def current_pass(self) -> int | None:
        """Inside a run, the index of the pass running in this thread; None outside a run."""
        return self._sched.current_pass if self._sched is not None else None

    @property
    def running(self) -> bool:
        return self._sched is not None

    @property
    def acquired_blocks(self) -> frozenset[int]:
        """Blocks whose parameters point at their device copies now (empty between runs)."""
        return frozenset(self._acquired)

    @property
    def slot_owners(self) -> tuple[int | None, ...]:
        """The block whose copy each slot holds or is receiving (None: free)."""
        return tuple(self.ring.owner)

    # -- one schedule ----------------------------------------------------------------------------
    def _run(self, specs: list[zo.PassSpec | None], forward: Callable[[int], Any]) -> list[Any]:
        self._specs = specs
        self._run_step = None if specs[0] is None else specs[0][0]
        seed = self.config.seed
        self._spec_hashes = [0 if s is None else zo.z_pass_hash(seed, s[0], s[1]) for s in specs]
        self._sched = sched = LockStep(len(specs), self.store.num_blocks, on_turn=self._on_turn, order=self._order)
        self.ring.start_run(training=specs[0] is not None, prefetch=self._order is not None)
        # Every pass runs on the caller's stream (the lock-step threads enter it): looked up once per run.
        self._compute = self.streams.compute()
        ok = False
        self.resident.begin_passes()
        if self.head is not None:
            self.head.begin_run()
        try:
            self._prefetch()
            outs = self._sched.run([lambda j=j: forward(j) for j in range(len(specs))], self._pool)
            ok = True
        finally:
            self._sched, self._compute, self._run_step = None, None, None
            self.ring.end_run()
            self.resident.activate(None)
            if not ok:
                self._recover()
        if self._order is None:
            self._learn_order(sched.sequence)
        return outs

    def _learn_order(self, sequence: list[int]) -> None:
        """After the first run at granularity "layer": upload in the order the forward called the units (the
        ring's slots and the blocks' kernel tables follow it). Nothing is in a slot: that run uploaded each
        unit at its acquire and released it before the next."""
        self._order = list(sequence)
        streamed = [b for b in sequence if self.store.is_streamed(b)]
        if streamed != self.ring.streamed:
            self.streams.synchronize()
            self.ring.set_order(streamed)
            self.perturber.forget_tables()

    def _head_context(self) -> tuple[tuple[int, float] | None, LockStep | None]:
        """For the streamed head: (pass hash, scale) of this thread's perturbed pass (None: unperturbed), the run."""
        sched = self._sched
        if sched is None:
            return None, None
        j = sched.current_pass
        spec = self._specs[j]
        return (None if spec is None else (self._spec_hashes[j], spec[2])), sched

    def _on_turn(self, j: int) -> None:
        # Parameters outside the blocks follow whichever pass holds the turn.
        self.resident.activate(self._specs[j])

    def _recover(self) -> None:
        """After a failed forward: release acquired blocks (an applied update was written back at acquire),
        wait for every copy, point params home."""
        for b in sorted(self._acquired):
            self._release(b)
        self.ring.drop_prefetched(self._acquired)
        self.streams.synchronize()
        self.ring.forget_all()
        for b in range(self.store.num_blocks):
            self.store.point_params_home(b)

    def _prefetch(self) -> None:
        self.ring.prefetch(self._exact_for)

    def _exact_for(self, b: int, next_run: bool) -> bool:
        """Which copy of block b the prefetch uploads: for this run's step, or (``next_run``) for the next
        run's, with this step's update pending on top."""
        if not next_run:
            step, num_pending = self._run_step, self.pending.count(b)
        else:
            step = self._next_step
            num_pending = self.pending.count(b) + (step != self._run_step)
        return rules.upload_is_exact(self.narrow.enabled, step, b, self.write_back_interval, num_pending)

    # -- block lifecycle (called from the blocks' hooks) -----------------------------------------------
    def _enter_block(self, b: int, module: Any = None, args: Any = None) -> None:
        sched = self._sched
        if sched is None:  # a forward outside the runner (model called directly): stream b plainly
            if b not in self._acquired:
                self.ring.drop_prefetched(self._acquired)
            self._acquire(b, None)
            return
        j = sched.enter_block(b)
        spec = self._specs[j]
        if j == 0:
            self._acquire(b, spec, self._spec_hashes[0])  # pending update fused with pass 0's perturbation
        elif spec is not None:
            self.perturber.perturb(b, None, spec[2], self._spec_hashes[j])
        if spec is not None:
            self.perturber.bind(b)

    def _leave_block(self, b: int, module: Any = None, args: Any = None, output: Any = None) -> None:
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

    def _acquire(self, b: int, spec: zo.PassSpec | None, pass_hash: int = 0) -> None:
        """Make block b computable: its upload done, params on the device, pending update applied, z_0 drawn."""
        streamed = self.store.is_streamed(b)
        compute = self._compute or self.streams.compute()
        entries = self.pending[b]
        step = None if spec is None else spec[0]
        if streamed:
            exact = rules.upload_is_exact(self.narrow.enabled, step, b, self.write_back_interval, len(entries))
            self.ring.make_ready(b, exact, compute)
        self.tracer.emit("compute", b, "start", compute)
        for e, v in zip(self.store.entries[b], self.ring.dev_views[b]):
            e.param.data = v
        self._acquired.add(b)
        # The updates not in the master, oldest first, in place; the newest fused with pass 0's perturbation.
        for entry in entries[:-1]:
            self.perturber.update(b, entry)
        last = entries[-1] if entries else None
        if spec is not None:
            self.perturber.perturb(b, last, spec[2], pass_hash)
        elif last is not None:
            self.perturber.update(b, last)
        # A resident block's home is its device buffer: applied is stored. A streamed block's master is
        # rewritten now when due (a flush or plain run, write_back_interval entries, or its turn in the
        # staggered rotation); otherwise its entries stay, to be applied again at the next upload.
        due = rules.write_back_due(step, b, self.write_back_interval, len(entries))
        if streamed and due:
            self.ring.write_back(b, compute)
        if entries and (not streamed or due):
            self.pending.clear(b)
        self._prefetch()

    def _release(self, b: int) -> None:
        """All passes are done with block b: point its params home, free its slot (behind its write-back, if
        one was issued), upload the next."""
        self._acquired.discard(b)
        self.ring.released.add(b)
        compute = self._compute or self.streams.compute()
        self.tracer.emit("compute", b, "end", compute)
        if not self.store.is_streamed(b):
            for e, v in zip(self.store.entries[b], self.store.home_views[b]):
                e.param.data = v  # undo the perturbed binding; the home is the device buffer itself
            return
        self.store.point_params_home(b)
        self.ring.free(b, compute)
        self._prefetch()
