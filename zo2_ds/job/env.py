"""The process a job runs in: rendezvous defaults for a lone process and the CPU threads per rank.

The accelerator (``DS_ACCELERATOR``) and the CUDA allocator settings must be chosen before deepspeed
is imported, which importing zo2_ds does: the launch scripts do that themselves, first thing.
"""

from __future__ import annotations

import os

import torch

from zo2_ds.testing import free_port

__all__ = ["set_process_env"]


def set_process_env(local_rank: int | None) -> None:
    """One-process defaults for torch.distributed (any free port: only a lone process reaches that), and
    on the CPU one share of the cores per local rank. A launcher's (deepspeed, torchrun) values win."""
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", os.environ["WORLD_SIZE"])))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
