"""zo2_ds.hygiene: no /dev/shm/deepspeed_allreduce_buffer_* left by a finished, failed or killed run; start-up
noise filtered by exact text, real warnings kept."""

from __future__ import annotations

import glob
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zo2_ds import hygiene
from zo2_ds.testing import free_port

WORKER = Path(__file__).parent / "workers" / "shm_worker.py"
REPO = Path(__file__).parents[2]


def env_for(port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE")}
    env.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def shm_files(port: int) -> list[str]:
    return glob.glob(f"/dev/shm/{hygiene.SHM_BUFFER_PREFIX}_{os.getuid()}_127.0.0.1_{port}_*")


def one_rank(port: int, *args: str) -> subprocess.CompletedProcess:
    # LOCAL_SIZE equal to the world size is what makes DeepSpeed create its shm buffer (the launcher sets it).
    env = env_for(port, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
    return subprocess.run([sys.executable, str(WORKER), *args], env=env, capture_output=True, text=True, timeout=300)


def test_plain_deepspeed_leaks_the_shm_buffer_and_hygiene_does_not():
    port = free_port()
    try:
        plain = one_rank(port, "--plain")
        assert plain.returncode == 0, plain.stderr[-3000:]
        assert len(shm_files(port)) == 1, (
            "the control run should leak DeepSpeed's buffer (else this test tests nothing)"
        )
        assert "built successfully" in plain.stdout
    finally:
        for path in shm_files(port):
            os.unlink(path)
    for args in ((), ("--fail",)):  # a finished run; one that fails after init (a lone rank 0 does not fail)
        port = free_port()
        proc = one_rank(port, *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "sum 1 shm False" in proc.stdout and "built successfully" not in proc.stdout
        assert shm_files(port) == []


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "mode", ["finish", pytest.param("fail", marks=pytest.mark.slow), pytest.param("sigint", marks=pytest.mark.slow)]
)
def test_no_shm_buffer_left_through_the_deepspeed_launcher(mode):
    port = free_port()
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port)]
    cmd = [*launcher, str(WORKER), *{"finish": [], "fail": ["--fail"], "sigint": ["--hang"]}[mode]]
    # A session of its own, so that a Ctrl-C can reach the whole group, as a terminal's does.
    proc = subprocess.Popen(
        cmd, env=env_for(port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        if mode == "sigint":
            deadline = time.monotonic() + 120
            seen = ""
            while seen.count("sum 2 shm False") < 2 and time.monotonic() < deadline and proc.poll() is None:
                seen += proc.stdout.readline()
            assert seen.count("sum 2 shm False") == 2, seen[-3000:]
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the launcher and its ranks get SIGINT
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert (proc.returncode == 0) == (mode == "finish"), output[-3000:]
    assert mode == "sigint" or output.count("sum 2 shm False") == 2, output[-3000:]
    assert shm_files(port) == []


def test_startup_noise_is_dropped_and_real_warnings_kept():
    hygiene.silence_startup_noise()
    hygiene.silence_startup_noise()  # idempotent
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Keep()
    loggers = [logging.getLogger("DeepSpeed"), logging.getLogger("transformers.modeling_utils")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        ds, tf = loggers
        ds.warning("Attempting to get learning rate from scheduler before it has started")
        ds.warning("a real DeepSpeed warning")
        tf.warning("`loss_type=None` was set in the config but it is unrecognized. Using the default loss: `X`.")
        tf.warning("`loss_type=Bogus` was set in the config but it is unrecognized. Using the default loss: `X`.")
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert records == ["a real DeepSpeed warning", records[1]] and "Bogus" in records[1]


def test_quiet_stdout_drops_only_the_shm_line(capsys):
    with hygiene.quiet_stdout():
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("DeepSpeed something else built successfully")
        print("keep me", end="")
    assert capsys.readouterr().out == "DeepSpeed something else built successfully\nkeep me"
