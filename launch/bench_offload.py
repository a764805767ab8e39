"""The offloaded ZO step (zo2.offload) against the in-GPU step, two plain forwards and the transfer floor.

    python launch/bench_offload.py --models opt-1.3b,opt-6.7b --batches 1x2048,16x256 --out $OUT/offload.json
    python launch/bench_offload.py --models opt-13b --no-in-gpu --cuda-graphs --out $OUT/offload_13b.json
    python launch/bench_offload.py --models opt-6.7b --resident 16 --timeline $OUT/timeline.png
    python launch/bench_offload.py --models opt-6.7b --dtype fp32 --transfer-dtypes auto,bf16
    python launch/bench_offload.py --models qwen2.5-7b --batches 1x2048 --no-in-gpu --vocab-chunks false  # A/B
    python launch/bench_offload.py --models opt-175b@6,opt-175b@12 --batches 1x2048 --no-in-gpu \
        --granularities block,layer                            # OPT-175B's shape, 6 and 12 of its blocks
    python launch/bench_offload.py --tiny                                                   # CPU, seconds
    torchrun --nproc_per_node 2 launch/bench_offload.py --models opt-6.7b --batches 1x2048 --no-in-gpu  # data parallel
    torchrun --nproc_per_node 2 launch/bench_offload.py --models opt-6.7b --batches 1x2048 --no-in-gpu --partitioned
    torchrun --nproc_per_node 2 launch/bench_offload.py --models opt-13b --batches 1x2048 --no-in-gpu \
        --partitioned --perturbation-parallel 2        # also: the 2 passes of a step on 2 GPUs, 1 each
    torchrun --nproc_per_node 2 launch/bench_offload.py --models opt-66b --batches 1x2048 --no-in-gpu --no-floor \
        --partitioned --partitioned-only --materialize # a model whose replicas the host cannot hold

Per model, one random-init model per engine (fp16 on CUDA, fp32 on CPU): two plain forwards and the
in-GPU step (``in_gpu``, unless --no-in-gpu), then the offloaded step with every block streamed
(``offload``; ``offload_xfer_<dtype>`` per narrower --transfer-dtypes) and the optional variants
(``offload_graphs``: zo2.offload.cuda_graphs; ``offload_resident<N>``: N blocks kept on the GPU;
``offload_partitioned``: zo2.offload.partition "node", each rank uploading its shard of every block;
``offload_pp<P>``: that, and the passes of a step spread over P ranks with zo2.perturbation_parallel).
floor = max(two plain forwards, streamed bytes / pinned host-to-device bandwidth measured here).
Reported: median step, tokens/s, x in-GPU, x floor, peak allocated, NVML used (the whole device: CUDA
context and allocator cache included; the context alone is ``env.cuda_context_nvml_bytes``), host RSS
over the model's bytes, and the offloader's device budget by part where the installed zo2_ds has it.
Under a launcher each rank runs on its GPU (LOCAL_RANK) with the same batch (the per-rank batch is fixed)
and rank 0 writes the JSON; compare its step with a one-GPU run for the data-parallel scaling.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts


from zo2_ds.bench import driver, measure, offload, report  # noqa: E402

COLUMNS = "model batch mode median_ms:.1f back_to_back_ms:.1f tokens_per_s:.0f ratio_to_two_forwards:.2f "
COLUMNS += "ratio_to_in_gpu:.2f "
COLUMNS += "ratio_to_floor:.2f peak_allocated_bytes:gib nvml_used_bytes:gib host_rss_over_model:.2f"
TRANSFER_DTYPES = ("auto", "fp32", "fp16", "bf16")
GRANULARITIES = ("auto", "block", "layer")
GATHERS = ("auto", "copy_engine", "collective")
ASYNC_STEPS = ("auto", "true", "false")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_run_args(p, default_models="opt-1.3b", tiny_batches="2x16")
    p.add_argument("--no-in-gpu", action="store_true", help="skip the in-GPU step (a model too big for the GPU)")
    p.add_argument("--no-floor", action="store_true", help="skip two plain forwards (the floor is then the link's)")
    p.add_argument("--only-in-gpu", action="store_true", help="no offloaded step")
    p.add_argument(
        "--prefetch-depth",
        type=lambda v: v if v == "auto" else int(v),
        default="auto",
        help="zo2.offload.prefetch_depth (ring: depth + 2), or auto",
    )
    p.add_argument("--write-back-interval", type=int, default=None, help="zo2.offload.write_back_interval")
    p.add_argument(
        "--transfer-dtypes", default="auto", help=f"zo2.offload.transfer_dtype per mode, of {TRANSFER_DTYPES}"
    )
    p.add_argument(
        "--granularities",
        default="auto",
        help="zo2.offload.granularity per mode, of auto,block,layer (e.g. block,layer)",
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="also offload_graphs (and offload_partitioned_graphs with --partitioned)",
    )
    p.add_argument("--resident", type=int, default=None, help="also offload_resident<N>: N blocks kept resident")
    p.add_argument("--kernels", default="auto", choices=driver.KERNEL_CHOICES, help="zo2.kernels")
    p.add_argument("--partitioned", action="store_true", help='also offload_partitioned: zo2.offload.partition "node"')
    p.add_argument(
        "--perturbation-parallel",
        type=int,
        default=1,
        help="also offload_pp<P>: partitioned masters and zo2.perturbation_parallel P (under a launcher)",
    )
    p.add_argument(
        "--partitioned-only", action="store_true", help="no replicated offload modes (a host too small for them)"
    )
    p.add_argument(
        "--materialize",
        action="store_true",
        help="build each offloaded model from its config straight into pinned memory (zo2_ds.offload.materialize)",
    )
    p.add_argument(
        "--gathers", default="auto",
        help="comma-separated zo2.offload.gather values (auto, copy_engine, collective) for the partitioned modes",
    )  # fmt: skip
    p.add_argument("--no-prefetch-next-step", action="store_true", help="zo2.offload.prefetch_next_step false")
    p.add_argument("--vocab-chunks", default="auto", choices=("auto", "true", "false"), help="zo2.vocab_chunks")
    p.add_argument("--stream-head", default="auto", choices=("auto", "true", "false"), help="zo2.offload.stream_head")
    p.add_argument(
        "--async-steps", default="auto",
        help="comma-separated zo2.async_step values (auto, true, false): every offload mode once per value "
        "(suffix _async / _sync unless auto)",
    )  # fmt: skip
    p.add_argument("--timeline", default=None, help="PNG of one offloaded step per mode (first model and batch)")
    args = report.run_args(p, p.parse_args(argv))
    try:
        args.transfer_dtypes = tuple(report.parse_names(args.transfer_dtypes, TRANSFER_DTYPES, "--transfer-dtypes"))
        args.granularities = tuple(report.parse_names(args.granularities, GRANULARITIES, "--granularities"))
        args.gathers = tuple(report.parse_names(args.gathers, GATHERS, "--gathers"))
        args.async_steps = tuple(report.parse_names(args.async_steps, ASYNC_STEPS, "--async-steps"))
    except ValueError as exc:
        p.error(str(exc))
    return args


def plot_timeline(spans: list[dict], path: Path, title: str) -> None:
    """Upload / gather (partitioned masters) / compute / write-back spans per block, one row each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {"upload": 3, "gather": 2, "compute": 1, "writeback": 0}
    colors = {"upload": "C0", "gather": "C3", "compute": "C2", "writeback": "C1"}
    fig, ax = plt.subplots(figsize=(14, 3))
    for s in spans:
        width = max(s["end_ms"] - s["start_ms"], 1e-3)
        ax.broken_barh([(s["start_ms"], width)], (rows[s["what"]] - 0.4, 0.8), facecolors=colors[s["what"]])
    ax.set_yticks(list(rows.values()), list(rows))
    ax.set_xlabel("ms since the step began")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    vocab_chunks = {"true": True, "false": False}.get(args.vocab_chunks, "auto")
    stream_head = {"true": True, "false": False}.get(args.stream_head, "auto")
    switches = driver.resolve_switches(
        kernels=args.kernels,
        prefetch_next_step=not args.no_prefetch_next_step,
        vocab_chunks=vocab_chunks,
        stream_head=stream_head,
    )
    device = driver.select_device()  # cuda:LOCAL_RANK under a launcher, before anything touches CUDA
    run = driver.Settings(args.dtype, switches, warmup=args.warmup, steps=args.steps, device=device)
    env = {**report.environment(), "cuda_context_nvml_bytes": measure.cuda_context_bytes()}
    bandwidth = {**measure.link_bandwidth(), **measure.gather_bandwidth()}
    result = {"env": env, "args": vars(args), "switches": switches, "bandwidth": bandwidth, "records": []}
    print(json.dumps(env), json.dumps(bandwidth), flush=True)
    variants = [] if args.only_in_gpu else offload.offload_variants(
        prefetch_depth=args.prefetch_depth, write_back_interval=args.write_back_interval,
        transfer_dtypes=args.transfer_dtypes, cuda_graphs=args.cuda_graphs, resident_blocks=args.resident,
        granularities=args.granularities, partitioned=args.partitioned,
        perturbation_parallel=args.perturbation_parallel, replicated=not args.partitioned_only, gathers=args.gathers,
    )  # fmt: skip
    variants = offload.per_async_step(variants, args.async_steps)
    for i, name in enumerate(args.models):
        records = offload.offload_records(
            name, args.batches, variants, run, in_gpu=not args.no_in_gpu, floor=not args.no_floor,
            bandwidth=bandwidth, timeline=bool(args.timeline) and i == 0, materialize=args.materialize,
            log=lambda rec: print(json.dumps(rec, default=str), flush=True),
        )  # fmt: skip
        for rec in records:
            spans = rec.pop("timeline", None)
            if spans and os.environ.get("RANK", "0") == "0":  # (every rank ran the step: it is collective)
                png = Path(args.timeline).with_name(f"{Path(args.timeline).stem}_{rec['mode']}.png")
                png.with_suffix(".json").write_text(json.dumps(spans))
                plot_timeline(spans, png, f"{name} {rec['batch']} {args.dtype} {rec['mode']}: one step")
                lead = driver.host_lead(spans)
                if lead:  # the device waiting for the host shows as a lead near zero
                    rec["timeline_host_lead"] = lead
                    print(
                        f"{rec['mode']}: compute starts queued {lead['median_lead_ms']:.2f} ms (median) before the "
                        f"device reached them; {lead['share_waiting_for_host']:.0%} within 0.05 ms",
                        flush=True,
                    )
        result["records"] += records
        report.write_json(args.out, result)
    if env["world_size"] == 1 or os.environ.get("RANK") == "0":
        print(f"\n{env['card']}  {env['date']}  H2D {bandwidth.get('h2d_gbps', 0):.1f} GB/s")
        print(report.format_table(result["records"], COLUMNS))
    return result


if __name__ == "__main__":
    main()
