"""Data parallel: two ranks through the real `deepspeed` launcher on CPU (gloo).

Both ranks must hold identical parameters after every step, and match one rank that sees the full
global batch (to floating-point tolerance: the loss of a half batch averaged over ranks equals the
full-batch loss up to rounding).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zo2_ds.testing import free_port

WORKER = Path(__file__).parent / "workers" / "dp_worker.py"
sys.path.insert(0, str(WORKER.parent))


@pytest.mark.multiprocess
@pytest.mark.slow  # two processes over gloo: 15-40 s on 2 shared cores
def test_two_ranks_agree_and_match_one_rank_with_the_full_batch(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["DS_ACCELERATOR"] = "cpu"
    # `python -m deepspeed.launcher.runner` is the `deepspeed` command itself, without relying on PATH.
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        str(WORKER),
        "--out",
        str(tmp_path),
        "--steps",
        "3",
        "--global-batch",
        "4",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == 2
    assert r0["g"] == r1["g"]  # the all-reduced projected gradients
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), f"ranks disagree on {name}"

    # One process, full batch: the same trajectory up to rounding.
    import dp_worker

    single_dir = tmp_path / "single"
    single_dir.mkdir()
    sys_argv = sys.argv
    try:
        sys.argv = ["dp_worker.py", "--out", str(single_dir), "--steps", "3", "--global-batch", "4"]
        dp_worker.main()
    finally:
        sys.argv = sys_argv
    one = torch.load(single_dir / "rank0.pt")
    assert one["world"] == 1
    for g_dp, g_one in zip(r0["g"], one["g"]):
        assert g_dp == pytest.approx(g_one, rel=1e-2, abs=1e-2)
    for name, p in one["params"].items():
        torch.testing.assert_close(r0["params"][name], p, rtol=0, atol=2e-5, msg=lambda m, name=name: f"{name}: {m}")
