"""Output directories: a previous run is never clobbered, a directory in use is refused, a killed job's lock is
not stuck, leftovers of an interrupted save are removed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from zo2_ds.checkpoint import CheckpointError, OutputDirInUseError, RunDirectory

REPO = Path(__file__).parents[2]
RUN_FILES = ("log.jsonl", "metrics.json", "model")


def previous_run(path: Path) -> None:
    (path / "checkpoint-40").mkdir(parents=True)
    (path / "latest").write_text("checkpoint-40")
    (path / "log.jsonl").write_text('{"step": 1}\n')
    (path / "notes.txt").write_text("the user's own file")


def test_a_directory_holding_a_previous_run_is_refused(tmp_path):
    previous_run(tmp_path)
    with pytest.raises(ValueError, match=r"holds a previous run \(checkpoint-40, latest, log.jsonl\).*--resume.*"):
        RunDirectory(tmp_path, run_files=RUN_FILES)
    with pytest.raises(ValueError, match="--overwrite_output_dir"):
        RunDirectory(tmp_path, run_files=RUN_FILES)
    assert (tmp_path / "checkpoint-40").is_dir() and (tmp_path / "log.jsonl").exists()  # nothing touched


def test_only_the_run_files_mark_a_previous_run(tmp_path):
    (tmp_path / "notes.txt").write_text("the user's own file")
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match=r"\(metrics.json\)"):
        RunDirectory(tmp_path, run_files=RUN_FILES)
    (tmp_path / "metrics.json").unlink()
    RunDirectory(tmp_path, run_files=RUN_FILES).close()  # an unrelated file is not a previous run


def test_overwrite_deletes_the_previous_run_only(tmp_path):
    previous_run(tmp_path)
    with RunDirectory(tmp_path, overwrite=True, run_files=RUN_FILES) as run_dir:
        assert run_dir.checkpoints() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "notes.txt"]


def test_resume_needs_a_checkpoint(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(CheckpointError, match=r"--resume: no checkpoint in .*stopped before its first checkpoint"):
        RunDirectory(tmp_path, resume=True, run_files=RUN_FILES)
    (tmp_path / "global_step6").mkdir()  # the layout of an older zo2_ds: DeepSpeed's own tags, no manifests
    (tmp_path / "latest").write_text("global_step6")
    with pytest.raises(CheckpointError, match=r"--resume: no checkpoint in .*'latest' there names .* older zo2_ds"):
        RunDirectory(tmp_path, resume=True, run_files=RUN_FILES)
    with pytest.raises(ValueError, match="--resume and --overwrite_output_dir exclude each other"):
        RunDirectory(tmp_path, resume=True, overwrite=True)


def test_leftovers_of_an_interrupted_save_are_removed(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / ".tmp-checkpoint-4").mkdir()
    (tmp_path / ".tmp-checkpoint-4" / "mp_rank_00_model_states.pt").write_bytes(b"half")
    (tmp_path / ".tmp-delete-checkpoint-1.77").mkdir()
    (tmp_path / ".tmp-latest.77").write_text("checkpoint-4")
    with RunDirectory(tmp_path, resume=True):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "checkpoint-2"]


HOLDER = textwrap.dedent(
    """
    import sys, time
    from zo2_ds.checkpoint import RunDirectory
    run_dir = RunDirectory(sys.argv[1])
    print("locked", flush=True)
    time.sleep(120)
    """
)


def test_a_second_job_is_refused_and_a_killed_jobs_lock_is_not_stuck(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirInUseError, match=rf"in use by another job \(pid {holder.pid} on .*choose another"):
            RunDirectory(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunDirectory(tmp_path):  # the kernel released the dead job's lock
        with pytest.raises(OutputDirInUseError):
            RunDirectory(tmp_path)  # ... and this process holds it now (another open file, another lock)
    RunDirectory(tmp_path).close()  # close() released it


def test_a_rank_of_a_multi_process_job_needs_torch_distributed_first(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    code = f"from zo2_ds.checkpoint import RunDirectory; RunDirectory({str(tmp_path)!r})"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "needs torch.distributed initialised first" in proc.stderr
    assert not (tmp_path / ".lock").exists()
