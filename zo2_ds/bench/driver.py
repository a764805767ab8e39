"""Driving a zo2_ds engine through its public API only, so one bench can time any checkout of zo2_ds.

The timed path uses ``zo2_ds.initialize(model=..., config=dict)``, ``engine(**batch)``,
``engine.backward``, ``engine.step`` and ``engine.zo_runner.flush()``; nothing else. What older and newer
checkouts expose differently is feature-detected and optional:

- switches: ``zo2.kernels`` ("auto", "multi_tensor", "per_tensor", "torch") and
  ``zo2.offload.prefetch_next_step`` are config fields where the installed zo2_ds's config accepts them;
  older checkouts read environment variables at import instead (``ZO2_DS_DISABLE_KERNELS``,
  ``ZO2_DS_MULTI_TENSOR``, ``ZO2_DS_PREFETCH_NEXT_STEP``), so :func:`resolve_switches` then restarts the
  process with them set (before CUDA is touched);
- the offloader's device budget (``engine.zo_runner.device_bytes()``), its ring size and write-back interval,
  and a timeline of one step: recorded where present, skipped where not.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "KERNEL_CHOICES",
    "Settings",
    "select_device",
    "single_process_env",
    "config_accepts",
    "resolve_switches",
    "engine_config",
    "build_engine",
    "zo_step",
    "finish",
    "offload_facts",
    "timeline_of_one_step",
    "host_lead",
]

KERNEL_CHOICES = ("auto", "multi_tensor", "per_tensor", "torch")
# What older checkouts read at import in place of the config fields (the defaults set nothing).
_SWITCH_ENV = {
    ("kernels", "torch"): ("ZO2_DS_DISABLE_KERNELS", "1"),
    ("kernels", "per_tensor"): ("ZO2_DS_MULTI_TENSOR", "0"),
    ("prefetch_next_step", False): ("ZO2_DS_PREFETCH_NEXT_STEP", "0"),
}
_RESTARTED = "ZO2_DS_BENCH_RESTARTED"


def select_device() -> torch.device:
    """This process's device, made current: ``cuda:LOCAL_RANK`` (0 outside a launcher; one process per GPU
    under ``torchrun`` / ``deepspeed``), else the CPU. Call it before anything else touches CUDA."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


@dataclass(frozen=True)
class Settings:
    """How every measurement of one bench run is made: the model dtype ("fp32", "fp16", "bf16"), the
    switches from :func:`resolve_switches`, untimed and timed steps, and the device (CUDA when present)."""

    dtype: str
    switches: dict[str, Any]
    warmup: int = 3
    steps: int = 10
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def single_process_env() -> None:
    """The rendezvous variables DeepSpeed's init_distributed needs outside a launcher (else it tries MPI):
    one process, world size 1. Values already set win."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)


def config_accepts(zo2_block: dict[str, Any]) -> bool:
    """Whether the installed zo2_ds validates this ``zo2`` block (it rejects unknown keys), through
    ``zo2_ds.parse_zo2_config`` or, failing that, the ``zo2_ds.ZO2Config`` model."""
    import zo2_ds

    parse = getattr(zo2_ds, "parse_zo2_config", None)
    model = getattr(zo2_ds, "ZO2Config", None)
    try:
        if parse is not None:
            parse({"zo2": zo2_block})
        elif model is not None:
            model(**zo2_block)
        else:
            return False
    except (ValueError, TypeError):  # pydantic's ValidationError is a ValueError
        return False
    return True


def resolve_switches(
    kernels: str = "auto",
    prefetch_next_step: bool = True,
    vocab_chunks: bool | str = "auto",
    stream_head: bool | str = "auto",
) -> dict[str, Any]:
    """The ``zo2`` config fields for the switches, and how they reach zo2_ds ({"route": ...}).

    Where the installed config lacks a field and the switch is not the default, the environment variable
    of older checkouts is set and the process restarts (``os.execv``) so that zo2_ds reads it at import.
    Call this before anything touches CUDA. Raises ValueError for a choice the bench does not know.
    """
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels: {kernels!r} is not one of {KERNEL_CHOICES}")
    fields: dict[str, Any] = {}
    offload_fields: dict[str, Any] = {}
    wanted_env: dict[str, str] = {}
    for key, value in (("kernels", kernels), ("prefetch_next_step", prefetch_next_step)):
        block = {"kernels": value} if key == "kernels" else {"offload": {key: value}}
        if config_accepts(block):
            (fields if key == "kernels" else offload_fields)[key] = value
        elif (key, value) in _SWITCH_ENV:
            name, env_value = _SWITCH_ENV[(key, value)]
            wanted_env[name] = env_value
    if vocab_chunks != "auto":  # a config field only (no environment route)
        if not config_accepts({"vocab_chunks": vocab_chunks}):
            raise ValueError(f"vocab_chunks: the installed zo2_ds has no zo2.vocab_chunks (asked for {vocab_chunks!r})")
        fields["vocab_chunks"] = vocab_chunks
    if stream_head != "auto":  # likewise
        if not config_accepts({"offload": {"stream_head": stream_head}}):
            raise ValueError(
                f"stream_head: the installed zo2_ds has no zo2.offload.stream_head (asked for {stream_head!r})"
            )
        offload_fields["stream_head"] = stream_head
    missing = {k: v for k, v in wanted_env.items() if os.environ.get(k) != v}
    if missing:
        if os.environ.get(_RESTARTED):
            raise RuntimeError(f"environment switches {missing} did not survive the restart")
        os.environ.update(missing, **{_RESTARTED: "1"})
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, *sys.argv])
    route = "config" if (fields or offload_fields) else ("env" if wanted_env else "default")
    return {"zo2": fields, "offload": offload_fields, "route": route, "env": wanted_env}


def engine_config(
    micro_batch: int,
    dtype: str,
    *,
    offload: dict[str, Any] | None = None,
    switches: dict[str, Any] | None = None,
    lr: float = 1e-7,
    eps: float = 1e-3,
) -> dict[str, Any]:
    """A DeepSpeed config with a ``zo2`` block: SGD with no weight decay, ``offload`` as given (off if None)."""
    switches = switches or {"zo2": {}, "offload": {}}
    zo2: dict[str, Any] = {"enabled": True, "eps": eps, **switches["zo2"]}
    if offload is not None and offload.get("enabled"):
        zo2["offload"] = {**offload, **switches["offload"]}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "steps_per_print": 10**9,
        "optimizer": {"type": "SGD", "params": {"lr": lr, "weight_decay": 0.0}},
        "zo2": zo2,
    }
    if dtype == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 0}
    elif dtype == "bf16":
        config["bf16"] = {"enabled": True}
    elif dtype != "fp32":
        raise ValueError(f"dtype: {dtype!r} is not one of 'fp32', 'fp16', 'bf16'")
    return config


def build_engine(model: torch.nn.Module, config: dict[str, Any]) -> Any:
    import zo2_ds

    single_process_env()
    engine, *_ = zo2_ds.initialize(model=model, config=config)
    engine.train()
    return engine


def zo_step(engine: Any, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One full training step, as a training loop makes it (the step's output is dropped at the end)."""

    def step() -> None:
        out = engine(**batch)
        engine.backward(getattr(out, "loss", out))
        engine.step()

    return step


def finish(engine: Any) -> None:
    """Apply pending updates (offload) and release the engine's hooks and buffers."""
    runner = getattr(engine, "zo_runner", None)
    if runner is not None and hasattr(runner, "flush"):
        runner.flush()
    engine.destroy()


def offload_facts(engine: Any) -> dict[str, Any]:
    """What the installed offloader tells about itself; absent entries are what it does not expose."""
    runner = getattr(engine, "zo_runner", None)
    facts: dict[str, Any] = {}
    for name in ("num_slots", "write_back_interval"):
        if isinstance(getattr(runner, name, None), int):
            facts[name] = getattr(runner, name)
    device_bytes = getattr(runner, "device_bytes", None)
    if callable(device_bytes):
        facts["device_budget"] = dict(device_bytes())
    return facts


def timeline_of_one_step(engine: Any, step: Callable[[], None]) -> list[dict[str, Any]]:
    """[{what, block, start_ms, end_ms}] of one offloaded step from the runner's CUDA events, where the
    installed offloader records them (``recording_timeline()``, or an older checkout's ``timeline`` list of
    (what, block, edge, event)); else []. Where the timeline has host issue times, each span also has
    ``start_issued_ms`` / ``end_issued_ms``: when the host queued that edge, on the same origin (the device
    is idle at the origin, so it reaches the origin as the host records it). An edge the device reached
    within a few microseconds of its issue found the device waiting for the host."""
    runner = getattr(engine, "zo_runner", None)
    recording = getattr(runner, "recording_timeline", None)
    if not torch.cuda.is_available() or not (callable(recording) or hasattr(runner, "timeline")):
        return []
    origin = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    issued: list[float] = []
    if callable(recording):
        with recording() as timeline:
            origin.record()
            host_origin = time.perf_counter()
            step()
            torch.cuda.synchronize()
        events, issued = timeline.events, getattr(timeline, "issued", [])
    else:
        runner.timeline = []
        origin.record()
        host_origin = time.perf_counter()
        step()
        torch.cuda.synchronize()
        events, runner.timeline = runner.timeline, None
    spans: dict[tuple[str, int], dict[str, Any]] = {}
    for i, (what, block, edge, event) in enumerate(events):
        span = spans.setdefault((what, block), {"what": what, "block": block})
        span[f"{edge}_ms"] = origin.elapsed_time(event)
        if i < len(issued):
            span[f"{edge}_issued_ms"] = (issued[i] - host_origin) * 1e3
    return [s for s in spans.values() if "start_ms" in s and "end_ms" in s]


def host_lead(spans: list[dict[str, Any]], what: str = "compute") -> dict[str, float] | None:
    """How far ahead of the device the host queued the starts of ``what`` spans (ms: device start minus host
    issue), median and the share of starts the device reached within 0.05 ms of their issue (it was waiting
    for the host there); None without issue times."""
    leads = sorted(s["start_ms"] - s["start_issued_ms"] for s in spans if s["what"] == what and "start_issued_ms" in s)
    if not leads:
        return None
    starved = sum(lead < 0.05 for lead in leads) / len(leads)
    return {"median_lead_ms": leads[len(leads) // 2], "min_lead_ms": leads[0], "share_waiting_for_host": starved}
