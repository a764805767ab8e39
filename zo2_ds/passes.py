"""What one forward pass of the engine needs around the model: every module in eval mode, no KV cache, the
loss read from whatever the model returns, and the output handed back with the ZO loss in it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = ["eval_mode", "kv_cache_configs", "kv_cache_off", "loss_of", "with_loss"]


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
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


def kv_cache_configs(module: torch.nn.Module) -> list[Any]:
    """The distinct HF configs inside ``module`` whose ``use_cache`` is on."""
    configs = {}
    for sub in module.modules():
        config = getattr(sub, "config", None)
        if getattr(config, "use_cache", False) is True:
            configs[id(config)] = config
    return list(configs.values())


@contextlib.contextmanager
def kv_cache_off(configs: list[Any]) -> Iterator[None]:
    """``config.use_cache = False`` on each of ``configs`` for the duration (nothing reuses the cache)."""
    for config in configs:
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs:
            config.use_cache = True


def loss_of(output: Any) -> torch.Tensor:
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


def with_loss(output: Any, loss: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return loss
    if getattr(output, "loss", None) is not None:
        output.loss = loss
        return output
    if isinstance(output, Mapping):
        return {**output, "loss": loss}
    return type(output)((loss, *output[1:]))
