"""A small training run built on zo2_ds.checkpoint, as a launcher would write it; the checkpoint tests run it
in subprocesses and kill it, interrupt it and resume it.

    python tests/checkpoint/workers/train_worker.py --out DIR --result FILE [--resume] [--offload]
        [--steps 6] [--save-steps 2] [--kill-step 4 --kill-stage deepspeed --kill-seed 0] [--sigint-at 3]
    torchrun --nproc_per_node 2 tests/checkpoint/workers/train_worker.py ...   # two ranks over gloo

Every step's batch is a function of the step (and the rank), so any resumed run sees the data an
uninterrupted one sees. The final parameters are saved to --result (by rank 0).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import threading
import time

import torch

from zo2_ds.checkpoint import Checkpointer, GracefulStop, NonFiniteGuard, RunDirectory, truncate_jsonl
from zo2_ds.testing import ds_config, tiny_causal_lm

VOCAB = 96


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--offload", action="store_true")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--save-steps", type=int, default=2)
    p.add_argument("--total-limit", type=int, default=None)
    p.add_argument("--kill-step", type=int, default=None, help="SIGKILL this process during the save of this step")
    p.add_argument("--kill-stage", default=None, help="... at this stage of it (zo2_ds.checkpoint.SAVE_STAGES)")
    p.add_argument("--kill-seed", type=int, default=0, help="picks the delay into DeepSpeed's write")
    p.add_argument("--sigint-at", type=int, default=None, help="send this process SIGINT during this step")
    p.add_argument("--sigint-twice", action="store_true", help="... twice (the second aborts)")
    p.add_argument("--sigint-rank0-only", action="store_true", help="... on rank 0 only (the ranks must agree)")
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds of sleep per step (time for a Ctrl-C)")
    p.add_argument("--local_rank", type=int, default=None)
    return p.parse_args()


def batch(step: int, rank: int, world: int, global_batch: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (global_batch, 10), generator=gen)
    per_rank = global_batch // world
    shard = ids[rank * per_rank : (rank + 1) * per_rank]
    return {"input_ids": shard, "labels": shard}


def fault_hook(args: argparse.Namespace, engine) -> callable:
    def hook(stage: str) -> None:
        if engine.global_steps != args.kill_step:
            return
        if stage == args.kill_stage == "deepspeed":  # land somewhere inside DeepSpeed's own writes
            delay = random.Random(args.kill_seed).uniform(0.0, 0.03)
            threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
        elif stage == "done" and args.kill_stage == "deepspeed":
            time.sleep(1.0)  # a save faster than the delay: the timer still fires inside it, at its end
        elif stage == args.kill_stage:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def main() -> None:
    args = parse_args()
    import deepspeed

    import zo2_ds
    from zo2_ds import hygiene

    hygiene.silence_startup_noise()
    hygiene.init_distributed()
    rank, world = deepspeed.comm.get_rank(), deepspeed.comm.get_world_size()
    run_dir = RunDirectory(args.out, resume=args.resume, run_files=("log.jsonl",))
    scheduler = {
        "type": "WarmupDecayLR",
        "params": {"warmup_max_lr": 3e-3, "warmup_num_steps": 2, "total_num_steps": args.steps},
    }
    offload = {"enabled": True, "prefetch_depth": 0} if args.offload else {"enabled": False}
    config = ds_config(
        micro_batch=4 // world,
        lr=3e-3,
        scheduler=scheduler,
        zo2={"seed": 5, "num_perturbations": 2, "offload": offload},
    )
    engine, *_ = zo2_ds.initialize(model=tiny_causal_lm("opt", seed=0), config=config)
    ckpt = Checkpointer(
        engine,
        run_dir,
        save_steps=args.save_steps,
        save_total_limit=args.total_limit,
        run_info={"steps": args.steps, "scheduler": scheduler},
        fault_hook=fault_hook(args, engine),
    )
    log = os.path.join(args.out, "log.jsonl")
    if args.resume:
        state = ckpt.resume()
        if rank == 0:
            truncate_jsonl(log, state.step)
    guard = NonFiniteGuard(max_consecutive=3)
    engine.train()
    with GracefulStop() as stop:
        while engine.global_steps < args.steps:
            step = engine.global_steps
            out = engine(**batch(step, rank, world))
            if args.sigint_at == step + 1 and not args.resume and (rank == 0 or not args.sigint_rank0_only):
                os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step
                if args.sigint_twice:
                    time.sleep(2.5)  # later than a launcher's passing on of the first one
                    os.kill(os.getpid(), signal.SIGINT)
            time.sleep(args.step_sleep)
            engine.backward(out.loss)
            engine.step()
            guard.check(engine)
            if rank == 0:
                with open(log, "a") as f:
                    f.write(f'{{"step": {engine.global_steps}, "loss": {out.loss.item()!r}}}\n')
            stopping = stop.should_stop()
            if ckpt.due(engine.global_steps) or stopping:
                ckpt.save({"note": f"step {engine.global_steps}"})
            if stopping:
                print(stop.message(), flush=True)
                deepspeed.comm.destroy_process_group()  # every rank stops here: should_stop agrees over them
                sys.exit(130)
    ckpt.save({"note": "final"})
    if rank == 0:
        engine.eval()  # flushes offloaded updates
        params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        torch.save({"params": params, "step": engine.global_steps}, args.result)
    run_dir.close()
    deepspeed.comm.destroy_process_group()  # as launch/train.py: gloo can abort an exit without it


if __name__ == "__main__":
    main()
