"""Perturbed forwards on resident parameters (the in-GPU ZO engine, no offloading).

A perturbed forward never writes to a parameter. Before a unit's forward, a pre-hook writes
``theta + scale * z`` for every trainable tensor of the unit into scratch and swaps the scratch into the
owning modules' ``_parameters`` slots; the post-hook swaps the original Parameters back. So the clean
value is restored exactly and for free, in any dtype, and the extra memory is one unit's parameters at
a time (not a copy of the model, as an in-place perturb-and-restore needs).

Units. Each repeated block of the model (an element of its decoder-layer ModuleList, found by
:func:`zo2_ds.models.find_blocks`) is one unit: one pre-hook and one post-hook on the block cover every
trainable tensor owned by modules inside it. A tensor used outside the blocks belongs to a unit per
owning module, as does everything when the model has no recognisable blocks. Grouping is for the host:
on CUDA a unit is perturbed by one kernel launch (:func:`zo2_ds.kernels.perturbed_into_multi`) into one
flat scratch buffer taken from a small pool, and an update group is updated by one launch per dtype;
an OPT-1.3B step makes ~80 launches instead of ~1170. The z of every tensor is unchanged by this
(it is keyed by the tensor, not by the unit).

Vocabulary-sized tensors outside the blocks need no whole perturbed copy (zo2_ds/vocab.py): an ``nn.Embedding``
gathers its rows and perturbs just those; a large head computes its logits and the loss over chunks of
vocabulary rows (``zo2.vocab_chunks``). The hooks ask :class:`~zo2_ds.vocab.VocabPaths` first.

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
from zo2_ds.config import ZO2Config
from zo2_ds.ops import Ops
from zo2_ds.scratch import ScratchPool
from zo2_ds.vocab import VocabPaths

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


@dataclass(eq=False)
class _Unit:
    """A module whose forward is one perturbation unit, and the trainable tensors used inside it."""

    module: nn.Module  # the hooks go here
    tensors: list[TrainableParam]  # distinct tensors, each perturbed once per forward of the unit
    slots: list[tuple[nn.Module, str, int]]  # (owner, attribute, index in tensors) for every use in the unit
    param_ids: frozenset[int] = frozenset()
    params: tuple[nn.Parameter, ...] = ()  # tensors[i].param, for the table's storage check
    table: Any = None  # kernels.TensorTable on CUDA (built at the first use), False when not applicable
    held: torch.Tensor | None = None  # the pool buffer holding this unit's perturbed values, while swapped in
    contains_block: bool = False  # the unit's module runs a block inside its forward (see share_scratch)
    views: tuple[torch.Tensor | None, list[torch.Tensor]] = (None, [])  # (buffer, its views) cache


def _block_modules(module: nn.Module) -> tuple[nn.Module, ...]:
    """The model's repeated blocks, or () when there are none (units fall back to one per owning module)."""
    from zo2_ds.models import find_blocks

    try:
        return find_blocks(module).blocks
    except ValueError:
        return ()


class ResidentRunner:
    """Runs the 2q perturbed forwards of one micro-batch with every parameter resident.

    Args:
        module: the model (hooks are installed on its blocks and on the modules owning other params).
        params: the trainable tensors, from :func:`trainable_params` (any subset: the offloader passes
            the tensors outside its streamed blocks).
        config: the ``zo2`` config (eps, seed, num_perturbations are read from it).
        ops: the kernel dispatch (default: the one ``config.kernels`` names).
        group_blocks: one unit per block (else one per owning module, as outside the blocks). The offloader
            passes False: the tensors it leaves to this runner inside a block (layer norms, at granularity
            "layer") are used between its own units, while the passes take turns within the block.
    """

    def __init__(
        self,
        module: nn.Module,
        params: Sequence[TrainableParam],
        config: ZO2Config,
        ops: Ops | None = None,
        *,
        group_blocks: bool = True,
    ):
        self.config = config
        self.ops = ops if ops is not None else Ops(config.kernels)
        self.params = list(params)
        self._key_of = {id(tp.param): tp.key for tp in self.params}
        # (step, index, scale) while a perturbed forward runs; None otherwise (hooks do nothing).
        self._active: zo.PassSpec | None = None
        self._perturbed_in_pass: set[int] = set()
        self._warned_unperturbed = False
        self._pass_hash_cache: tuple[tuple[int, int], int] | None = None
        # Flat buffers for the perturbed copies on the multi-tensor path (see zo2_ds/scratch.py).
        self.scratch = ScratchPool()
        # Units finished per pass (keyed by the pass's (step, index, scale)): passes may interleave (the
        # offloader's lock-step), so each counts its own.
        self._units_done: dict[tuple[int, int, float], int] = {}
        self._update_tables: dict[tuple[int, ...], list[tuple[list[nn.Parameter], Any]]] = {}
        self.units = self._build_units(module, group_blocks)
        # Embeddings gathered and heads in vocabulary chunks, without a whole perturbed copy (zo2_ds/vocab.py).
        self.vocab = VocabPaths(module, [(u.module, u.tensors) for u in self.units], config.vocab_chunks, self.ops,
                                self.scratch)  # fmt: skip
        self._handles = []
        for unit in self.units:
            self._handles.append(unit.module.register_forward_pre_hook(self._make_pre_hook(unit)))
            self._handles.append(unit.module.register_forward_hook(self._make_post_hook(unit), always_call=True))

    def _build_units(self, module: nn.Module, group_blocks: bool) -> list[_Unit]:
        block_of: dict[int, nn.Module] = {}
        if self.params and group_blocks:
            for block in _block_modules(module):
                for sub in block.modules():
                    block_of[id(sub)] = block
        units: dict[int, _Unit] = {}
        for tp in self.params:
            for mod, attr in tp.uses:
                home = block_of.get(id(mod), mod)
                unit = units.get(id(home))
                if unit is None:
                    unit = units[id(home)] = _Unit(home, [], [])
                index = next((i for i, t in enumerate(unit.tensors) if t.param is tp.param), None)
                if index is None:
                    index = len(unit.tensors)
                    unit.tensors.append(tp)
                unit.slots.append((mod, attr, index))
        blocks = {id(b) for b in set(block_of.values())}
        for unit in units.values():
            unit.param_ids = frozenset(id(tp.param) for tp in unit.tensors)
            unit.params = tuple(tp.param for tp in unit.tensors)
            unit.contains_block = any(id(sub) in blocks for sub in unit.module.modules())
        return list(units.values())

    def share_scratch(self, buffer: torch.Tensor) -> None:
        """Perturb units that run no block into ``buffer`` (flat uint8) when it is free and large enough.

        The offloader lends its block perturbation scratch: a unit outside the blocks (embeddings, head,
        final norm) never runs while a block does, and every use is on the compute stream, in order.
        """
        self.scratch.lend(buffer)

    def shared_bytes_wanted(self) -> int:
        """Bytes the largest unit outside the blocks needs in the multi-tensor scratch layout (0 if none)."""
        wanted = 0
        for unit in self.units:
            if unit.contains_block or not unit.tensors or not self.vocab.takes_whole(unit.module):
                continue
            wanted = max(
                wanted,
                sum(-(-tp.param.numel() // 64) * 64 * tp.param.element_size() for tp in unit.tensors),
            )
        return wanted

    # -- hooks -----------------------------------------------------------------------------------
    def _make_pre_hook(self, unit: _Unit) -> Callable:
        def pre_hook(mod: nn.Module, args: Any) -> None:
            active = self._active
            if active is None:
                return
            for owner, attr, i in unit.slots:
                if owner._parameters[attr] is not unit.tensors[i].param:
                    raise RuntimeError(
                        f"{type(owner).__name__}.{attr} is already perturbed: the module was re-entered "
                        "during its own forward, which zo2_ds does not support"
                    )
            step, index, scale = active
            pass_hash = self._pass_hash(step, index)
            values = self.vocab.perturb(mod, args, pass_hash, scale) if len(unit.tensors) == 1 else None
            if values is None:
                values = self._perturb_unit(unit, pass_hash, scale)
            for owner, attr, i in unit.slots:
                owner._parameters[attr] = values[i]
            self._perturbed_in_pass.update(unit.param_ids)

        return pre_hook

    def _make_post_hook(self, unit: _Unit) -> Callable:
        # Runs even when the forward raised (always_call=True), so a failure never leaves a
        # perturbed tensor in place of a parameter.
        def post_hook(mod: nn.Module, args: Any, output: Any) -> None:
            self.vocab.finish(mod, args, output)
            for owner, attr, i in unit.slots:
                owner._parameters[attr] = unit.tensors[i].param
            if unit.held is not None:
                self.scratch.give_back(unit.held)
                unit.held = None
            active = self._active
            if active is not None:
                done = self._units_done.get(active, 0) + 1
                self._units_done[active] = done
                if done == len(self.units):
                    self.scratch.release_memory()

        return post_hook

    # -- perturbation ----------------------------------------------------------------------------
    def _pass_hash(self, step: int, index: int) -> int:
        """z_pass_hash of (seed, step, index), computed once per pass rather than per tensor."""
        cached = self._pass_hash_cache
        if cached is None or cached[0] != (step, index):
            cached = self._pass_hash_cache = ((step, index), zo.z_pass_hash(self.config.seed, step, index))
        return cached[1]

    def _perturb_unit(self, unit: _Unit, pass_hash: int, scale: float) -> list[torch.Tensor]:
        table = self._unit_table(unit) if self.ops.multi_tensor else False
        if not table:  # the per-tensor path (torch on CPU), or tensors the multi-tensor kernels do not take
            seeds = [zo.z_seed_from_pass(pass_hash, tp.key) for tp in unit.tensors]
            return [
                self.ops.perturbed_into(torch.empty_like(tp.param), tp.param.data, seed, scale)
                for tp, seed in zip(unit.tensors, seeds)
            ]
        buf = None if unit.contains_block else self.scratch.take_lent(table.device, table.dtype, table.scratch_numel)
        if buf is None:
            buf = self.scratch.take(table.device, table.dtype, table.scratch_numel)
        if not self.ops.perturbed_into_multi(table, buf, pass_hash, scale):
            self.scratch.give_back(buf)
            unit.table = False
            return self._perturb_unit(unit, pass_hash, scale)
        unit.held = buf
        if unit.views[0] is not buf:
            unit.views = (buf, table.views(buf))
        return unit.views[1]

    def _unit_table(self, unit: _Unit) -> Any:
        """The unit's kernels.TensorTable (rebuilt if a tensor's storage moved), or False for the torch path."""
        table = unit.table
        if table is False:
            return False
        if table is not None and table.matches(unit.params):
            return table
        unit.table = self.ops.table([p.data for p in unit.params], [tp.key for tp in unit.tensors]) or False
        return unit.table

    # -- passes ----------------------------------------------------------------------------------
    def perturbed(self, step: int, index: int, sign: int) -> contextlib.AbstractContextManager:
        """Within this context, forwards of the module see theta + sign * eps * z(step, index)."""
        return self._in_pass(zo.pass_spec(step, index, sign, self.config.eps))

    @contextlib.contextmanager
    def _in_pass(self, spec: zo.PassSpec) -> Iterator[None]:
        self._perturbed_in_pass.clear()
        self.begin_passes()
        self.activate(spec)
        try:
            yield
        finally:
            self.activate(None)
        self._check_all_perturbed()

    def begin_passes(self) -> None:
        """Start counting finished units afresh (the offloader calls it before its interleaved passes)."""
        self._units_done.clear()

    def activate(self, spec: zo.PassSpec | None) -> None:
        """Forwards from now on see the perturbation ``spec`` = (step, index, scale) (None: unperturbed).

        The offloader calls it at each turn of its interleaved passes, so the parameters outside its blocks
        follow whichever pass runs."""
        self._active = spec

    def run(self, step: int, forward: Callable[[int], Any], next_step: int | None = None) -> list[tuple[Any, Any]]:
        """[(forward(2i) at theta + eps z_i, forward(2i + 1) at theta - eps z_i) for i in range(q)]
        (``next_step``: see :class:`zo2_ds.runner.ZORunner`; nothing to prefetch here)."""
        outputs = self.run_passes(step, forward, range(2 * self.config.num_perturbations), next_step)
        return list(zip(outputs[0::2], outputs[1::2]))

    def run_passes(
        self, step: int, forward: Callable[[int], Any], passes: Sequence[int], next_step: int | None = None
    ) -> list[Any]:
        """[forward(j) for j in ``passes``], pass j at theta + (-1)^j eps z_{j // 2} (a subset of the step's
        passes: ``zo2.perturbation_parallel``)."""
        specs = zo.pass_specs(step, self.config.num_perturbations, self.config.eps)
        outputs = []
        for j in passes:
            with self._in_pass(specs[j]):
                outputs.append(forward(j))
        return outputs

    def run_plain(self, forward: Callable[[], Any]) -> Any:
        """One unperturbed forward (eval mode)."""
        return forward()

    def update(self, step: int, coefs: Sequence[float], groups: Sequence[UpdateGroup]) -> None:
        """theta <- theta - lr * (sum_i coefs[i] z_i + wd * theta), once per distinct tensor."""
        hashes = [zo.z_pass_hash(self.config.seed, step, i) for i in range(len(coefs))]
        for group in groups:
            for params, table in self._group_tables(group.params):
                if table and self.ops.apply_update_multi_(table, hashes, coefs, group.lr, group.weight_decay):
                    continue
                for p in params:
                    key = self._key_of[id(p)]
                    seeds = [zo.z_seed_from_pass(h, key) for h in hashes]
                    wd = group.weight_decay if zo.uses_weight_decay(p) else 0.0
                    self.ops.apply_update_(p.data, seeds, coefs, group.lr, wd)

    def _group_tables(self, params: Sequence[nn.Parameter]) -> list[tuple[list[nn.Parameter], Any]]:
        """An update group split by (device, dtype), each part with its kernels.TensorTable (or False)."""
        cache_key = tuple(id(p) for p in params)
        parts = self._update_tables.get(cache_key)
        if parts is not None and all(not t or t.matches(ps) for ps, t in parts):
            return parts
        by_kind: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
        for p in params:
            by_kind.setdefault((p.device, p.dtype), []).append(p)
        parts = []
        for ps in by_kind.values():
            keys = [self._key_of[id(p)] for p in ps]
            decays = [zo.uses_weight_decay(p) for p in ps]
            parts.append((ps, self.ops.table([p.data for p in ps], keys, decays) or False))
        self._update_tables[cache_key] = parts
        return parts

    def flush(self) -> None:
        """Nothing is deferred when every parameter is resident."""

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.vocab.close()
        self.scratch.clear()
        self._update_tables.clear()
        for unit in self.units:
            unit.table, unit.views = None, (None, [])

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
