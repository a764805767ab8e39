"""launch/train.py's use of zo2_ds.checkpoint: the run directory, periodic / best / final checkpoints, resume,
the graceful stop's last line, and the user-visible HF copies. A thin adapter: every mechanism (locking,
atomic and verified saves, rotation, the checks on resume) is the library's.

The output directory (``zo2_ds.checkpoint.rundir`` has the details)::

    output_dir/
      .lock                  held by the running job (released by the kernel if it dies)
      checkpoint-500/ ...    the newest --save_total_limit checkpoints plus the best: DeepSpeed's files, the HF
                             copy (model/ or adapter/), manifest.json (sizes and sha256 of every file)
      latest, best           the name of the newest / best-dev checkpoint folder
      model/ (adapter/)      the final weights in HF format, for use without zo2_ds
      best_model/ (best_adapter/)  the best-dev checkpoint's HF copy
      metrics.json, log.jsonl
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zo2_ds.checkpoint import Checkpointer, GracefulStop, RunDirectory, resume_command, truncate_jsonl
from zo2_ds.checkpoint.atomic import TMP_PREFIX, fsync_dir, fsync_tree, remove_tree
from zo2_ds.job.records import LossWindow

__all__ = [
    "RUN_FILES",
    "HF_KINDS",
    "RunCheckpoints",
    "run_info_of",
    "open_run_dir",
    "publish_hf_folder",
    "stop_exit_code",
]

HF_KINDS = ("model", "adapter")  # save_hf_copy's folder: a full model, or a PEFT adapter
RUN_FILES = ("log.jsonl", "metrics.json", "monitor", *HF_KINDS, *(f"best_{k}" for k in HF_KINDS))
"""What a run writes into output_dir besides its checkpoints: a previous run's mark, deleted by
--overwrite_output_dir."""


def run_info_of(max_steps: int, ds_config: dict[str, Any]) -> dict[str, Any]:
    """What a resumed run must share with the saved one: the lr schedule, and ``max_steps`` when the schedule's
    length was taken from it (a constant lr, or a schedule of explicit length, lets ``--max_steps`` change)."""
    scheduler = ds_config.get("scheduler")
    info: dict[str, Any] = {"scheduler": scheduler}
    if ((scheduler or {}).get("params") or {}).get("total_num_steps") == max_steps:
        info["max_steps"] = max_steps
    return info


def open_run_dir(args: Any, run_info: dict[str, Any]) -> RunDirectory:
    """Lock ``--output_dir``, refuse a used one (without --resume / --overwrite_output_dir), clean up after an
    interrupted save; with --resume (to train on), refuse a changed schedule. Cheap: before the model loads."""
    run_dir = RunDirectory(
        args.output_dir, resume=args.resume, overwrite=args.overwrite_output_dir, run_files=RUN_FILES
    )
    if args.resume and not args.eval_only:
        try:
            run_dir.find_checkpoint(args.checkpoint_tag).require_same_run(run_info)
        except BaseException:
            run_dir.close()
            raise
    return run_dir


def publish_hf_folder(source: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Make ``dest`` a copy of the HF folder ``source`` (a checkpoint's ``model/``), replacing it atomically.

    The files are hard links to the checkpoint's (no second copy on disk; checkpoint files are never
    rewritten in place), or copies where the file system has no hard links. A kill leaves the old ``dest``
    or the new, plus ``.tmp-`` names the next start removes.
    """
    source, dest = Path(source), Path(dest)
    staging = dest.with_name(f"{TMP_PREFIX}{dest.name}.{os.getpid()}")
    if staging.exists():
        remove_tree(staging)
    shutil.copytree(source, staging, copy_function=_link_or_copy)
    fsync_tree(staging)
    if dest.exists():
        remove_tree(dest)  # renamed away first: a kill from here leaves the checkpoint's copy only
    os.replace(staging, dest)
    fsync_dir(dest.parent)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class RunCheckpoints:
    """One run's checkpoints: a :class:`~zo2_ds.checkpoint.Checkpointer` over the opened ``run_dir``, and
    what launch/train.py does around it. Every rank calls every method; rank 0 does the file work.

    Each checkpoint's ``client_state``: ``{"run_summary": summary, "loss_window": [loss sum, steps]}``.
    """

    def __init__(
        self,
        engine: Any,
        run_dir: RunDirectory,
        args: Any,
        *,
        run_info: dict[str, Any],
        hf_save: Callable[..., Any] | None,
        hf_collect: Callable[[], Any] | None = None,
    ) -> None:
        self.engine, self.run_dir, self.rank = engine, run_dir, engine.global_rank
        self.checkpointer = Checkpointer(
            engine,
            run_dir,
            save_steps=args.save_steps or None,  # 0: no periodic checkpoints
            save_total_limit=args.save_total_limit or None,  # 0: keep all
            hf_save=hf_save,
            hf_collect=hf_collect,
            run_info={} if args.eval_only else run_info,  # to evaluate, any schedule will do
        )

    def due(self, step: int) -> bool:
        return self.checkpointer.due(step)

    def resume(self, tag: str | None, *, truncate_log: bool = True) -> dict[str, Any]:
        """Load the checkpoint (verified; the library logs which one); returns its client_state. The run's
        log.jsonl loses what the stopped run logged after that checkpoint (logged again from here)."""
        state = self.checkpointer.resume(tag)
        if truncate_log and self.rank == 0:
            truncate_jsonl(self.run_dir.path / "log.jsonl", state.step)
        return state.client_state

    def save(self, summary: dict[str, Any], window: LossWindow, *, best: bool = False) -> str:
        """Save this step's checkpoint (every rank): ``latest`` names it, and ``best`` with ``best``."""
        return self.checkpointer.save({"run_summary": summary, "loss_window": window.state()}, best=best)

    def has_best(self) -> bool:
        return self.run_dir.read_pointer("best") is not None

    def load_best(self) -> None:
        """Load the best-dev checkpoint into the engine (to score it; after the last save)."""
        self.engine.load_checkpoint(str(self.run_dir.path), tag=self.run_dir.read_pointer("best"))

    def publish_hf_copies(self) -> None:
        """``model/`` (or ``adapter/``) from the latest checkpoint, ``best_model/`` from the best (rank 0)."""
        if self.rank != 0:
            return
        for pointer, prefix in (("latest", ""), ("best", "best_")):
            name = self.run_dir.read_pointer(pointer)
            for kind in HF_KINDS if name else ():
                if (self.run_dir.path / name / kind).is_dir():
                    publish_hf_folder(self.run_dir.path / name / kind, self.run_dir.path / f"{prefix}{kind}")

    def close(self) -> None:
        self.run_dir.close()


def stop_exit_code(stop: GracefulStop, args: Any, *, world_size: int) -> int:
    """After the stop's checkpoint: rank 0 prints the one line with the command that resumes; the exit code is
    130 after a Ctrl-C (SIGINT, the shell's convention: ``train && next`` does not go on), else 0 (SIGTERM: a
    scheduler's preemption, saved and done)."""
    if int(os.environ.get("RANK", "0")) == 0:
        command = resume_command()  # "python launch/train.py ... --resume"
        if "TORCHELASTIC_RUN_ID" in os.environ:  # set by torchrun
            launcher = f"torchrun --nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', world_size)}"
            command = launcher + command.removeprefix("python")
        elif args.local_rank is not None:  # the deepspeed launcher passes --local_rank
            command = f"deepspeed --num_gpus {world_size}" + command.removeprefix("python")
        print(stop.message(command), flush=True)
    return 130 if stop.reason == "SIGINT" else 0
