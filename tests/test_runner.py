"""The engine-runner contract (zo2_ds.runner.ZORunner), as both runners keep it."""

from __future__ import annotations

import pytest
import torch

import zo2_ds
from zo2_ds.runner import ZORunner
from zo2_ds.testing import ds_config, tiny_causal_lm


@pytest.mark.parametrize("offload", [False, True])
def test_both_runners_keep_the_contract(offload):
    cfg = ds_config(zo2={"eps": 1e-3, "num_perturbations": 3, "offload": {"enabled": offload}})
    engine, *_ = zo2_ds.initialize(model=tiny_causal_lm("opt", layers=3), config=cfg)
    runner = engine.zo_runner
    assert isinstance(runner, ZORunner)
    ids = torch.randint(0, 64, (2, 8))
    model = engine.module
    model.eval()
    called = []

    def forward(j):
        called.append(j)
        with torch.no_grad():
            return model(input_ids=ids, labels=ids).loss

    pairs = runner.run(0, forward)
    assert sorted(called) == list(range(6))  # every pass index exactly once (interleaved when offloaded)
    assert len(pairs) == 3
    for plus, minus in pairs:  # each pass sees its own perturbation: + and - differ
        assert plus.item() != minus.item()
    with torch.no_grad():
        plain = runner.run_plain(lambda: model(input_ids=ids, labels=ids).loss)
    assert torch.isfinite(plain)
    runner.flush()
    engine.destroy()
