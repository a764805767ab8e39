"""The host links under an offloaded step's traffic: uploads to every GPU of the host at once, with and
without write-backs beside them (CUDA only, one process, all visible GPUs).

    python launch/bench_link.py --out $OUT/link.json          # 2 x H200: ~10 s

Each GPU uploads ``--uploads`` copies of ``--unit-mib`` (a pinned host buffer into a device buffer, one
stream) while, per mode, its write-back stream copies device to host: ``none``; ``write_back`` (one whole
unit after every ``--interval`` uploads, as ``zo2.offload.write_back_interval`` does, issued at once);
``paced`` (the same bytes, a 1/interval part after each upload completes). Reported per GPU count (1, then
all at once) and mode: each GPU's upload GB/s (1e9 bytes/s) over the whole run. This is what bounds the
partitioned step of issue 12: every rank uploads its shard of every unit and writes back its shard of the
updated ones, through one host.
"""

from __future__ import annotations

import argparse
import json

import torch

from zo2_ds.bench import report

MODES = ("none", "write_back", "paced")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unit-mib", type=int, default=201, help="bytes per upload (201: half an OPT-6.7B block)")
    p.add_argument("--uploads", type=int, default=24)
    p.add_argument("--interval", type=int, default=4, help="uploads per written-back unit")
    p.add_argument("--out", default=None, help="results JSON")
    args = p.parse_args(argv)
    for name in ("unit_mib", "uploads", "interval"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: {getattr(args, name)} must be at least 1")
    return args


def _buffers(gpu: int, nbytes: int) -> dict:
    with torch.cuda.device(gpu):
        return {
            "host_up": torch.empty(nbytes, dtype=torch.uint8).pin_memory(),
            "host_wb": torch.empty(nbytes, dtype=torch.uint8).pin_memory(),
            "dev_up": torch.empty(nbytes, dtype=torch.uint8, device=gpu),
            "dev_wb": torch.empty(nbytes, dtype=torch.uint8, device=gpu),
            "up": torch.cuda.Stream(gpu),
            "wb": torch.cuda.Stream(gpu),
        }


def _issue(b: dict, mode: str, uploads: int, interval: int) -> tuple:
    nbytes = b["host_up"].numel()
    part = nbytes // interval
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(b["up"])
    b["wb"].wait_stream(b["up"])
    for i in range(uploads):
        with torch.cuda.stream(b["up"]):
            b["dev_up"].copy_(b["host_up"], non_blocking=True)
            done = torch.cuda.Event()
            done.record(b["up"])
        with torch.cuda.stream(b["wb"]):
            if mode == "write_back" and i % interval == 0:
                b["host_wb"].copy_(b["dev_wb"], non_blocking=True)
            elif mode == "paced":
                b["wb"].wait_event(done)
                k = (i % interval) * part
                b["host_wb"][k : k + part].copy_(b["dev_wb"][k : k + part], non_blocking=True)
    end.record(b["up"])
    return start, end


def measure(gpus: list[int], bufs: dict, mode: str, uploads: int, interval: int) -> list[float]:
    """Each GPU's upload GB/s with every GPU of ``gpus`` running ``mode`` at once."""
    for g in gpus:
        torch.cuda.synchronize(g)
    events = {g: _issue(bufs[g], mode, uploads, interval) for g in gpus}
    rates = []
    for g in gpus:
        torch.cuda.synchronize(g)
        ms = events[g][0].elapsed_time(events[g][1])
        rates.append(uploads * bufs[g]["host_up"].numel() / ms / 1e6)
    return rates


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_link.py: needs CUDA (it measures the host links of the GPUs)")
    gpus = list(range(torch.cuda.device_count()))
    nbytes = args.unit_mib << 20
    bufs = {g: _buffers(g, nbytes) for g in gpus}
    rows = []
    for active in ([0], gpus) if len(gpus) > 1 else ([0],):
        for mode in MODES:
            measure(active, bufs, mode, 2, args.interval)  # warm-up
            rates = measure(active, bufs, mode, args.uploads, args.interval)
            mean = sum(rates) / len(rates)
            rows.append({"gpus": len(active), "mode": mode, "upload_gbps_per_gpu": rates, "mean": mean})
    result = {"env": report.environment(), "args": vars(args), "rows": rows}
    report.write_json(args.out, result)
    print(report.format_table(rows, "gpus mode mean:.1f"))
    print(json.dumps(rows))
    return result


if __name__ == "__main__":
    main()
