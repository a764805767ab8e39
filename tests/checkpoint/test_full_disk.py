"""A full disk in the middle of a save: the error reaches the caller, the previous checkpoint stays complete
and verified, and the next start removes what the failed save left."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from zo2_ds.checkpoint import SAVE_STAGES, Checkpointer, RunDirectory

# Stages at which a write can fail for lack of space (the rest only move pointers or delete).
_WRITING_STAGES = ("deepspeed", "hf_copy", "manifest", "publish", "latest")


def _disk_full_at(stage: str):
    def hook(current: str) -> None:
        if current == stage:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return hook


@pytest.mark.parametrize("stage", _WRITING_STAGES)
def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, new_engine, train_step, stage):
    assert set(_WRITING_STAGES) <= set(SAVE_STAGES)
    engine = new_engine()
    with RunDirectory(tmp_path) as run_dir:
        train_step(engine)
        Checkpointer(engine, run_dir).save({"mark": "first"})
        saved = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        train_step(engine)
        failing = Checkpointer(engine, run_dir, fault_hook=_disk_full_at(stage))
        with pytest.raises(OSError) as raised:
            failing.save({"mark": "second"})
        assert raised.value.errno == errno.ENOSPC
    # What a user does next: start again with --resume. The failed save's leftovers go; the checkpoint
    # 'latest' names, the previous one, is found, verified and loaded (a newer folder published before the
    # pointer write failed is the same trajectory and is replaced by the next save).
    fresh = new_engine()
    with RunDirectory(tmp_path, resume=True) as run_dir:
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
        state = Checkpointer(fresh, run_dir).resume()
    assert state.step == 1
    assert state.client_state["mark"] == "first"
    for name, p in fresh.module.named_parameters():
        assert torch.equal(p, saved[name]), name
