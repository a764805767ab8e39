"""ZOEngine: a thin DeepSpeedEngine subclass whose training forward is the seeded dual forward.

What it overrides, and why (everything else is DeepSpeed's own behaviour):

- ``forward``: in train mode, runs the 2q perturbed forwards (no autograd) and records the
  projected gradients g_i; returns the model's output with the loss replaced by the mean of L+, L-.
  In eval mode, one plain forward under ``no_grad``.
- ``backward``: no autograd work; kept so HF Trainer / accelerate loops run unchanged.
- ``step``: at the accumulation boundary, averages g over micro-batches and data-parallel ranks
  (one all-reduce of q floats), then lets DeepSpeed's own ``step`` run: it calls our
  :class:`ZOOptimizer`'s ``step`` (the ZO-SGD update), steps the lr scheduler, counts
  ``global_steps`` / ``global_samples`` and writes the monitor and ``steps_per_print`` output. With
  ``zo2.async_step`` (CUDA's default) g never leaves the device before the update: the kernels read it
  (:class:`zo2_ds.zo.DeviceCoefs`, a skipped step gated to a no-op there), and the host reads each step's
  figures at the next boundary from a pinned copy (:mod:`zo2_ds.figures`), so it never waits for the device.
- ``_configure_optimizer``: builds a :class:`ZOOptimizer` (param groups holding lr and weight decay,
  no state) instead of DeepSpeed's optimizer and its fp16/bf16 wrappers, so no fp32 master copies,
  moments or gradients are ever allocated.
- ``save_checkpoint`` / ``load_checkpoint``: flush pending (offloaded) updates and carry the ZO state.
- ``_configure_distributed_model`` / ``_broadcast_model`` and the forward timers / flops profiler /
  throughput timer: through :mod:`zo2_ds.ds_compat`, the one place that steers DeepSpeed's private
  attributes (and lists what it relies on).

The passes themselves are the runner's (:class:`zo2_ds.runner.ZORunner`, ``self.zo_runner``): the engine
hands it one forward that takes the pass index and gets the losses back; whether passes interleave on
threads (the offloader) is invisible here. The update reaches the runner through DeepSpeed's own
``optimizer.step()``: :meth:`ZOOptimizer.prepare_step` before it, :meth:`ZOOptimizer.bind` once.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from deepspeed import comm as dist
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.utils import logger

from zo2_ds import ds_compat, parallel, zo
from zo2_ds.config import ZO2Config, parse_zo2_config
from zo2_ds.figures import FigureLog, StepFigures, resolve_async_step
from zo2_ds.loss import install_lean_loss, uninstall_lean_loss
from zo2_ds.ops import Ops
from zo2_ds.optimizer import ZOOptimizer
from zo2_ds.passes import eval_mode, kv_cache_configs, kv_cache_off, loss_of, with_loss
from zo2_ds.perturb import ResidentRunner, trainable_params
from zo2_ds.runner import ZORunner

__all__ = ["ZOEngine", "ZOOptimizer"]

_IGNORED_OPTIMIZER_KEYS = ("momentum", "betas", "eps", "nesterov", "dampening", "amsgrad", "torch_adam", "adam_w_mode")


class ZOEngine(DeepSpeedEngine):
    """DeepSpeed engine for zeroth-order training. Build it with ``zo2_ds.initialize`` or, after
    ``import zo2_ds``, with ``deepspeed.initialize`` and a config whose ``zo2.enabled`` is true."""

    def __init__(self, *args: Any, config_class: Any = None, **kwargs: Any):
        # Validate before DeepSpeed builds anything: a bad zo2 block fails here, naming the key.
        self.zo_config: ZO2Config = parse_zo2_config(config_class._param_dict)
        _check_compatible(config_class)
        if self.zo_config.perturbation_parallel > 1 and dist.is_initialized():  # before the model is moved
            parallel.check_sizes(
                self.zo_config.perturbation_parallel, dist.get_world_size(), 2 * self.zo_config.num_perturbations
            )
        super().__init__(*args, config_class=config_class, **kwargs)
        if self.optimizer is None:
            raise ValueError(
                "zo2 needs a learning rate: add an optimizer block to the DeepSpeed config, e.g. "
                '"optimizer": {"type": "SGD", "params": {"lr": 1e-6, "weight_decay": 0.0}}, '
                "or pass optimizer= to initialize"
            )
        self.zo_params = trainable_params(self.module)
        # HF configs with a KV cache switched on, found once: the perturbed passes turn it off.
        self._kv_cache_configs = kv_cache_configs(self.module)
        if not self.zo_params:
            raise ValueError("zo2: the model has no parameter with requires_grad=True; nothing to train")
        self._lean_loss_models = install_lean_loss(self.module) if self.zo_config.lean_loss else []
        self.zo_groups: parallel.PerturbationGroups | None = None
        if self.zo_config.perturbation_parallel > 1:
            cfg = self.zo_config
            world = dist.get_world_size()
            self.zo_groups = parallel.PerturbationGroups(
                cfg.perturbation_parallel, self.global_rank, world, 2 * cfg.num_perturbations
            )
        self.zo_runner: ZORunner = self._build_runner()
        self.optimizer.bind(self.zo_runner, [tp.param for tp in self.zo_params])
        self._zo_span = ds_compat.ForwardSpan(self)
        self._g_sum: torch.Tensor | None = None  # sum over micro-batches of g_i, shape [q], on device
        self._g_count = 0
        # Each step's figures on their way to the host; with zo2.async_step read one step late.
        self.zo_figures = FigureLog(resolve_async_step(self.zo_config), self._report_zo)
        self.zo_async_step = self.zo_figures.deferred

    # -- construction ----------------------------------------------------------------------------
    def _build_runner(self) -> ZORunner:
        cfg = self.zo_config
        ops = Ops(cfg.kernels)
        if cfg.offload.enabled:
            from zo2_ds.offload import OffloadRunner

            return OffloadRunner(self.module, self.zo_params, self.zo_offload_store, cfg, ops=ops)
        return ResidentRunner(self.module, self.zo_params, cfg, ops)

    def _configure_distributed_model(self, model: Any) -> None:
        """With zo2.offload the blocks' masters go to pinned host memory (see :mod:`zo2_ds.ds_compat`)."""
        if not self.zo_config.offload.enabled:
            return super()._configure_distributed_model(model)
        self.zo_offload_store = ds_compat.configure_offloaded_model(self, super()._configure_distributed_model, model)

    def _broadcast_model(self) -> None:
        store = getattr(self, "zo_offload_store", None)
        ds_compat.broadcast_model(self, store, super()._broadcast_model)

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
    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        """Train mode: the seeded dual forward; returns the output of the last pass (theta - eps z_{q-1})
        with its loss replaced by the mean of every L+ and L-. Eval mode: one plain forward."""
        # DeepSpeed times, counts and profiles the 2q passes as one forward (ds_compat.ForwardSpan).
        with self._zo_span:
            return self._zo_forward(*inputs, **kwargs)

    def flops_profiler_enabled(self) -> bool:  # noqa: D102
        span = getattr(self, "_zo_span", None)
        return False if span is not None and span.active else super().flops_profiler_enabled()

    def profile_this_step(self) -> bool:
        """Whether DeepSpeed's flops profiler profiles the forward of this step (rank 0, its profile step)."""
        return (
            super().flops_profiler_enabled()
            and self.global_steps == self.flops_profiler_profile_step()
            and self.global_rank == 0
        )

    def wall_clock_breakdown(self) -> bool:  # noqa: D102
        span = getattr(self, "_zo_span", None)
        return False if span is not None and span.printing_profile else super().wall_clock_breakdown()

    def _start_timers(self, timer_names: list[str]) -> None:
        span = getattr(self, "_zo_span", None)
        if span is None or not span.suppresses(timer_names):
            super()._start_timers(timer_names)

    def _stop_timers(self, timer_names: list[str]) -> None:
        span = getattr(self, "_zo_span", None)
        if span is None or not span.suppresses(timer_names):
            super()._stop_timers(timer_names)

    def _zo_forward(self, *inputs: Any, **kwargs: Any) -> Any:
        if not self.module.training:
            with torch.no_grad():
                return self.zo_runner.run_plain(lambda: DeepSpeedEngine.forward(self, *inputs, **kwargs))
        cfg, groups = self.zo_config, self.zo_groups
        # Each pass is reduced to its scalar loss at once, so 2q sets of logits (and KV caches) are never
        # alive together. The last pass's full output is the one returned to the caller: kept from any
        # earlier pass, its logits would still be alive during every later pass's loss.
        passes = groups.passes if groups is not None else list(range(2 * cfg.num_perturbations))
        last_pass = passes[-1]
        last_output: list[Any] = []

        def one_pass(index: int) -> torch.Tensor:
            output = DeepSpeedEngine.forward(self, *inputs, **kwargs)
            if index == last_pass:
                last_output.append(output)
            return loss_of(output)

        # Dropout off for the perturbed passes (as MeZO does): L+ and L- must see the same network
        # up to the perturbation, or g measures dropout noise. No KV cache either: nothing reuses it.
        with eval_mode(self.module), torch.no_grad(), kv_cache_off(self._kv_cache_configs):
            step = self.global_steps
            next_step = step + 1 if self.is_gradient_accumulation_boundary() else step
            if groups is None:
                pairs = self.zo_runner.run(step, one_pass, next_step=next_step)
                plus_losses = torch.stack([p for p, _ in pairs])
                minus_losses = torch.stack([m for _, m in pairs])
            else:  # this rank's share of the passes; the group's all-reduce brings the others
                local = self.zo_runner.run_passes(step, one_pass, passes, next_step=next_step)
                checksum = parallel.input_checksum([*inputs, *kwargs.values()])
                losses, differed = groups.gather_losses(local, checksum)
                plus_losses, minus_losses = losses[0::2], losses[1::2]
        g = zo.projected_grad(plus_losses, minus_losses, cfg.eps)
        mean_loss = (plus_losses.float().mean() + minus_losses.float().mean()) / 2
        # g_i and the reported loss, summed over the micro-batches of this step (kept on device); with
        # perturbation groups, whether a group's inputs differed (checked at the step's host sync).
        stats = torch.cat([g, mean_loss.reshape(1)] + ([differed.reshape(1)] if groups is not None else []))
        self._g_sum = stats if self._g_sum is None else self._g_sum + stats
        self._g_count += 1
        return with_loss(last_output[0], mean_loss.to(plus_losses.dtype))

    def backward(self, loss: torch.Tensor, retain_graph: bool = False, scale_wrt_gas: bool = True) -> torch.Tensor:
        """No autograd work: the projected gradient was measured in forward."""
        if self._g_sum is None or self._g_count == 0:
            raise RuntimeError("ZOEngine.backward() called without a training forward (engine.train(); engine(batch))")
        return loss / self.gradient_accumulation_steps() if scale_wrt_gas else loss

    def step(self, lr_kwargs: dict | None = None) -> None:
        """At the accumulation boundary, all-reduce g and apply the update through DeepSpeed's step."""
        boundary = self.is_gradient_accumulation_boundary()
        stats = self._finalize_projected_grad() if boundary else None
        super().step(lr_kwargs)
        if stats is None:
            return
        self.zo_figures.record(stats, self.global_steps, self.global_samples, self.get_lr())

    def _finalize_projected_grad(self) -> torch.Tensor:
        """The step's [g_0 .. g_{q-1}, loss] averaged over micro-batches and data-parallel ranks, on the device;
        prepares the optimizer's update from it."""
        if self._g_sum is None:
            raise RuntimeError("ZOEngine.step() at a boundary without any training forward since the last step")
        stats = self._g_sum.float() / self._g_count
        self._g_sum, self._g_count = None, 0
        data_world, data_group = self.zo_data_world_size, self.data_parallel_group
        if self.zo_groups is not None:
            data_group = self.zo_groups.data_group
        if data_world > 1:
            # The only communication of data-parallel ZO: q + 1 floats per step (g_i and the loss).
            dist.all_reduce(stats, group=data_group)
            stats = stats / data_world
        if self.zo_groups is not None:
            stats, differed = stats[:-1], stats[-1].item()
            self.zo_groups.check_inputs(differed)  # before any update: every rank raises together
        q = self.zo_config.num_perturbations
        if self.zo_async_step:
            self.zo_figures.read()  # the previous step's figures: on the host since before this step's forward
            self.optimizer.prepare_step(self.global_steps, zo.step_coefs(stats[:q]), True)
        else:  # the host sync per step: g are kernel arguments, and DeepSpeed's overflow check needs them
            coefs = (stats[:q] / q).tolist()  # fp32, as zo.step_coefs computes them; finite exactly where g is
            self.optimizer.prepare_step(self.global_steps, coefs, all(math.isfinite(c) for c in coefs))
        return stats

    def _report_zo(self, figures: StepFigures, samples: int, lr: Any) -> None:
        """A step's ZO figures next to DeepSpeed's own, once the host has read them: monitor events and the
        steps_per_print line."""
        if self.global_rank != 0:
            return
        if self.monitor.enabled:
            events = [("Train/Samples/train_loss", figures.loss, samples)]
            events += [(f"Train/Samples/zo_projected_grad_{i}", g, samples) for i, g in enumerate(figures.g)]
            events.append(("Train/Samples/zo_skipped_steps", figures.skipped_steps, samples))
            self.monitor.write_events(events)
        every = self.steps_per_print()
        if every and figures.step % every == 0:
            g = ", ".join(f"{v:.4g}" for v in figures.g)
            logger.info(
                f"zo2: step={figures.step} loss={figures.loss:.5g} g=[{g}] lr={lr} zo_skipped={figures.skipped_steps}"
            )

    @property
    def zo_data_rank(self) -> int:
        """Which shard of the data this rank takes: its global rank, or with ``zo2.perturbation_parallel``
        its group's index (the ranks of a group must see the same micro-batch)."""
        return self.zo_groups.data_rank if self.zo_groups is not None else self.global_rank

    @property
    def zo_data_world_size(self) -> int:
        """Over how many shards the data is split: the data-parallel world, divided by
        ``zo2.perturbation_parallel``."""
        return self.zo_groups.data_world_size if self.zo_groups is not None else self.dp_world_size

    def deepspeed_io(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
        """DeepSpeed's loader; with ``zo2.perturbation_parallel`` its default sampler shards by group."""
        if self.zo_groups is not None and self.is_map_style_dataset(dataset):
            kwargs = self.zo_groups.loader_kwargs(dataset, args, kwargs)
            args = ()
        return super().deepspeed_io(dataset, *args, **kwargs)

    @property
    def last_loss(self) -> float:
        """The reported loss of the last completed step, averaged over micro-batches and ranks (with
        zo2.async_step, reading it waits for that step to finish on the device)."""
        self.zo_figures.read()
        return self.zo_figures.last_loss

    @property
    def last_projected_grad(self) -> list[float]:
        """The g values (one per perturbation) of the last completed step, averaged over ranks."""
        self.zo_figures.read()
        return list(self.zo_figures.last_g)

    def zo_step_figures(self, since: int = -1, wait: bool = True) -> list[StepFigures]:
        """The figures the host has read of the steps after ``since`` (a ``global_steps`` value), oldest first (the
        engine keeps the last 64): each step's ``global_steps`` after it, its loss and g (averaged over
        micro-batches and ranks) and the skipped steps up to it. ``wait``: read the last step first, waiting
        for it on the device if needed. With zo2.async_step the engine reads a step at the next step's
        boundary, so ``wait=False`` brings the steps up to the one before the last without any wait (a training
        loop's progress bar and logs, one step behind); without zo2.async_step, up to the last step."""
        return self.zo_figures.since(since, wait)

    @property
    def zo_skipped_steps(self) -> int:
        """Steps whose update was skipped because their g was not finite."""
        self.zo_figures.read()
        return self.zo_figures.skipped

    @zo_skipped_steps.setter
    def zo_skipped_steps(self, value: int) -> None:
        self.zo_figures.skipped = int(value)

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, save_dir: str, tag: Any = None, client_state: dict | None = None, **kwargs: Any) -> Any:
        from zo2_ds.offload.partition import kept_gathered

        self.zo_runner.flush()
        self.zo_figures.read()
        state = dict(client_state or {})
        state["zo2_state"] = {"zo_skipped_steps": self.zo_skipped_steps, "config": self.zo_config.model_dump()}
        with kept_gathered(ds_compat.writes_module_states(self)):  # partitioned masters: the writer keeps them
            return super().save_checkpoint(save_dir, tag=tag, client_state=state, **kwargs)

    def load_checkpoint(self, load_dir: str, tag: Any = None, **kwargs: Any) -> Any:
        self.zo_runner.flush()
        self.zo_figures.read()
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
        self.zo_figures.read()
        super().eval()

    def destroy(self) -> None:  # noqa: D102
        if getattr(self, "zo_figures", None) is not None:
            self.zo_figures.read()  # the last step's warning and report
        runner = getattr(self, "zo_runner", None)
        if runner is not None:
            runner.flush()
            runner.close()
        uninstall_lean_loss(getattr(self, "_lean_loss_models", []))
        super().destroy()


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
