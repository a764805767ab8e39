"""The hooks the offloader puts on the model: each unit's forward hooks (acquire at the pre-hook, release at
the post-hook), and the state_dict hooks that keep the host masters exact.

Reading or writing the blocks' weights through a state_dict (save_pretrained, torch.save of a state_dict,
load_state_dict) flushes the pending updates first, from the model or any module on the way to a block or
unit. Loading a unit's weights remakes its transfer_dtype copy; with partitioned masters
(:mod:`~zo2_ds.offload.partition`) a state_dict gathers the whole unit and a load keeps this rank's shard.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from zo2_ds.offload.partition import install_state_hooks
from zo2_ds.offload.store import BlockStore

__all__ = ["install"]


def install(
    model: torch.nn.Module,
    store: BlockStore,
    *,
    enter: Callable[..., None],
    leave: Callable[..., None],
    flush: Callable[[], None],
    masters_changed: Callable[[list[int]], None],
    at_home: Callable[[int], bool],
) -> list[Any]:
    """Install the hooks; ``enter(b, module, args)`` / ``leave(b, module, args, output)`` run at unit b's
    forward pre- / post-hook (always, even when the forward raises), ``flush()`` before any state_dict or
    load, ``masters_changed([b])`` after unit b's weights were loaded (narrow copies of replicated masters
    only), ``at_home(b)``: unit b's parameters point at their home (not at a device copy). Returns the
    handles to remove when the runner closes."""
    handles = []
    for b, unit in enumerate(store.units):
        handles.append(unit.register_forward_pre_hook(functools.partial(enter, b)))
        handles.append(unit.register_forward_hook(functools.partial(leave, b), always_call=True))
    # Partitioned, the state hooks remake the narrow copies from the whole unit a load writes (see below).
    for b in store.streamed if store.narrow is not None and store.partition is None else ():
        handles.append(store.units[b].register_load_state_dict_post_hook(lambda *_, b=b: masters_changed([b])))
    path = store.blocks.path.split(".") if store.blocks.path else []
    holders = [model] + [model.get_submodule(".".join(path[: i + 1])) for i in range(len(path))]
    holders.extend(store.blocks.blocks)
    holders.extend(store.units)
    for mod in {id(m): m for m in holders}.values():
        handles.append(mod.register_state_dict_pre_hook(lambda *_: flush()))
        handles.append(mod.register_load_state_dict_pre_hook(lambda *_: flush()))
    if store.partition is not None:  # after the flushes: the masters are whole only on demand
        # Not among the handles: a partitioned model's weights are whole only through these hooks, so they
        # stay when the runner closes (engine.destroy), for the model's life.
        install_state_hooks(store, at_home)
    return handles
