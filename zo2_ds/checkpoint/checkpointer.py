"""Atomic, verified, rotated checkpoints of a ZO (or any DeepSpeed) engine in a :class:`RunDirectory`.

A save, on every rank: DeepSpeed writes each rank's files into a staging folder ``.tmp-checkpoint-<step>``
(``engine.save_checkpoint`` also flushes the offloader's pending updates); rank 0 then adds the HF copy
when asked, fsyncs everything, writes ``manifest.json`` (sizes and sha256 of every file, the model's
fingerprint, ``run_info``), renames the folder to ``checkpoint-<step>``, replaces ``latest`` (and ``best``)
atomically and deletes checkpoints beyond ``save_total_limit``; the ranks leave together. A kill at any
instant leaves the previous complete state plus ``.tmp-`` leftovers that the next start removes.

The files rank 0 hashes are the ones every rank wrote, so the output directory must be one file system that
all ranks see (DeepSpeed's default; ``use_node_local_storage`` is not supported).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zo2_ds.checkpoint import _dist
from zo2_ds.checkpoint.atomic import TMP_PREFIX, fsync_dir, fsync_tree, remove_tree
from zo2_ds.checkpoint.manifest import (
    CheckpointError,
    check_fingerprint,
    model_fingerprint,
    verify_files,
    write_manifest,
)
from zo2_ds.checkpoint.rundir import CheckpointInfo, RunDirectory, checkpoint_name

__all__ = ["Checkpointer", "ResumeState", "SAVE_STAGES"]

logger = logging.getLogger(__name__)

SAVE_STAGES = ("staging", "deepspeed", "hf_copy", "manifest", "publish", "latest", "best", "rotate", "done")
"""The points of a save at which the fault hook is called, in order:
``staging`` before anything is written; ``deepspeed`` just before ``engine.save_checkpoint`` writes (a hook may
arm a timer to land inside it); ``hf_copy`` after DeepSpeed's files, before the HF copy; ``manifest`` after
every file is fsynced and before the manifest is written; ``publish`` before the rename to
``checkpoint-<step>``; ``latest`` before the ``latest`` pointer; ``best`` before the ``best`` pointer (saves
with ``best=True``); ``rotate`` before each deletion of an old checkpoint; ``done`` at the end. Stages after
``deepspeed`` are reached on rank 0 only."""


@dataclass(frozen=True)
class ResumeState:
    """What :meth:`Checkpointer.resume` loaded."""

    checkpoint: CheckpointInfo
    client_state: dict[str, Any]
    """The ``client_state`` given to :meth:`Checkpointer.save`."""

    @property
    def step(self) -> int:
        return self.checkpoint.step

    @property
    def run_info(self) -> dict[str, Any]:
        return self.checkpoint.run_info


class Checkpointer:
    """Saves and resumes ``engine`` in ``run_dir``.

    Args:
        engine: a DeepSpeed engine (``zo2_ds.initialize``'s). Only its public API is used:
            ``save_checkpoint`` / ``load_checkpoint`` with ``client_state``, ``global_steps``, ``module``.
        run_dir: the opened :class:`RunDirectory`.
        save_steps: with :meth:`due`, a checkpoint every this many optimizer steps (HF Trainer's
            ``save_steps``); None: :meth:`due` is always False (the launcher decides alone).
        save_total_limit: keep the newest this many checkpoints, plus the best (HF Trainer's
            ``save_total_limit``); None keeps all.
        hf_save: called as ``hf_save(folder)`` on rank 0 with the staging checkpoint folder, to add the
            Hugging Face copy (e.g. ``folder/model``); it becomes part of the checkpoint and its manifest.
        hf_collect: for weights no single rank holds whole (``zo2.offload.partition``): called on every rank
            before rank 0's ``hf_save``, which then gets its result, ``hf_save(folder, collected)`` (e.g. a
            ``state_dict`` gathered by all ranks together); None: ``hf_save(folder)`` alone.
        run_info: JSON-able facts that must not change on resume (e.g. ``{"max_steps": 3000, "scheduler":
            {...}}``): stored in every manifest, checked by :meth:`resume`.
        fault_hook: a test hook, called as ``fault_hook(stage)`` at each of :data:`SAVE_STAGES` (e.g. to
            SIGKILL the process there); None in normal use.
    """

    def __init__(
        self,
        engine: Any,
        run_dir: RunDirectory,
        *,
        save_steps: int | None = None,
        save_total_limit: int | None = None,
        hf_save: Callable[..., Any] | None = None,
        hf_collect: Callable[[], Any] | None = None,
        run_info: dict[str, Any] | None = None,
        fault_hook: Callable[[str], None] | None = None,
    ):
        for name, value in (("save_steps", save_steps), ("save_total_limit", save_total_limit)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name} must be an integer >= 1 (or unset), got {value!r}")
        self.engine = engine
        self.run_dir = run_dir
        self.save_steps = save_steps
        self.save_total_limit = save_total_limit
        self.hf_save = hf_save
        self.hf_collect = hf_collect
        self.run_info = dict(run_info or {})
        self._fault = fault_hook or (lambda stage: None)
        self._resumed_step: int | None = None  # set by resume() until the first save (see _stale)

    def due(self, step: int) -> bool:
        """Whether the periodic checkpoint falls on optimizer step ``step`` (every ``save_steps``)."""
        return self.save_steps is not None and step > 0 and step % self.save_steps == 0

    # -- save ----------------------------------------------------------------------------------
    def save(self, client_state: dict[str, Any] | None = None, *, best: bool = False) -> str:
        """Save ``checkpoint-<engine.global_steps>`` atomically, point ``latest`` at it (and ``best`` when
        ``best``), then delete old checkpoints beyond ``save_total_limit``. Every rank must call it.

        A checkpoint is immutable: when the step already has one of this trajectory (e.g. the periodic
        save fell on the last step), only the pointers are updated. Returns the checkpoint folder's path.
        """
        step = self.engine.global_steps
        name = checkpoint_name(step)
        final = self.run_dir.path / name
        if _dist.on_rank0(lambda: final.is_dir() and name not in self._stale()):
            _dist.on_rank0(lambda: self._point(name, best))
            return str(final)
        staging_name = f"{TMP_PREFIX}{name}"
        staging = self.run_dir.path / staging_name
        self._fault("staging")
        _dist.on_rank0(lambda: remove_tree(staging) if staging.exists() else None)
        fingerprint = model_fingerprint(self.engine.module)
        self._fault("deepspeed")
        self.engine.save_checkpoint(
            str(self.run_dir.path), tag=staging_name, client_state=dict(client_state or {}), save_latest=False
        )
        # Every rank, when the HF copy needs them all (a collective gather of partitioned weights).
        collected = self.hf_collect() if self.hf_save is not None and self.hf_collect is not None else None
        _dist.on_rank0(lambda: self._publish(staging, final, step, fingerprint, best, collected))
        return str(final)

    def _publish(
        self, staging: os.PathLike, final: os.PathLike, step: int, fingerprint: dict, best: bool, collected: Any
    ) -> None:
        self._fault("hf_copy")
        if self.hf_save is not None and self.hf_collect is not None:
            self.hf_save(str(staging), collected)
        elif self.hf_save is not None:
            self.hf_save(str(staging))
        fsync_tree(staging)
        self._fault("manifest")
        write_manifest(staging, step=step, fingerprint=fingerprint, run_info=self.run_info)
        fsync_dir(staging)
        self._drop_stale()
        self._fault("publish")
        os.replace(staging, final)
        fsync_dir(self.run_dir.path)
        self._point(os.path.basename(final), best)
        self._rotate()
        self._fault("done")

    def _point(self, name: str, best: bool) -> None:
        self._fault("latest")
        self.run_dir.write_pointer("latest", name)
        if best:
            self._fault("best")
            self.run_dir.write_pointer("best", name)

    def _stale(self) -> list[str]:
        """Checkpoints after the one this run resumed from: a continuation it abandoned (it resumed from an
        older one, e.g. ``best``), or saves of its own trajectory whose ``latest`` update a kill prevented."""
        if self._resumed_step is None:
            return []
        return [name for s, name in self.run_dir.checkpoints() if s > self._resumed_step]

    def _drop_stale(self) -> None:
        """Before the first checkpoint of the resumed trajectory is published, the stale ones go; the
        pointers are moved off them first, so no kill leaves a pointer naming a missing folder."""
        stale = self._stale()
        if stale:
            if self.run_dir.read_pointer("latest") in stale:
                self.run_dir.write_pointer("latest", checkpoint_name(self._resumed_step))
            if self.run_dir.read_pointer("best") in stale:
                (self.run_dir.path / "best").unlink()
            for name in stale:
                self._fault("rotate")
                remove_tree(self.run_dir.path / name)
            logger.warning(f"deleted {', '.join(stale)}: saved after step {self._resumed_step}, where this run resumed")
        self._resumed_step = None

    def _rotate(self) -> None:
        if self.save_total_limit is None:
            return
        names = [name for _, name in self.run_dir.checkpoints()]
        keep = set(names[-self.save_total_limit :])
        keep.add(self.run_dir.read_pointer("best") or "")
        for name in names:
            if name not in keep:
                self._fault("rotate")
                remove_tree(self.run_dir.path / name)

    # -- resume --------------------------------------------------------------------------------
    def resume(self, tag: str | int | None = None) -> ResumeState:
        """Load the newest complete checkpoint (or ``tag``: ``"best"``, ``"latest"``, ``"checkpoint-500"``,
        ``500``) into the engine after verifying it. Every rank must call it.

        Before DeepSpeed reads anything, rank 0 checks every file against the manifest (present, size,
        sha256), the model against the saved fingerprint and ``run_info`` against the saved one; any
        failure is a :class:`~zo2_ds.checkpoint.CheckpointError` (or ValueError for ``run_info``) naming the
        file and what is wrong, raised on every rank. Logs which checkpoint it resumes from, and why.

        Checkpoints after the resumed one are then stale: the next :meth:`save` deletes them (the run left
        that trajectory). To evaluate a checkpoint without training on from it, load it after the last save.
        """
        fingerprint = model_fingerprint(self.engine.module)
        info = _dist.on_rank0(lambda: self._verified(tag, fingerprint))
        load_path, client_state = self.engine.load_checkpoint(str(self.run_dir.path), tag=info.name)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed loaded nothing from {info.path}")
        if self.engine.global_steps != info.step:
            raise RuntimeError(
                f"{info.path}: the manifest records step {info.step}, DeepSpeed restored {self.engine.global_steps}"
            )
        self._resumed_step = info.step
        why = f" ({info.note})" if info.note else ""
        if _dist.rank() == 0:  # said once, not by every rank
            logger.warning(f"resuming from {info.path} (step {info.step}, saved {info.manifest['saved_at']}){why}")
        return ResumeState(checkpoint=info, client_state=dict(client_state or {}))

    def _verified(self, tag: str | int | None, fingerprint: dict) -> CheckpointInfo:
        info = self.run_dir.find_checkpoint(tag)
        try:
            verify_files(info.path, info.manifest)
            check_fingerprint(info.manifest["model"], fingerprint, str(info.path))
        except CheckpointError as exc:
            others = [name for _, name in self.run_dir.checkpoints() if name != info.name]
            if not others:
                raise
            raise CheckpointError(f"{exc}. Other checkpoints there: {', '.join(others)} (--checkpoint_tag)") from None
        info.require_same_run(self.run_info)
        return info
