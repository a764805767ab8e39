"""Test setup shared by every test module.

DeepSpeed on a CPU machine needs DS_ACCELERATOR=cpu and the five rendezvous variables before its first
import (otherwise init_distributed tries MPI). One process initialises torch.distributed once (gloo, world
size 1) and every engine in the session reuses it. MASTER_PORT is picked free so parallel runs don't clash.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RANK", "0")
os.environ.setdefault("LOCAL_RANK", "0")
os.environ.setdefault("WORLD_SIZE", "1")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
from zo2_ds.testing import free_port  # noqa: E402  (imports deepspeed: the variables above come first)

os.environ.setdefault("MASTER_PORT", str(free_port()))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
