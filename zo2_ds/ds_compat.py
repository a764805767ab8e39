"""Every place zo2_ds steers DeepSpeed through its private attributes, in one module.

ZOEngine subclasses ``deepspeed.runtime.engine.DeepSpeedEngine`` (0.19.x) and relies on exactly this
DeepSpeed behaviour beyond its public API (re-check these when DeepSpeed is upgraded):

1. ``DeepSpeedEngine.__init__`` calls ``self._configure_distributed_model(model)``, which moves the module
   to the device unless ``self.dont_change_device`` is True, and ends by calling ``self._broadcast_model()``
   (rank 0's weights to every rank) when ``self.dist_backend`` is set. With offloading the blocks must not
   be moved (they may not fit the GPU) and cannot be broadcast before their pinned homes exist:
   :func:`configure_offloaded_model` sets ``dont_change_device`` for the call, defers the broadcast through
   ``_zo_defer_broadcast`` (read by :func:`broadcast_model`, which ZOEngine's ``_broadcast_model`` override
   calls), then builds the block store and broadcasts it.
2. Broadcast source and group: ``deepspeed.utils.groups._get_broadcast_src_rank()`` and
   ``engine.seq_data_parallel_group``, as ``DeepSpeedEngine._broadcast_model`` uses them.
3. ``DeepSpeedEngine.forward`` starts and stops ``engine_timers.forward_timers`` through
   ``_start_timers`` / ``_stop_timers``, starts ``engine.tput_timer`` (a ThroughputTimer whose
   ``config.synchronized`` makes every start synchronise the device) and, at the profile step, the flops
   profiler (through ``flops_profiler_enabled()``); ``print_model_profile`` reads ``wall_clock_breakdown()``
   to print backward lines. A ZO step runs 2q forwards, which DeepSpeed would time, count and profile as 2q
   steps: :class:`ForwardSpan` makes the 2q passes one span (see ZOEngine.forward).
4. ``DeepSpeedEngine._save_checkpoint`` builds the module's ``state_dict`` on every rank and writes it only
   where ``engine.save_non_zero_checkpoint`` is True: :func:`writes_module_states` reads it, so that with
   partitioned masters only that rank keeps the gathered weights (ZOEngine.save_checkpoint).

The other adapter, how ``deepspeed.initialize`` comes to build a ZOEngine (the module global it looks up),
is :mod:`zo2_ds.patch`, with its own list.
"""

from __future__ import annotations

from typing import Any

__all__ = ["configure_offloaded_model", "broadcast_model", "ForwardSpan", "writes_module_states"]


def configure_offloaded_model(engine: Any, configure: Any, model: Any) -> Any:
    """DeepSpeed's ``_configure_distributed_model`` (``configure``, the parent's bound method) for an offloaded
    model: DeepSpeed casts the model but neither moves nor broadcasts it; then the blocks' masters go to
    pinned host memory (:func:`zo2_ds.offload.build_store`, which moves everything else to the device unless
    DeepSpeed was asked not to) and rank 0's weights are broadcast (before the store is built, with
    ``zo2.offload.partition``: each rank then keeps its shard of them). Returns the block store."""
    from zo2_ds.offload import broadcast_module, build_store
    from zo2_ds.offload.node import cannot_partition, node_partition

    keep_device, engine.dont_change_device = engine.dont_change_device, True
    engine._zo_defer_broadcast = True  # DeepSpeed broadcasts at the end of configure(); blocks are not placed yet
    try:
        configure(model)
    finally:
        engine.dont_change_device, engine._zo_defer_broadcast = keep_device, False
    source = _broadcast_source(engine)
    # The ranks agree over the broadcast's group (its communicator is connected anyway, no other one is).
    partition = node_partition(engine.zo_config.offload, engine.device, None if source is None else source[1])
    if partition is not None:
        from deepspeed import comm as dist

        if source is None or dist.get_world_size(group=source[1]) != dist.get_world_size():
            reason = "it needs every rank in one data-parallel group (no model or sequence parallelism)"
            cannot_partition(engine.zo_config.offload, reason)
            partition = None
    if partition is not None:
        broadcast_module(engine.module, engine.device, src=source[0], group=source[1])
    offload = engine.zo_config.offload
    store = build_store(engine.module, offload, engine.device, move_rest=not keep_device, partition=partition)
    if partition is None:
        _broadcast_store(engine, store)
    return store


def broadcast_model(engine: Any, store: Any, broadcast: Any) -> None:
    """ZOEngine's ``_broadcast_model``: nothing while deferred (see 1.), the offloaded broadcast with a block
    store, else DeepSpeed's own (``broadcast``, the parent's bound method)."""
    if getattr(engine, "_zo_defer_broadcast", False):
        return
    if store is None:
        broadcast()
        return
    _broadcast_store(engine, store)


def writes_module_states(engine: Any) -> bool:
    """Whether this rank writes the module's weights in DeepSpeed's checkpoint (see 4.)."""
    return bool(engine.save_non_zero_checkpoint)


def _broadcast_source(engine: Any) -> tuple[int, Any] | None:
    """DeepSpeed's broadcast source rank and group (see 2.), or None when there is nothing to broadcast."""
    from deepspeed import comm as dist
    from deepspeed.utils import groups

    if engine.dist_backend is None:
        return None
    group = engine.seq_data_parallel_group
    if dist.get_world_size(group=group) == 1:
        return None
    return groups._get_broadcast_src_rank(), group


def _broadcast_store(engine: Any, store: Any) -> None:
    from zo2_ds.offload import broadcast_store

    source = _broadcast_source(engine)
    if source is not None:
        broadcast_store(engine.module, store, src=source[0], group=source[1])


class ForwardSpan:
    """The 2q passes of one ZO forward timed, counted and profiled by DeepSpeed as one forward (see 3.).

    ``with span: ...`` around the passes; inside, ZOEngine's ``_start_timers`` / ``_stop_timers`` /
    ``flops_profiler_enabled`` overrides ask :meth:`suppresses` and do nothing for the passes, and the
    throughput timer's per-pass ``start`` is a no-op. The timer is started once per step without its own
    device synchronise unless the config asks for it (``"timers": {"throughput": {"synchronized": true}}``):
    a synchronize at the start of a pass would drain the queue the offloader keeps ahead of the host.
    """

    def __init__(self, engine: Any):
        self.engine = engine
        self.active = False
        self.printing_profile = False
        timer = engine.tput_timer
        explicit = ((engine._config._param_dict.get("timers") or {}).get("throughput") or {}).get("synchronized")
        if not explicit and getattr(timer.config, "synchronized", False):
            timer.config = timer.config.model_copy(update={"synchronized": False})
        engine.tput_timer = _OncePerStepThroughputTimer(timer, self)
        if engine.flops_profiler_enabled() and hasattr(engine, "flops_profiler"):
            self._wrap_profile_print(engine.flops_profiler)

    def suppresses(self, timer_names: Any) -> bool:
        """True for the forward timers while the span is open (the passes' own start / stop)."""
        return self.active and timer_names is self.engine.engine_timers.forward_timers

    def __enter__(self) -> ForwardSpan:
        engine = self.engine
        engine._start_timers(engine.engine_timers.forward_timers)
        if engine.training_dataloader is None:
            engine.tput_timer.start_step()
        # DeepSpeed's flops profiler, at its step: one profile over every pass (started here, not per pass).
        self._profiling = engine.profile_this_step()
        if self._profiling:
            engine.flops_profiler.start_profile(ignore_list=None)
        self.active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self.active = False
        engine = self.engine
        engine._stop_timers(engine.engine_timers.forward_timers)
        if self._profiling:
            engine.flops_profiler.stop_profile()

    def _wrap_profile_print(self, profiler: Any) -> None:
        """The profile's summary, without DeepSpeed's backward lines: with wall_clock_breakdown they divide by
        the backward's latency, which is 0 here (ZeroDivisionError), and count 2x the forward's flops for a
        backward ZO does not run. The forward lines cover all 2q passes of the step (flops and latency)."""
        original = profiler.print_model_profile

        def print_model_profile(*args: Any, **kwargs: Any) -> Any:
            self.printing_profile = True
            try:
                return original(*args, **kwargs)
            finally:
                self.printing_profile = False

        profiler.print_model_profile = print_model_profile


class _OncePerStepThroughputTimer:
    """DeepSpeed's ThroughputTimer, started once per ZO forward instead of once per pass."""

    def __init__(self, timer: Any, span: ForwardSpan):
        self._timer = timer
        self._span = span

    def start(self) -> None:  # called by every pass's DeepSpeedEngine.forward: a no-op inside a ZO forward
        if not self._span.active:
            self._timer.start()

    def start_step(self) -> None:
        self._timer.start()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._timer, name)
