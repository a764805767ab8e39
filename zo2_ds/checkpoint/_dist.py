"""The few collectives the checkpoint library needs, on a CPU (gloo) group so none waits on a GPU.

With one process, or before ``torch.distributed`` is initialised, every function works locally.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

T = TypeVar("T")

_cpu_groups: dict[int, Any] = {}


def initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return tdist.get_world_size() if initialized() else 1


def require_initialized(what: str) -> None:
    """A launcher started several processes (WORLD_SIZE > 1): ``what`` needs torch.distributed up first."""
    if not initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError(
            f"{what} in a job of {os.environ['WORLD_SIZE']} processes needs torch.distributed initialised first "
            "(deepspeed.init_distributed() or zo2_ds.hygiene.init_distributed())"
        )


def cpu_group() -> Any:
    """A group over every rank whose collectives run on the CPU: the default group when it is gloo,
    else one gloo group made on first use (a collective call: every rank must reach it)."""
    if tdist.get_backend() == "gloo":
        return None
    key = id(tdist.distributed_c10d._get_default_group())
    if key not in _cpu_groups:
        _cpu_groups[key] = tdist.new_group(backend="gloo")
    return _cpu_groups[key]


def barrier() -> None:
    if world_size() > 1:
        tdist.barrier(group=cpu_group())


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (one all-reduce of one int)."""
    if world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)
    tdist.all_reduce(value, op=tdist.ReduceOp.MAX, group=cpu_group())
    return bool(value.item())


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` (a CPU tensor) summed over every rank, in place (one all-reduce on the CPU group: NCCL cannot
    reduce a host tensor)."""
    if world_size() > 1:
        tdist.all_reduce(values, group=cpu_group())
    return values


def on_rank0(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and give every rank its result, or raise its exception on every rank.

    Every rank must call it (it is a collective, and so also a barrier): the other ranks never wait forever
    on a rank 0 that failed.
    """
    if world_size() == 1:
        return fn()
    outcome: list[Any] = [None, None]
    if rank() == 0:
        try:
            outcome = [fn(), None]
        except Exception as exc:  # shared below, then raised on every rank
            outcome = [None, exc]
    tdist.broadcast_object_list(outcome, src=0, group=cpu_group())
    result, error = outcome
    if error is not None:
        raise error
    return result
