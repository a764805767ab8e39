"""Measurement helpers: steady-state step times, device and host memory, link bandwidth.

Every timed call is bracketed by device synchronizations, so a step's time is its wall time from an
idle device to an idle device, whatever the step does inside (the ZO step reads its projected gradient
on the host anyway). Steps after ``warmup`` are timed one by one and summarised by their median.
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "time_calls",
    "time_back_to_back",
    "summarize",
    "sync",
    "release_cached_memory",
    "reset_peak_memory",
    "device_memory",
    "nvml_used_bytes",
    "host_rss_bytes",
    "reset_host_rss_peak",
    "cuda_context_bytes",
    "link_bandwidth",
    "gather_bandwidth",
    "summed_over_ranks",
    "NvmlPeak",
    "HostRssPeak",
]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], Any], warmup: int, steps: int) -> list[float]:
    """Milliseconds of each of ``steps`` calls of ``fn`` made after ``warmup`` untimed calls."""
    times = []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return times


def time_back_to_back(fn: Callable[[], Any], steps: int) -> float:
    """Milliseconds per call of ``steps`` calls made back to back, one device sync before and after: the
    throughput of a training loop, in which the host may issue a step while the device finishes the last
    (``time_calls`` syncs around each call, so each of its figures also holds the host's issue latency)."""
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - start) * 1e3 / steps


def summarize(times: list[float], warmup: int) -> dict[str, Any]:
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "steps": len(times),
        "warmup": warmup,
        "step_ms_all": times,
    }


def release_cached_memory() -> None:
    """Give cached device (and pinned host) blocks back, so later readings see only what runs next."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        host_empty = getattr(torch._C, "_host_emptyCache", None)
        if host_empty is not None:
            host_empty()


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def device_memory() -> dict[str, int | None]:
    """Peak allocated / reserved since the last reset, and NVML's reading now (empty on CPU)."""
    if not torch.cuda.is_available():
        return {}
    return {
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
        "nvml_used_bytes": nvml_used_bytes(),
    }


def nvml_used_bytes() -> int | None:
    """Device memory in use as NVML counts it (the whole device: CUDA context and allocator cache
    included); None where NVML is not available."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:  # no pynvml or no GPU: report nothing rather than fail the run
        return None


def host_rss_bytes() -> dict[str, int]:
    """This process's resident host memory now, and its peak since :func:`reset_host_rss_peak` (where the
    kernel allows the reset; else since the process began)."""
    import psutil

    try:
        peak = _proc_status_bytes("VmHWM")
    except (OSError, KeyError):  # not Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return {"host_rss_bytes": psutil.Process().memory_info().rss, "host_rss_peak_bytes": peak}


def reset_host_rss_peak() -> bool:
    """Start :func:`host_rss_bytes`' peak afresh (VmHWM := VmRSS); False where the kernel does not let this
    process do it (the peak then covers the whole process)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def summed_over_ranks(value: int) -> int:
    """``value`` summed over the ranks of the job (a collective when there are several; else ``value``): the
    host memory of a node whose ranks are all this job's."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return int(total.item())


def cuda_context_bytes() -> int | None:
    """NVML-used bytes with CUDA initialised, a cuBLAS handle made and nothing allocated: the floor of every
    NVML reading of this process. Call it before anything else touches the GPU."""
    if not torch.cuda.is_available():
        return None
    a = torch.ones(64, 64, device="cuda", dtype=torch.float16)
    (a @ a).sum().item()
    del a
    release_cached_memory()
    return nvml_used_bytes()


def link_bandwidth(num_bytes: int = 1 << 30, repeats: int = 5) -> dict[str, float]:
    """Pinned host<->device bandwidth in GB/s (1e9 bytes/s): to the device, from it, and both at once
    (the sum); the median of ``repeats`` copies of ``num_bytes``. Empty on CPU."""
    if not torch.cuda.is_available():
        return {}
    result = _copy_bandwidth(num_bytes, repeats)
    release_cached_memory()  # the buffers are gone: give their cache (and pinned blocks) back
    return result


def gather_bandwidth(num_bytes: int = 1 << 30, repeats: int = 5) -> dict[str, float]:
    """Under a launcher on CUDA (more than one rank): an all-gather of ``num_bytes`` over every rank (each
    contributes 1/N), the median of ``repeats``; ``allgather_gbps`` is the bytes a rank receives from the
    others per second (1e9 bytes/s): what gathering partitioned masters moves. Empty otherwise. It runs in
    a process group of its own, destroyed after, so that NCCL's buffers for it do not stay in the NVML
    figures of the runs measured next (the world group's communicator would keep them)."""
    if not torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return {}
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="nccl")
    world = dist.get_world_size()
    group = dist.new_group(list(range(world)))
    try:
        seconds, received = _gather_seconds(dist, num_bytes // world, world, repeats, group)
    finally:
        torch.cuda.synchronize()
        with contextlib.suppress(Exception):  # a torch that cannot destroy a subgroup: it stays, as before
            dist.destroy_process_group(group)
    release_cached_memory()
    return {"allgather_gbps": received / seconds / 1e9, "allgather_world": world}


def _gather_seconds(dist: Any, shard_bytes: int, world: int, repeats: int, group: Any = None) -> tuple[float, int]:
    out = torch.empty(shard_bytes * world, dtype=torch.uint8, device=torch.cuda.current_device())
    own = out[:shard_bytes].clone()
    times = time_calls(lambda: dist.all_gather_into_tensor(out, own, group=group), 2, repeats)
    return statistics.median(times) / 1e3, shard_bytes * (world - 1)


def _copy_bandwidth(num_bytes: int, repeats: int) -> dict[str, float]:
    host_in = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)
    host_out = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)
    dev_in = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dev_out = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    up, down = torch.cuda.Stream(), torch.cuda.Stream()

    def both() -> None:
        with torch.cuda.stream(up):
            dev_in.copy_(host_in, non_blocking=True)
        with torch.cuda.stream(down):
            host_out.copy_(dev_out, non_blocking=True)

    def seconds(fn: Callable[[], Any]) -> float:
        return statistics.median(time_calls(fn, 1, repeats)) / 1e3

    return {
        "h2d_gbps": num_bytes / seconds(lambda: dev_in.copy_(host_in, non_blocking=True)) / 1e9,
        "d2h_gbps": num_bytes / seconds(lambda: host_out.copy_(dev_out, non_blocking=True)) / 1e9,
        "bidir_sum_gbps": 2 * num_bytes / seconds(both) / 1e9,
    }


class NvmlPeak:
    """The peak of GPU 0's used memory (as NVML counts it: the whole device, every process) while the
    ``with`` block runs, sampled by a thread every ``interval_s``; through pynvml, else nvidia-smi, else None."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.peak_bytes: int | None = None
        self.baseline_bytes: int | None = None
        self.source: str | None = None
        self._read = self._reader()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _reader(self) -> Callable[[], int] | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.source = "pynvml"
            return lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        except Exception:  # no pynvml or no GPU: try nvidia-smi
            pass
        cmd = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"]
        try:
            subprocess.run(cmd, capture_output=True, check=True, timeout=10)
        except Exception:  # no GPU here: nothing to sample
            return None
        self.source = "nvidia-smi"
        return lambda: int(subprocess.run(cmd, capture_output=True, text=True).stdout.split()[0]) * 2**20

    def _sample(self) -> None:
        while not self._stop.is_set():
            used = self._read()
            self.peak_bytes = used if self.peak_bytes is None else max(self.peak_bytes, used)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> NvmlPeak:
        if self._read is not None:
            self.baseline_bytes = self._read()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def _proc_status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(f"/proc/self/status has no {field}")


class HostRssPeak:
    """The peak of this process's resident host memory while the ``with`` block runs, and its growth over the
    reading at entry (``growth_bytes``). A thread samples VmRSS every ``interval_s``; where the kernel lets a
    process reset its high-water mark (``/proc/self/clear_refs``), VmHWM at exit also catches a peak that
    rose and fell between two samples (``hwm_reset`` says whether it did). Linux only."""

    def __init__(self, interval_s: float = 0.01):
        self.interval_s = interval_s
        self.baseline_bytes = 0
        self.peak_bytes = 0
        self.num_samples = 0
        self.hwm_reset = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @property
    def growth_bytes(self) -> int:
        return self.peak_bytes - self.baseline_bytes

    @staticmethod
    def now_bytes() -> int:
        """This process's resident host memory now (VmRSS)."""
        return _proc_status_bytes("VmRSS")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, _proc_status_bytes("VmRSS"))
            self.num_samples += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> HostRssPeak:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS now
            self.hwm_reset = True
        except OSError:  # not allowed here (some containers): the samples alone
            pass
        self.baseline_bytes = self.peak_bytes = _proc_status_bytes("VmRSS")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, _proc_status_bytes("VmRSS"))
        if self.hwm_reset:
            self.peak_bytes = max(self.peak_bytes, _proc_status_bytes("VmHWM"))
