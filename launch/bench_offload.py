"""Offloaded ZO step (zo2.offload) against the in-GPU step, two plain forwards and the transfer floor.

    python launch/bench_offload.py --models opt-1.3b --batches 1x2048,16x256 --out $OUT/offload.json \
        --timeline $OUT/offload_timeline.png
    python launch/bench_offload.py --tiny          # CPU smoke run, seconds

Per model x batch, on one random-init fp16 OPT-shaped model built on the GPU (never CPU default init):
  in_gpu        zo2 without offloading (skipped with --no-in-gpu or when the model cannot fit)
  offload       every block streamed (prefetch depth 1)
  offload_half  half of the blocks resident (zo2.offload.num_resident_blocks = N/2)
and the pinned host->device bandwidth measured in the same process, so

  transfer floor = bytes streamed per step / measured H2D bandwidth
  floor          = max(two plain forwards, transfer floor)

Reported: median step ms, tokens/s, ratio to in-GPU, ratio to floor and to transfer floor, peak GPU
memory (torch peak allocated, and NVML used: CUDA context and allocator cache included), host RSS (now
and peak), card, date. ``--timeline`` draws one offloaded step (upload / compute / write-back per block).
Each offload record also carries ``device_budget``: what the offloader holds on the GPU by part
(``OffloadRunner.device_bytes``: resident blocks, slot ring, perturbation scratch, the rest of the model,
its perturbed copy) plus estimates of the loss tail (logits kept for the caller, the fp32 copy and
log-softmax of the loss), printed as one line per record to compare with the measured peak.
``--prefetch-depth 0`` runs the two-slot ring (one block less on the GPU).
``--dtype fp32 --transfer-dtypes auto,bf16`` runs fp32 masters streamed as they are (``offload``) and with
bf16 transfers (``offload_xfer_bf16``, zo2.offload.transfer_dtype); its transfer floor counts the bytes a
step moves on average (the exact master one step in write_back_interval, the bf16 copy at the others).
``--cuda-graphs`` adds ``offload_graphs``: the same with zo2.offload.cuda_graphs (block forwards replayed
from CUDA graphs), in the same process.
``launch/bench.py`` calls :func:`run_offload_bench` for its offload rows.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import resource
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

__all__ = [
    "OPT_SHAPES",
    "build_opt",
    "measure_link_bandwidth",
    "time_zo_steps",
    "run_offload_bench",
    "device_budget",
    "timeline_of_one_step",
    "plot_timeline",
    "main",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Allocator segments that grow and shrink in place: the cache then holds little beyond what is allocated
# (NVML counts the cache). Set before CUDA is initialised; a value in the environment wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
for _key, _value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
    os.environ.setdefault(_key, _value)
os.environ.setdefault("MASTER_PORT", str(_free_port()))
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

# name: (hidden, layers, heads); vocab 50272, ffn 4 x hidden, as OPT.
OPT_SHAPES = {
    "opt-1.3b": (2048, 24, 32),
    "opt-6.7b": (4096, 32, 32),
    "opt-13b": (5120, 40, 40),
    "opt-30b": (7168, 48, 56),
    "tiny": (64, 4, 4),
}
_GIB = 1024**3
_GC_FREEZE = [False]  # --gc-freeze: gc.freeze() after each engine is built
_LEAN_LOSS = [True]  # zo2.lean_loss of every engine built here (--no-lean-loss: HF's own loss, for A/B)
_HALF = [True]  # the model in fp16 on CUDA (--dtype fp32: fp32 masters, no fp16 config block)


def build_opt(name: str, device: torch.device, dtype: torch.dtype = torch.float16) -> torch.nn.Module:
    """A random-init OPTForCausalLM of a named shape, allocated and initialised directly on ``device``."""
    from transformers import OPTConfig, OPTForCausalLM
    from transformers.initialization import no_init_weights

    hidden, layers, heads = OPT_SHAPES[name]
    config = OPTConfig(
        vocab_size=1000 if name == "tiny" else 50272,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        ffn_dim=4 * hidden,
        max_position_embeddings=2048,
        word_embed_proj_dim=hidden,
        dropout=0.0,
        attention_dropout=0.0,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights(), torch.device(device):
            model = OPTForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.tie_weights()  # no_init_weights skips the tying that post_init does: OPT's head is its embedding
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.fill_(1.0 if pname.endswith("weight") else 0.0)
    return model


def measure_link_bandwidth(nbytes: int = _GIB, repeats: int = 5) -> dict[str, float]:
    """Pinned host<->device bandwidth in GB/s (1e9 bytes/s): H2D, D2H and both at once (sum)."""
    if not torch.cuda.is_available():
        return {}
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host2 = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev2 = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

    def timed(fn) -> float:
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def both() -> None:
        with torch.cuda.stream(s1):
            dev.copy_(host, non_blocking=True)
        with torch.cuda.stream(s2):
            host2.copy_(dev2, non_blocking=True)

    return {
        "h2d_gbps": nbytes / timed(lambda: dev.copy_(host, non_blocking=True)) / 1e9,
        "d2h_gbps": nbytes / timed(lambda: host2.copy_(dev2, non_blocking=True)) / 1e9,
        "bidir_sum_gbps": 2 * nbytes / timed(both) / 1e9,
    }


def cuda_context_bytes() -> int | None:
    """NVML-used bytes with CUDA initialised, a cuBLAS handle made and nothing allocated: the floor of any
    NVML reading of this process (call before anything else touches the GPU)."""
    if not torch.cuda.is_available():
        return None
    a = torch.ones(64, 64, device="cuda", dtype=torch.float16)
    (a @ a).sum().item()
    del a
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return _nvml_used_bytes()


def memory_trace_of_one_step(engine: Any, batch: dict[str, torch.Tensor], path: str, top: int = 25) -> dict:
    """Record the allocator's history over one step and write, to ``path``, what is alive at the step's peak.

    Allocations made before the step (the slot ring, scratch, resident model...) are summed as ``baseline``;
    those made during it are grouped by the first frames of zo2_ds / transformers / torch code that made
    them. Returns {"baseline", "peak", "groups": [(bytes, where)]}.
    """
    if not torch.cuda.is_available():
        return {}
    mem = torch.cuda.memory
    _sync()
    baseline = torch.cuda.memory_allocated()
    mem._record_memory_history(enabled="all", context="all", stacks="python", max_entries=500_000)
    try:
        out = engine(**batch)
        engine.backward(out.loss)
        engine.step()
        del out
        _sync()
        snap = mem._snapshot()
    finally:
        mem._record_memory_history(enabled=None)
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    peak_live: dict[int, tuple[int, str]] = {}
    for ev in snap["device_traces"][torch.cuda.current_device()]:
        action, addr, size = ev["action"], ev["addr"], ev["size"]
        if action == "alloc":
            live[addr] = (size, _where(ev.get("frames", [])))
            total += size
            if total > peak:
                peak, peak_live = total, dict(live)
        elif action == "free_requested" and addr in live:
            total -= live.pop(addr)[0]
    groups: dict[str, int] = {}
    for size, where in peak_live.values():
        groups[where] = groups.get(where, 0) + size
    ranked = sorted(groups.items(), key=lambda kv: -kv[1])[:top]
    lines = [
        f"baseline (allocated before the step) {baseline / 2**20:.1f} MiB",
        f"peak of allocations made during the step {peak / 2**20:.1f} MiB (total {(baseline + peak) / 2**20:.1f} MiB)",
        f"torch max_memory_allocated {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB, "
        f"max_memory_reserved {torch.cuda.max_memory_reserved() / 2**20:.1f} MiB",
        "alive at the peak, by where allocated (MiB):",
    ] + [f"  {size / 2**20:9.1f}  {where}" for where, size in ranked]
    Path(path).write_text("\n".join(lines) + "\n")
    return {"baseline": baseline, "peak": peak, "groups": ranked}


def _where(frames: list[dict[str, Any]]) -> str:
    keep = []
    for f in frames:
        name = f.get("filename", "")
        if any(k in name for k in ("zo2_ds/", "transformers/", "deepspeed/", "torch/nn/", "bench_offload")):
            short = name.split("site-packages/")[-1].split("/main/")[-1]
            keep.append(f"{short}:{f.get('line')}:{f.get('name')}")
        if len(keep) == 3:
            break
    return " < ".join(keep) or "?"


def profile_one_step(engine: Any, batch: dict[str, torch.Tensor], path: str) -> None:
    """A torch.profiler chrome trace (host and device) of two offloaded steps, gzipped to ``path``."""
    import gzip
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    _sync()
    with profile(activities=activities) as prof:
        for _ in range(2):
            out = engine(**batch)
            engine.backward(out.loss)
            engine.step()
        _sync()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(path, "wb") as dst:
            dst.write(src.read())


def host_profile_of_steps(engine: Any, batch: dict[str, torch.Tensor], path: str, steps: int = 10) -> None:
    """cProfile of ``steps`` offloaded steps (the host's side: Python, launches, hooks), top functions to ``path``."""
    import cProfile
    import io
    import pstats

    _sync()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        out = engine(**batch)
        engine.backward(out.loss)
        engine.step()
        del out
    prof.disable()
    _sync()
    wall = (time.perf_counter() - t0) / steps * 1e3
    buf = io.StringIO()
    buf.write(f"{steps} steps, {wall:.1f} ms a step under cProfile\n")
    for key in ("tottime", "cumulative"):
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(45)
    Path(path).write_text(buf.getvalue())


def _release_cached_memory() -> None:
    """Give cached device and pinned host blocks back, so later memory readings see only the run."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        host_empty = getattr(torch._C, "_host_emptyCache", None)
        if host_empty is not None:
            host_empty()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _nvml_used_bytes() -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:  # no NVML here: report nothing rather than fail
        return None


def _rss_bytes() -> tuple[int, int]:
    import psutil

    now = psutil.Process().memory_info().rss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return now, peak


def _engine(model: torch.nn.Module, offload: dict[str, Any], micro_batch: int) -> Any:
    import zo2_ds

    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "steps_per_print": 10**9,
        "optimizer": {"type": "SGD", "params": {"lr": 1e-7}},
        "zo2": {"enabled": True, "eps": 1e-3, "offload": offload, "lean_loss": _LEAN_LOSS[0]},
    }
    if torch.cuda.is_available() and _HALF[0]:
        config["fp16"] = {"enabled": True, "initial_scale_power": 0}
    engine, *_ = zo2_ds.initialize(model=model, config=config)
    engine.train()
    if _GC_FREEZE[0]:
        # Long-lived objects (the model, libraries) out of the collector's reach: a full collection then
        # scans only what the steps allocate, not the whole heap.
        gc.collect()
        gc.freeze()
    return engine


def time_zo_steps(engine: Any, batch: dict[str, torch.Tensor], warmup: int, steps: int) -> list[float]:
    """Wall time (ms) of full steps: engine(batch), backward, step (one host sync per step, inside step)."""
    times = []
    for i in range(warmup + steps):
        _sync()
        t0 = time.perf_counter()
        out = engine(**batch)
        engine.backward(out.loss)
        engine.step()
        del out  # as a training loop drops the step's output: its logits are not alive in the next step
        _sync()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _two_forwards_ms(model: torch.nn.Module, batch: dict[str, torch.Tensor], warmup: int, steps: int) -> float:
    model.eval()
    times = []
    with torch.inference_mode():
        for i in range(warmup + steps):
            _sync()
            t0 = time.perf_counter()
            model(**batch)
            model(**batch)
            _sync()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def timeline_of_one_step(engine: Any, batch: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """[{what, block, start_ms, end_ms}] of one offloaded step, from CUDA events on each stream."""
    if not torch.cuda.is_available():
        return []
    runner = engine.zo_runner
    t0 = torch.cuda.Event(enable_timing=True)
    _sync()
    runner.timeline = []
    t0.record()
    out = engine(**batch)
    engine.backward(out.loss)
    engine.step()
    _sync()
    events, runner.timeline = runner.timeline, None
    spans: dict[tuple[str, int], dict[str, Any]] = {}
    for what, block, edge, event in events:
        span = spans.setdefault((what, block), {"what": what, "block": block})
        span[f"{edge}_ms"] = t0.elapsed_time(event)
    return [s for s in spans.values() if "start_ms" in s and "end_ms" in s]


def plot_timeline(spans: list[dict[str, Any]], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {"upload": 2, "compute": 1, "writeback": 0}
    colors = {"upload": "tab:blue", "compute": "tab:green", "writeback": "tab:orange"}
    fig, ax = plt.subplots(figsize=(14, 3))
    for s in spans:
        ax.broken_barh(
            [(s["start_ms"], max(s["end_ms"] - s["start_ms"], 1e-3))],
            (rows[s["what"]] - 0.4, 0.8),
            facecolors=colors[s["what"]],
            edgecolors="black",
            linewidth=0.3,
        )
        if s["what"] == "compute":
            ax.text((s["start_ms"] + s["end_ms"]) / 2, 1, str(s["block"]), ha="center", va="center", fontsize=6)
    ax.set_yticks(list(rows.values()), list(rows.keys()))
    ax.set_xlabel("ms since the step began")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _record(name: str, mode: str, batch_size: int, seq: int, times: list[float], extra: dict[str, Any]) -> dict:
    ms = statistics.median(times)
    rss_now, rss_peak = _rss_bytes()
    rec = {
        "model": name,
        "batch": f"{batch_size}x{seq}",
        "mode": mode,
        "step_ms": ms,
        "step_ms_all": times,
        "tokens_per_s": batch_size * seq / ms * 1e3,
        "host_rss_bytes": rss_now,
        "host_rss_peak_bytes": rss_peak,
        **extra,
    }
    if torch.cuda.is_available():
        rec["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        rec["nvml_used_bytes"] = _nvml_used_bytes()
    return rec


def device_budget(engine: Any, tokens: int, vocab: int) -> dict[str, int]:
    """GPU bytes by part for one offloaded step: the offloader's own buffers (exact) and the loss tail (estimate).

    ``logits``: one pass's logits (model dtype; the last pass's are returned to the caller, earlier passes'
    are freed at their loss). ``loss_chunks``: zo2_ds.loss's fp32 chunk and its log-softmax (HF's own loss
    would hold two fp32 copies of the whole logits instead). Block activations (a few hidden-size and
    ffn-size tensors per token), the CUDA context and library workspaces are not counted.
    """
    from zo2_ds import loss

    budget = dict(engine.zo_runner.device_bytes())
    element = engine.module.get_input_embeddings().weight.element_size()
    budget["logits"] = tokens * vocab * element
    budget["loss_chunks"] = 2 * loss._CHUNK_BYTES
    budget["total"] = sum(budget.values())
    return budget


def _budget_line(name: str, b: int, s: int, mode: str, budget: dict[str, int], peak: int | None) -> str:
    parts = " ".join(f"{k}={v / 2**20:.1f}" for k, v in budget.items())
    measured = f" | measured peak {peak / 2**20:.1f}" if peak else ""
    return f"device budget MiB {name} {b}x{s} {mode}: {parts}{measured}"


def run_offload_bench(
    name: str,
    batches: list[tuple[int, int]],
    *,
    warmup: int = 2,
    steps: int = 5,
    in_gpu: bool = True,
    half: bool = True,
    timeline_png: str | None = None,
    bandwidth: dict[str, float] | None = None,
    prefetch_depth: int = 1,
    write_back_interval: int | None = None,
    transfer_dtypes: tuple[str, ...] = ("auto",),
    cuda_graphs: bool = False,
    mem_trace: str | None = None,
    profile: str | None = None,
    host_profile: str | None = None,
    log=print,
) -> list[dict[str, Any]]:
    """Records for one model shape (see the module docstring). Each record is printed as it is made."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" and _HALF[0] else torch.float32
    bandwidth = bandwidth if bandwidth is not None else measure_link_bandwidth()
    _release_cached_memory()
    hidden, layers, _ = OPT_SHAPES[name]
    records: list[dict[str, Any]] = []
    vocab = 1000 if name == "tiny" else 50272

    def batch_of(b: int, s: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(1)).to(device)
        # use_cache=False: a training forward must not build a KV cache (for OPT-13B at 1x2048 it is
        # 1.7 GB per pass, and the engine keeps every pass's output until the step's losses are read).
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "use_cache": False}

    forwards_ms: dict[tuple[int, int], float] = {}
    in_gpu_ms: dict[tuple[int, int], float] = {}
    if in_gpu:
        model = build_opt(name, device, dtype)
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        for b, s in batches:
            forwards_ms[(b, s)] = _two_forwards_ms(model, batch_of(b, s), warmup, steps)
        engine = _engine(model, {"enabled": False}, batches[0][0])
        for b, s in batches:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = time_zo_steps(engine, batch_of(b, s), warmup, steps)
            in_gpu_ms[(b, s)] = statistics.median(times)
            rec = _record(name, "in_gpu", b, s, times, {"two_forwards_ms": forwards_ms[(b, s)]})
            records.append(rec)
            log(json.dumps({k: v for k, v in rec.items() if k != "step_ms_all"}))
        engine.destroy()
        del engine, model
        _release_cached_memory()

    common = {"enabled": True, "prefetch_depth": prefetch_depth}
    if write_back_interval is not None:
        common["write_back_interval"] = write_back_interval
    modes = [
        ("offload" if xfer == "auto" else f"offload_xfer_{xfer}", {**common, "transfer_dtype": xfer})
        for xfer in transfer_dtypes
    ]
    if cuda_graphs:
        modes.append(("offload_graphs", {**common, "cuda_graphs": True}))
    if half:
        modes.append(("offload_half", {**common, "num_resident_blocks": layers // 2}))
    for mode, offload in modes:
        model = build_opt(name, device, dtype)
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        t0 = time.perf_counter()
        engine = _engine(model, offload, batches[0][0])
        init_s = time.perf_counter() - t0
        store = engine.zo_offload_store
        streamed = store.streamed_bytes()
        if store.narrow is not None:  # per step on average: the exact master at 1 step in k, else the copy
            k = engine.zo_runner.write_back_interval
            streamed = sum((store.sizes[b] + (k - 1) * store.narrow.sizes[b]) / k for b in store.streamed)
        for b, s in batches:
            batch = batch_of(b, s)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = time_zo_steps(engine, batch, warmup, steps)
            h2d = bandwidth.get("h2d_gbps")
            transfer_ms = streamed / (h2d * 1e9) * 1e3 if h2d else None
            fwd = forwards_ms.get((b, s))
            floor = max(x for x in (fwd, transfer_ms) if x is not None) if (fwd or transfer_ms) else None
            ms = statistics.median(times)
            rec = _record(
                name,
                mode,
                b,
                s,
                times,
                {
                    "two_forwards_ms": fwd,
                    "transfer_floor_ms": transfer_ms,
                    "floor_ms": floor,
                    "ratio_to_floor": ms / floor if floor else None,
                    "ratio_to_transfer_floor": ms / transfer_ms if transfer_ms else None,
                    "ratio_to_in_gpu": ms / in_gpu_ms[(b, s)] if (b, s) in in_gpu_ms else None,
                    "streamed_bytes": streamed,
                    "model_bytes": model_bytes,
                    "num_blocks": layers,
                    "num_resident_blocks": store.num_resident,
                    "engine_init_s": init_s,
                    "host_rss_over_model": _rss_bytes()[0] / model_bytes,
                    "prefetch_depth": prefetch_depth,
                    "write_back_interval": engine.zo_runner.write_back_interval,
                    "transfer_dtype": offload["transfer_dtype"] if "transfer_dtype" in offload else "auto",
                    "dtype": str(dtype),
                    "num_slots": engine.zo_runner.num_slots,
                    "device_budget": device_budget(engine, b * s, vocab),
                },
            )
            records.append(rec)
            log(json.dumps({k: v for k, v in rec.items() if k != "step_ms_all"}))
            log(_budget_line(name, b, s, mode, rec["device_budget"], rec.get("peak_allocated_bytes")))
            if mem_trace and mode == "offload" and (b, s) == batches[0]:
                memory_trace_of_one_step(engine, batch, mem_trace)
            if host_profile and mode == "offload" and (b, s) == batches[0]:
                host_profile_of_steps(engine, batch, host_profile)
            if profile and mode == "offload" and (b, s) == batches[0]:
                profile_one_step(engine, batch, profile)
            if timeline_png and mode != "offload_half" and (b, s) == batches[0]:
                spans = timeline_of_one_step(engine, batch)
                if spans:
                    png = Path(timeline_png)
                    if mode != "offload":
                        png = png.with_name(f"{png.stem}_{mode}{png.suffix}")
                    png.with_suffix(".json").write_text(json.dumps(spans))
                    plot_timeline(spans, str(png), f"{name} {b}x{s} {dtype} {mode}, one offloaded step")
        engine.destroy()
        del engine, model, store
        _release_cached_memory()
    return records


def environment() -> dict[str, Any]:
    import deepspeed
    import transformers

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "host": socket.gethostname(),
    }
    if torch.cuda.is_available():
        env["card"] = torch.cuda.get_device_name()
    return env


def table(records: list[dict[str, Any]]) -> str:
    head = (
        "model",
        "batch",
        "mode",
        "step ms",
        "tok/s",
        "x in-GPU",
        "x floor",
        "x transfer",
        "peak GiB",
        "NVML GiB",
        "RSS GiB",
    )
    lines = [" | ".join(head), " | ".join("---" for _ in head)]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in records:
        nv = r.get("nvml_used_bytes")
        lines.append(
            " | ".join(
                [
                    r["model"],
                    r["batch"],
                    r["mode"],
                    f(r["step_ms"], ".1f"),
                    f(r["tokens_per_s"], ".0f"),
                    f(r.get("ratio_to_in_gpu"), ".2f"),
                    f(r.get("ratio_to_floor"), ".2f"),
                    f(r.get("ratio_to_transfer_floor"), ".2f"),
                    f(r.get("peak_allocated_bytes", 0) / _GIB, ".2f"),
                    f(nv / _GIB if nv else None, ".2f"),
                    f(r["host_rss_bytes"] / _GIB, ".2f"),
                ]
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="opt-1.3b")
    parser.add_argument("--batches", default="1x2048,16x256")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-in-gpu", action="store_true")
    parser.add_argument("--no-half", action="store_true")
    parser.add_argument("--prefetch-depth", type=int, default=1, help="zo2.offload.prefetch_depth (ring: depth + 2)")
    parser.add_argument("--timeline", default=None, help="PNG of one offloaded step (first model and batch)")
    parser.add_argument("--out", default=None, help="results JSON")
    parser.add_argument("--mem-trace", default=None, help="text file: what is alive at one offloaded step's peak")
    parser.add_argument("--profile", default=None, help="gzipped chrome trace of two offloaded steps")
    parser.add_argument("--host-profile", default=None, help="text: cProfile of 10 offloaded steps")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny OPT")
    parser.add_argument("--write-back-interval", type=int, default=None, help="zo2.offload.write_back_interval")
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after building each engine")
    parser.add_argument("--no-lean-loss", action="store_true", help="zo2.lean_loss false (HF's loss), for A/B")
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="the model's dtype on CUDA")
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="also run offload_graphs (zo2.offload.cuda_graphs) in the process"
    )
    parser.add_argument(
        "--transfer-dtypes", default="auto", help='zo2.offload.transfer_dtype per offload mode, e.g. "auto,bf16"'
    )
    args = parser.parse_args(argv)
    _HALF[0] = args.dtype == "fp16"
    _LEAN_LOSS[0] = not args.no_lean_loss
    _GC_FREEZE[0] = args.gc_freeze
    if args.tiny:
        args.models, args.batches, args.warmup, args.steps = "tiny", "2x16", 1, 2
    batches = [tuple(int(x) for x in b.split("x")) for b in args.batches.split(",")]
    context = cuda_context_bytes()
    result: dict[str, Any] = {"environment": environment(), "bandwidth": measure_link_bandwidth(), "records": []}
    result["environment"]["cuda_context_nvml_bytes"] = context
    result["environment"]["pytorch_cuda_alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    print(json.dumps(result["environment"]), json.dumps(result["bandwidth"]), flush=True)
    for i, name in enumerate(args.models.split(",")):
        result["records"] += run_offload_bench(
            name,
            batches,
            warmup=args.warmup,
            steps=args.steps,
            in_gpu=not args.no_in_gpu,
            half=not args.no_half,
            timeline_png=args.timeline if i == 0 else None,
            bandwidth=result["bandwidth"],
            prefetch_depth=args.prefetch_depth,
            write_back_interval=args.write_back_interval,
            transfer_dtypes=tuple(args.transfer_dtypes.split(",")),
            cuda_graphs=args.cuda_graphs,
            mem_trace=args.mem_trace if i == 0 else None,
            profile=args.profile if i == 0 else None,
            host_profile=args.host_profile if i == 0 else None,
            log=lambda s: print(s, flush=True),
        )
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
    print(table(result["records"]))
    return result


if __name__ == "__main__":
    main()
