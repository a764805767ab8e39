"""ZO (MeZO-style) fine-tuning with DeepSpeed: the main job.

    deepspeed launch/train.py --deepspeed_config ds_configs/zo2.json         # the embedded default job
    deepspeed --num_gpus 2 launch/train.py --deepspeed_config ds_configs/zo2.json
    torchrun --nproc_per_node 2 launch/train.py --deepspeed_config ds_configs/zo2.json
    python launch/train.py                                                   # one process, default job

    python launch/train.py --deepspeed_config my_zo2.json --model_name_or_path facebook/opt-125m \
        --dataset glue --dataset_config sst2 --template "{sentence} It was" --label_words " terrible" " great"
    python launch/train.py --deepspeed_config my_zo2.json --model_name_or_path facebook/opt-1.3b --task sst2
    python launch/train.py --deepspeed_config ds_configs/zo2_lora.json --model_name_or_path facebook/opt-1.3b \
        --dtype fp16 --task sst2 --peft lora --eval_every 500                      # LoRA (or --peft prefix)

With no model or data argument it runs the embedded default: a tiny randomly initialised OPT learning
a generated sentiment task (zo2_ds.data), evaluated on held-out sentences before and after. CPU or GPU
is chosen automatically. Results land in --output_dir: a DeepSpeed checkpoint and its HF copy (model/ or
the PEFT adapter/), metrics.json, log.jsonl; with --eval_every, best/ holds the best-dev checkpoint.
launch/README.md has the task, adapter, evaluation and plotting recipes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--deepspeed_config", default=None, help="DeepSpeed JSON config with a zo2 block (default: built in)"
    )
    p.add_argument("--deepspeed", action="store_true", help="accepted for DeepSpeed launcher compatibility")
    p.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    g = p.add_argument_group("model and data (none of these: the embedded default job)")
    g.add_argument("--model_name_or_path", default=None, help="hub id or local save_pretrained folder")
    g.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    g.add_argument("--task", default=None, help="a zo2_ds.tasks task name (e.g. sst2)")
    g.add_argument("--data_dir", default=None, help="local data folder for --task")
    g.add_argument("--dataset", default=None, help="hub dataset id, save_to_disk folder, or data folder")
    g.add_argument("--dataset_config", default=None, help="hub dataset configuration name (e.g. sst2 of glue)")
    g.add_argument("--data_files", nargs="+", default=None, help="local .jsonl/.csv/.parquet files: PATH or SPLIT=PATH")
    g.add_argument("--template", default=None, help='prompt template over the columns, e.g. "{sentence} It was"')
    g.add_argument("--label_words", nargs="+", default=None, help='one per class: " terrible" " great", or LABEL=WORD')
    g.add_argument("--text_column", default=None)
    g.add_argument("--label_column", default="label")
    g.add_argument("--max_train_examples", type=int, default=None)
    g.add_argument("--max_eval_examples", type=int, default=None)
    g.add_argument("--max_length", type=int, default=256, help="prompt tokens kept (from the end)")
    a = p.add_argument_group("adapters (peft; only the adapter is perturbed and updated)")
    a.add_argument("--peft", default=None, choices=["lora", "prefix"], help="train a LoRA or prefix adapter")
    a.add_argument("--lora_r", type=int, default=8)
    a.add_argument("--lora_alpha", type=int, default=16)
    a.add_argument("--prefix_tokens", type=int, default=5, help="virtual tokens of the prefix")
    r = p.add_argument_group("run")
    r.add_argument("--output_dir", default="runs/zo2_default")
    r.add_argument("--max_steps", type=int, default=None, help="optimizer steps (default: tuned for the default job)")
    r.add_argument("--eval_every", type=int, default=None, help="steps between dev evaluations (0: only before/after)")
    r.add_argument("--log_every", type=int, default=None, help="steps per log.jsonl record")
    r.add_argument("--eval_batch_size", type=int, default=64)
    r.add_argument("--seed", type=int, default=0, help="data order, model init and the default task")
    r.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output_dir")
    r.add_argument("--checkpoint_tag", default=None, help="with --resume: load this tag instead of the latest (best)")
    r.add_argument("--eval_only", action="store_true", help="evaluate (the checkpoint with --resume) and exit")
    r.add_argument(
        "--save_best",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the best checkpoint by dev metric in <output_dir>/best (with --eval_every > 0)",
    )
    r.add_argument("--no_hf_save", action="store_true", help="no HF-format copy (model/ or adapter/) of the weights")
    r.add_argument("--no_progress", action="store_true", help="no tqdm bar")
    return p.parse_args(argv)


def set_process_env(local_rank: int | None) -> None:
    """One-process defaults for torch.distributed, the CPU accelerator when there is no GPU, and one
    share of the cores per local rank. Runs before deepspeed is imported (it picks its accelerator then)."""
    import socket

    # An allocator cache that grows and shrinks in place holds little beyond what is allocated: what the GPU
    # shows (NVML) stays close to what the step needs (zo2_ds/offload/README.md, "GPU memory").
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch

    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:  # only reached by a lone process: any free port will do
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if "OMP_NUM_THREADS" not in os.environ:
            local_ranks = int(
                os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", os.environ["WORLD_SIZE"]))
            )
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_process_env(args.local_rank)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import deepspeed

    deepspeed.init_distributed()
    try:
        return train(args)
    finally:
        deepspeed.comm.destroy_process_group()


def train(args: argparse.Namespace) -> dict:
    """Build, evaluate, train (keeping the best-dev checkpoint), evaluate, save. Returns the summary also
    written to metrics.json."""
    import deepspeed
    import torch
    from tqdm import tqdm

    import zo2_ds
    from zo2_ds.data import RunRecorder, ShardedBatches, job

    started = time.perf_counter()
    rank, world_size = deepspeed.comm.get_rank(), deepspeed.comm.get_world_size()
    max_steps = args.max_steps or job.DEFAULT_MAX_STEPS
    eval_every = job.DEFAULT_EVAL_EVERY if args.eval_every is None else args.eval_every
    log_every = args.log_every or job.DEFAULT_LOG_EVERY

    if args.checkpoint_tag and not args.resume:
        raise ValueError("--checkpoint_tag selects the checkpoint --resume loads; add --resume")
    if args.resume and not job.has_checkpoint(args.output_dir, args.checkpoint_tag):
        what = f"tag {args.checkpoint_tag!r}" if args.checkpoint_tag else "'latest' file"
        raise ValueError(f"--resume: no checkpoint in --output_dir {args.output_dir!r} (no {what})")

    # -- build ------------------------------------------------------------------------------------
    model, task_data = job.build_model_and_task(args)  # with --peft: the peft model, only the adapter trainable
    ds_config = job.resolve_ds_config(
        args.deepspeed_config, max_steps=max_steps, peft=args.peft, output_dir=args.output_dir
    )
    wrapped = task_data.wrap_model(model)
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    engine, _, _, _ = zo2_ds.initialize(model=wrapped, model_parameters=trainable, config=ds_config)
    recorder = RunRecorder(args.output_dir, enabled=rank == 0, resume=args.resume)
    metric = task_data.task.metric  # the headline: "accuracy" (classification; the default job) or "f1"
    tokenizer = getattr(task_data, "tokenizer", None)
    summary: dict = {}
    if args.resume:
        _, client_state = engine.load_checkpoint(args.output_dir, tag=args.checkpoint_tag)
        summary = dict((client_state or {}).get("run_summary", {}))

    def evaluate(examples: list[dict]) -> dict[str, float]:
        """All of the task's metrics (accuracy; or em and f1) on ``examples``."""
        engine.eval()  # applies any pending (offloaded) update before the parameters are read
        values = task_data.evaluate(model, examples, batch_size=args.eval_batch_size, device=engine.device)
        engine.train()
        return values

    def save_hf(folder: str) -> None:
        if rank == 0 and not args.no_hf_save:
            job.save_hf_copy(model, folder, tokenizer)

    if args.eval_only:
        summary.update({f"eval_{k}": v for k, v in evaluate(task_data.test).items()})
        summary.update({f"dev_{k}": v for k, v in evaluate(task_data.dev).items()})
        recorder.write_metrics({"eval_only": True, "steps": engine.global_steps, **summary})
        engine.destroy()
        return summary
    # The held-out metric before training (kept from the first run when resuming), on the test split,
    # which is never trained or tuned on.
    if f"eval_{metric}_before" not in summary:
        summary.update({f"eval_{k}_before": v for k, v in evaluate(task_data.test).items()})

    def keep_if_best(step: int, dev: dict[str, float]) -> None:
        """Save <output_dir>/best when the dev metric beats the best so far (DeepSpeed tag "best", which
        leaves the "latest" pointer alone, plus the HF copy inside it)."""
        if not args.save_best or dev[metric] <= summary.get(f"best_dev_{metric}", float("-inf")):
            return
        summary.update({f"best_dev_{metric}": dev[metric], "best_step": step})
        engine.save_checkpoint(
            args.output_dir, tag=job.BEST_TAG, client_state={"run_summary": summary}, save_latest=False
        )
        save_hf(os.path.join(args.output_dir, job.BEST_TAG))

    def report_eval(step: int, dev: dict[str, float]) -> None:
        """Dev metrics to DeepSpeed's monitors (csv / tensorboard / wandb, x axis = samples like theirs)."""
        if rank == 0 and engine.monitor.enabled:
            engine.monitor.write_events([(f"Eval/{k}", v, engine.global_samples) for k, v in dev.items()])

    # -- train ------------------------------------------------------------------------------------
    grad_accum = engine.gradient_accumulation_steps()
    batches = ShardedBatches(
        num_examples=len(task_data.train),
        micro_batch_size=engine.train_micro_batch_size_per_gpu(),
        world_size=world_size,
        rank=rank,
        seed=args.seed,
    ).iterate(start_micro_step=engine.global_steps * grad_accum)  # a resumed run continues the same order
    progress = tqdm(total=max_steps, initial=engine.global_steps, desc="zo2", disable=rank != 0 or args.no_progress)
    window = torch.zeros(2, dtype=torch.float64)  # (sum of step losses, number of steps) since the last log
    start_step = engine.global_steps
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train_started = time.perf_counter()
    dev: dict[str, float] = {}
    engine.train()
    while engine.global_steps < max_steps:
        step_loss = 0.0
        for _ in range(grad_accum):
            batch = task_data.collate([task_data.train[i] for i in next(batches)])
            loss = engine(**{k: v.to(engine.device) for k, v in batch.items()})  # L(theta +- eps z), averaged
            engine.backward(loss)  # no autograd: g was measured in the forward
            engine.step()  # at the accumulation boundary: theta <- theta - lr g z; lr scheduler steps
            step_loss += float(loss) / grad_accum
        step = engine.global_steps
        lr = engine.get_lr()[0]
        window += torch.tensor([step_loss, 1.0], dtype=torch.float64)
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        # Dev evaluation every eval_every steps and at the last one (the final model may be the best).
        evaluated = eval_every > 0 and (step % eval_every == 0 or step == max_steps)
        if step % log_every == 0 or evaluated or step == max_steps:
            if world_size > 1:
                deepspeed.comm.all_reduce(window)  # the loss over all ranks' shards
            record = {"train_loss": float(window[0] / window[1]), "lr": lr}
            window.zero_()
            if evaluated:
                dev = evaluate(task_data.dev)
                record.update({f"eval_{k}": v for k, v in dev.items()})
                report_eval(step, dev)
                keep_if_best(step, dev)
            recorder.log(step, **record)
            summary.setdefault("train_loss_first", record["train_loss"])
            summary["train_loss_last"] = record["train_loss"]
    progress.close()
    train_seconds = time.perf_counter() - train_started
    peak_bytes = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None

    # -- finish -----------------------------------------------------------------------------------
    summary.update({f"eval_{k}_after": v for k, v in evaluate(task_data.test).items()})
    final_dev = dev if eval_every > 0 and engine.global_steps > start_step else evaluate(task_data.dev)
    summary.update({f"dev_{k}_after": v for k, v in final_dev.items()})
    engine.save_checkpoint(args.output_dir, client_state={"run_summary": summary})
    save_hf(args.output_dir)
    steps_this_run = engine.global_steps - start_step
    summary.update(
        task=task_data.task.name,
        peft=args.peft,
        steps=engine.global_steps,
        steps_this_run=steps_this_run,
        seconds=train_seconds,
        steps_per_second=steps_this_run / train_seconds if train_seconds > 0 else None,
        total_seconds=time.perf_counter() - started,
        world_size=world_size,
        device=str(engine.device),
        num_trainable_parameters=sum(p.numel() for p in {id(p): p for p in trainable}.values()),
        peak_gpu_memory_allocated_bytes=peak_bytes,
    )
    best_step = summary.get("best_step")
    if best_step is not None and best_step != engine.global_steps and job.has_checkpoint(args.output_dir, job.BEST_TAG):
        # MeZO reports the test metric of the best-dev model: load it back (the final one is saved above).
        engine.load_checkpoint(args.output_dir, tag=job.BEST_TAG)
        summary.update({f"eval_{k}_best": v for k, v in evaluate(task_data.test).items()})
    elif best_step is not None:  # the final model is the best one
        after = {k: v for k, v in summary.items() if k.startswith("eval_") and k.endswith("_after")}
        summary.update({f"{k.removesuffix('_after')}_best": v for k, v in after.items()})
    recorder.write_metrics(summary)
    engine.destroy()
    if rank == 0:
        before, after = summary[f"eval_{metric}_before"], summary[f"eval_{metric}_after"]
        print(
            f"held-out {metric} {before:.3f} -> {after:.3f} after {summary['steps']} steps ({train_seconds:.1f} s "
            f"of training); checkpoint, metrics.json and log.jsonl in {args.output_dir}"
        )
    return summary


if __name__ == "__main__":
    main()
