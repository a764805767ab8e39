"""The benchmark helpers (zo2_ds/bench) and the launch/bench_*.py entry points, at tiny size on the CPU.

The figures themselves need a GPU; here: the model builder (shapes, tying, determinism), the byte
accounting behind the transfer floor, the config and switch handling, the records each mode writes, the
A/B overlay and ratio table, and every entry point's --tiny run end to end.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zo2_ds.bench import SHAPES, build_model, driver, make_batch, measure, offload, report, step
from zo2_ds.bench.models import block_list, parameter_bytes

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
RUN = driver.Settings("fp32", {"zo2": {}, "offload": {}, "route": "default", "env": {}}, warmup=1, steps=2, device=CPU)


def _load_launch(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_script(args: list[str], tmp_path: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", OUT=str(tmp_path))
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_build_model_ties_the_head_where_the_real_model_does():
    opt = build_model("tiny", CPU, torch.float32)
    assert opt.lm_head.weight.data_ptr() == opt.get_input_embeddings().weight.data_ptr()
    llama = build_model("tiny-llama", CPU, torch.float32)
    assert llama.lm_head.weight.data_ptr() != llama.get_input_embeddings().weight.data_ptr()
    assert len(block_list(opt)) == SHAPES["tiny"].num_layers and len(block_list(llama)) == 4
    # A tied tensor counts once.
    assert parameter_bytes(opt) == 4 * sum(p.numel() for p in opt.parameters())


def test_build_model_is_deterministic_in_the_requested_dtype():
    a, b = build_model("tiny", CPU, torch.bfloat16), build_model("tiny", CPU, torch.bfloat16)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert pa.dtype == torch.bfloat16 and torch.equal(pa, pb), name
    norm = block_list(a)[0].final_layer_norm
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    assert not a.config.use_cache and a.config.dropout == 0.0


def test_build_model_and_batches_reject_unknown_names_and_lengths():
    with pytest.raises(ValueError, match="model: 'opt-7b'"):
        build_model("opt-7b", CPU)
    batch = make_batch("tiny", 2, 16, CPU)
    assert batch["input_ids"].shape == (2, 16) and torch.equal(batch["labels"], batch["input_ids"])
    assert torch.equal(make_batch("tiny", 2, 16, CPU)["input_ids"], batch["input_ids"])
    with pytest.raises(ValueError, match="seq_len: 4096"):
        make_batch("tiny", 1, 4096, CPU)


def test_parsers_name_the_argument():
    assert report.parse_batches("1x2048,16X256") == [(1, 2048), (16, 256)]
    with pytest.raises(ValueError, match="--batches: '16-256'"):
        report.parse_batches("16-256")
    with pytest.raises(ValueError, match="--models"):
        report.parse_names("tiny,opt-7b", SHAPES, "--models")


def test_streamed_bytes_count_resident_blocks_and_narrow_copies():
    model = build_model("tiny", CPU, torch.float32)
    numel = sum(p.numel() for p in block_list(model)[0].parameters())
    assert offload.streamed_bytes_per_step(model, {"enabled": True}, 4) == 4 * numel * 4
    assert offload.streamed_bytes_per_step(model, {"num_resident_blocks": 1}, 4) == 3 * numel * 4
    # bf16 copies of fp32 masters, interval 4: the exact master one step in four, the copy at the others.
    assert offload.streamed_bytes_per_step(model, {"transfer_dtype": "bf16"}, 4) == 4 * numel * (4 + 3 * 2) / 4
    half = build_model("tiny", CPU, torch.float16)
    assert offload.streamed_bytes_per_step(half, {"transfer_dtype": "bf16"}, 4) == 4 * numel * 2


def test_every_variant_once_per_async_step_value():
    base = offload.offload_variants(partitioned=True, perturbation_parallel=2, replicated=False)
    both = offload.per_async_step(base, ("false", "auto"))
    assert [m for m, _, _ in both] == ["offload_partitioned_sync", "offload_pp2_sync", "offload_partitioned",
                                       "offload_pp2"]  # fmt: skip
    assert both[1][2] == {"perturbation_parallel": 2, "async_step": False}
    assert both[3][2] == {"perturbation_parallel": 2}  # "auto": the config field left out
    assert [m for m, _, z in offload.per_async_step(base[:1], ("true",)) if z == {"async_step": True}] == [
        "offload_partitioned_async"
    ]


def test_offload_variants_and_engine_config():
    variants = offload.offload_variants(
        transfer_dtypes=("auto", "bf16"), cuda_graphs=True, resident_blocks=2, partitioned=True,
        perturbation_parallel=2,
    )  # fmt: skip
    assert [m for m, _, _ in variants] == [
        "offload",
        "offload_xfer_bf16",
        "offload_graphs",
        "offload_resident2",
        "offload_partitioned",
        "offload_partitioned_graphs",
        "offload_pp2",
    ]
    assert variants[3][1:] == ({"enabled": True, "partition": "none", "num_resident_blocks": 2}, {})
    assert variants[4][1:] == ({"enabled": True, "partition": "node"}, {})
    assert variants[5][1:] == ({"enabled": True, "partition": "node", "cuda_graphs": True}, {})
    assert variants[6][1:] == ({"enabled": True, "partition": "node"}, {"perturbation_parallel": 2})
    assert offload.offload_variants(prefetch_depth=0)[0][1] == {
        "enabled": True,
        "partition": "none",
        "prefetch_depth": 0,
        "transfer_dtype": "auto",
    }
    gathers = offload.offload_variants(partitioned=True, replicated=False, gathers=("auto", "collective"))
    assert [(m, o) for m, o, _ in gathers] == [
        ("offload_partitioned", {"enabled": True, "partition": "node"}),
        ("offload_partitioned_collective", {"enabled": True, "partition": "node", "gather": "collective"}),
    ]
    units = offload.offload_variants(partitioned=True, replicated=False, granularities=("auto", "block"))
    assert [(m, o) for m, o, _ in units] == [
        ("offload_partitioned", {"enabled": True, "partition": "node"}),
        ("offload_partitioned_block", {"enabled": True, "partition": "node", "granularity": "block"}),
    ]
    pp = offload.offload_variants(replicated=False, perturbation_parallel=2, granularities=("auto", "block"))
    assert [(m, o, z) for m, o, z in pp] == [
        ("offload_pp2", {"enabled": True, "partition": "node"}, {"perturbation_parallel": 2}),
        (
            "offload_pp2_block",
            {"enabled": True, "partition": "node", "granularity": "block"},
            {"perturbation_parallel": 2},
        ),
    ]
    config = driver.engine_config(16, "fp16", offload=variants[0][1])
    assert config["zo2"]["offload"]["enabled"] and config["fp16"]["enabled"]
    assert "offload" not in driver.engine_config(1, "fp32")["zo2"]
    with pytest.raises(ValueError, match="dtype: 'int8'"):
        driver.engine_config(1, "int8")


def test_switches_default_needs_no_restart_and_bad_choices_fail():
    switches = driver.resolve_switches()
    assert switches["env"] == {} and switches["route"] in ("default", "config")
    assert not driver.config_accepts({"no_such_key": 1})
    with pytest.raises(ValueError, match="kernels: 'fast'"):
        driver.resolve_switches(kernels="fast")
    assert driver.resolve_switches(vocab_chunks=False)["zo2"]["vocab_chunks"] is False
    with pytest.raises(ValueError, match="vocab_chunks"):
        driver.resolve_switches(vocab_chunks="sometimes")


def test_step_records_measure_every_mode_against_two_forwards():
    records = step.step_records("tiny", [(2, 16)], list(step.STEP_MODES), RUN, log=lambda rec: None)
    step.add_ratios(records)
    assert [r["mode"] for r in records] == ["forward", "mezo_ref", "zo"]
    for rec in records:
        assert "error" not in rec, rec.get("traceback")
        assert rec["steps"] == 2 and len(rec["step_ms_all"]) == 2 and rec["median_ms"] > 0
        assert rec["time_vs_forward"] == rec["median_ms"] / records[0]["median_ms"]


def test_offload_records_carry_floors_ratios_and_host_memory():
    variants = offload.offload_variants(resident_blocks=2, partitioned=True)
    records = offload.offload_records(
        "tiny", [(2, 16)], variants, RUN, bandwidth={"h2d_gbps": 50.0}, log=lambda r: None
    )
    assert [r["mode"] for r in records] == ["in_gpu", "offload", "offload_resident2", "offload_partitioned"]
    in_gpu, streamed, half, partitioned = records
    # One rank: nothing to share, the partitioned masters are whole (the link carries all of every block).
    assert partitioned["ranks_sharing_masters"] == 1
    assert partitioned["streamed_bytes"] == streamed["streamed_bytes"]
    assert in_gpu["ratio_to_two_forwards"] == in_gpu["median_ms"] / in_gpu["two_forwards_ms"]
    assert streamed["ratio_to_in_gpu"] == streamed["median_ms"] / in_gpu["median_ms"]
    assert streamed["transfer_floor_ms"] == streamed["streamed_bytes"] / 50e9 * 1e3
    assert streamed["floor_ms"] == max(streamed["two_forwards_ms"], streamed["transfer_floor_ms"])
    assert half["streamed_bytes"] == streamed["streamed_bytes"] / 2
    assert streamed["host_rss_bytes"] > 0 and streamed["host_rss_over_model"] > 0
    assert streamed.get("write_back_interval", 1) == 1  # "auto" on the CPU, where the installed offloader says


def test_measure_helpers_on_the_cpu():
    calls = []
    times = measure.time_calls(lambda: calls.append(1), warmup=2, steps=3)
    assert len(calls) == 5 and len(times) == 3
    summary = measure.summarize([3.0, 1.0, 2.0], warmup=2)
    assert (summary["median_ms"], summary["min_ms"], summary["max_ms"]) == (2.0, 1.0, 3.0)
    assert measure.device_memory() == {} and measure.link_bandwidth() == {}
    assert measure.host_rss_bytes()["host_rss_peak_bytes"] > 0


def test_write_json_and_table(tmp_path):
    report.write_json(tmp_path / "a" / "r.json", {"x": 1.5})
    assert json.loads((tmp_path / "a" / "r.json").read_text()) == {"x": 1.5}
    assert not list((tmp_path / "a").glob("*.partial"))
    table = report.format_table([{"m": "tiny", "b": 3 * 2**30}, {"m": "x"}], "m b:gib")
    assert table.splitlines()[2:] == ["tiny | 3.00", "x | -"]


def test_ab_overlay_child_path_and_ratios(tmp_path):
    ab = _load_launch("bench_ab")
    tree = tmp_path / "old"
    (tree / "zo2_ds" / "bench").mkdir(parents=True)
    (tree / "zo2_ds" / "__init__.py").write_text("")
    root = ab.overlay(tree, tmp_path / "stage")
    root = ab.overlay(tree, tmp_path / "stage")  # again: replaces the links
    assert (root / "zo2_ds" / "__init__.py").resolve() == (tree / "zo2_ds" / "__init__.py").resolve()
    assert (root / "zo2_ds" / "bench").resolve() == (REPO / "zo2_ds" / "bench").resolve()
    os.environ["PYTHONPATH"], saved = f"/tmp/site{os.pathsep}{REPO}", os.environ.get("PYTHONPATH")
    try:
        assert ab.child_env(root)["PYTHONPATH"] == f"{root}{os.pathsep}/tmp/site"
    finally:
        os.environ.pop("PYTHONPATH") if saved is None else os.environ.__setitem__("PYTHONPATH", saved)

    def run(label, ms):
        return {"label": label, "records": [{"model": "m", "batch": "1x8", "mode": "offload", "median_ms": ms}]}

    rows = ab.ratio_rows([run("A1", 100.0), run("B1", 99.0), run("A2", 102.0), run("B2", 103.0)])
    assert rows == [{"model": "m", "batch": "1x8", "mode": "offload", "a_ms": [100.0, 102.0], "b_ms": [99.0, 103.0],
                     "b_over_a": 1.0}]  # fmt: skip


def test_bench_step_script_tiny_with_a_kernel_switch(tmp_path):
    args = ["launch/bench_step.py", "--tiny", "--modes", "forward,zo", "--kernels", "per_tensor"]
    proc = _run_script([*args, "--out", str(tmp_path / "step.json")], tmp_path)
    result = json.loads((tmp_path / "step.json").read_text())
    assert [r["mode"] for r in result["records"]] == ["forward", "zo"]
    # A config field where this checkout's config has it, else the variable older checkouts read (a restart).
    switches = result["switches"]
    assert switches["zo2"] == {"kernels": "per_tensor"} or switches["env"] == {"ZO2_DS_MULTI_TENSOR": "0"}
    assert result["env"]["zo2_ds_path"] == str(REPO / "zo2_ds") and "tiny | 2x32 | zo |" in proc.stdout


def test_bench_offload_script_tiny(tmp_path):
    proc = _run_script(["launch/bench_offload.py", "--tiny", "--out", str(tmp_path / "off.json")], tmp_path)
    result = json.loads((tmp_path / "off.json").read_text())
    assert [r["mode"] for r in result["records"]] == ["in_gpu", "offload"]
    assert "tiny | 2x16 | offload |" in proc.stdout


@pytest.mark.slow
def test_bench_tasks_script_tiny(tmp_path):
    proc = _run_script(["launch/bench_tasks.py", "--tiny", "--steps", "3", "--out", str(tmp_path)], tmp_path)
    result = json.loads((tmp_path / "tasks.json").read_text())
    assert [r["peft"] for r in result["runs"]] == ["none", "lora"]
    for row in result["runs"]:
        assert row["steps"] == 3 and row["steps_per_second"] > 0
    assert "| steps_per_second |" in proc.stdout


@pytest.mark.slow
def test_bench_ab_script_tiny_runs_abab_on_the_two_trees(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    subprocess.run(f"git -C {REPO} archive HEAD zo2_ds | tar -x -C {old}", shell=True, check=True)
    args = ["launch/bench_ab.py", "--a", str(old), "--b", str(REPO), "--tiny", "--out", str(tmp_path / "ab")]
    proc = _run_script([*args, "--work", str(tmp_path / "stage")], tmp_path, timeout=400)
    result = json.loads((tmp_path / "ab" / "ab.json").read_text())
    assert [r["label"] for r in result["runs"]] == ["A1", "B1", "A2", "B2"]
    assert [r["zo2_ds"] for r in result["runs"]][:2] == [str((old / "zo2_ds").resolve()), str(REPO / "zo2_ds")]
    cells = {(r["mode"], len(r["a_ms"]), len(r["b_ms"])) for r in result["ratios"]}
    assert cells == {("in_gpu", 2, 2), ("offload", 2, 2)}
    assert "| B / A | within 3%" in proc.stdout


@pytest.mark.cuda
def test_bench_scripts_on_the_gpu(tmp_path):
    env_extra = {"DS_ACCELERATOR": "cuda"}
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(env_extra, PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    common = ["--models", "opt-125m", "--batches", "2x128", "--steps", "2", "--warmup", "1"]
    for script, out in (("bench_step.py", "step.json"), ("bench_offload.py", "off.json")):
        extra = ["--timeline", str(tmp_path / "tl.png")] if script == "bench_offload.py" else ["--kernel-micro"]
        cmd = [sys.executable, f"launch/{script}", *common, *extra, "--out", str(tmp_path / out)]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads((tmp_path / "step.json").read_text())["records"]
    assert all("error" not in r and r["peak_allocated_bytes"] > 0 for r in records)
    result = json.loads((tmp_path / "off.json").read_text())
    assert result["bandwidth"]["h2d_gbps"] > 1
    streamed = [r for r in result["records"] if r["mode"] == "offload"]
    assert streamed and all(r["ratio_to_floor"] > 0 and r["peak_allocated_bytes"] > 0 for r in streamed)
    assert all(r.get("device_budget") for r in streamed)  # engine.zo_runner.device_bytes()


def test_host_rss_peak_sees_memory_touched_inside():
    with measure.HostRssPeak(interval_s=0.001) as rss:
        buf = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, every page written
        del buf
    assert rss.growth_bytes >= 60 << 20 and rss.num_samples >= 1
    assert rss.peak_bytes >= rss.baseline_bytes > 0


def test_bench_materialize_main_records_the_floor_and_the_peak_rss(tmp_path):
    """A truncated OPT-1.3B shape (4 blocks of 100 MB in fp16) on the CPU: the JSON fields, finite positive
    ratios, the floor pinning exactly the blocks' homes, and the RSS growth near the model's bytes."""
    import math

    from zo2_ds.estimate.meta_model import meta_model
    from zo2_ds.offload.store import block_layout

    bench = _load_launch("bench_materialize")
    out = tmp_path / "materialize.json"
    result = bench.main(["--model", "opt-1.3b", "--layers", "4", "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result, default=str))
    env, (rec,) = result["env"], result["records"]
    assert env["card"] == "cpu" and env["torch"] == torch.__version__ and "cuda" in env
    assert rec["model"] == "opt-1.3b" and rec["num_layers"] == rec["num_blocks"] == 4 and rec["dtype"] == "fp16"
    assert rec["shape"]["hidden_size"] == 2048 and rec["device"] == "cpu"
    skeleton = meta_model("opt-1.3b", torch.float16, num_layers=4)
    assert rec["pinned_bytes"] == 4 * block_layout(block_list(skeleton)[0])[1] == 4 * rec["block_bytes"]
    assert rec["model_bytes"] == parameter_bytes(skeleton)
    for key in ("floor_s", "materialize_s", "time_ratio", "rss_ratio", "peak_rss_growth_bytes"):
        assert math.isfinite(rec[key]) and rec[key] > 0, key
    assert rec["time_ratio"] == pytest.approx(rec["materialize_s"] / rec["floor_s"])
    assert rec["rss_ratio"] == pytest.approx(rec["peak_rss_growth_bytes"] / rec["model_bytes"])
    assert rec["floor_rss_growth_bytes"] >= 0.9 * rec["pinned_bytes"]  # every page of the floor was touched
    assert 0.9 <= rec["rss_ratio"] <= 1.1  # the blocks' homes and the rest (on the CPU here), no second copy
    assert rec["meets_targets"] == (rec["rss_ratio"] <= 1.1 and rec["time_ratio"] <= 1.5)
    assert rec["huge_pages"] is True
    with pytest.raises(SystemExit):
        bench.parse_args(["--model", "opt-1.3b", "--layers", "0"])


def test_bench_materialize_no_huge_pages_is_recorded_and_undone(monkeypatch):
    """--no-huge-pages page-locks 4 KiB pages for this bench only: the switch is back on after it."""
    from zo2_ds.offload import hostmem

    bench = _load_launch("bench_materialize")
    seen = []
    real = hostmem._advise_huge_pages
    monkeypatch.setattr(
        hostmem, "_advise_huge_pages", lambda pages: seen.append(hostmem.ADVISE_HUGE_PAGES) or real(pages)
    )
    result = bench.main(["--model", "tiny", "--device", "cpu", "--no-huge-pages"])
    assert result["records"][0]["huge_pages"] is False
    assert seen and not any(seen)  # every buffer of the run was made with the advice off
    assert hostmem.ADVISE_HUGE_PAGES is True


@pytest.mark.cuda
def test_bench_materialize_on_the_gpu_page_locks_and_stays_near_the_pinned_bytes(tmp_path):
    """In a fresh process, as check.sh runs it: the floor is page-locked, the blocks are initialized on the GPU
    and only their homes grow the host RSS (the embedding and head stay on the GPU)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cuda", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    out = tmp_path / "materialize.json"
    cmd = [sys.executable, "launch/bench_materialize.py", "--model", "opt-1.3b", "--layers", "8", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (rec,) = result["records"]
    assert result["env"]["card"] != "cpu" and result["env"]["cuda"]
    assert rec["device"] == "cuda" and rec["floor_page_locked"] and rec["num_blocks"] == 8
    assert 0.9 * rec["pinned_bytes"] <= rec["peak_rss_growth_bytes"] <= 1.1 * rec["pinned_bytes"]
    assert rec["floor_rss_growth_bytes"] >= 0.9 * rec["pinned_bytes"]
    assert 0 < rec["floor_s"] and 0 < rec["time_ratio"] < 20


def _record(mode: str, ms: float, pp: int = 1, streamed: float = 8e9) -> dict:
    return {"mode": mode, "batch": "1x1000", "median_ms": ms, "floor_ms": 100.0, "two_forwards_ms": 50.0,
            "transfer_floor_ms": 100.0, "streamed_bytes": streamed, "model_bytes": 10e9, "nvml_used_bytes": 1,
            "peak_allocated_bytes": 1, "ranks_host_rss_bytes": 12e9, "ranks_host_rss_peak_bytes": 13e9,
            "perturbation_parallel": pp}  # fmt: skip


def test_bench_scaling_counts_the_jobs_tokens_and_models_the_links():
    scaling = _load_launch("bench_scaling")
    one = {"records": [_record("offload", 100.0)], "bandwidth": {"h2d_gbps": 80.0}}
    two = {
        "records": [_record("offload", 125.0), _record("offload_partitioned", 80.0, streamed=4e9),
                    _record("offload_pp2", 60.0, pp=2, streamed=4e9)],
        "bandwidth": {"h2d_gbps": 80.0, "allgather_gbps": 200.0},
    }  # fmt: skip
    rows = scaling.rows_of("m", 1, one, 2) + scaling.rows_of("m", 2, two, 2)
    scaling.add_ratios(rows)
    by_mode = {(r["gpus"], r["mode"]): r for r in rows}
    # Two ranks' micro-batches per step, but a perturbation-parallel group of 2 shares one.
    assert by_mode[(2, "offload")]["tokens_per_s"] == 2 * 1000 / 0.125
    assert by_mode[(2, "offload_partitioned")]["scaling"] == (2 * 1000 / 0.080) / (1000 / 0.100)
    assert by_mode[(2, "offload_pp2")]["tokens_per_s"] == 1000 / 0.060
    assert by_mode[(2, "offload_pp2")]["latency"] == 0.6
    assert by_mode[(2, "offload")]["node_rss_over_model"] == 1.2
    model = {(m["gpus"], m["partitioned"]): m for m in scaling.scaling_model(rows, allgather_gbps=200.0)}
    # 8 GB over an 80 GB/s link: 100 ms; split over 2 ranks 50 ms, the gather of the other 4 GB 20 ms, the
    # compute (two forwards) 50 ms: the partitioned step is bound at 50 ms.
    assert model[(1, False)]["predicted_step_ms"] == 100.0 and model[(2, False)]["measured_step_ms"] == 125.0
    assert model[(2, True)]["predicted_step_ms"] == 50.0 and model[(2, True)]["measured_step_ms"] == 80.0
    assert model[(8, True)]["link_bytes_per_rank"] == 1e9 and model[(8, True)]["nvlink_bytes_per_rank"] == 7e9
    assert model[(8, False)]["host_bytes_per_node"] == 80e9 and model[(8, True)]["host_bytes_per_node"] == 10e9
    # With the host in the model (100 GB/s for every rank's uploads and write-backs, a quarter of the bytes a step
    # at write_back_interval 4): one copy's 10 GB per step whatever N when partitioned, N copies' replicated.
    for row in rows:
        row["write_back_interval"] = 4
    hosted = {(m["gpus"], m["partitioned"]): m for m in scaling.scaling_model(rows, 200.0, host_gbs=100.0)}
    assert hosted[(2, True)]["host_bytes_per_step"] == hosted[(8, True)]["host_bytes_per_step"] == 10e9
    assert hosted[(1, False)]["predicted_step_ms"] == pytest.approx(100.0)  # the link and the host alike
    assert hosted[(2, True)]["predicted_step_ms"] == hosted[(8, True)]["predicted_step_ms"] == pytest.approx(100.0)
    assert hosted[(2, False)]["predicted_step_ms"] == pytest.approx(200.0)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_bench_scaling_script_tiny_on_two_cpu_ranks(tmp_path):
    out = tmp_path / "scaling.json"
    args = ["launch/bench_scaling.py", "--tiny", "--gpus", "1,2", "--steps", "1", "--warmup", "1", "--out", str(out)]
    _run_script(args, tmp_path, timeout=400)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["gpus"], r["mode"]) for r in rows] == [
        (1, "offload"), (2, "offload"), (2, "offload_partitioned"), (2, "offload_pp2")
    ]  # fmt: skip
    assert rows[0]["scaling"] == 1.0 and all(r["step_ms"] > 0 for r in rows)
    # Partitioned: each rank's link carries half of every block.
    assert rows[2]["streamed_bytes"] == rows[1]["streamed_bytes"] / 2


def test_host_rss_peak_starts_afresh_after_a_reset():
    """A mode's host peak (bench offload records) is its own, not an earlier mode's in the same process."""
    big = torch.ones(64 << 20, dtype=torch.float32)  # 256 MiB, touched
    before = measure.host_rss_bytes()["host_rss_peak_bytes"]
    del big  # (a mapping of its own: unmapped when freed)
    if not measure.reset_host_rss_peak():
        pytest.skip("this kernel does not let a process reset its VmHWM")
    assert measure.host_rss_bytes()["host_rss_peak_bytes"] < before - (128 << 20)


def test_host_lead_tells_a_device_waiting_for_the_host():
    # Device starts 2 ms after issue (host ahead) for one unit, 0.01 ms for three (the device waited).
    spans = [{"what": "compute", "block": b, "start_ms": 5.0 + b, "start_issued_ms": 5.0 + b - lead, "end_ms": 9.0}
             for b, lead in enumerate([2.0, 0.01, 0.01, 0.02])]  # fmt: skip
    spans.append({"what": "upload", "block": 0, "start_ms": 1.0, "start_issued_ms": 0.0, "end_ms": 2.0})
    lead = driver.host_lead(spans)
    assert lead["share_waiting_for_host"] == 0.75 and lead["min_lead_ms"] == pytest.approx(0.01)
    assert lead["median_lead_ms"] == pytest.approx(0.02)
    assert driver.host_lead([{"what": "compute", "block": 0, "start_ms": 1.0, "end_ms": 2.0}]) is None


def test_bench_link_names_a_bad_argument_and_needs_cuda(monkeypatch):
    bench = _load_launch("bench_link")
    with pytest.raises(SystemExit):
        bench.parse_args(["--interval", "0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs CUDA"):
        bench.main([])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_link_measures_every_mode_on_one_gpu_and_all(tmp_path):
    """In a child process, as check.sh runs it: this process stays off the GPU (NVML counts the whole device,
    and test_estimate's check reads it next)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    out = tmp_path / "link.json"
    cmd = [sys.executable, "launch/bench_link.py", "--unit-mib", "16", "--uploads", "4", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    counts = [1] + ([torch.cuda.device_count()] if torch.cuda.device_count() > 1 else [])
    modes = _load_launch("bench_link").MODES
    assert [(r["gpus"], r["mode"]) for r in rows] == [(n, m) for n in counts for m in modes]
    assert all(0 < v < 1000 for r in rows for v in r["upload_gbps_per_gpu"])


def test_bench_memory_stages_names_a_bad_argument_and_needs_cuda(monkeypatch):
    bench = _load_launch("bench_memory_stages")
    for bad in (["--prefetch-depth", "0"], ["--batch", "2by8"], ["--model", "opt-13b@x"], ["--gather", "nvlink"]):
        with pytest.raises((SystemExit, ValueError)):
            bench.parse_args(bad)
    assert bench.parse_args(["--prefetch-depth", "2"]).prefetch_depth == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        bench.main(["--model", "opt-125m@1"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_memory_stages_records_every_stage(tmp_path):
    """In a child process (NVML counts the whole device): every stage recorded, NVML above the allocator's
    reserved bytes (the context alone is outside it), the step's slots inside the allocator on one GPU."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    out = tmp_path / "stages.json"
    cmd = [sys.executable, "launch/bench_memory_stages.py", "--model", "opt-125m@2", "--batch", "1x64"]
    proc = subprocess.run([*cmd, "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    stages = result["stages"]
    assert [s["stage"] for s in stages] == ["context", "init_distributed", "model", "engine", "step_1", "step_5"]
    assert result["world_size"] == 1 and not result["partitioned"]
    if stages[0]["nvml_mib"] is not None:  # pynvml present
        assert all(s["outside_allocator_mib"] > 0 for s in stages)
    assert stages[-1]["reserved_mib"] > stages[0]["reserved_mib"]
