"""Perturbed forwards on resident parameters (the in-GPU ZO engine, no offloading).

A perturbed forward never writes to a parameter. For every module that directly owns trainable
parameters, a forward pre-hook writes ``theta + scale * z`` into a scratch tensor and swaps the
scratch into the module's ``_parameters`` slot; the post-hook swaps the original Parameter back.
So the clean value is restored exactly and for free, in any dtype, and the extra memory is one
module's parameters at a time (not a copy of the model, as an in-place perturb-and-restore needs).

A tensor shared by several modules (tied embedding / lm_head) is perturbed at each use with the
same z (z is keyed by the tensor's canonical name), so every use sees the same perturbed value,
and it is updated once.

The same unit of work (a module and the trainable tensors it owns) is what the offloader streams;
see ``zo2_ds.offload``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zo2_ds import zo

__all__ = ["TrainableParam", "trainable_params", "ResidentRunner", "UpdateGroup"]


@dataclass(frozen=True)
class TrainableParam:
    """One distinct trainable tensor: its canonical name (the z key) and where it is used."""

    name: str
    param: nn.Parameter
    key: int
    uses: tuple[tuple[nn.Module, str], ...]  # (owning module, attribute name) for every module holding it


def trainable_params(module: nn.Module) -> list[TrainableParam]:
    """The distinct parameters with requires_grad, in ``named_parameters`` order.

    The canonical name of a shared tensor is its first name in ``named_parameters()`` (which
    deduplicates), so it is the same on every rank and with or without offloading.
    """
    uses: dict[int, list[tuple[nn.Module, str]]] = {}
    for mod in module.modules():
        for attr, p in mod._parameters.items():
            if p is not None and p.requires_grad:
                uses.setdefault(id(p), []).append((mod, attr))
    result = []
    for name, p in module.named_parameters():
        if p.requires_grad:
            result.append(TrainableParam(name, p, zo.param_key(name), tuple(uses[id(p)])))
    return result


@dataclass(frozen=True)
class UpdateGroup:
    """Parameters sharing one lr and weight decay (an optimizer param group)."""

    params: tuple[nn.Parameter, ...]
    lr: float
    weight_decay: float


class ResidentRunner:
    """Runs the 2q perturbed forwards of one micro-batch with every parameter resident.

    Args:
        module: the model (hooks are installed on its submodules).
        params: the trainable tensors, from :func:`trainable_params`.
        eps: perturbation scale.
        seed: the zo2 base seed.
    """

    def __init__(self, module: nn.Module, params: Sequence[TrainableParam], eps: float, seed: int):
        self.eps = eps
        self.seed = seed
        self.params = list(params)
        self._key_of = {id(tp.param): tp.key for tp in self.params}
        # (step, index, scale) while a perturbed forward runs; None otherwise (hooks do nothing).
        self._active: tuple[int, int, float] | None = None
        self._perturbed_in_pass: set[int] = set()
        self._warned_unperturbed = False
        owners: dict[nn.Module, list[tuple[str, TrainableParam]]] = {}
        for tp in self.params:
            for mod, attr in tp.uses:
                owners.setdefault(mod, []).append((attr, tp))
        self._handles = []
        for mod, slots in owners.items():
            self._handles.append(mod.register_forward_pre_hook(self._make_pre_hook(slots)))
            self._handles.append(mod.register_forward_hook(self._make_post_hook(slots), always_call=True))

    # -- hooks -----------------------------------------------------------------------------------
    def _make_pre_hook(self, slots: list[tuple[str, TrainableParam]]) -> Callable:
        def pre_hook(mod: nn.Module, args: Any) -> None:
            if self._active is None:
                return
            step, index, scale = self._active
            for attr, tp in slots:
                if mod._parameters[attr] is not tp.param:
                    raise RuntimeError(
                        f"{type(mod).__name__}.{attr} is already perturbed: the module was re-entered "
                        "during its own forward, which zo2_ds does not support"
                    )
                seed = zo.z_seed(self.seed, step, index, tp.key)
                mod._parameters[attr] = zo.perturbed_into(torch.empty_like(tp.param), tp.param.data, seed, scale)
                self._perturbed_in_pass.add(id(tp.param))

        return pre_hook

    @staticmethod
    def _make_post_hook(slots: list[tuple[str, TrainableParam]]) -> Callable:
        # Runs even when the forward raised (always_call=True), so a failure never leaves a
        # perturbed tensor in place of a parameter.
        def post_hook(mod: nn.Module, args: Any, output: Any) -> None:
            for attr, tp in slots:
                mod._parameters[attr] = tp.param

        return post_hook

    # -- passes ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def perturbed(self, step: int, index: int, sign: int) -> Iterator[None]:
        """Within this context, forwards of the module see theta + sign * eps * z(step, index)."""
        self._active = (step, index, sign * self.eps)
        self._perturbed_in_pass.clear()
        try:
            yield
        finally:
            self._active = None
        self._check_all_perturbed()

    def run(self, step: int, num_perturbations: int, forward: Callable[[], Any]) -> list[tuple[Any, Any]]:
        """[(output at theta + eps z_i, output at theta - eps z_i) for i in range(q)]."""
        outputs = []
        for index in range(num_perturbations):
            with self.perturbed(step, index, +1):
                plus = forward()
            with self.perturbed(step, index, -1):
                minus = forward()
            outputs.append((plus, minus))
        return outputs

    def run_plain(self, forward: Callable[[], Any]) -> Any:
        """One unperturbed forward (eval mode)."""
        return forward()

    def update(self, step: int, coefs: Sequence[float], groups: Sequence[UpdateGroup]) -> None:
        """theta <- theta - lr * (sum_i coefs[i] z_i + wd * theta), once per distinct tensor."""
        for group in groups:
            for p in group.params:
                key = self._key_of[id(p)]
                seeds = [zo.z_seed(self.seed, step, i, key) for i in range(len(coefs))]
                wd = group.weight_decay if zo.uses_weight_decay(p) else 0.0
                zo.apply_update_(p.data, seeds, coefs, group.lr, wd)

    def flush(self) -> None:
        """Nothing is deferred when every parameter is resident."""

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _check_all_perturbed(self) -> None:
        if self._warned_unperturbed:
            return
        missed = [tp.name for tp in self.params if id(tp.param) not in self._perturbed_in_pass]
        if missed:
            self._warned_unperturbed = True
            shown = ", ".join(missed[:8]) + (" ..." if len(missed) > 8 else "")
            warnings.warn(
                f"zo2: {len(missed)} trainable parameter(s) were not used by their module's forward and so "
                f"were not perturbed: {shown}. They still receive the update g*z (pure noise); freeze them "
                "(requires_grad=False) if they are unused, or call the owning module instead of reading "
                "its weight directly.",
                stacklevel=3,
            )
