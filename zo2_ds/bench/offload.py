"""The offloaded ZO step against the in-GPU step and its floor, on one model (``launch/bench_offload.py``).

  transfer floor = bytes streamed per step / pinned host-to-device bandwidth measured in the process
  floor          = max(two plain forwards, transfer floor)

The streamed bytes are counted from the model's blocks before the engine takes them: (blocks - resident)
x one block's bytes; with a narrower ``transfer_dtype`` the per-step average, since a block crosses as its
exact master one step in ``write_back_interval`` and as the narrow copy at the others; plus a streamed head's
bytes (``zo2.offload.stream_head``: once per step at one micro-batch).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from zo2_ds.bench import baselines, driver, measure
from zo2_ds.bench.models import DTYPES, SHAPES, block_list, build_model, hf_config, make_batch, parameter_bytes

__all__ = ["offload_variants", "per_async_step", "streamed_bytes_per_step", "offload_records"]


def offload_variants(
    *,
    prefetch_depth: int | str = "auto",
    write_back_interval: int | None = None,
    transfer_dtypes: tuple[str, ...] = ("auto",),
    cuda_graphs: bool = False,
    resident_blocks: int | None = None,
    granularities: tuple[str, ...] = ("auto",),
    partitioned: bool = False,
    perturbation_parallel: int = 1,
    replicated: bool = True,
    gathers: tuple[str, ...] = ("auto",),
) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """[(mode, zo2.offload block, other zo2 fields)]: every block streamed per transfer dtype and granularity
    (mode ``offload``, ``offload_xfer_<dtype>``, with ``_<granularity>`` unless "auto"; replicated masters
    where the installed zo2_ds has ``partition``), then the optional variants (``offload_partitioned``:
    zo2.offload.partition "node", the masters shared by a node's ranks; ``offload_pp<P>``: that and
    zo2.perturbation_parallel P, a step's passes spread over P ranks that see the same micro-batch). Not
    ``replicated``: only the optional variants (a model whose replicas the host cannot hold). ``gathers``: the
    partitioned and perturbation-parallel modes once per zo2.offload.gather (``_<gather>`` appended unless
    "auto") and per granularity (``_<granularity>`` unless "auto"); with ``cuda_graphs`` also
    ``offload_partitioned_graphs``."""
    common: dict[str, Any] = {"enabled": True}
    if driver.config_accepts({"offload": {"enabled": True, "partition": "none"}}):
        common["partition"] = "none"  # whatever the default, these modes are the replicated ones
    if prefetch_depth != "auto":  # (a tree older than "auto" may be benchmarked, see launch/bench_ab.py)
        common["prefetch_depth"] = prefetch_depth
    if write_back_interval is not None:
        common["write_back_interval"] = write_back_interval
    variants = [
        (
            ("offload" if xfer == "auto" else f"offload_xfer_{xfer}") + ("" if unit == "auto" else f"_{unit}"),
            {**common, "transfer_dtype": xfer, **({} if unit == "auto" else {"granularity": unit})},
            {},
        )
        for unit in granularities
        for xfer in transfer_dtypes
        if replicated
    ]
    if cuda_graphs and replicated:
        variants.append(("offload_graphs", {**common, "cuda_graphs": True}, {}))
    if resident_blocks:
        variants.append((f"offload_resident{resident_blocks}", {**common, "num_resident_blocks": resident_blocks}, {}))
    for gather in gathers:
        node = {**common, "partition": "node", **({} if gather == "auto" else {"gather": gather})}
        suffix = "" if gather == "auto" else f"_{gather}"
        kinds = [("partitioned", {})] if partitioned else []
        if perturbation_parallel > 1:
            kinds.append((f"pp{perturbation_parallel}", {"perturbation_parallel": perturbation_parallel}))
        for kind, others in kinds:
            for unit in granularities:
                by_unit = {} if unit == "auto" else {"granularity": unit}
                name = f"offload_{kind}{suffix}" + ("" if unit == "auto" else f"_{unit}")
                variants.append((name, {**node, **by_unit}, others))
            if cuda_graphs and kind == "partitioned":  # whole blocks from graphs: the host's launches out of the step
                variants.append((f"offload_partitioned_graphs{suffix}", {**node, "cuda_graphs": True}, {}))
    return variants


def per_async_step(
    variants: list[tuple[str, dict[str, Any], dict[str, Any]]], values: tuple[str, ...]
) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """Each variant once per ``zo2.async_step`` value ("auto", "true", "false"; mode suffix ``_async`` /
    ``_sync`` unless "auto"). A checkout without the field runs "false" as it is (it synchronises every step)
    and refuses "true"."""
    out = []
    for value in values:
        field = {"true": True, "false": False}.get(value, "auto")
        accepted = field == "auto" or driver.config_accepts({"async_step": field})
        if not accepted and field is True:
            raise ValueError("--async-steps true: the installed zo2_ds has no zo2.async_step")
        suffix = {"true": "_async", "false": "_sync"}.get(value, "")
        extra = {"async_step": field} if field != "auto" and accepted else {}
        out += [(mode + suffix, off, {**zo2, **extra}) for mode, off, zo2 in variants]
    return out


def streamed_bytes_per_step(model: torch.nn.Module, offload: dict[str, Any], write_back_interval: int) -> float:
    """Host-to-device bytes of one step (average over ``write_back_interval`` steps with a narrow copy)."""
    blocks = block_list(model)
    streamed = len(blocks) - (offload.get("num_resident_blocks") or 0)
    numel = sum(p.numel() for p in blocks[0].parameters())
    element = next(blocks[0].parameters()).element_size()
    narrow = {"fp16": 2, "bf16": 2, "fp32": 4}.get(offload.get("transfer_dtype", "auto"), element)
    per_element = element if narrow >= element else (element + (write_back_interval - 1) * narrow) / write_back_interval
    return streamed * numel * per_element


def _in_gpu(name: str, batches: list, run: driver.Settings, floor: bool, in_gpu: bool) -> tuple[list, dict, dict]:
    """Two plain forwards (if ``floor``) and the in-GPU step (if ``in_gpu``) per batch, on one model."""
    model = build_model(name, run.device, DTYPES[run.dtype])
    forwards_ms: dict[str, float] = {}
    records = []
    if floor:
        model.eval()
        for b, s in batches:
            times = measure.time_calls(
                baselines.two_forwards(model, make_batch(name, b, s, run.device)), run.warmup, run.steps
            )
            forwards_ms[f"{b}x{s}"] = statistics.median(times)
    if in_gpu:
        engine = driver.build_engine(model, driver.engine_config(batches[0][0], run.dtype, switches=run.switches))
        for b, s in batches:
            measure.reset_peak_memory()
            times = measure.time_calls(
                driver.zo_step(engine, make_batch(name, b, s, run.device)), run.warmup, run.steps
            )
            rec = {"mode": "in_gpu", "batch": f"{b}x{s}", **measure.summarize(times, run.warmup)}
            records.append({**rec, **measure.device_memory(), **measure.host_rss_bytes()})
        driver.finish(engine)
    del model
    measure.release_cached_memory()
    return records, forwards_ms, {r["batch"]: r["median_ms"] for r in records}


def _offload_model(name: str, offload: dict, run: driver.Settings, materialize: bool) -> torch.nn.Module:
    """A fresh model for an offloaded engine: built on the device (offloading then moves the blocks off it),
    or ``materialize``d from its config straight into pinned memory as the engine lays it out (with
    partitioned masters each rank builds only its shards)."""
    if not materialize:
        return build_model(name, run.device, DTYPES[run.dtype])
    import deepspeed

    from zo2_ds.offload.materialize import materialize as build
    from zo2_ds.offload.materialize import materialize_layout

    driver.single_process_env()
    deepspeed.init_distributed()
    config, _ = hf_config(SHAPES[name], use_cache=False)
    layout = materialize_layout(offload)
    return build(config, dtype=DTYPES[run.dtype], device=run.device, progress=False, **layout)


def _offload_one(
    name: str,
    mode: str,
    offload: dict,
    zo2: dict,
    batches: list,
    run: driver.Settings,
    timeline: bool,
    materialize: bool = False,
) -> list:
    """The offloaded step per batch on a fresh model (see :func:`_offload_model`); ``zo2``: more fields of
    the zo2 block."""
    peak_of_mode = measure.reset_host_rss_peak()  # the host peak of this mode, build and init included
    started = time.perf_counter()
    model = _offload_model(name, offload, run, materialize)
    build_s = time.perf_counter() - started
    model_bytes = parameter_bytes(model)
    num_blocks = len(block_list(model))
    switches = {**run.switches, "zo2": {**run.switches["zo2"], **zo2}}
    config = driver.engine_config(batches[0][0], run.dtype, offload=offload, switches=switches)
    started = time.perf_counter()
    engine = driver.build_engine(model, config)
    init_s = time.perf_counter() - started
    facts = driver.offload_facts(engine)
    interval = facts.get("write_back_interval") or offload.get("write_back_interval") or 1
    # Partitioned masters: each rank's host link carries its 1/N shard of every unit (the rest is gathered).
    partition = getattr(engine.zo_offload_store, "partition", None)
    num_sharing = partition.num_ranks if partition is not None else 1
    streamed = streamed_bytes_per_step(model, offload, interval) / num_sharing
    head = getattr(engine.zo_runner, "head", None)  # a streamed head crosses once per run (zo2.offload.stream_head)
    head_bytes = 0 if head is None else head.master.numel() * head.master.element_size()
    streamed += head_bytes
    records = []
    for b, s in batches:
        batch = make_batch(name, b, s, run.device)
        measure.reset_peak_memory()
        step = driver.zo_step(engine, batch)
        times = measure.time_calls(step, run.warmup, run.steps)
        rec = {"mode": mode, "batch": f"{b}x{s}", **measure.summarize(times, run.warmup), **measure.device_memory()}
        rec["back_to_back_ms"] = measure.time_back_to_back(step, run.steps)
        rec.update(measure.host_rss_bytes())
        rec.update(ranks_host_rss_bytes=measure.summed_over_ranks(rec["host_rss_bytes"]))
        rec.update(ranks_host_rss_peak_bytes=measure.summed_over_ranks(rec["host_rss_peak_bytes"]))
        rec.update(facts, offload=offload, streamed_bytes=streamed, model_bytes=model_bytes, num_blocks=num_blocks)
        rec.update(streamed_head_bytes=head_bytes)
        rec.update(ranks_sharing_masters=num_sharing, perturbation_parallel=zo2.get("perturbation_parallel", 1))
        rec.update(engine_init_s=init_s, host_rss_over_model=rec["host_rss_bytes"] / model_bytes)
        rec.update(model_build_s=build_s, materialized=materialize, host_rss_peak_of_mode=peak_of_mode)
        if timeline and (b, s) == batches[0]:
            rec["timeline"] = driver.timeline_of_one_step(engine, driver.zo_step(engine, batch))
        records.append(rec)
    driver.finish(engine)
    del engine, model
    measure.release_cached_memory()
    return records


def offload_records(
    name: str,
    batches: list[tuple[int, int]],
    variants: list[tuple[str, dict[str, Any], dict[str, Any]]],
    run: driver.Settings,
    *,
    in_gpu: bool = True,
    floor: bool = True,
    bandwidth: dict[str, float] | None = None,
    timeline: bool = False,
    materialize: bool = False,
    log: Any = print,
) -> list[dict[str, Any]]:
    """Records of the in-GPU step (if ``in_gpu``) and of each offload variant, one per batch, with floors
    and ratios. A fresh model per engine: offloading moves the blocks off the device."""
    forwards_ms: dict[str, float] = {}
    in_gpu_ms: dict[str, float] = {}
    records: list[dict[str, Any]] = []
    if in_gpu or floor:
        records, forwards_ms, in_gpu_ms = _in_gpu(name, batches, run, floor, in_gpu)
    for mode, offload, zo2 in variants:
        records += _offload_one(name, mode, offload, zo2, batches, run, timeline, materialize)
    h2d = (bandwidth or {}).get("h2d_gbps")
    for rec in records:
        b, s = (int(v) for v in rec["batch"].split("x"))
        rec.update(model=name, dtype=run.dtype, tokens_per_s=b * s / rec["median_ms"] * 1e3)
        if rec.get("back_to_back_ms"):  # the offloaded modes' training-loop throughput
            rec["back_to_back_tokens_per_s"] = b * s / rec["back_to_back_ms"] * 1e3
        fwd = rec["two_forwards_ms"] = forwards_ms.get(rec["batch"])
        if rec["mode"] == "in_gpu":
            rec["ratio_to_two_forwards"] = rec["median_ms"] / fwd if fwd else None
        else:
            transfer = rec["transfer_floor_ms"] = rec["streamed_bytes"] / (h2d * 1e9) * 1e3 if h2d else None
            floors = [x for x in (fwd, transfer) if x]
            rec["floor_ms"] = max(floors) if floors else None
            rec["ratio_to_floor"] = rec["median_ms"] / rec["floor_ms"] if floors else None
            rec["ratio_to_in_gpu"] = rec["median_ms"] / in_gpu_ms[rec["batch"]] if in_gpu else None
        log({k: v for k, v in rec.items() if k not in ("step_ms_all", "timeline")})
    return records
