"""Offloaded ZO on 1 and N GPUs of one host in one call: replicated masters, partitioned masters
(zo2.offload.partition "node") and perturbation parallelism, with a scaling model checked against them.

    python launch/bench_scaling.py --models opt-6.7b,opt-13b --gpus 1,2 --out $OUT/scaling.json
    python launch/bench_scaling.py --models opt-13b --gpus 1,2 --perturbation-parallel 2 --timeline $OUT/tl.png
    python launch/bench_scaling.py --tiny --gpus 1,2                          # CPU ranks over gloo, seconds

Per model and GPU count, one launch of launch/bench_offload.py (``torchrun --nproc_per_node N`` above one
GPU) with the per-rank batch fixed, every block streamed: ``offload`` (each rank its own copy of the masters),
and above one GPU ``offload_partitioned`` and ``offload_pp<P>``. A row's tokens/s counts the job: N ranks'
micro-batches per step, over P for perturbation parallelism (a group of P ranks shares one micro-batch).
``scaling`` is that over the 1-GPU offloaded row's; ``latency`` the step over the 1-GPU step.

The scaling model (``model`` in the JSON): a rank's step is bound by the largest of its compute (two
forwards per perturbation, over P with perturbation parallelism), its host link, which carries its 1/N
shard of every streamed block (partitioned) or all of it (replicated), and the host itself, which carries
every rank's uploads and write-backs (``--host-gbs``); the all-gather of the other (N-1)/N runs on NVLink
beside them. Predicted for 1..8 GPUs from the link and NVLink bandwidths measured here, and for several
nodes (a node holds one copy and gathers inside itself; across nodes only the scalar g is all-reduced).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="opt-6.7b", help="comma-separated shapes of zo2_ds.bench.SHAPES")
    p.add_argument("--batch", default="1x2048", help="per-rank micro-batch BxS")
    p.add_argument("--gpus", default="1,2", help="GPU counts (ranks of one host), the first must be 1")
    p.add_argument("--perturbation-parallel", type=int, default=2, help="P of the offload_pp<P> rows (1: none)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gathers", default="auto", help="comma-separated zo2.offload.gather values, partitioned modes")
    p.add_argument("--timeline", default=None, help="PNG of one step per mode, rank 0, first model at most GPUs")
    p.add_argument("--tiny", action="store_true", help="the tiny model on CPU ranks (gloo): checks the plumbing")
    p.add_argument(
        "--host-gbs", type=float, default=None,
        help="GB/s of uploads and write-backs the host carries for all its GPUs at once, for the model (default: "
        "zo2_ds.estimate.DEFAULT_HOST_GBS, measured for 2 H200s by launch/bench_link.py; 0: leave it out)",
    )  # fmt: skip
    p.add_argument("--out", default="runs/scaling.json")
    args = p.parse_args(argv)
    try:
        args.gpus = [int(g) for g in args.gpus.split(",")]
    except ValueError:
        p.error(f"--gpus: {args.gpus!r} is not a comma-separated list of integers")
    if args.gpus[0] != 1 or any(g < 1 for g in args.gpus):
        p.error(f"--gpus: {args.gpus} must start with 1 (the baseline) and hold positive counts")
    if args.perturbation_parallel < 1:
        p.error(f"--perturbation-parallel: {args.perturbation_parallel} must be at least 1")
    return args


def launch(model: str, gpus: int, args: argparse.Namespace, out: Path, timeline: str | None) -> dict[str, Any]:
    """One bench_offload run on ``gpus`` ranks; its JSON (rank 0's)."""
    bench = [str(HERE / "bench_offload.py"), "--no-in-gpu", "--steps", str(args.steps), "--warmup", str(args.warmup)]
    bench += ["--tiny"] if args.tiny else ["--models", model, "--batches", args.batch]
    if gpus > 1:
        bench += ["--partitioned", "--gathers", args.gathers]
        if args.perturbation_parallel > 1 and gpus % args.perturbation_parallel == 0:
            bench += ["--perturbation-parallel", str(args.perturbation_parallel)]
    if timeline:
        bench += ["--timeline", timeline]
    bench += ["--out", str(out)]
    if gpus == 1:
        cmd = [sys.executable, *bench]
    else:
        with socket.socket() as sock:  # a free port for this launch's rendezvous
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus), "--master_port",
               str(port), *bench]  # fmt: skip
    env = dict(os.environ, DS_ACCELERATOR="cpu") if args.tiny else dict(os.environ)
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True)
    return json.loads(out.read_text())


def rows_of(model: str, gpus: int, result: dict[str, Any], perturbation_parallel: int) -> list[dict[str, Any]]:
    rows = []
    for rec in result["records"]:
        b, s = (int(v) for v in rec["batch"].split("x"))
        groups = gpus // rec.get("perturbation_parallel", 1)
        rows.append({
            "model": model, "gpus": gpus, "mode": rec["mode"], "batch": rec["batch"],
            "step_ms": rec["median_ms"], "tokens_per_s": b * s * groups / rec["median_ms"] * 1e3,
            "back_to_back_ms": rec.get("back_to_back_ms"),
            "floor_ms": rec.get("floor_ms"), "two_forwards_ms": rec.get("two_forwards_ms"),
            "transfer_floor_ms": rec.get("transfer_floor_ms"), "streamed_bytes": rec.get("streamed_bytes"),
            "model_bytes": rec.get("model_bytes"), "nvml_used_bytes": rec.get("nvml_used_bytes"),
            "peak_allocated_bytes": rec.get("peak_allocated_bytes"),
            "node_host_rss_bytes": rec.get("ranks_host_rss_bytes"),
            "node_host_rss_peak_bytes": rec.get("ranks_host_rss_peak_bytes"),
            "perturbation_parallel": rec.get("perturbation_parallel", 1),
            "write_back_interval": rec.get("write_back_interval"),
            "h2d_gbps": result.get("bandwidth", {}).get("h2d_gbps"),
            "allgather_gbps": result.get("bandwidth", {}).get("allgather_gbps"),
        })  # fmt: skip
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """scaling (tokens/s over the 1-GPU offloaded row of the model), latency (step over its step), and the
    per-rank step over its floor where the floor is known."""
    for row in rows:
        base = next(r for r in rows if r["model"] == row["model"] and r["gpus"] == 1 and r["mode"] == "offload")
        row["scaling"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["latency"] = row["step_ms"] / base["step_ms"]
        if row.get("back_to_back_ms") and base.get("back_to_back_ms"):  # throughput of steps issued back to back
            groups = row["gpus"] // row["perturbation_parallel"]
            row["back_to_back_scaling"] = groups * base["back_to_back_ms"] / row["back_to_back_ms"]
        rss, model = row["node_host_rss_bytes"], row["model_bytes"]
        row["node_rss_over_model"] = rss / model if rss and model else None
        row["ratio_to_floor"] = row["step_ms"] / row["floor_ms"] if row["floor_ms"] else None


def host_bytes_per_step(row: dict[str, Any], gpus: int, partitioned: bool) -> float:
    """What the host moves per step for all ``gpus`` ranks: their uploads and their write-backs (every streamed
    byte rewritten once per ``write_back_interval``), from the 1-GPU row."""
    whole = row["streamed_bytes"]
    per_rank = whole / gpus if partitioned else whole
    return gpus * per_rank * (1 + 1 / (row.get("write_back_interval") or 1))


def predicted_step_ms(
    row: dict[str, Any], gpus: int, partitioned: bool, pp: int = 1, host_gbs: float | None = None
) -> float | None:
    """The scaling model's per-rank step for the 1-GPU row's model on ``gpus`` GPUs of one host: the largest of
    the compute, the rank's link, the NVLink gather and (``host_gbs``) the host carrying every rank's uploads
    and write-backs."""
    if not (row.get("two_forwards_ms") and row.get("h2d_gbps") and row.get("streamed_bytes")):
        return None
    whole = row["streamed_bytes"]  # the 1-GPU row: every streamed byte over one link
    compute = row["two_forwards_ms"] / pp
    link = (whole / gpus if partitioned else whole) / (row["h2d_gbps"] * 1e9) * 1e3
    gather = 0.0
    if partitioned and gpus > 1 and row.get("allgather_gbps"):
        gather = whole * (gpus - 1) / gpus / (row["allgather_gbps"] * 1e9) * 1e3
    host = host_bytes_per_step(row, gpus, partitioned) / (host_gbs * 1e9) * 1e3 if host_gbs else 0.0
    return max(compute, link, gather, host)


def scaling_model(
    rows: list[dict[str, Any]], allgather_gbps: float | None, host_gbs: float | None = None
) -> list[dict[str, Any]]:
    out = []
    for base in (r for r in rows if r["gpus"] == 1 and r["mode"] == "offload"):
        base = {**base, "allgather_gbps": allgather_gbps}
        b, s = (int(v) for v in base["batch"].split("x"))
        for gpus in (1, 2, 4, 8):
            for partitioned in (False, True):
                step = predicted_step_ms(base, gpus, partitioned, host_gbs=host_gbs)
                if step is None:
                    continue
                measured = next(
                    (r["step_ms"] for r in rows if r["model"] == base["model"] and r["gpus"] == gpus
                     and r["mode"] == ("offload_partitioned" if partitioned else "offload")), None)  # fmt: skip
                out.append({
                    "model": base["model"], "gpus": gpus, "partitioned": partitioned, "predicted_step_ms": step,
                    "predicted_scaling": gpus * base["step_ms"] / step if base["step_ms"] else None,
                    "measured_step_ms": measured,
                    "link_bytes_per_rank": base["streamed_bytes"] / (gpus if partitioned else 1),
                    "nvlink_bytes_per_rank": base["streamed_bytes"] * (gpus - 1) / gpus if partitioned else 0,
                    "host_bytes_per_node": base["model_bytes"] * (1 if partitioned else gpus),
                    "host_read_bytes_per_step": base["streamed_bytes"] * (1 if partitioned else gpus),
                    "host_bytes_per_step": host_bytes_per_step(base, gpus, partitioned),
                    "tokens_per_step": gpus * b * s,
                })  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    sys.path.insert(0, str(HERE.parent))
    from zo2_ds.bench import report

    result: dict[str, Any] = {"args": vars(args), "runs": {}, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i, model in enumerate(["tiny"] if args.tiny else args.models.split(",")):
            for gpus in args.gpus:
                timeline = args.timeline if i == 0 and gpus == max(args.gpus) else None
                run = launch(model, gpus, args, Path(tmp) / f"{model}_{gpus}.json", timeline)
                result["runs"][f"{model}@{gpus}"] = {"env": run["env"], "bandwidth": run["bandwidth"]}
                result["rows"] += rows_of(model, gpus, run, args.perturbation_parallel)
    add_ratios(result["rows"])
    gathers = [r["allgather_gbps"] for r in result["rows"] if r.get("allgather_gbps")]
    if args.host_gbs is None:
        from zo2_ds.estimate.result import DEFAULT_HOST_GBS as host_gbs
    else:
        host_gbs = args.host_gbs
    result["model"] = scaling_model(result["rows"], min(gathers) if gathers else None, host_gbs)
    report.write_json(args.out, result)
    columns = "model gpus mode batch step_ms:.1f tokens_per_s:.0f scaling:.2f latency:.2f ratio_to_floor:.2f "
    columns += "back_to_back_ms:.1f back_to_back_scaling:.2f "
    columns += "nvml_used_bytes:gib node_rss_over_model:.2f"
    print(report.format_table(result["rows"], columns))
    print(report.format_table(result["model"], "model gpus partitioned predicted_step_ms:.1f measured_step_ms:.1f "
                              "predicted_scaling:.2f"))  # fmt: skip
    return result


if __name__ == "__main__":
    main()
