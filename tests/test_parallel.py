"""Perturbation parallelism (``zo2.perturbation_parallel``): a step's passes spread over a group of ranks.

P ranks in one group follow one rank's trajectory bit for bit (losses, g, parameters); 2 x 2 ranks follow
2 data-parallel ranks; a group fed different micro-batches is refused; sizes that do not divide are refused
at initialize. Ranks are CPU processes over gloo, started as the launcher would (RANK, WORLD_SIZE, ...).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from zo2_ds.parallel import check_sizes, input_checksum
from zo2_ds.testing import free_port

pytestmark = pytest.mark.multiprocess

WORKER = r"""
import json, os, sys, torch
import zo2_ds
from zo2_ds.testing import ds_config, tiny_causal_lm

out, parallel, data_world, q, offload, arch, skew, extra = sys.argv[1:9]
parallel, data_world, q, extra = int(parallel), int(data_world), int(q), json.loads(extra)
rank = int(os.environ["RANK"])
config = ds_config(grad_accum=2, lr=5e-3, weight_decay=0.05,
                   zo2={"seed": 7, "num_perturbations": q, "perturbation_parallel": parallel,
                        "offload": json.loads(offload), **extra.get("zo2", {})})
model = tiny_causal_lm(arch, tied=extra.get("tied", True), layers=3, seed=rank)
engine, *_ = zo2_ds.initialize(model=model, config=config)
assert (getattr(engine.zo_runner, "head", None) is not None) == bool(json.loads(offload).get("stream_head"))
assert (engine.zo_data_rank, engine.zo_data_world_size) == (rank // parallel, data_world)
gen = torch.Generator().manual_seed(11)
data = [torch.randint(0, 96, (2 * data_world, 12), generator=gen) for _ in range(6)]
engine.train()
losses, gs = [], []
for k, ids in enumerate(data):
    shard = ids[engine.zo_data_rank * 2 : engine.zo_data_rank * 2 + 2].to(engine.device)
    if skew == "yes" and rank == 1:
        shard = shard.flip(0)
    out_ = engine(input_ids=shard, labels=shard)
    engine.backward(out_.loss)
    engine.step()
    losses.append(out_.loss.item())
    if k % 2:
        gs.append(engine.last_projected_grad)
# Through state_dict: partitioned masters (offload on several ranks, partition "auto") are whole only there.
params = {n: v.to("cpu", copy=True) for n, v in engine.module.state_dict().items()}
torch.save({"losses": losses, "gs": gs, "params": params}, os.path.join(out, f"rank{rank}.pt"))
"""


def run_ranks(
    tmp_path,
    name,
    world,
    parallel,
    *,
    q=1,
    offload=None,
    arch="opt",
    skew=False,
    expect_ok=True,
    accelerator="cpu",
    extra=None,
):
    """Start ``world`` ranks of WORKER; returns each rank's saved result (or the logs when not ``expect_ok``)."""
    import json

    out = tmp_path / name
    out.mkdir()
    port = str(free_port())
    data_world = world // parallel
    argv = [str(out), str(parallel), str(data_world), str(q), json.dumps(offload or {}), arch, "yes" if skew else "no",
            json.dumps(extra or {})]  # fmt: skip
    procs = []
    for rank in range(world):
        env = dict(os.environ, DS_ACCELERATOR=accelerator, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, GLOO_SOCKET_IFNAME="lo")  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, *argv],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = [p.communicate(timeout=300)[0] for p in procs]
    if not expect_ok:
        return logs
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


def assert_same_run(a, b):
    assert a["losses"] == b["losses"]
    assert a["gs"] == b["gs"]
    for name, value in a["params"].items():
        assert torch.equal(value, b["params"][name]), name


@pytest.mark.slow
@pytest.mark.parametrize(
    "q,offload,arch,extra",
    [
        (1, None, "opt", None),
        (2, {"enabled": True, "granularity": "layer"}, "llama", None),
        # the untied head streamed (zo2_ds/offload/head.py), with the masters partitioned over the two ranks
        (2, {"enabled": True, "stream_head": True}, "qwen2", {"tied": False, "zo2": {"vocab_chunks": True}}),
    ],
)
def test_a_group_of_two_ranks_follows_one_rank_bit_exactly(tmp_path, q, offload, arch, extra):
    one = run_ranks(tmp_path, "one", 1, 1, q=q, offload=offload, arch=arch, extra=extra)[0]
    two = run_ranks(tmp_path, "two", 2, 2, q=q, offload=offload, arch=arch, extra=extra)
    for rank in two:  # rank 1 started from another init: rank 0's weights were broadcast
        assert_same_run(one, rank)


@pytest.mark.slow
def test_two_groups_of_two_follow_two_data_parallel_ranks_bit_exactly(tmp_path):
    data_parallel = run_ranks(tmp_path, "dp", 2, 1, q=2)
    grid = run_ranks(tmp_path, "grid", 4, 2, q=2)
    assert data_parallel[0]["losses"] != data_parallel[1]["losses"]  # each its own shard ...
    assert data_parallel[0]["gs"] == data_parallel[1]["gs"]  # ... one g, one trajectory
    for rank, result in enumerate(grid):  # group k is data-parallel rank k
        assert_same_run(data_parallel[rank // 2], result)


@pytest.mark.slow
def test_a_group_fed_different_batches_is_refused(tmp_path):
    logs = run_ranks(tmp_path, "skew", 2, 2, skew=True, expect_ok=False)
    for log in logs:  # both ranks refuse, at the first step, before any update
        assert "perturbation_parallel=2: the ranks of a perturbation group" in log, log[-2000:]
        assert "were fed different micro-batches" in log and "engine.zo_data_rank (0 here)" in log


def test_sizes_that_do_not_divide_are_refused_naming_the_key():
    check_sizes(2, 4, 2)
    with pytest.raises(ValueError, match=r"perturbation_parallel=3 must divide the number of ranks \(4\)"):
        check_sizes(3, 4, 6)
    with pytest.raises(ValueError, match=r"perturbation_parallel=4 must divide .* 2 passes .*allowed here: 1, 2"):
        check_sizes(4, 4, 2)


def test_the_input_checksum_tells_batches_apart():
    ids = torch.arange(24).reshape(2, 12)
    assert input_checksum([ids, None, 3]) == input_checksum([ids.clone()])
    assert input_checksum([ids]) != input_checksum([ids.flip(0)])
    assert input_checksum([ids]) != input_checksum([ids + 1])


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize(
    "offload,arch,extra",
    [
        (None, "llama", None),
        ({"enabled": True, "granularity": "layer"}, "llama", None),
        ({"enabled": True, "stream_head": True}, "qwen2", {"tied": False, "zo2": {"vocab_chunks": True}}),
    ],
)
def test_cuda_a_group_of_two_gpus_follows_one_gpu_bit_exactly(tmp_path, offload, arch, extra):
    """The same over NCCL: each GPU runs half of the passes of one micro-batch (fp32, the same kernels)."""
    kw = dict(q=2, offload=offload, arch=arch, extra=extra, accelerator="cuda")
    one = run_ranks(tmp_path, "one", 1, 1, **kw)[0]
    two = run_ranks(tmp_path, "two", 2, 2, **kw)
    for rank in two:
        assert_same_run(one, rank)
