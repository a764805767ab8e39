"""Rotation and pointers, the non-finite guard, the graceful stop's signal handling, log continuation and
atomic JSON."""

from __future__ import annotations

import json
import os
import signal
from types import SimpleNamespace

import pytest
import torch

from zo2_ds.checkpoint import (
    Checkpointer,
    GracefulStop,
    NonFiniteError,
    NonFiniteGuard,
    RunDirectory,
    resume_command,
    truncate_jsonl,
    write_json_atomic,
)
from zo2_ds.figures import StepFigures


def listing(path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name != ".lock")


def test_rotation_keeps_the_newest_k_plus_the_best(tmp_path, new_engine, train_step):
    engine = new_engine()
    stages = []
    with RunDirectory(tmp_path) as run_dir:
        ckpt = Checkpointer(engine, run_dir, save_steps=1, save_total_limit=2, fault_hook=stages.append)
        for step in range(1, 6):
            train_step(engine)
            assert ckpt.due(engine.global_steps)
            ckpt.save(best=step == 2)
    assert listing(tmp_path) == ["best", "checkpoint-2", "checkpoint-4", "checkpoint-5", "latest"]
    assert (tmp_path / "latest").read_text() == "checkpoint-5" and (tmp_path / "best").read_text() == "checkpoint-2"
    assert stages.count("rotate") == 2  # checkpoint-1 and checkpoint-3 went; checkpoint-2 is the best
    plain = ["staging", "deepspeed", "hf_copy", "manifest", "publish", "latest"]
    assert stages[:15] == [*plain, "done", *plain, "best", "done"]  # saves of steps 1 and 2


def test_a_checkpoint_is_immutable_and_hf_copy_is_part_of_it(tmp_path, new_engine, train_step):
    engine = new_engine()

    def hf_save(folder: str) -> None:
        os.makedirs(os.path.join(folder, "model"))
        engine.module.save_pretrained(os.path.join(folder, "model"))

    with RunDirectory(tmp_path) as run_dir:
        ckpt = Checkpointer(engine, run_dir, hf_save=hf_save)
        train_step(engine)
        path = ckpt.save({"n": 1})
        manifest = json.loads((tmp_path / "checkpoint-1" / "manifest.json").read_text())
        assert any(name.startswith("model/") for name in manifest["files"])
        mtime = os.stat(os.path.join(path, "manifest.json")).st_mtime_ns
        assert ckpt.save({"n": 2}, best=True) == path  # the same step again: only the pointers move
        assert os.stat(os.path.join(path, "manifest.json")).st_mtime_ns == mtime
    assert (tmp_path / "best").read_text() == "checkpoint-1"


def test_resuming_an_older_checkpoint_drops_the_abandoned_newer_ones_at_the_first_save(
    tmp_path, new_engine, train_step
):
    engine = new_engine()
    with RunDirectory(tmp_path) as run_dir:
        ckpt = Checkpointer(engine, run_dir)
        for step in range(1, 5):
            train_step(engine)
            ckpt.save(best=step == 2)
    engine = new_engine()
    with RunDirectory(tmp_path, resume=True) as run_dir:
        ckpt = Checkpointer(engine, run_dir)
        assert ckpt.resume("checkpoint-1").step == 1
        assert listing(tmp_path)[:4] == ["best", "checkpoint-1", "checkpoint-2", "checkpoint-3"]
        train_step(engine)
        train_step(engine)
        ckpt.save()  # checkpoint-3 of this trajectory, not the old one
    assert listing(tmp_path) == ["checkpoint-1", "checkpoint-3", "latest"]  # the old best was abandoned too
    assert (tmp_path / "latest").read_text() == "checkpoint-3"


def test_due_and_limits_are_validated(tmp_path):
    with RunDirectory(tmp_path) as run_dir:
        ckpt = Checkpointer(SimpleNamespace(), run_dir, save_steps=3)
        assert [s for s in range(10) if ckpt.due(s)] == [3, 6, 9]
        assert not Checkpointer(SimpleNamespace(), run_dir).due(3)
        with pytest.raises(ValueError, match="--save_total_limit must be an integer >= 1"):
            Checkpointer(SimpleNamespace(), run_dir, save_total_limit=0)


def test_non_finite_guard_stops_a_run_whose_steps_are_all_skipped():
    guard = NonFiniteGuard(max_consecutive=3)
    read: list[StepFigures] = []  # the engine's figures as the host has read them
    engine = SimpleNamespace(
        zo_skipped_steps=0, zo_step_figures=lambda since, wait: [f for f in read if f.step > since]
    )  # fmt: skip
    for step, g in enumerate([[1.0], [float("nan")], [float("inf")], [0.5], [float("nan")], [float("nan")]], 1):
        read.append(StepFigures(step, 0.0, g, 0))
        guard.check(engine)
        guard.check(engine)  # twice at one step counts once
    read += [StepFigures(7, 0.0, [float("nan")], 0)]
    with pytest.raises(NonFiniteError, match=r"the last 3 steps \(5\.\.7\) were all skipped"):
        guard.check(engine)


def test_non_finite_guard_on_a_real_engine(new_engine, train_step):
    engine = new_engine()
    with torch.no_grad():  # bytes overwritten inside the weights: every loss is NaN, every step skipped
        engine.module.model.decoder.embed_tokens.weight[:, 0] = float("nan")
    guard = NonFiniteGuard(max_consecutive=2)
    with pytest.warns(UserWarning, match="non-finite"), pytest.raises(NonFiniteError, match="2 skipped in all"):
        for _ in range(2):
            train_step(engine)
            guard.check(engine)


def test_graceful_stop_sets_a_flag_and_a_second_ctrl_c_aborts(capsys):
    previous = signal.getsignal(signal.SIGINT)
    with GracefulStop() as stop:
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)  # a launcher's SIGTERM after the first signal does not abort
        assert "SIGTERM received (rank 0): finishing this step" in capsys.readouterr().err
        assert stop.message("python train.py --resume").endswith("to resume: python train.py --resume")
        assert "stopped by SIGTERM" in stop.message()
    assert signal.getsignal(signal.SIGINT) is previous
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # at once: the same Ctrl-C, passed on by a launcher (torchrun)
        assert stop.requested
    with GracefulStop(repeat_window_s=0.0) as stop, pytest.raises(KeyboardInterrupt, match="second Ctrl-C"):
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        os.kill(os.getpid(), signal.SIGINT)


def test_truncate_jsonl_drops_steps_after_the_resumed_one_and_a_torn_line(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2, "x": 1}\n{"note": "no step"}\n{"step": 3}\n{"step": 4}\n{"st')
    assert truncate_jsonl(log, 2) == 3
    assert log.read_text() == '{"step": 1}\n{"step": 2, "x": 1}\n{"note": "no step"}\n'
    assert truncate_jsonl(tmp_path / "missing.jsonl", 2) == 0


def test_write_json_atomic_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"acc": torch.tensor(0.5), "dir": tmp_path})
    assert json.loads(path.read_text()) == {"acc": 0.5, "dir": str(tmp_path)}
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text())["acc"] == 0.5 and listing(tmp_path) == ["metrics.json"]


def test_resume_command_adds_resume_and_drops_what_a_rerun_must_not_repeat():
    argv = ["launch/train.py", "--output_dir", "runs/a b", "--overwrite_output_dir", "--local_rank=0"]
    assert resume_command(argv) == "python launch/train.py --output_dir 'runs/a b' --resume"
    assert resume_command(["t.py", "--local_rank", "1", "--resume"]) == "python t.py --resume"
