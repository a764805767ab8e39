"""Speed and memory of the ZO step against two plain forwards and MeZO's reference pattern (issue #2).

    python launch/bench.py --models opt-1.3b,opt-6.7b,opt-13b --batches 1x2048,16x256 --out bench.json
    python launch/bench.py --kernels --models none       # the fused kernels against copy bandwidth
    python launch/bench.py --tiny                          # CPU smoke run: a tiny OPT, seconds

Modes, one function each (``MODES``), all on the same random-init model and batch:
  forward    two plain forwards under torch.inference_mode: the floor a ZO step is measured against
  zo_engine  zo2_ds's full step: engine(**batch), engine.backward(loss), engine.step()
  mezo_ref   MeZO's pattern: per tensor torch.normal + add_ to perturb +eps, forward, -2 eps, forward,
             +eps to restore, then the update with z drawn again
  zo_engine_torch / zo_engine_per_tensor (opt-in): the engine with the fused kernels off (zo.py's torch
             path) / with one kernel launch per tensor instead of one per block
Each reports the median step time over ``--steps`` steps after ``--warmup`` (CUDA events on GPU),
peak ``torch.cuda.max_memory_allocated`` / reserved and NVML "used" memory at the end of the mode.
Results go to JSON (one record per model x batch x mode, written after every configuration, so a run
cut short keeps what it measured), with card, date and versions; a table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# DeepSpeed's init_distributed needs the rendezvous variables (else it tries MPI); one process, world 1.
for _key, _value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
    os.environ.setdefault(_key, _value)
os.environ.setdefault("MASTER_PORT", str(_free_port()))
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ModelShape:
    """An OPT shape (OPTConfig fields)."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    vocab_size: int = 50272
    max_positions: int = 2048

    @property
    def ffn_dim(self) -> int:
        return 4 * self.hidden_size


SHAPES = {
    s.name: s
    for s in (
        ModelShape("opt-1.3b", 2048, 24, 32),
        ModelShape("opt-6.7b", 4096, 32, 32),
        ModelShape("opt-13b", 5120, 40, 40),
        ModelShape("tiny", 64, 2, 4, vocab_size=1000, max_positions=128),
    )
}


# -------------------------------------------------------------------------------------------------
# Building the model and the batch
# -------------------------------------------------------------------------------------------------


def build_model(
    shape: ModelShape, device: torch.device, dtype: torch.dtype, use_cache: bool = False
) -> torch.nn.Module:
    """A random-init OPTForCausalLM built directly on ``device`` in ``dtype``.

    ``use_cache`` is off by default, as for training: with it on, every forward also builds and returns
    a KV cache (time in torch.cat, and memory held as long as the output is).

    HF's init is skipped (``no_init_weights``) and the weights are drawn on the device: the CPU default
    init of a 6.7B model takes minutes, a GPU ``normal_`` a fraction of a second.
    """
    from transformers import OPTConfig, OPTForCausalLM
    from transformers.initialization import no_init_weights

    config = OPTConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        ffn_dim=shape.ffn_dim,
        max_position_embeddings=shape.max_positions,
        word_embed_proj_dim=shape.hidden_size,
        dropout=0.0,
        attention_dropout=0.0,
        layerdrop=0.0,
        use_cache=use_cache,
    )
    saved_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights(), torch.device(device):
            model = OPTForCausalLM(config)
    finally:
        torch.set_default_dtype(saved_dtype)
    model.tie_weights()  # no_init_weights skips the tying that post_init does: OPT's head is its embedding
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            elif name.endswith("weight"):  # layer norm scales
                p.fill_(1.0)
            else:
                p.zero_()
    return model.to(dtype)


def make_batch(shape: ModelShape, batch_size: int, seq_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(1)
    input_ids = torch.randint(0, shape.vocab_size, (batch_size, seq_len), generator=gen).to(device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}


# -------------------------------------------------------------------------------------------------
# Timing and memory
# -------------------------------------------------------------------------------------------------


def time_steps(step: Callable[[], Any], warmup: int, steps: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``steps`` calls after ``warmup`` calls (CUDA events on GPU)."""
    for _ in range(warmup):
        step()
    if device.type != "cuda":
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def _nvml_used_bytes(device: torch.device) -> int | None:
    """Device memory in use as NVML sees it (CUDA context and allocator cache included)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:  # no NVML (CPU machine, missing package): report nothing rather than fail
        return None


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _memory_record(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {}
    return {
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
        "nvml_used_bytes": _nvml_used_bytes(device),
    }


def measure(step: Callable[[], Any], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    _reset_memory(device)
    times = time_steps(step, args.warmup, args.steps, device)
    record = {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "steps": len(times),
        "warmup": args.warmup,
    }
    record.update(_memory_record(device))
    return record


# -------------------------------------------------------------------------------------------------
# The measured modes: each takes (model, batch, args, device) and returns a record
# -------------------------------------------------------------------------------------------------


def bench_forward(model: torch.nn.Module, batch: dict, args: argparse.Namespace, device: torch.device) -> dict:
    """Two plain forwards (with the loss) under inference_mode: what L+ and L- cost without ZO."""
    model.eval()

    def step() -> tuple:
        with torch.inference_mode():
            loss_plus = model(**batch).loss
            loss_minus = model(**batch).loss
        return loss_plus, loss_minus

    return measure(step, args, device)


def bench_mezo_ref(model: torch.nn.Module, batch: dict, args: argparse.Namespace, device: torch.device) -> dict:
    """MeZO's trainer pattern (zo_perturb_parameters / zo_step / zo_update), with in-place add_.

    z is materialised per tensor by ``torch.normal`` (MeZO reseeds to regenerate it); the projected
    gradient is read to the host with ``.item()`` as MeZO does.
    """
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    eps, lr = args.eps, args.lr

    def perturb(seed: int, scale: float) -> None:
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0.0, std=1.0, size=p.shape, device=p.device, dtype=p.dtype)
            p.data.add_(z, alpha=scale * eps)

    step_seed = [0]

    @torch.no_grad()
    def step() -> None:
        seed = step_seed[0] = step_seed[0] + 1
        perturb(seed, +1.0)
        with torch.inference_mode():
            loss_plus = model(**batch).loss
        perturb(seed, -2.0)
        with torch.inference_mode():
            loss_minus = model(**batch).loss
        perturb(seed, +1.0)
        g = ((loss_plus - loss_minus) / (2 * eps)).item()
        torch.manual_seed(seed)
        for p in params:  # weight_decay = 0 in this benchmark, as in the engine's config
            z = torch.normal(mean=0.0, std=1.0, size=p.shape, device=p.device, dtype=p.dtype)
            p.data.add_(z, alpha=-lr * g)

    return measure(step, args, device)


def zo_engine_config(args: argparse.Namespace, batch_size: int) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": batch_size,
        "optimizer": {"type": "SGD", "params": {"lr": args.lr, "weight_decay": 0.0}},
        "zo2": {"enabled": True, "eps": args.eps},
    }
    if args.dtype == "fp16":
        config["fp16"] = {"enabled": True}
    elif args.dtype == "bf16":
        config["bf16"] = {"enabled": True}
    return config


def bench_zo_engine(model: torch.nn.Module, batch: dict, args: argparse.Namespace, device: torch.device) -> dict:
    """The zo2_ds engine's full training step, through the DeepSpeed-style API."""
    import zo2_ds

    engine, _, _, _ = zo2_ds.initialize(model=model, config=zo_engine_config(args, batch["input_ids"].shape[0]))
    engine.train()

    def step() -> None:
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()

    try:
        record = measure(step, args, device)
        if args.profile:
            record["profile"] = profile_step(step, device)
        return record
    finally:
        destroy = getattr(engine, "destroy", None)
        if destroy is not None:
            destroy()  # removes the perturbation hooks, so the next mode sees the plain model


def profile_step(step: Callable[[], Any], device: torch.device, top: int = 12) -> dict[str, Any]:
    """One step under torch.profiler: host wall time vs summed GPU kernel time (is the step CPU-bound?),
    and the operators costing the most host and device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    wall_ms = (time.perf_counter() - start) * 1e3
    events = prof.key_averages()

    def device_us(e: Any) -> float:
        return getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0)

    def row(e: Any) -> dict:
        return {"name": e.key[:80], "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                "self_device_ms": device_us(e) / 1e3}  # fmt: skip

    # Only kernel events: operator rows (aten::*, Optimizer.step, ...) repeat their kernels' time.
    kernels = [e for e in events if getattr(e, "device_type", None) != torch.autograd.DeviceType.CPU]
    return {
        "wall_ms_profiled": wall_ms,
        "device_kernel_ms": sum(device_us(e) for e in kernels) / 1e3,
        "top_cpu": [row(e) for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]],
        "top_device": [row(e) for e in sorted(events, key=lambda e: -device_us(e))[:top]],
    }


def bench_zo_engine_torch(model: torch.nn.Module, batch: dict, args: argparse.Namespace, device: torch.device) -> dict:
    """The engine's step with the fused kernels switched off (zo.py's torch path): what they buy."""
    from zo2_ds import kernels

    saved = os.environ.get("ZO2_DS_DISABLE_KERNELS")
    os.environ["ZO2_DS_DISABLE_KERNELS"] = "1"
    kernels.available.cache_clear()
    try:
        return bench_zo_engine(model, batch, args, device)
    finally:
        if saved is None:
            del os.environ["ZO2_DS_DISABLE_KERNELS"]
        else:
            os.environ["ZO2_DS_DISABLE_KERNELS"] = saved
        kernels.available.cache_clear()


def bench_zo_engine_per_tensor(
    model: torch.nn.Module, batch: dict, args: argparse.Namespace, device: torch.device
) -> dict:
    """The engine's step with one fused-kernel launch per tensor (the multi-tensor launches off)."""
    from zo2_ds import perturb

    saved = perturb._MULTI_TENSOR["enabled"]
    perturb._MULTI_TENSOR["enabled"] = False
    try:
        return bench_zo_engine(model, batch, args, device)
    finally:
        perturb._MULTI_TENSOR["enabled"] = saved


MODES: dict[str, Callable[..., dict]] = {
    "forward": bench_forward,
    "mezo_ref": bench_mezo_ref,
    "zo_engine": bench_zo_engine,
    "zo_engine_torch": bench_zo_engine_torch,  # not in the default list
    "zo_engine_per_tensor": bench_zo_engine_per_tensor,  # not in the default list
}
DEFAULT_MODES = "forward,mezo_ref,zo_engine"


# -------------------------------------------------------------------------------------------------
# Kernel microbenchmark
# -------------------------------------------------------------------------------------------------


def bench_kernels(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Fused kernels vs a device-to-device copy of the same bytes (the bandwidth ceiling), and vs
    MeZO's per-tensor torch.normal + add_. Sizes are OPT-1.3B's embedding, fc1 and q_proj."""
    records = []
    for numel in (50272 * 2048, 8192 * 2048, 2048 * 2048):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            records.extend(_bench_kernel_cases(numel, dtype, device))
            torch.cuda.empty_cache()
    records.append(_launch_overhead(device))
    records.append(_multi_tensor_unit(device))
    records.append(_kernel_resources(device))
    return records


def _bench_kernel_cases(numel: int, dtype: torch.dtype, device: torch.device) -> list[dict]:
    from triton.testing import do_bench

    from zo2_ds import kernels, zo

    seeds = [zo.z_seed(0, 0, i, 1) for i in range(16)]
    theta = torch.randn(numel, device=device, dtype=dtype)
    out, out2 = torch.empty_like(theta), torch.empty_like(theta)
    size = theta.element_size()
    table = kernels.TensorTable([theta], [1])  # the multi-tensor kernel on this one tensor

    def mezo_pattern() -> None:
        z = torch.normal(0.0, 1.0, size=theta.shape, device=device, dtype=dtype)
        theta.add_(z, alpha=1e-9)

    cases = {  # name: (function, bytes moved per element or None)
        "copy": (lambda: out.copy_(theta), 2 * size),
        "perturb": (lambda: kernels.perturbed_into(out, theta, seeds[0], 1e-3), 2 * size),
        "update_q1": (lambda: kernels.apply_update_(theta, seeds[:1], [1e-9], 1.0, 0.0), 2 * size),
        "update_q4": (lambda: kernels.apply_update_(theta, seeds[:4], [1e-9] * 4, 1.0, 0.0), 2 * size),
        "fused_update_2outs": (
            lambda: kernels.update_and_perturb_(
                theta, (seeds[:1], [1e-9], 1.0, 0.0), seeds[1], (1e-3, -1e-3), (out, out2)
            ),
            4 * size,
        ),
        "perturb_multi": (lambda: kernels.perturbed_into_multi(table, out, 12345, 1e-3), 2 * size),
        "update_q1_multi": (lambda: kernels.apply_update_multi_(table, [12345], [1e-9], 1.0, 0.0), 2 * size),
        "mezo_normal_add": (mezo_pattern, None),
    }
    if dtype == torch.float16 and numel == 50272 * 2048:  # variants that would change z (design choices)
        for rounds, fast, warps in ((10, True, 4), (7, False, 4), (7, True, 8), (7, True, 2)):
            cases[f"perturb_r{rounds}_{'fast' if fast else 'precise'}_w{warps}"] = (
                lambda r=rounds, f=fast, w=warps: kernels._launch(
                    theta, (out,), (1e-3,), seeds[0], rounds=r, fast_math=f, num_warps=w
                ),
                2 * size,
            )
    records, copy_ms = [], None
    for name, (fn, bytes_per_elem) in cases.items():
        rec: dict[str, Any] = {"case": name, "numel": numel, "dtype": str(dtype).replace("torch.", "")}
        try:
            ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        except Exception as exc:  # one failing case must not hide the others
            records.append({**rec, "error": repr(exc)})
            continue
        copy_ms = ms if name == "copy" else copy_ms
        rec.update(ms=ms, gelem_per_s=numel / ms / 1e6)
        if bytes_per_elem is not None:
            rec["gb_per_s"] = numel * bytes_per_elem / ms / 1e6
        if copy_ms:
            rec["vs_copy"] = ms / copy_ms
        records.append(rec)
    return records


def _launch_overhead(device: torch.device) -> dict:
    """Host microseconds per perturbed_into call on a small (bias-sized) tensor: with ~400 tensors
    an OPT model pays this ~1200 times a step (two perturbations and an update)."""
    from zo2_ds import kernels

    theta = torch.randn(2048, device=device, dtype=torch.float16)
    out = torch.empty_like(theta)
    for _ in range(10):
        kernels.perturbed_into(out, theta, 123, 1e-3)
    torch.cuda.synchronize(device)
    record: dict[str, Any] = {"case": "launch_overhead_small_tensor"}
    saved = kernels._DIRECT_STATE["enabled"]
    for direct in (True, False):
        kernels._DIRECT_STATE["enabled"] = direct
        calls = 2000
        start = time.perf_counter()
        for i in range(calls):
            kernels.perturbed_into(out, theta, 123 + i, 1e-3)
        record["host_us_per_call_direct" if direct else "host_us_per_call_triton"] = (
            (time.perf_counter() - start) / calls * 1e6
        )
        torch.cuda.synchronize(device)
    kernels._DIRECT_STATE["enabled"] = saved
    record["host_us_per_call"] = record["host_us_per_call_direct" if saved else "host_us_per_call_triton"]
    return record


def _multi_tensor_unit(device: torch.device) -> dict:
    """One OPT decoder layer (16 fp16 tensors) perturbed tensor by tensor (16 launches) vs in one multi-tensor
    launch: GPU ms (do_bench) on an OPT-1.3B layer, and host us per layer on a hidden=64 layer (so the GPU
    work is too small to hold the host back: what the hooks pay per block)."""
    record: dict[str, Any] = {"case": "multi_tensor_unit_opt_layer"}
    for name, fn in _layer_perturbers(2048, 8192, device).items():
        record[f"{name}_gpu_ms_opt1.3b"] = _do_bench(fn)
    for name, fn in _layer_perturbers(64, 256, device).items():
        for _ in range(10):
            fn()
        torch.cuda.synchronize(device)
        calls = 300
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        record[f"{name}_host_us_h64"] = (time.perf_counter() - start) / calls * 1e6
        torch.cuda.synchronize(device)
    return record


def _do_bench(fn: Callable[[], Any]) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _layer_perturbers(h: int, f: int, device: torch.device) -> dict[str, Callable[[], None]]:
    """{"per_tensor": 16 perturbed_into calls, "multi": one perturbed_into_multi} over one OPT layer's tensors."""
    from zo2_ds import kernels, zo

    shapes = [(h, h), (h,)] * 4 + [(f, h), (f,), (h, f), (h,), (h,), (h,), (h,), (h,)]
    thetas = [torch.randn(s, device=device, dtype=torch.float16) for s in shapes]
    keys = [zo.param_key(f"layer.{i}") for i in range(len(shapes))]
    outs = [torch.empty_like(t) for t in thetas]
    table = kernels.TensorTable(thetas, keys)
    flat = torch.empty(table.scratch_numel, device=device, dtype=torch.float16)
    pass_hash = zo.z_pass_hash(0, 0, 0)

    def per_tensor() -> None:
        for t, o, k in zip(thetas, outs, keys):
            kernels.perturbed_into(o, t, zo.z_seed_from_pass(pass_hash, k), 1e-3)

    def multi() -> None:
        kernels.perturbed_into_multi(table, flat, pass_hash, 1e-3)

    return {"per_tensor": per_tensor, "multi": multi}


def _kernel_resources(device: torch.device) -> dict:
    """Registers, spills and a count of the key PTX instructions of the compiled perturb kernel."""
    from zo2_ds import kernels

    theta = torch.randn(1 << 20, device=device, dtype=torch.float16)
    compiled = kernels._launch(theta, (torch.empty_like(theta),), (1e-3,), 7)
    if compiled is None:
        return {"case": "kernel_resources", "error": "no compiled kernel handle"}
    ptx = compiled.asm.get("ptx", "")
    counts = {
        op: ptx.count(op)
        for op in ("lg2.approx", "sin.approx", "cos.approx", "sqrt.approx", "mul.hi.u32", "ld.global", "st.global")
    }
    counts["ld.global.v4"] = ptx.count("ld.global.v4")
    return {
        "case": "kernel_resources",
        "n_regs": getattr(compiled, "n_regs", None),
        "n_spills": getattr(compiled, "n_spills", None),
        "ptx_counts": counts,
    }


# -------------------------------------------------------------------------------------------------
# Driver
# -------------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    }
    for name in ("transformers", "deepspeed", "triton"):
        try:
            env[name] = __import__(name).__version__
        except Exception:
            env[name] = None
    try:
        from zo2_ds import kernels

        env["zo2_kernels_available"] = kernels.available()
    except Exception as exc:
        env["zo2_kernels_available"] = repr(exc)
    return env


def run_model(shape: ModelShape, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Every batch shape and mode on one model; errors (OOM, missing engine) are recorded, not raised."""
    records: list[dict] = []
    base = {"model": shape.name, "shape": asdict(shape), "dtype": args.dtype, "use_cache": args.use_cache}
    try:
        start = time.perf_counter()
        model = build_model(shape, device, DTYPES[args.dtype], use_cache=args.use_cache)
        build_s = time.perf_counter() - start
        num_params = sum(p.numel() for p in model.parameters())
    except Exception as exc:
        return [{**base, "mode": "build", "error": repr(exc)}]
    for batch_size, seq_len in args.batches:
        batch = make_batch(shape, batch_size, seq_len, device)
        for mode in args.modes:
            rec = {**base, "mode": mode, "batch_size": batch_size, "seq_len": seq_len}
            rec.update(num_params=num_params, build_s=build_s)
            try:
                rec.update(MODES[mode](model, batch, args, device))
            except Exception as exc:
                rec["error"] = repr(exc)
                rec["traceback"] = traceback.format_exc(limit=8)
                print(f"[bench] {shape.name} {batch_size}x{seq_len} {mode}: {exc!r}", file=sys.stderr, flush=True)
            records.append(rec)
            print(f"[bench] {_row(rec)}", flush=True)
            _reset_memory(device)
        del batch
    del model
    _reset_memory(device)
    return records


def add_ratios(records: list[dict]) -> None:
    """Per model x batch: step time and peak memory of each mode over the plain-forward baseline."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for rec in records:
        if "median_ms" in rec:
            by_key.setdefault((rec["model"], rec.get("batch_size"), rec.get("seq_len")), {})[rec["mode"]] = rec
    for modes in by_key.values():
        base = modes.get("forward")
        for rec in modes.values():
            if base is not None:
                rec["time_vs_forward"] = rec["median_ms"] / base["median_ms"]
                if rec.get("peak_allocated_bytes") and base.get("peak_allocated_bytes"):
                    rec["peak_vs_forward"] = rec["peak_allocated_bytes"] / base["peak_allocated_bytes"]
            if rec["mode"] == "zo_engine" and "mezo_ref" in modes:
                rec["time_vs_mezo_ref"] = rec["median_ms"] / modes["mezo_ref"]["median_ms"]


def _row(rec: dict) -> str:
    head = f"{rec['model']:<9} {rec.get('batch_size', '')}x{rec.get('seq_len', ''):<5} {rec['mode']:<10}"
    if "error" in rec:
        return f"{head} ERROR {rec['error'][:80]}"
    gib = (rec.get("peak_allocated_bytes") or 0) / 2**30
    nvml = rec.get("nvml_used_bytes")
    nvml_txt = f"{nvml / 2**30:7.2f}" if nvml else "      -"
    ratio = rec.get("time_vs_forward")
    peak_ratio = rec.get("peak_vs_forward")
    return (
        f"{head} {rec['median_ms']:9.2f} ms  x{ratio if ratio else math.nan:5.2f}  "
        f"peak {gib:7.2f} GiB x{peak_ratio if peak_ratio else math.nan:5.3f}  nvml {nvml_txt} GiB"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="opt-1.3b", help=f"comma list of {sorted(SHAPES)}, or 'none'")
    p.add_argument("--batches", default="1x2048,16x256", help="comma list of BATCHxSEQ")
    p.add_argument("--modes", default=DEFAULT_MODES, help=f"comma list of {list(MODES)}")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default fp16 on GPU, fp32 on CPU")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--use-cache", action="store_true", help="build OPT with use_cache=True (KV cache per forward)")
    p.add_argument("--profile", action="store_true", help="profile one zo_engine step (torch.profiler)")
    p.add_argument("--kernels", action="store_true", help="also run the fused-kernel microbenchmark (CUDA)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: --models tiny --batches 2x32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--report", nargs="+", default=None, metavar="JSON", help="only print the tables of result files")
    args = p.parse_args(argv)
    if args.tiny:
        args.models, args.batches = "tiny", "2x32"
    args.models = [] if args.models == "none" else args.models.split(",")
    unknown = [m for m in args.models if m not in SHAPES]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {sorted(SHAPES)}")
    args.modes = args.modes.split(",")
    if any(m not in MODES for m in args.modes):
        p.error(f"--modes: choose from {list(MODES)}")
    args.batches = [tuple(int(v) for v in b.lower().split("x")) for b in args.batches.split(",")]
    if args.dtype is None:
        args.dtype = "fp16" if args.device.startswith("cuda") else "fp32"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.report:
        for path in args.report:
            try:
                print_tables(json.loads(Path(path).read_text()))
            except (OSError, ValueError) as exc:
                print(f"{path}: {exc}")
        return {}
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    result: dict[str, Any] = {"env": environment(device), "args": {k: v for k, v in vars(args).items()}}
    result["records"], result["kernels"] = [], []

    def save() -> None:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1, default=str))

    if args.kernels:
        if device.type == "cuda":
            result["kernels"] = bench_kernels(args, device)
        else:
            result["kernels"] = [{"case": "all", "error": "kernel microbenchmark needs CUDA"}]
        save()
    for name in args.models:
        result["records"].extend(run_model(SHAPES[name], args, device))
        add_ratios(result["records"])
        save()
    print_tables(result)
    return result


def print_tables(result: dict) -> None:
    env = result["env"]
    print(f"\n== {env['card']}  {env['date']}  torch {env['torch']}  triton {env.get('triton')}")
    for rec in result["kernels"]:
        if "ms" in rec:
            extra = f"{rec.get('gb_per_s', 0):8.0f} GB/s  x{rec.get('vs_copy', math.nan):5.2f} copy"
            print(f"kernel {rec['case']:<26} {rec['dtype']:<8} n={rec['numel']:<10} {rec['ms']:8.3f} ms {extra}")
        elif rec.get("case") == "launch_overhead_small_tensor":
            direct, via_triton = (
                rec.get("host_us_per_call_direct", math.nan),
                rec.get("host_us_per_call_triton", math.nan),
            )
            print(f"kernel launch overhead (host us/call): direct {direct:.1f}, through triton {via_triton:.1f}")
        else:
            print(f"kernel {json.dumps(rec)[:200]}")
    for rec in result["records"]:
        print(_row(rec))
        prof = rec.get("profile")
        if prof:
            tops = ", ".join(f"{r['name'][:40]} {r['self_cpu_ms']:.1f}" for r in prof["top_cpu"][:6])
            wall, gpu = prof["wall_ms_profiled"], prof["device_kernel_ms"]
            print(f"    profiled step: wall {wall:.1f} ms, GPU kernels {gpu:.1f} ms; top host ms: {tops}")


if __name__ == "__main__":
    main()
