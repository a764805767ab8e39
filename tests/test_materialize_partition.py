"""materialize with a partition: each of a node's ranks builds and pins only its shards, the engine adopts them,
and training equals a replicated engine on a normally built model bit for bit. CPU, gloo, 2 ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zo2_ds
from zo2_ds.testing import ds_config, run_ranks, tiny_causal_lm

VOCAB = 96
SEED = 5
# (architecture, granularity, source, resident blocks): a config (random init, every rank seeded alike) or a
# checkpoint folder. A resident block materialized as shards is gathered whole onto the device by the engine.
CASES = [
    ("opt", "block", "config", 0),
    ("opt", "block", "folder", 1),
    ("llama", "layer", "config", 1),
    ("llama", "layer", "folder", 0),
]
RSS_WORKER = Path(__file__).parent / "workers" / "materialize_rss_worker.py"


def _config(granularity: str, partition: str, resident: int = 0) -> dict:
    offload = {"enabled": True, "granularity": granularity, "write_back_interval": 2, "partition": partition}
    offload["num_resident_blocks"] = resident
    return ds_config(grad_accum=2, lr=5e-3, zo2={"eps": 1e-3, "seed": 7, "num_perturbations": 2, "offload": offload})


def _model(arch: str, source: str, folder: str, granularity: str, partitioned: bool, device: torch.device):
    """Partitioned: materialized with this rank's partition; else built the ordinary way (transformers). On an
    accelerator a config's blocks are initialized there (the reference materializes there too)."""
    from transformers import AutoModelForCausalLM

    from zo2_ds.config import parse_zo2_config
    from zo2_ds.offload.materialize import materialize
    from zo2_ds.offload.node import materialize_partition

    src = folder if source == "folder" else tiny_causal_lm(arch, layers=3).config
    torch.manual_seed(SEED)
    if not partitioned:
        if source == "folder":
            return AutoModelForCausalLM.from_pretrained(folder)
        return materialize(src, device=device, progress=False)
    cfg = parse_zo2_config(_config(granularity, "node")).offload
    partition = materialize_partition(cfg, device)
    assert partition is not None and partition.num_ranks == 2
    return materialize(src, device=device, progress=False, partition=partition, granularity=granularity)


def _train(arch: str, granularity: str, source: str, resident: int, folder: str, partitioned: bool) -> dict:
    """3 steps of q=2 with 2 micro-batches each, each rank on its part of the data; losses, g, the state."""
    from deepspeed.accelerator import get_accelerator

    import zo2_ds.offload.partition as partition_module

    device = torch.device(get_accelerator().current_device_name())
    model = _model(arch, source, folder, granularity, partitioned, device)
    copy_shard = partition_module.pinned_host_buffer
    partition_module.pinned_host_buffer = None  # the engine adopts every shard: it cuts none of its own
    try:
        config = _config(granularity, "node" if partitioned else "none", resident)
        engine, *_ = zo2_ds.initialize(model=model, config=config)
    finally:
        partition_module.pinned_host_buffer = copy_shard
    engine.train()
    store = engine.zo_offload_store
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    gen = torch.Generator().manual_seed(11)
    losses, gs = [], []
    for _ in range(3):
        for _ in range(2):
            ids = torch.randint(0, VOCAB, (2 * world, 12), generator=gen)[2 * rank : 2 * rank + 2].to(device)
            out = engine(input_ids=ids, labels=ids)
            engine.backward(out.loss)
            engine.step()
            losses.append(out.loss.item())
        gs.append(engine.last_projected_grad)
    engine.zo_runner.flush()
    state = {k: v.to("cpu", copy=True) for k, v in engine.module.state_dict().items()}
    pinned = sum(store.homes[b].numel() for b in store.streamed)
    resident = sorted(store.resident)
    return {
        "losses": losses,
        "gs": gs,
        "state": state,
        "pinned": pinned,
        "units": store.streamed_bytes(),
        "resident": resident,
    }


def _worker(out_dir: str, cases: list) -> None:
    from zo2_ds import hygiene

    hygiene.init_distributed()  # materialize_partition needs the ranks; train.py starts them the same way
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(int(os.environ["LOCAL_RANK"]))
    results = {}
    for case in cases:
        folder = os.path.join(out_dir, case[0])
        for partitioned in (False, True):
            results[(*case, partitioned)] = _train(*case, folder, partitioned)
    torch.save(results, os.path.join(out_dir, f"rank{os.environ['RANK']}.pt"))


def _offload_cfg(granularity: str):
    from zo2_ds.config import parse_zo2_config

    return parse_zo2_config(_config(granularity, "node")).offload


def test_a_rank_pins_only_its_shards_and_the_store_adopts_them(monkeypatch):
    """One process playing rank 1 of 2 (nothing is gathered while building): the blocks' parameters are
    placeholders, each shard holds this rank's bytes of the whole block, and build_store keeps the shards."""
    import zo2_ds.offload.partition as partition_module
    from zo2_ds.offload.materialize import materialize
    from zo2_ds.offload.partition import Partition, is_placeholder
    from zo2_ds.offload.store import block_layout, build_store

    config = tiny_causal_lm("llama", layers=3).config
    torch.manual_seed(SEED)
    whole = materialize(config, device="cpu", progress=False)
    partition = Partition(1, 2, None, 256)
    torch.manual_seed(SEED)
    model = materialize(config, device="cpu", progress=False, partition=partition, granularity="block")
    assert all(is_placeholder(p.data) for p in model.model.layers.parameters())
    assert not any(is_placeholder(p.data) for n, p in model.named_parameters() if ".layers." not in n)
    monkeypatch.setattr(partition_module, "pinned_host_buffer", None)  # a shard cut by the store would fail
    store = build_store(model, _offload_cfg("block"), torch.device("cpu"), partition=partition)
    for b, block in enumerate(whole.model.layers):
        layout, size = block_layout(block)
        shard = partition.shard_nbytes(size)
        assert store.homes[b].numel() == shard
        for p, offset, nbytes in layout:  # the bytes of each parameter in this rank's shard (not the padding)
            raw = p.data.reshape(-1).view(torch.uint8)
            start, end = max(offset, shard), min(offset + nbytes, 2 * shard)
            if start < end:
                assert torch.equal(store.homes[b][start - shard : end - shard], raw[start - offset : end - offset])


def test_shards_of_other_units_ranks_or_dtypes_are_refused_naming_the_key():
    from zo2_ds.config import parse_zo2_config
    from zo2_ds.offload.materialize import materialize
    from zo2_ds.offload.partition import Partition
    from zo2_ds.offload.store import build_store

    config = tiny_causal_lm("llama", layers=2).config
    cpu = torch.device("cpu")

    def build(granularity: str):
        return materialize(
            config, device="cpu", progress=False, partition=Partition(0, 2, None, 256), granularity=granularity
        )

    with pytest.raises(ValueError, match="partition.*granularity"):
        build_store(build("block"), _offload_cfg("layer"), cpu, partition=Partition(0, 2, None, 256))
    with pytest.raises(ValueError, match=r'partition="node": the model was materialized as rank 0 of 2.*rank 1 of 2'):
        build_store(build("block"), _offload_cfg("block"), cpu, partition=Partition(1, 2, None, 256))
    with pytest.raises(ValueError, match=r'partition="none": the model was materialized with a partition'):
        build_store(build("block"), parse_zo2_config(_config("block", "none")).offload, cpu)
    model = build("block")
    for p in model.model.layers.parameters():
        p.data = p.data.to(torch.bfloat16)  # as DeepSpeed casts a model of another dtype than its config's
    with pytest.raises(ValueError, match=r'partition="node": parameters of a materialized shard were replaced'):
        build_store(model, _offload_cfg("block"), cpu, partition=Partition(0, 2, None, 256))


def _check_trains_as_replicated(tmp_path, accelerator: str) -> None:
    for arch in ("opt", "llama"):
        tiny_causal_lm(arch, layers=3, seed=SEED).save_pretrained(tmp_path / arch, max_shard_size="20KB")
    code = (
        f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_materialize_partition as t; "
        f"t._worker({str(tmp_path)!r}, {CASES!r})"
    )
    run_ranks(code, 2, accelerator)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for case in CASES:
        for r, res in enumerate(ranks):
            ref, part = res[(*case, False)], res[(*case, True)]
            assert part["losses"] == ref["losses"] and part["gs"] == ref["gs"], (case, r)
            assert part["state"].keys() == ref["state"].keys(), (case, r)
            for name, value in ref["state"].items():
                assert torch.equal(part["state"][name], value), (case, r, name)
            assert ref["pinned"] == ref["units"] and part["pinned"] < ref["units"] / 2 + 256 * 12, (case, r)
            assert part["resident"] == ref["resident"] and bool(part["resident"]) == bool(case[3]), (case, r)


@pytest.mark.multiprocess
@pytest.mark.slow  # 2 ranks x 8 engines over gloo
def test_partitioned_materialize_trains_as_replicated_normal_load(tmp_path):
    _check_trains_as_replicated(tmp_path, "cpu")


@pytest.mark.cuda
@pytest.mark.multiprocess
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cuda_partitioned_materialize_trains_as_replicated_normal_load(tmp_path):
    """The same on 2 GPUs: a config's blocks initialized on each rank's GPU, the shards copied down from it."""
    _check_trains_as_replicated(tmp_path, "cuda")


def _rss_of_ranks(source: str, out_dir: Path) -> tuple[int, dict]:
    """Summed peak RSS growth of 2 partitioned ranks over materialize + initialize, and rank 0's figures."""
    code = (
        f"import sys, runpy; sys.argv = [{str(RSS_WORKER)!r}, '--ranks', {source!r}, {str(out_dir)!r}]; "
        f"runpy.run_path({str(RSS_WORKER)!r}, run_name='__main__')"
    )
    run_ranks(code, 2, "cpu")
    ranks = [json.loads((out_dir / f"rss{r}.json").read_text()) for r in range(2)]
    return sum(r["peak_bytes"] - r["baseline_bytes"] for r in ranks), ranks[0]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_partitioned_ranks_hold_one_copy_of_the_model_while_loading(tmp_path):
    """Summed over 2 ranks, the peak RSS growth of materialize + initialize of a ~350 MB fp32 model stays near
    one copy of it (each rank building the whole model first: about 2.1x). From safetensors each rank reads
    only its shards; from a config each also builds one block at a time in one buffer of its own."""
    subprocess.run([sys.executable, str(RSS_WORKER), "--save", str(tmp_path)], check=True, timeout=300)
    growth, rank0 = _rss_of_ranks(str(tmp_path), tmp_path)
    assert growth <= 1.15 * rank0["model_bytes"], (growth, rank0)
    growth, rank0 = _rss_of_ranks("config", tmp_path)
    assert growth <= 1.1 * rank0["model_bytes"] + 2 * rank0["block_bytes"], (growth, rank0)
