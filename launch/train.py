"""ZO (MeZO-style) fine-tuning with DeepSpeed: the main job.

    python launch/train.py                                                   # the default job, one process
    deepspeed launch/train.py --deepspeed_config ds_configs/zo2.json         # the same through DeepSpeed
    deepspeed --num_gpus 2 launch/train.py --deepspeed_config ds_configs/zo2.json
    torchrun --nproc_per_node 2 launch/train.py --deepspeed_config ds_configs/zo2.json

    python launch/train.py --deepspeed_config my_zo2.json --model_name_or_path facebook/opt-1.3b --task sst2
    python launch/train.py --deepspeed_config my_zo2.json --model_name_or_path facebook/opt-125m \
        --dataset glue --dataset_config sst2 --template "{sentence} It was" --label_words terrible great
    python launch/train.py --deepspeed_config ds_configs/zo2_lora.json --model_name_or_path facebook/opt-1.3b \
        --dtype fp16 --task sst2 --peft lora --eval_every 500                      # LoRA (or --peft prefix)

The default job (no model, task or data argument): a tiny randomly initialised OPT learning the
generated synthetic_sentiment task, evaluated on held-out sentences before and after (accuracy ~0.5 ->
~1.0 in 6000 steps). CPU or GPU is chosen automatically. Results land in --output_dir (a used one is refused
without --resume or --overwrite_output_dir): checkpoint-N/ every --save_steps (the newest --save_total_limit
plus the best), latest and best naming them, model/ (or adapter/) and best_model/ in HF format,
metrics.json, log.jsonl. Ctrl-C saves and prints the command that resumes. launch/README.md has the rest.
"""

from __future__ import annotations

import os
import time


def main(argv: list[str] | None = None) -> dict:
    # Chosen before deepspeed is imported (importing zo2_ds does): it picks its accelerator then. An allocator
    # cache that grows in place keeps what the GPU shows (NVML) close to what a step needs.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    from zo2_ds import hygiene, job

    args = job.check_args(job.build_parser(__doc__.split("\n\n")[0]).parse_args(argv))
    job.set_process_env(args.local_rank)
    hygiene.silence_startup_noise()
    hygiene.init_distributed()  # deepspeed.init_distributed() without its /dev/shm leak and start-up noise
    try:
        return train(args)
    finally:
        deepspeed.comm.destroy_process_group()


def build(args):
    """``(task, task_data, model, engine, checkpoints)``: the cheap checks first (task, DeepSpeed config, the
    output directory and, with --resume, the checkpoint's schedule), then the tokenizer and the data (their
    errors name files and rows), the model last."""
    import zo2_ds
    from zo2_ds import job

    task = job.task_of(args)
    ds_config = job.resolve_ds_config(
        args.deepspeed_config, max_steps=args.max_steps, peft=args.peft, output_dir=args.output_dir
    )
    run_info = job.run_info_of(args.max_steps, ds_config)
    run_dir = job.open_run_dir(args, run_info)  # locked; a used one refused; with --resume, the same schedule
    tokenizer = job.build_tokenizer(args, task)
    task_data = job.build_task_data(args, task, tokenizer)
    offload = ds_config.get("zo2", {}).get("offload", {})  # enabled: blocks read straight into pinned memory
    model = job.build_model(args, tokenizer, offload=offload if offload.get("enabled") else None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = zo2_ds.initialize(model=task_data.wrap_model(model), model_parameters=trainable, config=ds_config)
    hf_save = (
        None if args.no_hf_save else (lambda folder, state=None: job.save_hf_copy(model, folder, tokenizer, state))
    )
    collect = job.hf_state_collector(engine, model)  # partitioned masters: every rank gathers, rank 0 writes
    checkpoints = job.RunCheckpoints(engine, run_dir, args, run_info=run_info, hf_save=hf_save, hf_collect=collect)
    return task, task_data, model, engine, checkpoints


def train(args) -> dict:
    """Build, evaluate, train (checkpoints every --save_steps and at the best dev metric; Ctrl-C saves and
    stops), evaluate, save. Returns the summary also written to metrics.json."""
    import deepspeed
    import torch
    from tqdm import tqdm

    from zo2_ds import job
    from zo2_ds.checkpoint import GracefulStop, NonFiniteGuard

    started = time.perf_counter()
    task, task_data, model, engine, checkpoints = build(args)
    rank, world_size = deepspeed.comm.get_rank(), deepspeed.comm.get_world_size()
    recorder = job.RunRecorder(args.output_dir, enabled=rank == 0, resume=args.resume)
    evaluate = job.Evaluator(engine, model, task_data, batch_size=args.eval_batch_size)
    state = checkpoints.resume(args.checkpoint_tag, truncate_log=not args.eval_only) if args.resume else {}
    summary = dict(state.get("run_summary", {}))
    metric = task.metric  # the headline: "accuracy" (classification; the default job) or "f1"

    if args.eval_only:
        summary.update(job.prefixed("eval_", evaluate(task_data.test)))
        summary.update(job.prefixed("dev_", evaluate(task_data.dev)))
        recorder.write_metrics({"eval_only": True, "steps": engine.global_steps, **summary})
        engine.destroy()
        checkpoints.close()
        return summary
    # The held-out metric before training (kept from the first run when resuming), on the test split.
    if f"eval_{metric}_before" not in summary:
        summary.update(job.prefixed("eval_", evaluate(task_data.test), "_before"))
    best = job.BestKeeper(summary, metric=metric, enabled=args.save_best)

    # -- train ------------------------------------------------------------------------------------
    grad_accum = engine.gradient_accumulation_steps()
    batches = job.ShardedBatches(
        num_examples=len(task_data.train),
        micro_batch_size=engine.train_micro_batch_size_per_gpu(),
        world_size=engine.zo_data_world_size,  # the ranks of a perturbation group share one shard
        rank=engine.zo_data_rank,
        seed=args.seed,
    ).iterate(start_micro_step=engine.global_steps * grad_accum)  # a resumed run continues the same order
    progress = tqdm(
        total=args.max_steps, initial=engine.global_steps, desc="zo2", disable=rank != 0 or args.no_progress
    )
    window = job.LossWindow(world_size=world_size, saved=state.get("loss_window"), rank=rank)
    guard = NonFiniteGuard(max_consecutive=20)  # a run that only skips non-finite steps stops, saving nothing
    start_step, dev = engine.global_steps, {}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train_started = time.perf_counter()
    engine.train()
    seen = engine.global_steps  # the last step whose loss the window holds

    def take_figures(wait: bool) -> None:
        """Steps whose figures the engine has read: counted by the guard, into the window and the progress bar.
        With zo2.async_step (CUDA) that is the step before the last, read without waiting for the device;
        ``wait`` reads the last step too (before a log record, an evaluation or a save)."""
        nonlocal seen
        guard.check(engine, wait=wait)
        for figures in engine.zo_step_figures(since=seen, wait=wait):
            seen = figures.step
            window.add(figures.loss)  # the step's loss, over micro-batches and ranks
            progress.set_postfix(loss=f"{figures.loss:.4f}", lr=f"{engine.get_lr()[0]:.2e}", refresh=False)

    with GracefulStop() as stop:  # Ctrl-C / SIGTERM: finish the step, save, stop
        while engine.global_steps < args.max_steps:
            for _ in range(grad_accum):
                batch = task_data.collate([task_data.train[i] for i in next(batches)])
                loss = engine(**{k: v.to(engine.device) for k, v in batch.items()})  # L(theta +- eps z), averaged
                engine.backward(loss)  # no autograd: g was measured in the forward
                engine.step()  # at the accumulation boundary: theta <- theta - lr g z; lr scheduler steps
            step, lr = engine.global_steps, engine.get_lr()[0]
            # Dev evaluation every eval_every steps and at the last one (the final model may be the best).
            evaluated = args.eval_every > 0 and (step % args.eval_every == 0 or step == args.max_steps)
            logged = step % args.log_every == 0 or evaluated or step == args.max_steps
            stopping = stop.should_stop()
            take_figures(wait=logged or stopping or checkpoints.due(step))
            progress.update(1)
            improved = False
            if logged:
                record = {"train_loss": window.take(), "lr": lr}
                if evaluated:
                    dev = evaluate(task_data.dev)
                    record.update(job.prefixed("eval_", dev))
                    evaluate.report(dev)
                    improved = best.update(step, dev)
                recorder.log(step, **record)
                summary.setdefault("train_loss_first", record["train_loss"])
                summary["train_loss_last"] = record["train_loss"]
            if improved or stopping or checkpoints.due(step):
                checkpoints.save(summary, window, best=improved)
            if stopping:  # saved: say how to resume, and exit (130 after Ctrl-C, else 0)
                progress.close()
                engine.destroy()
                checkpoints.close()
                raise SystemExit(job.stop_exit_code(stop, args, world_size=world_size))
    progress.close()
    train_seconds = time.perf_counter() - train_started
    peak_bytes = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None

    # -- finish -----------------------------------------------------------------------------------
    summary.update(job.prefixed("eval_", evaluate(task_data.test), "_after"))
    final_dev = dev if args.eval_every > 0 and engine.global_steps > start_step else evaluate(task_data.dev)
    summary.update(job.prefixed("dev_", final_dev, "_after"))
    checkpoints.save(summary, window)  # the final checkpoint: 'latest'
    figures = dict(started=started, train_seconds=train_seconds, model=model, peak_bytes=peak_bytes)
    summary.update(task=task.name, peft=args.peft)
    summary.update(job.run_figures(engine, steps_this_run=engine.global_steps - start_step, **figures))
    best.score_best(engine, evaluate, task_data.test, checkpoints)  # MeZO reports the best-dev model's test metric
    checkpoints.publish_hf_copies()  # model/ (adapter/) and best_model/ from the checkpoints, atomically
    recorder.write_metrics(summary)  # last: a metrics.json marks a finished run
    engine.destroy()
    checkpoints.close()
    if rank == 0:
        before, after = summary[f"eval_{metric}_before"], summary[f"eval_{metric}_after"]
        print(
            f"held-out {metric} {before:.3f} -> {after:.3f} after {summary['steps']} steps ({train_seconds:.1f} s "
            f"of training); checkpoints, model, metrics.json and log.jsonl in {args.output_dir}"
        )
    return summary


if __name__ == "__main__":
    main()
