"""ZOEngine: a thin DeepSpeedEngine subclass whose training forward is the seeded dual forward.

What it overrides, and why (everything else is DeepSpeed's own behaviour):

- ``forward``: in train mode, runs the 2q perturbed forwards (no autograd) and records the
  projected gradients g_i; returns the model's output with the loss replaced by the mean of L+, L-.
  In eval mode, one plain forward under ``no_grad``.
- ``backward``: no autograd work; kept so HF Trainer / accelerate loops run unchanged.
- ``step``: at the accumulation boundary, averages g over micro-batches and data-parallel ranks
  (one all-reduce of q floats), then lets DeepSpeed's own ``step`` run: it calls our
  :class:`ZOOptimizer`'s ``step`` (the ZO-SGD update), steps the lr scheduler, counts
  ``global_steps`` / ``global_samples`` and writes the monitor and ``steps_per_print`` output.
- ``_configure_optimizer``: builds a :class:`ZOOptimizer` (param groups holding lr and weight decay,
  no state) instead of DeepSpeed's optimizer and its fp16/bf16 wrappers, so no fp32 master copies,
  moments or gradients are ever allocated.
- ``save_checkpoint`` / ``load_checkpoint``: flush pending (offloaded) updates and carry the ZO state.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from deepspeed import comm as dist
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.utils import logger

from zo2_ds import zo
from zo2_ds.config import ZO2Config, parse_zo2_config
from zo2_ds.loss import install_lean_loss, uninstall_lean_loss
from zo2_ds.perturb import ResidentRunner, UpdateGroup, trainable_params

__all__ = ["ZOEngine", "ZOOptimizer"]

_IGNORED_OPTIMIZER_KEYS = ("momentum", "betas", "eps", "nesterov", "dampening", "amsgrad", "torch_adam", "adam_w_mode")


class ZOOptimizer(torch.optim.Optimizer):
    """Param groups (lr, weight_decay) that DeepSpeed's and torch's schedulers can drive; no state.

    ``step()`` applies the ZO-SGD update through the engine. ``overflow`` tells DeepSpeed's step to
    skip the scheduler and count a skipped step (set when g is not finite).
    """

    def __init__(self, params: Any, lr: float, weight_decay: float = 0.0):
        if lr is None or not isinstance(lr, (int, float)) or lr < 0:
            raise ValueError(f"optimizer.params.lr: expected a non-negative number, got {lr!r}")
        super().__init__(params, {"lr": float(lr), "weight_decay": float(weight_decay)})
        self.overflow = False
        self.apply_update: Callable[[], None] | None = None

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:  # noqa: D102
        if self.apply_update is None:
            raise RuntimeError("ZOOptimizer.step() is driven by ZOEngine.step(); call engine.step()")
        self.apply_update()

    def load_state_dict(self, state_dict: dict, load_optimizer_states: bool = True) -> None:  # noqa: D102
        # DeepSpeed passes load_optimizer_states for fp16/bf16 runs; there is no state to skip.
        super().load_state_dict(state_dict)


class ZOEngine(DeepSpeedEngine):
    """DeepSpeed engine for zeroth-order training. Build it with ``zo2_ds.initialize`` or, after
    ``import zo2_ds``, with ``deepspeed.initialize`` and a config whose ``zo2.enabled`` is true."""

    def __init__(self, *args: Any, config_class: Any = None, **kwargs: Any):
        # Validate before DeepSpeed builds anything: a bad zo2 block fails here, naming the key.
        self.zo_config: ZO2Config = parse_zo2_config(config_class._param_dict)
        _check_compatible(config_class)
        super().__init__(*args, config_class=config_class, **kwargs)
        if self.optimizer is None:
            raise ValueError(
                "zo2 needs a learning rate: add an optimizer block to the DeepSpeed config, e.g. "
                '"optimizer": {"type": "SGD", "params": {"lr": 1e-6, "weight_decay": 0.0}}, '
                "or pass optimizer= to initialize"
            )
        self.zo_params = trainable_params(self.module)
        self._zo_param_ids = frozenset(id(tp.param) for tp in self.zo_params)
        # HF configs with a KV cache switched on, found once: the perturbed passes turn it off.
        self._kv_cache_configs = _kv_cache_configs(self.module)
        if not self.zo_params:
            raise ValueError("zo2: the model has no parameter with requires_grad=True; nothing to train")
        self._lean_loss_models = install_lean_loss(self.module) if self.zo_config.lean_loss else []
        self.zo_runner = self._build_runner()
        self.tput_timer = _OncePerStepThroughputTimer(self)
        self.optimizer.apply_update = self._apply_update
        self.zo_skipped_steps = 0
        self._g_sum: torch.Tensor | None = None  # sum over micro-batches of g_i, shape [q], on device
        self._g_count = 0
        self._last_g: list[float] = []
        self._last_loss = float("nan")
        if self.flops_profiler_enabled() and hasattr(self, "flops_profiler"):
            self._wrap_flops_profiler_print()

    # -- construction ----------------------------------------------------------------------------
    def _build_runner(self) -> Any:
        cfg = self.zo_config
        if cfg.offload.enabled:
            from zo2_ds.offload import OffloadRunner

            return OffloadRunner(self, cfg)
        return ResidentRunner(self.module, self.zo_params, cfg.eps, cfg.seed)

    def _configure_distributed_model(self, model: Any) -> None:
        """With zo2.offload, DeepSpeed casts the model but does not move it (the blocks may not fit the GPU):
        :func:`zo2_ds.offload.build_store` then puts the blocks' masters in pinned host memory (replacing
        their storage block by block) and moves everything else to the device; the broadcast follows."""
        offload = self.zo_config.offload
        if not offload.enabled:
            return super()._configure_distributed_model(model)
        from zo2_ds.offload import broadcast_store, build_store

        keep_device, self.dont_change_device = self.dont_change_device, True
        self._zo_defer_broadcast = True  # DeepSpeed broadcasts at the end of super(); blocks are not placed yet
        try:
            super()._configure_distributed_model(model)
        finally:
            self.dont_change_device, self._zo_defer_broadcast = keep_device, False
        self.zo_offload_store = build_store(self.module, offload, self.device, move_rest=not keep_device)
        broadcast_store(self, self.zo_offload_store)

    def _broadcast_model(self) -> None:
        if getattr(self, "_zo_defer_broadcast", False):
            return
        store = getattr(self, "zo_offload_store", None)
        if store is None:
            return super()._broadcast_model()
        from zo2_ds.offload import broadcast_store

        broadcast_store(self, store)

    def _configure_optimizer(self, client_optimizer: Any, model_parameters: Any) -> None:
        if client_optimizer is not None:
            if not isinstance(client_optimizer, torch.optim.Optimizer):
                client_optimizer = client_optimizer(model_parameters)
            if type(client_optimizer).__name__ not in ("SGD", "ZOOptimizer"):
                logger.warning(
                    f"zo2: the client optimizer {type(client_optimizer).__name__} only provides lr and "
                    "weight_decay (and their schedule); the update is ZO-SGD"
                )
            optimizer = ZOOptimizer(client_optimizer.param_groups, lr=client_optimizer.defaults.get("lr", 0.0))
            # Share the group dicts so a client scheduler built on client_optimizer drives our lr.
            optimizer.param_groups = client_optimizer.param_groups
        else:
            params = dict(self.optimizer_params() or {})
            if "lr" not in params:
                raise ValueError('zo2: optimizer.params.lr is required (e.g. {"type": "SGD", "params": {"lr": 1e-6}})')
            ignored = sorted(k for k in params if k not in ("lr", "weight_decay"))
            if ignored or self.optimizer_name().lower() != "sgd":
                logger.warning(
                    f"zo2: optimizer type {self.optimizer_name()!r} and params {ignored} are ignored; "
                    "zo2 runs ZO-SGD with optimizer.params.lr and weight_decay"
                )
            optimizer = ZOOptimizer(model_parameters, lr=params["lr"], weight_decay=params.get("weight_decay", 0.0))
        for group in optimizer.param_groups:
            group.setdefault("weight_decay", 0.0)
        self.basic_optimizer = optimizer
        self.optimizer = optimizer

    def gradient_clipping(self) -> float:
        value = super().gradient_clipping()
        explicit = "gradient_clipping" in self._config._param_dict
        if value and explicit and not getattr(self, "_warned_clipping", False):
            self._warned_clipping = True
            logger.warning("zo2: gradient_clipping is ignored (there are no gradients to clip)")
        return 0.0

    # -- forward / backward / step ---------------------------------------------------------------
    _zo_timed_forward = False  # True while forward() holds DeepSpeed's forward timers for all its passes

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        """Train mode: the seeded dual forward; returns the output of the last pass (theta - eps z_{q-1})
        with its loss replaced by the mean of every L+ and L-. Eval mode: one plain forward."""
        # DeepSpeed times a forward from its prologue to its epilogue (hooks on the module). Time the 2q
        # passes as one span instead: the offloader interleaves them, and a pass's prologue would find the
        # timer still running (wall_clock_breakdown asserts); the figure is then the whole ZO forward.
        timers = self.engine_timers.forward_timers
        self._start_timers(timers)
        if self.training_dataloader is None:
            self.tput_timer.start_step()
        # DeepSpeed's flops profiler, at its step: one profile over every pass (started here, not per pass).
        profiling = self._flops_profile_now()
        if profiling:
            self.flops_profiler.start_profile(ignore_list=None)
        self._zo_timed_forward = True
        try:
            return self._zo_forward(*inputs, **kwargs)
        finally:
            self._zo_timed_forward = False
            self._stop_timers(timers)
            if profiling:
                self.flops_profiler.stop_profile()

    def flops_profiler_enabled(self) -> bool:  # noqa: D102
        # Inside forward() the passes must not start / stop the profile each (see forward).
        return False if self._zo_timed_forward else super().flops_profiler_enabled()

    def _flops_profile_now(self) -> bool:
        return (
            super().flops_profiler_enabled()
            and self.global_steps == self.flops_profiler_profile_step()
            and self.global_rank == 0
        )

    _zo_printing_profile = False

    def wall_clock_breakdown(self) -> bool:  # noqa: D102
        return False if self._zo_printing_profile else super().wall_clock_breakdown()

    def _wrap_flops_profiler_print(self) -> None:
        """The profile's summary, without DeepSpeed's backward lines: with wall_clock_breakdown they divide by
        the backward's latency, which is 0 here (ZeroDivisionError), and count 2x the forward's flops for a
        backward ZO does not run. The forward lines cover all 2q passes of the step (flops and latency)."""
        profiler = self.flops_profiler
        original = profiler.print_model_profile

        def print_model_profile(*args: Any, **kwargs: Any) -> Any:
            self._zo_printing_profile = True
            try:
                return original(*args, **kwargs)
            finally:
                self._zo_printing_profile = False

        profiler.print_model_profile = print_model_profile

    def _start_timers(self, timer_names: list[str]) -> None:
        if not (self._zo_timed_forward and timer_names is self.engine_timers.forward_timers):
            super()._start_timers(timer_names)

    def _stop_timers(self, timer_names: list[str]) -> None:
        if not (self._zo_timed_forward and timer_names is self.engine_timers.forward_timers):
            super()._stop_timers(timer_names)

    def _zo_forward(self, *inputs: Any, **kwargs: Any) -> Any:
        if not self.module.training:
            with torch.no_grad():
                return self.zo_runner.run_plain(lambda: DeepSpeedEngine.forward(self, *inputs, **kwargs))
        cfg = self.zo_config
        # Each pass is reduced to its scalar loss at once, so 2q sets of logits (and KV caches) are never
        # alive together. The last pass's full output is the one returned to the caller: kept from any
        # earlier pass, its logits would still be alive during every later pass's loss. Passes start in
        # order (sequentially, or in turn under the offloader's lock-step), so a counter names them.
        num_passes = 2 * cfg.num_perturbations
        last_output: list[Any] = []
        started = [0]
        lock = threading.Lock()

        def one_pass() -> torch.Tensor:
            with lock:  # the offloader runs passes in lock-step threads
                index = started[0]
                started[0] += 1
            output = DeepSpeedEngine.forward(self, *inputs, **kwargs)
            loss = _loss_of(output)
            if index == num_passes - 1:
                last_output.append(output)
            return loss

        # Dropout off for the perturbed passes (as MeZO does): L+ and L- must see the same network
        # up to the perturbation, or g measures dropout noise. No KV cache either: nothing reuses it.
        with _eval_mode(self.module), torch.no_grad(), _kv_cache_off(self._kv_cache_configs):
            step = self.global_steps
            next_step = step + 1 if self.is_gradient_accumulation_boundary() else step
            pairs = self.zo_runner.run(step, cfg.num_perturbations, one_pass, next_step=next_step)
        plus_losses = torch.stack([p for p, _ in pairs])
        minus_losses = torch.stack([m for _, m in pairs])
        g = zo.projected_grad(plus_losses, minus_losses, cfg.eps)
        mean_loss = (plus_losses.float().mean() + minus_losses.float().mean()) / 2
        # g_i and the reported loss, summed over the micro-batches of this step (kept on device).
        stats = torch.cat([g, mean_loss.reshape(1)])
        self._g_sum = stats if self._g_sum is None else self._g_sum + stats
        self._g_count += 1
        return _with_loss(last_output[0], mean_loss.to(plus_losses.dtype))

    def backward(self, loss: torch.Tensor, retain_graph: bool = False, scale_wrt_gas: bool = True) -> torch.Tensor:
        """No autograd work: the projected gradient was measured in forward."""
        if self._g_sum is None or self._g_count == 0:
            raise RuntimeError("ZOEngine.backward() called without a training forward (engine.train(); engine(batch))")
        return loss / self.gradient_accumulation_steps() if scale_wrt_gas else loss

    def step(self, lr_kwargs: dict | None = None) -> None:
        """At the accumulation boundary, all-reduce g and apply the update through DeepSpeed's step."""
        boundary = self.is_gradient_accumulation_boundary()
        if boundary:
            self._finalize_projected_grad()
        super().step(lr_kwargs)
        if boundary:
            self._report_zo()

    def _report_zo(self) -> None:
        """The ZO figures next to DeepSpeed's own: monitor events and the steps_per_print line."""
        if self.global_rank != 0:
            return
        if self.monitor.enabled:
            events = [("Train/Samples/train_loss", self._last_loss, self.global_samples)]
            events += [
                (f"Train/Samples/zo_projected_grad_{i}", g, self.global_samples) for i, g in enumerate(self._last_g)
            ]
            events.append(("Train/Samples/zo_skipped_steps", self.zo_skipped_steps, self.global_samples))
            self.monitor.write_events(events)
        every = self.steps_per_print()
        if every and self.global_steps % every == 0:
            g = ", ".join(f"{v:.4g}" for v in self._last_g)
            logger.info(
                f"zo2: step={self.global_steps} loss={self._last_loss:.5g} g=[{g}] lr={self.get_lr()} "
                f"zo_skipped={self.zo_skipped_steps}"
            )

    def _finalize_projected_grad(self) -> None:
        if self._g_sum is None:
            raise RuntimeError("ZOEngine.step() at a boundary without any training forward since the last step")
        stats = self._g_sum.float() / self._g_count
        if self.dp_world_size > 1:
            # The only communication of data-parallel ZO: q + 1 floats per step (g_i and the loss).
            dist.all_reduce(stats, group=self.data_parallel_group)
            stats = stats / self.dp_world_size
        *values, self._last_loss = stats.tolist()  # the one host sync per step: g are kernel arguments
        self._g_sum, self._g_count = None, 0
        self._last_g = values
        finite = all(math.isfinite(v) for v in values)
        self.optimizer.overflow = not finite
        if not finite:
            self.zo_skipped_steps += 1
            warnings.warn(
                f"zo2: non-finite projected gradient {values} at step {self.global_steps}; update skipped "
                f"(parameters unchanged; {self.zo_skipped_steps} skipped so far)",
                stacklevel=3,
            )

    def _apply_update(self) -> None:
        """ZOOptimizer.step(): theta <- theta - lr (mean_i g_i z_i + wd theta), per param group."""
        if self.optimizer.overflow:
            return
        q = len(self._last_g)
        coefs = [v / q for v in self._last_g]
        groups = []
        for group in self.optimizer.param_groups:
            params = tuple(p for p in group["params"] if id(p) in self._zo_param_ids)
            if params:
                groups.append(UpdateGroup(params, float(group["lr"]), float(group.get("weight_decay", 0.0))))
        self.zo_runner.update(self.global_steps, coefs, groups)

    @property
    def last_loss(self) -> float:
        """The reported loss of the last completed step, averaged over micro-batches and ranks."""
        return self._last_loss

    @property
    def last_projected_grad(self) -> list[float]:
        """The g values (one per perturbation) of the last completed step, averaged over ranks."""
        return list(self._last_g)

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, save_dir: str, tag: Any = None, client_state: dict | None = None, **kwargs: Any) -> Any:
        self.zo_runner.flush()
        state = dict(client_state or {})
        state["zo2_state"] = {"zo_skipped_steps": self.zo_skipped_steps, "config": self.zo_config.model_dump()}
        return super().save_checkpoint(save_dir, tag=tag, client_state=state, **kwargs)

    def load_checkpoint(self, load_dir: str, tag: Any = None, **kwargs: Any) -> Any:
        self.zo_runner.flush()
        load_path, client_state = super().load_checkpoint(load_dir, tag=tag, **kwargs)
        if client_state is not None:
            zo_state = client_state.pop("zo2_state", None)
            if zo_state is not None:
                self.zo_skipped_steps = zo_state["zo_skipped_steps"]
                saved_seed = zo_state["config"].get("seed")
                if saved_seed != self.zo_config.seed:
                    logger.warning(
                        f"zo2: checkpoint was trained with seed {saved_seed}, resuming with "
                        f"{self.zo_config.seed}: the trajectory will differ"
                    )
        self._g_sum, self._g_count = None, 0
        return load_path, client_state

    def eval(self) -> None:  # noqa: D102
        self.zo_runner.flush()
        super().eval()

    def destroy(self) -> None:  # noqa: D102
        runner = getattr(self, "zo_runner", None)
        if runner is not None:
            runner.flush()
            runner.close()
        uninstall_lean_loss(getattr(self, "_lean_loss_models", []))
        super().destroy()


class _OncePerStepThroughputTimer:
    """DeepSpeed's ThroughputTimer, started once per ZO forward instead of once per pass.

    DeepSpeed starts it in every ``DeepSpeedEngine.forward``, i.e. 2q times per ZO step, and by default each
    start and stop synchronizes the device. A device-wide synchronize at the start of a pass drains the
    queue the offloader keeps ahead of the host (the next blocks' uploads), leaving the GPU idle while the
    host prepares the pass. The ZO step already waits for the device once per step (reading g), so the
    timer keeps DeepSpeed's per-step figures without its own synchronize, unless the config asks for it
    explicitly (``"timers": {"throughput": {"synchronized": true}}``).
    """

    def __init__(self, engine: Any):
        timer = engine.tput_timer
        self._timer = timer
        self._engine = engine
        explicit = ((engine._config._param_dict.get("timers") or {}).get("throughput") or {}).get("synchronized")
        if not explicit and getattr(timer.config, "synchronized", False):
            timer.config = timer.config.model_copy(update={"synchronized": False})

    def start(self) -> None:  # called by every pass's DeepSpeedEngine.forward: a no-op inside a ZO forward
        if not self._engine._zo_timed_forward:
            self._timer.start()

    def start_step(self) -> None:
        self._timer.start()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._timer, name)


def _check_compatible(config_class: Any) -> None:
    """ZO replaces the optimizer and the backward pass; settings built around them cannot apply."""
    cfg = parse_zo2_config(config_class._param_dict)
    if not cfg.enabled:
        raise ValueError("ZOEngine needs zo2.enabled = true in the DeepSpeed config")
    stage = config_class.zero_optimization_stage
    if stage and stage > 0:
        raise ValueError(
            f"zo2 is incompatible with zero_optimization.stage={stage}: ZO keeps no gradients or optimizer "
            "state to partition; use stage 0 and zo2.offload to save memory"
        )
    if config_class.hybrid_engine.enabled:
        raise ValueError("zo2 is incompatible with hybrid_engine")


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Every submodule's ``training`` False for the duration, then each one's own flag back.

    ``module.train(False)`` / ``train(True)`` per step costs milliseconds of host time on a large model
    (``nn.Module.__setattr__`` for each of hundreds of modules, twice), which an offloaded small model's
    step cannot hide; it would also turn on modules the user had put in eval mode. Where a module's class
    does more in ``train`` than set the flag (other than HF's override, which only re-casts hub kernels
    when they are used), ``train`` is called as before.
    """
    modules = list(module.modules())
    if not all(_plain_train(m) for m in modules):
        module.train(False)
        try:
            yield
        finally:
            module.train(True)
        return
    saved = [m.training for m in modules]
    for m in modules:
        m.__dict__["training"] = False
    try:
        yield
    finally:
        for m, flag in zip(modules, saved):
            m.__dict__["training"] = flag


def _plain_train(module: torch.nn.Module) -> bool:
    train = type(module).train
    if train is torch.nn.Module.train:
        return True
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return train is PreTrainedModel.train and not getattr(module, "_use_kernels", False)


def _kv_cache_configs(module: torch.nn.Module) -> list[Any]:
    """The distinct HF configs inside ``module`` whose ``use_cache`` is on."""
    configs = {}
    for sub in module.modules():
        config = getattr(sub, "config", None)
        if getattr(config, "use_cache", False) is True:
            configs[id(config)] = config
    return list(configs.values())


@contextlib.contextmanager
def _kv_cache_off(configs: list[Any]) -> Iterator[None]:
    """``config.use_cache = False`` on each of ``configs`` for the duration (nothing reuses the cache)."""
    for config in configs:
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs:
            config.use_cache = True


def _loss_of(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        loss = output
    elif getattr(output, "loss", None) is not None:
        loss = output.loss
    elif isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        loss = output["loss"]
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        loss = output[0]
    else:
        raise TypeError(
            "zo2: the model's forward must return a scalar loss tensor, an object with a .loss (e.g. an HF "
            "ModelOutput: pass labels= to the model), a dict with a 'loss' tensor, or a tuple starting with the "
            f"loss; got {type(output).__name__}" + (" with loss=None" if hasattr(output, "loss") else "")
        )
    if loss.numel() != 1:
        raise TypeError(f"zo2: the loss must be a scalar tensor, got shape {tuple(loss.shape)}")
    return loss.reshape(())


def _with_loss(output: Any, loss: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return loss
    if getattr(output, "loss", None) is not None:
        output.loss = loss
        return output
    if isinstance(output, Mapping):
        return {**output, "loss": loss}
    return type(output)((loss, *output[1:]))
