"""Finding the repeated blocks of a model: the unit the offloader streams through the GPU.

A block is one element of the model's ``nn.ModuleList`` of decoder layers (``model.decoder.layers`` in
OPT, ``transformer.h`` in GPT-2, ``model.layers`` in Llama / Qwen / Mistral). Everything else
(embeddings, final norm, head, rotary tables) is "resident": it stays on the device.

Discovery is generic, so no model's forward is rewritten: among all ``nn.ModuleList`` submodules whose
children are of one class, prefer those whose class the model lists in ``_no_split_modules`` (HF's own
name for "a decoder layer"), then take the one holding the most parameters. That also finds the blocks
of a model wrapped in a task module or a PEFT model, whatever the prefix. ``zo2.offload.blocks_attr``
overrides it with a dotted path.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["BlockList", "find_blocks"]

_KEY = "zo2.offload.blocks_attr"


@dataclass(frozen=True)
class BlockList:
    """The model's repeated blocks: the dotted path of their ModuleList (from the model) and the blocks."""

    path: str
    blocks: tuple[nn.Module, ...]


def find_blocks(model: nn.Module, blocks_attr: str | None = None) -> BlockList:
    """The repeated blocks of ``model``, found automatically or at ``blocks_attr``.

    Raises ValueError (naming ``zo2.offload.blocks_attr``) when there are none, when the path does not
    lead to a non-empty ModuleList, or when a block's parameter is shared with anything outside it.
    """
    if blocks_attr:
        try:
            found = model.get_submodule(blocks_attr)
        except AttributeError:
            raise ValueError(
                f"{_KEY}={blocks_attr!r}: {type(model).__name__} has no submodule at that path; candidates: "
                f"{_describe_candidates(model)}"
            ) from None
        if not isinstance(found, (nn.ModuleList, nn.Sequential)) or len(found) == 0:
            raise ValueError(
                f"{_KEY}={blocks_attr!r} is a {type(found).__name__}, not a non-empty nn.ModuleList of blocks"
            )
        result = BlockList(blocks_attr, tuple(found))
    else:
        candidates = _candidates(model)
        if not candidates:
            raise ValueError(
                f"zo2.offload: could not find the repeated blocks of {type(model).__name__} (no nn.ModuleList of "
                f"same-class modules holding parameters); set {_KEY} to the dotted path of its block list, "
                'e.g. "model.decoder.layers"'
            )
        no_split = _no_split_names(model)
        path, blocks = max(candidates, key=lambda c: (type(c[1][0]).__name__ in no_split, _numel(c[1])))
        result = BlockList(path, tuple(blocks))
    _check_not_shared(model, result)
    return result


def _candidates(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            kinds = {type(child) for child in mod}
            if len(kinds) == 1 and _numel(mod) > 0:
                out.append((name, mod))
    return out


def _describe_candidates(model: nn.Module) -> str:
    names = [f"{n} ({len(m)} x {type(m[0]).__name__})" for n, m in _candidates(model)]
    return ", ".join(names) if names else "none"


def _no_split_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for mod in model.modules():
        names.update(getattr(mod, "_no_split_modules", None) or ())
    return names


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _check_not_shared(model: nn.Module, found: BlockList) -> None:
    owner: dict[int, int] = {}
    for index, block in enumerate(found.blocks):
        for p in block.parameters():
            if owner.setdefault(id(p), index) != index:
                raise ValueError(
                    f"zo2.offload: blocks {owner[id(p)]} and {index} of {found.path} share a parameter; "
                    f"blocks that share weights cannot be streamed (set {_KEY} to another list)"
                )
    inside = {id(m) for block in found.blocks for m in block.modules()}
    for mod in model.modules():
        if id(mod) in inside:
            continue
        for attr, p in mod._parameters.items():
            if p is not None and id(p) in owner:
                raise ValueError(
                    f"zo2.offload: parameter {type(mod).__name__}.{attr} of block {owner[id(p)]} of {found.path} "
                    "is also used outside the blocks; it cannot be streamed"
                )
