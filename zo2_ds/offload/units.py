"""What the offloader streams as one unit: a whole block, or one of its large sub-modules (``zo2.offload.granularity``).

With ``"block"`` each block is one unit: one upload, one slot of the ring, one perturbation scratch of
the whole block. With ``"layer"`` a block is split into its large sub-modules (OPT: the attention, fc1,
fc2; Llama: the attention, gate, up and down projections), each streamed as a unit of its own: the slots
and the perturbation scratch are then the size of the largest sub-module instead of the whole block, which
is what lets OPT-175B's 3.4 GiB blocks train in a few GiB of GPU memory. Nothing else changes: every unit
is still uploaded once per step, all 2q passes run on it while it is on the GPU (the passes take turns at
each unit instead of each block), and its update is applied lazily at its next upload.

The split (:func:`split_block`), for one block:

- the target size is 1.5 x the largest set of parameters one module owns directly (one linear layer's
  weight and bias); a module no larger than that is a unit, a larger one is split into its children;
- a module under 1/16 of the target (a layer norm) is not streamed: its parameters stay on the GPU, with
  the embeddings and the final norm, and are perturbed and updated there (a few hundred KB per block);
- the units must be called by the block's forward once each, in the order they are registered (the usual
  order of HF decoder layers); the passes check it and name ``granularity`` when it does not hold.

A block is not split when it yields fewer than two units, when a parameter is shared between units, or
when more than 1/8 of it would stay on the GPU. ``"auto"`` (the default) splits when what each rank uploads
of the largest block (all of it, or with partitioned masters its 1/N shard) is at least
:data:`AUTO_LAYER_BYTES` and ``cuda_graphs`` is off: below that a block's upload is short and the extra turns
between passes would cost more host time than the GPU memory saved is worth. (Two H200s, OPT-6.7B 1x2048
partitioned, 192 MiB per rank and block: whole blocks 149.9 ms a step against 161.7 in sub-modules in one
launch, 145.1 against 189.5 in another; the sub-modules' step waited on the host; launch/results.)

:func:`block_order` is the order of a block's parameters in its flat home buffer: the units' parameters
unit by unit, then the rest. Both granularities use it, so a block laid out once (as
:mod:`~zo2_ds.offload.materialize` does) is adopted as one home or as the homes of its units.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

__all__ = ["GRANULARITIES", "AUTO_LAYER_BYTES", "Split", "split_block", "block_order", "stream_units"]

GRANULARITIES = ("auto", "block", "layer")
AUTO_LAYER_BYTES = 256 * 1024**2
UNIT_SLACK = 1.5  # a module up to this many times the largest directly-owned parameters is one unit
SMALL_FRACTION = 16  # a module under target / this stays on the device
MAX_REST_FRACTION = 8  # a block leaving more than 1 / this of its bytes on the device is not split


@dataclass(frozen=True)
class Split:
    """One block's units (its sub-modules, in the order the forward calls them) and the parameters left on
    the device (``rest``)."""

    units: tuple[nn.Module, ...]
    rest: tuple[nn.Parameter, ...]


def _nbytes(params) -> int:
    seen: dict[int, nn.Parameter] = {}
    for p in params:
        seen.setdefault(id(p), p)
    return sum(p.numel() * p.element_size() for p in seen.values())


def _own(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module._parameters.values() if p is not None]


def split_block(block: nn.Module) -> Split | None:
    """``block`` split into units as described in the module docstring, or None when it does not split."""
    total = _nbytes(block.parameters())
    largest_own = max((_nbytes(_own(m)) for m in block.modules()), default=0)
    if total == 0 or largest_own == 0:
        return None
    target = UNIT_SLACK * largest_own
    units: list[nn.Module] = []
    rest: list[nn.Parameter] = []

    def visit(module: nn.Module) -> None:
        size = _nbytes(module.parameters())
        if size == 0:
            return
        if size <= target:
            if size * SMALL_FRACTION >= target:
                units.append(module)
            else:
                rest.extend(module.parameters())
            return
        rest.extend(_own(module))
        for child in module.children():
            visit(child)

    visit(block)
    owner: dict[int, int] = {}
    for u, unit in enumerate(units):
        for p in unit.parameters():
            if owner.setdefault(id(p), u) != u:
                return None
    if len(units) < 2 or any(id(p) in owner for p in rest) or _nbytes(rest) * MAX_REST_FRACTION > total:
        return None
    return Split(tuple(units), tuple({id(p): p for p in rest}.values()))


def block_order(block: nn.Module) -> list[nn.Parameter]:
    """``block``'s distinct parameters in the order of its flat home: the units' (of :func:`split_block`),
    unit by unit in ``parameters()`` order, then the rest; ``parameters()`` order when it does not split."""
    split = split_block(block)
    params = (
        block.parameters() if split is None else [p for u in split.units for p in u.parameters()] + list(split.rest)
    )
    return list({id(p): p for p in params}.values())


def stream_units(
    blocks: Sequence[nn.Module],
    granularity: str,
    *,
    cuda_graphs: bool = False,
    block_bytes: Sequence[int] = (),
    ranks_sharing: int = 1,
) -> tuple[str, list[nn.Module], list[int]]:
    """The resolved granularity (``"block"`` or ``"layer"``), the units in forward order, and the block of each.

    ``block_bytes``: each block's flat size and ``ranks_sharing``: how many ranks share the masters, each
    uploading 1/N of a unit (both for ``"auto"``). Raises ValueError naming
    ``zo2.offload.granularity`` for an unknown value, ``"layer"`` with ``cuda_graphs``, or ``"layer"`` for a
    model whose blocks do not split.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"zo2.offload.granularity={granularity!r}: expected one of {', '.join(GRANULARITIES)}")
    if granularity == "layer" and cuda_graphs:
        raise ValueError(
            'zo2.offload.granularity="layer" cannot be combined with cuda_graphs (graphs replay whole blocks); '
            'use "block" or turn cuda_graphs off'
        )
    if granularity == "block" or (
        granularity == "auto" and (cuda_graphs or max(block_bytes, default=0) / ranks_sharing < AUTO_LAYER_BYTES)
    ):
        return "block", list(blocks), list(range(len(blocks)))
    splits = [split_block(b) for b in blocks]
    if any(s is None for s in splits):
        if granularity == "auto":
            return "block", list(blocks), list(range(len(blocks)))
        name = type(blocks[splits.index(None)]).__name__
        raise ValueError(
            f'zo2.offload.granularity="layer": the blocks ({name}) do not split into at least two sub-modules that '
            'own their parameters alone; use "block"'
        )
    units = [u for s in splits for u in s.units]
    owners = [b for b, s in enumerate(splits) for _ in s.units]
    return "layer", units, owners
