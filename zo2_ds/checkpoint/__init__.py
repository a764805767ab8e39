"""Runs that lose nothing: atomic, verified, rotated checkpoints; resume after any stop; output directories
that are never clobbered; a graceful Ctrl-C; a stop for runs that only skip non-finite steps.

A launcher uses it in a few lines (every rank runs all of them; rank 0 does the file work)::

    from zo2_ds import hygiene
    from zo2_ds.checkpoint import (Checkpointer, GracefulStop, NonFiniteGuard, RunDirectory, truncate_jsonl,
                                   write_json_atomic)

    hygiene.silence_startup_noise()
    hygiene.init_distributed()  # instead of deepspeed.init_distributed(): no /dev/shm leak, no noise
    run_dir = RunDirectory(args.output_dir, resume=args.resume, overwrite=args.overwrite_output_dir,
                           run_files=("log.jsonl", "metrics.json"))  # lock; refuse a used dir; clean leftovers
    run_info = {"max_steps": max_steps, "scheduler": ds_config.get("scheduler")}
    if args.resume:  # before the model is built: a changed schedule is refused at once
        run_dir.find_checkpoint(args.checkpoint_tag).require_same_run(run_info)
    engine, *_ = zo2_ds.initialize(model=model, config=ds_config)
    ckpt = Checkpointer(engine, run_dir, save_steps=args.save_steps, save_total_limit=args.save_total_limit,
                        hf_save=lambda folder: job.save_hf_copy(model, folder, tokenizer), run_info=run_info)
    summary = {}
    if args.resume:
        state = ckpt.resume(args.checkpoint_tag)  # verified; logs which checkpoint and why
        summary = state.client_state.get("run_summary", {})
        if rank == 0:
            truncate_jsonl(os.path.join(args.output_dir, "log.jsonl"), state.step)
    guard = NonFiniteGuard(max_consecutive=20)
    with GracefulStop() as stop:
        while engine.global_steps < max_steps:
            ...  # one optimizer step
            guard.check(engine)  # raises NonFiniteError before anything is saved
            stopping = stop.should_stop()  # once per step: the same answer on every rank
            if ckpt.due(engine.global_steps) or stopping:
                ckpt.save({"run_summary": summary}, best=improved)
            if stopping:
                print(stop.message())  # one line, with the command that resumes
                sys.exit(130)
    ckpt.save({"run_summary": summary})
    if rank == 0:
        write_json_atomic(os.path.join(args.output_dir, "metrics.json"), summary)
    run_dir.close()

The layout of the output directory is described in :mod:`zo2_ds.checkpoint.rundir`; what a save does, in
:mod:`zo2_ds.checkpoint.checkpointer`. Errors a user can act on are ValueErrors that name the flag, file or
key (:class:`CheckpointError` for a checkpoint that cannot be used, :class:`OutputDirInUseError` for a
directory another job holds).
"""

from zo2_ds.checkpoint.atomic import remove_tree, write_json_atomic, write_text_atomic
from zo2_ds.checkpoint.checkpointer import SAVE_STAGES, Checkpointer, ResumeState
from zo2_ds.checkpoint.logs import truncate_jsonl
from zo2_ds.checkpoint.manifest import CheckpointError, model_fingerprint
from zo2_ds.checkpoint.rundir import CheckpointInfo, OutputDirInUseError, RunDirectory, checkpoint_name
from zo2_ds.checkpoint.stop import GracefulStop, NonFiniteError, NonFiniteGuard, resume_command

__all__ = [
    "RunDirectory",
    "Checkpointer",
    "ResumeState",
    "CheckpointInfo",
    "CheckpointError",
    "OutputDirInUseError",
    "GracefulStop",
    "NonFiniteGuard",
    "NonFiniteError",
    "resume_command",
    "SAVE_STAGES",
    "checkpoint_name",
    "model_fingerprint",
    "truncate_jsonl",
    "write_json_atomic",
    "write_text_atomic",
    "remove_tree",
]
