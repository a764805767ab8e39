"""Where a rank's GPU memory goes, stage by stage: NVML of its GPU (the driver's figure, every process and
the communicators included) and the caching allocator's reserved bytes, after each stage of an offloaded
engine's life. Run it alone (1 rank) and under a launcher (N ranks: partitioned masters where the config's
"auto" picks them) to see what a multi-GPU job adds per GPU.

    python launch/bench_memory_stages.py --out $OUT/stages_1.json                     # 1 GPU
    torchrun --nproc_per_node 2 launch/bench_memory_stages.py --out $OUT/stages_2.json
    NCCL_MAX_NCHANNELS=2 NCCL_BUFFSIZE=1048576 torchrun ...                          # smaller NCCL buffers

Stages: ``context`` (a CUDA context and nothing else), ``init_distributed`` (DeepSpeed's; an NCCL
communicator is made here when there is more than one rank), ``model`` (built on the GPU, fp16 by default),
``engine`` (zo2_ds.initialize: the blocks moved to pinned memory, the ring's slots made; DeepSpeed's
data-parallel communicator made and connected by its broadcast), ``step_1`` and ``step_5`` (kernels loaded,
the allocator's high-water mark). ``outside_allocator`` = NVML - reserved: the context, communicators,
symmetric-memory slots (copy-engine gathers) and whatever the driver holds for this process, plus other
processes on the same GPU (none here). The default model is OPT-13B's shape truncated to 4 blocks: the GPU
holds no more for 40 blocks (the blocks are streamed), and it builds in seconds.
"""

from __future__ import annotations

import argparse
import os

import torch

from zo2_ds.bench import driver, measure
from zo2_ds.bench.models import DTYPES, build_model, make_batch
from zo2_ds.bench.report import environment, parse_batches, register_truncated, write_json

_MIB = 1 << 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="opt-13b@4", help="a zo2_ds.bench shape, NAME@BLOCKS truncates it")
    p.add_argument("--batch", default="1x2048", help="BATCHxSEQ")
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    p.add_argument("--gather", default="auto", choices=["auto", "copy_engine", "collective"])
    p.add_argument("--prefetch-depth", default="auto", help='zo2.offload.prefetch_depth ("auto" or an integer)')
    p.add_argument("--out", default=None, help="results JSON (rank 0's stages)")
    args = p.parse_args(argv)
    register_truncated(args.model)
    (args.batch,) = parse_batches(args.batch)
    if args.prefetch_depth != "auto":
        if not args.prefetch_depth.isdigit() or int(args.prefetch_depth) < 1:
            p.error(f'--prefetch-depth: {args.prefetch_depth!r} is not "auto" or an integer >= 1')
        args.prefetch_depth = int(args.prefetch_depth)
    return args


class Stages:
    """NVML of this rank's GPU and the allocator's reserved bytes, recorded per stage (after a synchronize)."""

    def __init__(self, device: torch.device):
        self.device, self.records = device, []

    def mark(self, stage: str) -> None:
        torch.cuda.synchronize(self.device)
        nvml, reserved = measure.nvml_used_bytes(), torch.cuda.memory_reserved(self.device)
        record = {"stage": stage, "nvml_mib": None if nvml is None else nvml / _MIB, "reserved_mib": reserved / _MIB}
        record["outside_allocator_mib"] = None if nvml is None else (nvml - reserved) / _MIB
        self.records.append(record)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = driver.select_device()
    if device.type != "cuda":
        raise SystemExit("bench_memory_stages: needs a CUDA device (NVML is the figure it reports)")
    stages = Stages(device)
    torch.empty(1, device=device)
    stages.mark("context")
    import deepspeed
    import torch.distributed as dist

    driver.single_process_env()
    deepspeed.init_distributed()
    stages.mark("init_distributed")
    world, rank = dist.get_world_size(), dist.get_rank()
    model = build_model(args.model, device, DTYPES[args.dtype])
    stages.mark("model")
    offload = {"enabled": True, "prefetch_depth": args.prefetch_depth}
    if args.gather != "auto":
        offload["gather"] = args.gather
    engine = driver.build_engine(model, driver.engine_config(args.batch[0], args.dtype, offload=offload))
    stages.mark("engine")
    step = driver.zo_step(engine, make_batch(args.model, *args.batch, device))
    step()
    stages.mark("step_1")
    for _ in range(4):
        step()
    stages.mark("step_5")
    facts = driver.offload_facts(engine)
    partition = getattr(engine.zo_offload_store, "partition", None)
    result = {
        "model": args.model,
        "batch": "x".join(map(str, args.batch)),
        "dtype": args.dtype,
        "world_size": world,
        "rank": rank,
        "partitioned": partition is not None,
        "copy_engine": bool(getattr(partition, "copy_engine", False)),
        "nccl_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("NCCL_")},
        **facts,
        "stages": stages.records,
        "env": environment(),
    }
    driver.finish(engine)
    for r in stages.records:
        print(
            f"rank {rank} of {world} | {r['stage']:<16} | NVML {r['nvml_mib']:8.0f} MiB | reserved "
            f"{r['reserved_mib']:8.0f} MiB | outside the allocator {r['outside_allocator_mib']:8.0f} MiB"
        )
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
