"""The config-flag route: after ``import zo2_ds``, ``deepspeed.initialize`` builds a ZOEngine when the
config has ``"zo2": {"enabled": true}``, and exactly what it built before otherwise.

What this relies on in DeepSpeed 0.19 (``deepspeed/__init__.py``):
- ``initialize`` looks up the module global ``DeepSpeedEngine`` at call time to build the engine of a
  non-pipeline model, passing ``config_class=`` (the parsed config) as a keyword argument;
- HF Trainer (through accelerate) and accelerate itself call ``deepspeed.initialize`` as an attribute
  of the module, so replacing the attribute reaches them too.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from typing import Any

import deepspeed

from zo2_ds.config import parse_zo2_config

__all__ = ["initialize", "install", "resolve_config"]

_original_initialize = deepspeed.initialize
_swap_lock = threading.Lock()


def resolve_config(args: Any = None, config: Any = None, config_params: Any = None) -> dict[str, Any]:
    """The DeepSpeed config as a dict, found the way deepspeed.initialize finds it."""
    if config is None:
        config = config_params
    if config is None:
        config = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    if config is None:
        raise ValueError("no DeepSpeed config: pass config= (a dict or a JSON path) or args.deepspeed_config")
    if isinstance(config, dict):
        return config
    if hasattr(config, "config") and isinstance(config.config, dict):  # e.g. HfDeepSpeedConfig
        return config.config
    path = os.fspath(config)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DeepSpeed config file not found: {path}")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"DeepSpeed config {path} is not valid JSON: {exc}") from None


@functools.wraps(_original_initialize)
def initialize(*args: Any, **kwargs: Any) -> tuple:
    """``deepspeed.initialize`` with the same signature and return values; a ZOEngine when zo2 is on."""
    bound = _bind(*args, **kwargs)
    cfg = resolve_config(bound.get("args"), bound.get("config"), bound.get("config_params"))
    if not parse_zo2_config(cfg).enabled:
        return _original_initialize(*args, **kwargs)
    from deepspeed.pipe import PipelineModule

    from zo2_ds.engine import ZOEngine

    if isinstance(bound.get("model"), PipelineModule):
        raise ValueError("zo2 does not support pipeline parallelism (PipelineModule)")
    # deepspeed.initialize reads the global name DeepSpeedEngine when it builds the engine; swap it in
    # for the duration of the call (serialised, in case two threads initialize at once).
    with _swap_lock:
        saved = deepspeed.DeepSpeedEngine
        deepspeed.DeepSpeedEngine = ZOEngine
        try:
            return _original_initialize(*args, **kwargs)
        finally:
            deepspeed.DeepSpeedEngine = saved


def _bind(*args: Any, **kwargs: Any) -> dict[str, Any]:
    import inspect

    return dict(inspect.signature(_original_initialize).bind_partial(*args, **kwargs).arguments)


def install() -> None:
    """Make plain ``deepspeed.initialize`` honour the ``zo2`` block (idempotent)."""
    deepspeed.initialize = initialize
