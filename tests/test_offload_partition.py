"""zo2.offload.partition "node": the ranks of a node share one copy of the masters, one shard each.

Partitioned equals replicated bit-exactly (losses, g, the parameters after a flush), with resident units and
a narrower transfer_dtype too; each rank pins 1/N of the streamed units' bytes, and state_dict /
load_state_dict / checkpoints see whole tensors, so a run resumes on another number of ranks (1 -> 2 bit-exact
against the uninterrupted run, 2 -> 3 and 2 -> 1 from the weights saved). CPU, gloo, 1 to 3 ranks.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

import zo2_ds
from zo2_ds.config import parse_zo2_config
from zo2_ds.offload.partition import Partition
from zo2_ds.testing import ds_config, run_ranks, tiny_causal_lm

VOCAB = 96
# (architecture, granularity, variant): the variant's zo2.offload settings are added to the common ones.
CASES = [(arch, granularity, "") for arch in ("opt", "llama") for granularity in ("block", "layer")]
VARIANTS = {
    "": {},
    "resident": {"num_resident_blocks": 1},  # block 0 of 3 on the device
    "budget": {"max_gpu_memory": "block"},  # one block's bytes: one block, or one unit of each kind, resident
    "bf16": {"transfer_dtype": "bf16"},  # fp32 masters: bf16 copies cross the link between write-back steps
    "bf16_resident": {"transfer_dtype": "bf16", "num_resident_blocks": 1},
    "graphs": {"cuda_graphs": True},  # CUDA only (no effect on CPU): the hooks' gathers around graphed forwards
    "delayed": {},  # CUDA: compute, upload, gather and write-back each delayed in turn (a missing event wait shows)
    "collective": {"gather": "collective"},  # CUDA: NCCL's all-gather, not the copy engines "auto" picks there
}


def _variant(name: str, model) -> dict:
    """The zo2.offload settings of variant ``name`` for ``model`` ("block" stands for one block's bytes)."""
    from zo2_ds.models import find_blocks
    from zo2_ds.offload.store import block_nbytes

    block = block_nbytes(find_blocks(model).blocks[0])
    return {k: block if v == "block" else v for k, v in VARIANTS[name].items()}


def _engine(arch: str, granularity: str, partition: str, seed: int, variant: str = ""):
    model = tiny_causal_lm(arch, layers=3, seed=seed)
    offload = {"enabled": True, "granularity": granularity, "write_back_interval": 2, "partition": partition}
    offload.update(_variant(variant, model))
    zo2 = {"eps": 1e-3, "seed": 7, "num_perturbations": 2, "offload": offload}
    config = ds_config(grad_accum=2, lr=5e-3, zo2=zo2)
    engine, *_ = zo2_ds.initialize(model=model, config=config)
    engine.train()
    if variant == "delayed" and engine.device.type == "cuda":
        from test_offload import _delay_everything

        _delay_everything(engine, 2_000_000)
    return engine


def _steps(engine, gen: torch.Generator, num_steps: int, same_data: bool = False) -> tuple[list[float], list[float]]:
    """``num_steps`` steps of 2 micro-batches, each rank on its part of the data (``same_data``: every rank on
    the same micro-batches, whatever the number of ranks); losses and g."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if same_data:
        rank, world = 0, 1
    losses, gs = [], []
    for _ in range(num_steps):
        for _ in range(2):
            ids = torch.randint(0, VOCAB, (2 * world, 12), generator=gen)[2 * rank : 2 * rank + 2].to(engine.device)
            out = engine(input_ids=ids, labels=ids)
            engine.backward(out.loss)
            engine.step()
            losses.append(out.loss.item())
        gs.append(engine.last_projected_grad)
    return losses, gs


def _state(engine) -> dict[str, torch.Tensor]:
    engine.zo_runner.flush()
    return {k: v.clone() for k, v in engine.module.state_dict().items()}


def _train(arch: str, granularity: str, variant: str, partition: str) -> dict:
    """One rank: 3 steps of q=2 with 2 micro-batches each and write_back_interval 2; the ranks start from
    different inits (the broadcast from rank 0 must fix that)."""
    engine = _engine(arch, granularity, partition, seed=int(os.environ["RANK"]), variant=variant)
    store = engine.zo_offload_store
    losses, gs = _steps(engine, torch.Generator().manual_seed(11), 3)
    state = _state(engine)
    # load_state_dict keeps each rank's shard of what it is given: a changed state reads back whole.
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    engine.module.load_state_dict(changed)
    reloaded = _state(engine)
    engine.destroy()  # partitioned, the weights stay sharded: state_dict still gathers them
    destroyed = engine.module.state_dict()
    return {
        "losses": losses,
        "gs": gs,
        "state": state,
        "reload_ok": all(torch.equal(reloaded[k], v) for k, v in changed.items()),
        "destroy_ok": all(torch.equal(destroyed[k].cpu(), v.cpu()) for k, v in changed.items()),
        "pinned_bytes": sum(store.homes[b].numel() for b in store.streamed),
        "unit_bytes": sum(store.sizes[b] for b in store.streamed),
        "num_units": len(store.streamed),
        "num_resident": len(store.resident),
        "copy_engine": store.partition is not None and store.partition.copy_engine,
    }


def _resume(ckpt_dir: str, variant: str) -> dict[str, dict[str, torch.Tensor]]:
    """A partitioned run saved after 2 steps and continued for 1, against the same checkpoint loaded into a
    fresh partitioned engine and into a replicated one (a checkpoint holds whole tensors), each run 1 step."""
    engine = _engine("opt", "block", "node", seed=0, variant=variant)
    gen = torch.Generator().manual_seed(5)
    _steps(engine, gen, 2)
    with _placeholders_seen(engine) as seen:
        engine.save_checkpoint(ckpt_dir, tag="t")
    at_save = _state(engine)
    after_save = gen.get_state()
    out = {"at_save": at_save, "placeholders": seen}
    _steps(engine, gen, 1)
    out["uninterrupted"] = _state(engine)
    for partition in ("node", "none", "auto"):  # "auto", the default: "node" on a node of several ranks
        resumed = _engine("opt", "block", partition, seed=3, variant=variant)
        resumed.load_checkpoint(ckpt_dir, tag="t")
        _steps(resumed, torch.Generator().set_state(after_save), 1)
        out[partition] = _state(resumed)
        out[f"{partition}_partitioned"] = resumed.zo_offload_store.partition is not None
    return out


@contextlib.contextmanager
def _placeholders_seen(engine):
    """Within: the number of placeholders in each state_dict of the model taken (e.g. by save_checkpoint)."""
    from zo2_ds.offload.partition import is_placeholder

    seen: list[int] = []
    hook = engine.module.register_state_dict_post_hook(
        lambda module, state, prefix, meta: seen.append(sum(is_placeholder(v) for v in state.values()))
    )
    try:
        yield seen
    finally:
        hook.remove()


def _worker(out_dir: str, cases: list[tuple[str, str, str]], resume: str | None) -> None:
    results = {(*case, part): _train(*case, part) for case in cases for part in ("none", "node")}
    if resume is not None:
        results["resume"] = _resume(os.path.join(out_dir, "ckpt"), resume)
    torch.save(results, os.path.join(out_dir, f"rank{os.environ['RANK']}.pt"))


def _check_partitioned(tmp_path, accelerator: str, world_size: int = 2, cases=CASES, resume: str | None = "") -> None:
    """``cases`` trained partitioned and replicated on ``world_size`` ranks; with ``resume`` (a variant) also a
    save and load of that variant."""
    code = (
        f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_offload_partition; "
        f"test_offload_partition._worker({str(tmp_path)!r}, {cases!r}, {resume!r})"
    )
    run_ranks(code, world_size, accelerator)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    for arch, gran, variant in cases:
        for r, res in enumerate(ranks):
            rep, part = res[(arch, gran, variant, "none")], res[(arch, gran, variant, "node")]
            case = (arch, gran, variant, r)
            assert part["losses"] == rep["losses"] and part["gs"] == rep["gs"], case
            assert part["state"].keys() == rep["state"].keys(), case
            for name, value in rep["state"].items():
                assert torch.equal(part["state"][name], value), (case, name)
            assert part["reload_ok"] and rep["reload_ok"] and part["destroy_ok"] and rep["destroy_ok"], case
            # One copy per node: each of the N ranks pins 1/N of every unit's bytes (its shard rounded up to a
            # multiple of 256 bytes: less than 256 bytes more per unit).
            assert rep["pinned_bytes"] == rep["unit_bytes"], case
            share = rep["unit_bytes"] / world_size
            assert share <= part["pinned_bytes"] < share + 256 * part["num_units"], case
            resident = any(k in VARIANTS[variant] for k in ("num_resident_blocks", "max_gpu_memory"))
            assert part["num_resident"] == rep["num_resident"] and (part["num_resident"] > 0) == resident, case
        for r in range(1, world_size):
            key = (arch, gran, variant, "node")
            for name, value in ranks[0][key]["state"].items():
                assert torch.equal(ranks[r][key]["state"][name].cpu(), value.cpu()), (key, r, name)
    if resume is None:
        return
    # Only rank 0, the writer, keeps the gathered weights; its file holds them whole, as a replicated run's.
    saved = torch.load(tmp_path / "ckpt" / "t" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert saved.keys() == ranks[0]["resume"]["at_save"].keys()
    for name, value in ranks[0]["resume"]["at_save"].items():
        assert torch.equal(saved[name].cpu(), value.cpu()), name
    for r, res in enumerate(ranks):  # during the save: whole on rank 0, the other ranks' streamed units dropped
        seen = res["resume"]["placeholders"]
        assert len(seen) == 1 and (seen[0] == 0) == (r == 0), (r, seen)
    # save_checkpoint holds whole tensors: resumed partitioned or replicated, the run continues as it was.
    for r, res in enumerate(ranks):
        assert [res["resume"][f"{p}_partitioned"] for p in ("node", "none", "auto")] == [True, False, True], r
        for layout in ("node", "none", "auto"):
            for name, value in res["resume"]["uninterrupted"].items():
                assert torch.equal(res["resume"][layout][name], value), (r, layout, name)
    # ... and on another number of ranks: this process (one rank) loads the weights the 2 ranks saved.
    one = _engine("opt", "block", "node", seed=3, variant=resume)
    one.load_checkpoint(str(tmp_path / "ckpt"), tag="t")
    for name, value in _state(one).items():
        assert torch.equal(value.cpu(), ranks[0]["resume"]["at_save"][name].cpu()), name


def _save_worker(out_dir: str, case: tuple[str, str, str], same_data: bool) -> None:
    """2 steps, a checkpoint, 1 more step (partition "auto": "node" on several ranks, whole on one)."""
    arch, gran, variant = case
    engine = _engine(arch, gran, "auto", seed=0, variant=variant)
    gen = torch.Generator().manual_seed(5)
    _steps(engine, gen, 2, same_data)
    engine.save_checkpoint(os.path.join(out_dir, "ckpt"), tag="t")
    saved = {"at_save": _state(engine), "after_save": gen.get_state()}
    _steps(engine, gen, 1, same_data)
    saved["uninterrupted"] = _state(engine)
    torch.save(saved, os.path.join(out_dir, f"saved{os.environ['RANK']}.pt"))


def _load_worker(out_dir: str, case: tuple[str, str, str], same_data: bool) -> None:
    """The checkpoint of _save_worker (another number of ranks) loaded partitioned and replicated; each then
    runs the step the saving run ran after it."""
    arch, gran, variant = case
    after_save = torch.load(os.path.join(out_dir, "saved0.pt"))["after_save"]
    out = {}
    for partition in ("auto", "none"):
        engine = _engine(arch, gran, partition, seed=3, variant=variant)
        engine.load_checkpoint(os.path.join(out_dir, "ckpt"), tag="t")
        at_load = _state(engine)
        _steps(engine, torch.Generator().set_state(after_save), 1, same_data)
        partitioned = engine.zo_offload_store.partition is not None
        out[partition] = {"at_load": at_load, "after_step": _state(engine), "partitioned": partitioned}
    torch.save(out, os.path.join(out_dir, f"loaded{os.environ['RANK']}.pt"))


def _check_resume_on_other_ranks(tmp_path, saving: int, loading: int, case, same_data: bool) -> None:
    """A partitioned run saved on ``saving`` ranks resumes on ``loading``: every rank loads the weights saved,
    partitioned equals replicated after the next step, and with ``same_data`` (every rank fed the same
    micro-batches: g is then the same on any number of ranks) both equal the run that saved."""
    for name, world in (("_save_worker", saving), ("_load_worker", loading)):
        code = (
            f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_offload_partition; "
            f"test_offload_partition.{name}({str(tmp_path)!r}, {case!r}, {same_data})"
        )
        run_ranks(code, world, "cpu")
    saved = torch.load(tmp_path / "saved0.pt")
    for r in range(loading):
        loaded = torch.load(tmp_path / f"loaded{r}.pt")
        assert [loaded[p]["partitioned"] for p in ("auto", "none")] == [True, False], r
        for name, value in saved["at_save"].items():
            for p in ("auto", "none"):
                assert torch.equal(loaded[p]["at_load"][name], value), (r, p, name)
            assert torch.equal(loaded["auto"]["after_step"][name], loaded["none"]["after_step"][name]), (r, name)
            if same_data:
                assert torch.equal(loaded["auto"]["after_step"][name], saved["uninterrupted"][name]), (r, name)
        assert any(not torch.equal(loaded["auto"]["after_step"][k], v) for k, v in saved["at_save"].items()), r


@pytest.mark.multiprocess
@pytest.mark.slow
def test_saved_on_two_ranks_resumes_on_three(tmp_path):
    _check_resume_on_other_ranks(tmp_path, 2, 3, ("llama", "layer", "bf16"), same_data=False)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_saved_on_one_rank_resumes_on_two_as_the_uninterrupted_run(tmp_path):
    _check_resume_on_other_ranks(tmp_path, 1, 2, ("opt", "block", "resident"), same_data=True)


@pytest.mark.multiprocess
@pytest.mark.slow  # 2 ranks x 11 engines over gloo on 2 shared cores
def test_partitioned_equals_replicated_and_pins_one_shard_per_rank(tmp_path):
    _check_partitioned(tmp_path, "cpu")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_three_ranks_pad_their_shards_and_equal_replicated(tmp_path):
    _check_partitioned(
        tmp_path, "cpu", world_size=3, cases=[("opt", "layer", ""), ("llama", "block", "bf16")], resume=None
    )


@pytest.mark.multiprocess
@pytest.mark.slow
def test_resident_units_stay_whole_on_the_device_while_the_streamed_ones_are_partitioned(tmp_path):
    """Resident units need no host master: every rank keeps them whole on the device, the rest is sharded; a
    checkpoint holds both whole."""
    cases = [("opt", "block", "resident"), ("llama", "layer", "budget")]
    _check_partitioned(tmp_path, "cpu", cases=cases, resume="resident")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_narrow_copies_are_sharded_like_the_masters(tmp_path):
    """transfer_dtype bf16 for fp32 masters: each rank keeps its shard of the bf16 copy, uploads it and gathers
    the rest; equal to replicated with the same transfer_dtype, through a checkpoint too (3 ranks: above)."""
    cases = [("opt", "block", "bf16"), ("llama", "layer", "bf16_resident")]
    _check_partitioned(tmp_path, "cpu", cases=cases, resume="bf16_resident")


@pytest.mark.cuda
@pytest.mark.multiprocess
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cuda_partitioned_over_nccl(tmp_path):
    """The same on 2 GPUs: the shards are uploaded, and gathered on the gather stream, over the copy engines
    ("auto" on peer GPUs) and over NCCL ("collective"); with resident units, bf16 transfers, CUDA graphs and
    every stream delayed in turn too."""
    cases = [*CASES, ("opt", "block", "resident"), ("llama", "layer", "bf16_resident"), ("opt", "block", "graphs")]
    cases += [("opt", "layer", "delayed"), ("llama", "block", "delayed"), ("opt", "layer", "collective")]
    cases += [("llama", "block", "collective")]
    _check_partitioned(tmp_path, "cuda", cases=cases, resume="bf16_resident")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    peers = torch.cuda.can_device_access_peer(0, 1)
    for case in cases:  # the copy engines where "auto" may pick them (peer GPUs), NCCL where asked
        assert [res[(*case, "node")]["copy_engine"] for res in ranks] == [peers and case[2] != "collective"] * 2, case


def test_shards_cover_a_unit_once_at_aligned_offsets():
    size = 1000
    parts = [Partition(r, 3, None, 256) for r in range(3)]
    assert parts[0].shard_nbytes(size) == 512 and parts[0].padded_nbytes(size) == 1536
    src = torch.arange(300, dtype=torch.int32)  # 1200 bytes placed at byte 256 of a 1536-byte padded home
    whole = torch.zeros(1536, dtype=torch.uint8)
    for p in parts:
        shard = torch.zeros(p.shard_nbytes(size), dtype=torch.uint8)
        p.copy_own_part(shard, 256, src)
        p.own(whole, size).copy_(shard)
    assert torch.equal(whole[256:1456].view(torch.int32), src)
    assert not whole[:256].any() and not whole[1456:].any()


def test_partition_needs_offload_unless_auto():
    assert parse_zo2_config({"zo2": {"enabled": True}}).offload.partition == "auto"
    with pytest.raises(ValueError, match=r'zo2\.offload\.partition="node" needs zo2\.offload\.enabled'):
        parse_zo2_config({"zo2": {"enabled": True, "offload": {"partition": "node"}}})


def _place(monkeypatch, partition: str, enabled: bool, world: int, rank: int, gpus_per_node: int):
    """materialize_partition (the engine's resolution, without making groups) on a fake world of ``world``
    ranks with ``gpus_per_node`` accelerators per node."""
    import deepspeed.accelerator
    import torch.distributed as dist

    from zo2_ds.offload.node import materialize_partition

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)
    accelerator = type("Accelerator", (), {"device_count": lambda self: gpus_per_node})()
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: accelerator)
    cfg = parse_zo2_config({"zo2": {"offload": {"enabled": enabled, "partition": partition}}}).offload
    return materialize_partition(cfg, torch.device("cuda"))


def test_auto_partitions_a_node_of_several_ranks_and_falls_back_where_node_is_refused(monkeypatch, caplog):
    import zo2_ds.offload.node as partition

    monkeypatch.setattr(partition, "_WARNED", set())  # said once per process: maybe already, by another test
    part = _place(monkeypatch, "auto", True, world=4, rank=3, gpus_per_node=2)  # 2 nodes of 2
    assert (part.rank, part.num_ranks) == (1, 2)
    assert _place(monkeypatch, "auto", False, world=4, rank=3, gpus_per_node=2) is None  # offload off
    assert _place(monkeypatch, "none", True, world=4, rank=3, gpus_per_node=2) is None
    assert _place(monkeypatch, "auto", True, world=2, rank=1, gpus_per_node=1) is None  # nodes of one rank
    # 3 ranks on nodes of 2 GPUs: "node" is refused naming the key, "auto" replicates and says so once.
    with pytest.raises(ValueError, match=r'zo2\.offload\.partition="node": the world of 3 ranks is not whole'):
        _place(monkeypatch, "node", True, world=3, rank=0, gpus_per_node=2)
    with caplog.at_level("WARNING", logger="zo2_ds.offload.node"):
        for rank in (1, 0, 0):  # said by rank 0 alone, once
            assert _place(monkeypatch, "auto", True, world=3, rank=rank, gpus_per_node=2) is None
    warned = [r.getMessage() for r in caplog.records if "replicated masters" in r.getMessage()]
    assert len(warned) == 1 and "not whole nodes of 2 ranks" in warned[0], warned


@pytest.mark.parametrize("partition", ["node", "auto"])
def test_partition_on_one_rank_is_replicated(partition):
    """A node of one rank has nothing to share: the masters are whole, as with "none"."""
    cfg = ds_config(zo2={"offload": {"enabled": True, "partition": partition}})
    engine, *_ = zo2_ds.initialize(model=tiny_causal_lm("opt"), config=cfg)
    store = engine.zo_offload_store
    assert store.partition is None
    assert [h.numel() for h in store.homes] == store.sizes


def test_copy_engine_gather_is_refused_where_it_cannot_run_and_auto_falls_back():
    from zo2_ds.offload.node import _copy_engine

    cpu = torch.device("cpu")
    cfg = parse_zo2_config({"zo2": {"enabled": True, "offload": {"enabled": True, "gather": "copy_engine"}}}).offload
    with pytest.raises(ValueError, match=r'zo2\.offload\.gather="copy_engine": the device is cpu, not cuda'):
        _copy_engine(cfg, cpu, group=None)
    for gather in ("auto", "collective"):
        cfg = parse_zo2_config({"zo2": {"enabled": True, "offload": {"enabled": True, "gather": gather}}}).offload
        assert _copy_engine(cfg, cpu, group=None) is False
    with pytest.raises(ValueError, match=r"zo2\.offload\.gather"):
        parse_zo2_config({"zo2": {"enabled": True, "offload": {"enabled": True, "gather": "nvlink"}}})


def test_a_failed_rendezvous_is_a_reason_not_an_error():
    from zo2_ds.offload.peer import copy_engine_unavailable, rendezvous_fails

    assert copy_engine_unavailable(torch.device("cpu"), None) == "the device is cpu, not cuda"
    reason = rendezvous_fails(torch.device("cpu"), None)  # no symmetric memory on a CPU tensor
    assert reason is not None and reason.startswith("symmetric memory failed here (")
