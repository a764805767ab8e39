"""Verified checkpoints: each kind of damage is refused before DeepSpeed reads anything, with an error that names
the file and what is wrong; rotation, pointers and the other Checkpointer rules."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from zo2_ds.checkpoint import Checkpointer, CheckpointError, RunDirectory

RUN_INFO = {"max_steps": 10}
WEIGHTS = "mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, new_engine, train_step) -> Path:
    """A run directory with checkpoint-1 and checkpoint-2 (latest; best at 1)."""
    path = tmp_path_factory.mktemp("saved") / "run"
    engine = new_engine()
    with RunDirectory(path) as run_dir:
        ckpt = Checkpointer(engine, run_dir, run_info=RUN_INFO)
        for best in (True, False):
            train_step(engine)
            ckpt.save({"step_note": engine.global_steps}, best=best)
    return path


@pytest.fixture
def run_copy(saved_run, tmp_path) -> Path:
    return Path(shutil.copytree(saved_run, tmp_path / "run"))


def resume(new_engine, path: Path, tag=None, run_info=RUN_INFO, **model_kw):
    engine = new_engine(seed=7, **model_kw)
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    with RunDirectory(path, resume=True) as run_dir:
        try:
            return Checkpointer(engine, run_dir, run_info=run_info).resume(tag), engine
        finally:
            # Whatever failed, it failed before DeepSpeed loaded a byte: the fresh model is untouched.
            if engine.global_steps == 0:
                for n, p in engine.module.named_parameters():
                    assert torch.equal(p, before[n]), n


def test_intact_checkpoint_resumes_with_its_client_state(new_engine, run_copy):
    state, engine = resume(new_engine, run_copy)
    assert state.step == 2 and engine.global_steps == 2 and state.checkpoint.name == "checkpoint-2"
    assert state.client_state["step_note"] == 2 and state.run_info == RUN_INFO
    state, engine = resume(new_engine, run_copy, tag="best")
    assert state.step == 1 and state.client_state["step_note"] == 1


def damage_truncate(path: Path) -> None:
    data = (path / "checkpoint-2" / WEIGHTS).read_bytes()
    (path / "checkpoint-2" / WEIGHTS).write_bytes(data[: len(data) // 2])


def damage_flip_bytes(path: Path) -> None:
    with open(path / "checkpoint-2" / WEIGHTS, "r+b") as f:
        f.seek(20_000)
        chunk = f.read(64)
        f.seek(20_000)
        f.write(bytes(b ^ 0xFF for b in chunk))


DAMAGE = {
    "truncated": (
        damage_truncate,
        rf"checkpoint-2/{WEIGHTS} is truncated: \d+ bytes, the manifest records \d+\. Other checkpoints there: "
        r"checkpoint-1 \(--checkpoint_tag\)",
    ),
    "bytes changed": (
        damage_flip_bytes,
        rf"checkpoint-2/{WEIGHTS} is damaged: its contents changed since it was saved",
    ),
    "file missing": (lambda p: (p / "checkpoint-2" / WEIGHTS).unlink(), rf"checkpoint-2/{WEIGHTS} is missing"),
    "manifest missing": (
        lambda p: (p / "checkpoint-2" / "manifest.json").unlink(),
        r"checkpoint-2/manifest.json is missing: checkpoint-2 is not a complete zo2_ds checkpoint",
    ),
    "manifest garbage": (
        lambda p: (p / "checkpoint-2" / "manifest.json").write_text('{"files": '),
        r"checkpoint-2/manifest.json is damaged: it does not read as JSON",
    ),
    "latest empty": (lambda p: (p / "latest").write_text(""), r"/latest is empty \(it should name a checkpoint folder"),
    "latest dangling": (
        lambda p: (p / "latest").write_text("checkpoint-9"),
        r"/latest names 'checkpoint-9', which is not in .* \(checkpoints there: checkpoint-1, checkpoint-2\)",
    ),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_checkpoint_is_refused_naming_the_file(new_engine, run_copy, kind):
    damage, message = DAMAGE[kind]
    damage(run_copy)
    with pytest.raises(CheckpointError, match=message):
        resume(new_engine, run_copy)


def test_checkpoint_of_another_model_is_refused(new_engine, run_copy):
    with pytest.raises(
        CheckpointError, match=r"is a checkpoint of another model .*embed_tokens.weight \[96, 16\] -> \[96, 32\]"
    ):
        resume(new_engine, run_copy, hidden=32)
    with pytest.raises(
        CheckpointError, match=r"another model .*the model has parameters the checkpoint lacks: .*layers\.2\."
    ):
        resume(new_engine, run_copy, layers=3)


def test_changed_run_info_is_refused_naming_the_key(new_engine, run_copy):
    with pytest.raises(ValueError, match=r"checkpoint-2 was saved by a run with max_steps=10 \(now 20\)"):
        resume(new_engine, run_copy, run_info={"max_steps": 20})


def test_unknown_tags_name_what_there_is(new_engine, run_copy):
    with pytest.raises(
        CheckpointError, match=r"checkpoint '7': no folder .*checkpoint-7 \(checkpoints there: checkpoint-1"
    ):
        resume(new_engine, run_copy, tag=7)
    (run_copy / "best").unlink()
    with pytest.raises(CheckpointError, match=r"/best does not exist: no best checkpoint was saved"):
        resume(new_engine, run_copy, tag="best")
