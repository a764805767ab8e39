"""Fixtures shared by the in-process checkpoint tests: a tiny ZO engine and one training step of it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import zo2_ds
from zo2_ds.testing import ds_config, tiny_causal_lm


def _new_engine(**model_kw: Any) -> Any:
    engine, *_ = zo2_ds.initialize(model=tiny_causal_lm("opt", **model_kw), config=ds_config(lr=1e-3))
    engine.train()
    return engine


def _train_step(engine: Any) -> None:
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(engine.global_steps))
    out = engine(input_ids=ids, labels=ids)
    engine.backward(out.loss)
    engine.step()


@pytest.fixture(scope="session")
def new_engine() -> Callable[..., Any]:
    """``new_engine(**tiny_causal_lm_kwargs)``: a ZO engine in train mode over a tiny OPT."""
    return _new_engine


@pytest.fixture(scope="session")
def train_step() -> Callable[[Any], None]:
    """``train_step(engine)``: one optimizer step on a batch that depends only on the step."""
    return _train_step
