"""The in-GPU ZO step against two plain forwards and MeZO's pattern, on one model (``launch/bench_step.py``)."""

from __future__ import annotations

import sys
import traceback
from typing import Any

import torch

from zo2_ds.bench import baselines, driver, measure
from zo2_ds.bench.models import DTYPES, build_model, make_batch

__all__ = ["STEP_MODES", "step_records", "add_ratios"]

STEP_MODES = ("forward", "mezo_ref", "zo")


def _timed(step: Any, warmup: int, steps: int) -> dict[str, Any]:
    measure.release_cached_memory()
    measure.reset_peak_memory()
    record = measure.summarize(measure.time_calls(step, warmup, steps), warmup)
    record.update(measure.device_memory())
    return record


def _mode_record(mode: str, model: torch.nn.Module, batch: dict, run: driver.Settings) -> dict[str, Any]:
    if mode == "forward":
        model.eval()
        return _timed(baselines.two_forwards(model, batch), run.warmup, run.steps)
    if mode == "mezo_ref":
        model.eval()
        return _timed(baselines.mezo_reference_step(model, batch), run.warmup, run.steps)
    micro_batch = batch["input_ids"].shape[0]
    engine = driver.build_engine(model, driver.engine_config(micro_batch, run.dtype, switches=run.switches))
    try:
        return _timed(driver.zo_step(engine, batch), run.warmup, run.steps)
    finally:
        driver.finish(engine)  # removes the hooks: the next mode sees the plain model


def step_records(
    name: str, batches: list[tuple[int, int]], modes: list[str], run: driver.Settings, log: Any = print
) -> list[dict[str, Any]]:
    """One record per batch x mode; a failure (out of memory, a missing feature) is recorded, not raised."""
    base = {"model": name, "dtype": run.dtype, "kernels_route": run.switches["route"], **run.switches["zo2"]}
    model = build_model(name, run.device, DTYPES[run.dtype])
    base["num_params"] = sum(p.numel() for p in model.parameters())
    records = []
    for batch_size, seq_len in batches:
        batch = make_batch(name, batch_size, seq_len, run.device)
        for mode in modes:
            rec = {**base, "mode": mode, "batch": f"{batch_size}x{seq_len}"}
            try:
                rec.update(_mode_record(mode, model, batch, run))
                rec["tokens_per_s"] = batch_size * seq_len / rec["median_ms"] * 1e3
            except Exception as exc:
                rec.update(error=repr(exc), traceback=traceback.format_exc(limit=8))
                print(f"[bench_step] {name} {rec['batch']} {mode}: {exc!r}", file=sys.stderr, flush=True)
            records.append(rec)
            log({k: v for k, v in rec.items() if k not in ("step_ms_all", "traceback")})
    del model
    measure.release_cached_memory()
    return records


def add_ratios(records: list[dict[str, Any]]) -> None:
    """Per model x batch: each mode's median step and peak memory over the two plain forwards'."""
    forward = {(r["model"], r["batch"]): r for r in records if r["mode"] == "forward" and "median_ms" in r}
    for rec in records:
        base = forward.get((rec["model"], rec["batch"]))
        if base is None or "median_ms" not in rec:
            continue
        rec["time_vs_forward"] = rec["median_ms"] / base["median_ms"]
        if rec.get("peak_allocated_bytes") and base.get("peak_allocated_bytes"):
            rec["peak_vs_forward"] = rec["peak_allocated_bytes"] / base["peak_allocated_bytes"]
