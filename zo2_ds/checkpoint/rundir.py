"""One run's output directory: its lock, the refusal to clobber a previous run, the leftovers of an interrupted
save, and the checkpoints it holds.

Layout (checkpoint folders are named like HF Trainer's; ``latest`` is DeepSpeed's own pointer file, so a plain
``engine.load_checkpoint(output_dir)`` still finds the newest one)::

    output_dir/
      .lock                  held (fcntl.flock) by the job writing here; the kernel releases it when the job dies
      checkpoint-500/        DeepSpeed's files, the HF copy (model/ or adapter/) when asked, manifest.json
      checkpoint-1000/
      latest                 the name of the newest checkpoint folder (one line, replaced atomically)
      best                   the name of the best checkpoint folder, when there is one
      .tmp-*                 a save or delete in progress; removed at the next start
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zo2_ds.checkpoint import _dist
from zo2_ds.checkpoint.atomic import TMP_PREFIX, remove_tree, write_text_atomic
from zo2_ds.checkpoint.manifest import CheckpointError, read_manifest

__all__ = ["RunDirectory", "CheckpointInfo", "OutputDirInUseError", "POINTERS", "checkpoint_name"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
POINTERS = ("latest", "best")
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _step_of(name: str) -> int:
    m = _CHECKPOINT_RE.match(name)
    return int(m.group(1)) if m else -1


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint of ``step``: ``checkpoint-<step>``."""
    return f"checkpoint-{int(step)}"


class OutputDirInUseError(ValueError):
    """Another live job holds the output directory's lock."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint found in a run directory (its files not yet verified)."""

    name: str
    path: Path
    step: int
    manifest: dict[str, Any]
    note: str = ""
    """Why this one was chosen, when that is not obvious (e.g. newer than what ``latest`` names)."""

    @property
    def run_info(self) -> dict[str, Any]:
        """What the run that saved it recorded as ``run_info`` (e.g. max_steps, the lr schedule)."""
        return dict(self.manifest.get("run_info", {}))

    def require_same_run(self, current: dict[str, Any]) -> None:
        """ValueError naming every key of ``current`` whose value differs from the saved ``run_info``.

        Call it before building anything expensive, with what decides the trajectory (max_steps, the
        scheduler block): a resumed run with another schedule would silently jump its lr.
        """
        now = json.loads(json.dumps(current, default=str))
        saved = self.run_info
        changed = [f"{k}={saved[k]!r} (now {now[k]!r})" for k in now if k in saved and saved[k] != now[k]]
        if changed:
            raise ValueError(
                f"resume: {self.name} was saved by a run with {'; '.join(changed)}. Resuming with other values "
                "would change the schedule mid-run: resume with the saved values, or start a new run in another "
                "--output_dir (or with --overwrite_output_dir)"
            )


class RunDirectory:
    """Open ``path`` for a run: lock it, clean up after an interrupted save, refuse to clobber a previous run.

    Args:
        path: the output directory (created if missing).
        resume: the run continues the one in ``path``; it must hold a checkpoint.
        overwrite: a previous run in ``path`` is deleted (its checkpoints, pointers and ``run_files``);
            other files are left alone.
        run_files: the names of the other files and folders the launcher writes there (``log.jsonl``,
            ``metrics.json``, ...): their presence marks a previous run too, and ``overwrite`` deletes them.

    Every rank constructs it (a collective when torch.distributed is up); rank 0 holds the lock and does the
    file work, and an error on rank 0 is raised on every rank. Release the lock with :meth:`close` (or use it
    as a context manager); a killed job's lock is released by the kernel.
    """

    def __init__(
        self, path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False, run_files: tuple = ()
    ):
        if resume and overwrite:
            raise ValueError("--resume and --overwrite_output_dir exclude each other: continue the run, or replace it")
        self.path = Path(path)
        self.resume = resume
        self.overwrite = overwrite
        self.run_files = tuple(run_files)
        self._lock_fd: int | None = None
        _dist.require_initialized("RunDirectory")
        _dist.on_rank0(self._open)

    # -- opening -------------------------------------------------------------------------------
    def _open(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self._remove_leftovers()
            previous = self._previous_run()
            if previous and not (self.resume or self.overwrite):
                shown = ", ".join(previous[:5]) + (", ..." if len(previous) > 5 else "")
                raise ValueError(
                    f"--output_dir {self.path} holds a previous run ({shown}): pass --resume to continue it, "
                    "or --overwrite_output_dir to replace it"
                )
            if self.overwrite and previous:
                self._delete(previous)
            if self.resume and not self.checkpoints():
                why = " (that run stopped before its first checkpoint)" if previous else ""
                if (self.path / "latest").is_file():
                    why = " ('latest' there names a checkpoint of an older zo2_ds, without a manifest)"
                raise CheckpointError(
                    f"--resume: no checkpoint in --output_dir {self.path}{why}; start the run again, with "
                    "--overwrite_output_dir if the directory holds its files"
                )
        except BaseException:
            self.close()
            raise

    def _lock(self) -> None:
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise OutputDirInUseError(
                f"--output_dir {self.path} is in use by another job ({holder}); wait for it to finish or stop "
                "it, or choose another --output_dir"
            ) from None
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {stamp}\n".encode())
        self._lock_fd = fd

    def _remove_leftovers(self) -> None:
        leftovers = sorted(p for p in self.path.iterdir() if p.name.startswith(TMP_PREFIX))
        for p in leftovers:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        if leftovers:
            logger.warning(
                f"{self.path}: removed what an interrupted save left: {', '.join(p.name for p in leftovers)}"
            )

    def _previous_run(self) -> list[str]:
        names = [name for _, name in self.checkpoints()]
        names += [n for n in (*POINTERS, *self.run_files) if os.path.lexists(self.path / n)]
        return names

    def _delete(self, names: list[str]) -> None:
        for name in names:
            p = self.path / name
            remove_tree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        logger.warning(f"--overwrite_output_dir: deleted the previous run in {self.path} ({', '.join(names)})")

    def close(self) -> None:
        """Release the lock (the files stay)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoints(self) -> list[tuple[int, str]]:
        """``(step, folder name)`` of every checkpoint folder, oldest first."""
        found = []
        for p in self.path.iterdir() if self.path.is_dir() else ():
            m = _CHECKPOINT_RE.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p.name))
        return sorted(found)

    def read_pointer(self, kind: str) -> str | None:
        """The checkpoint folder ``latest`` or ``best`` names; None without that file. An empty pointer, or
        one naming a folder that is not there, is a :class:`CheckpointError`."""
        path = self.path / kind
        if not path.is_file():
            return None
        name = path.read_text().strip()
        if not name:
            raise CheckpointError(f"{path} is empty (it should name a checkpoint folder, e.g. checkpoint-500)")
        if not (self.path / name).is_dir():
            raise CheckpointError(
                f"{path} names {name!r}, which is not in {self.path} (checkpoints there: {self._listing()})"
            )
        return name

    def write_pointer(self, kind: str, name: str) -> None:
        """Point ``latest`` or ``best`` at checkpoint folder ``name`` (atomically)."""
        assert kind in POINTERS, kind
        write_text_atomic(self.path / kind, name)

    def _listing(self) -> str:
        return ", ".join(name for _, name in self.checkpoints()) or "none"

    def find_checkpoint(self, tag: str | int | None = None) -> CheckpointInfo:
        """The checkpoint to resume from, with its manifest read (its files are verified on load).

        ``tag`` None: the one ``latest`` names (checkpoints are published complete before ``latest`` moves
        to them), or the newest folder when there is no ``latest``. ``"latest"`` / ``"best"``:
        the one that pointer names. ``"checkpoint-500"`` or ``500``: that one.
        """
        note = ""
        if tag is None:
            available = self.checkpoints()
            if not available:
                raise CheckpointError(f"no checkpoint in {self.path} (no checkpoint-* folder)")
            # 'latest' is replaced only once its checkpoint is complete. Newer folders than the one it names
            # come from a kill between publishing a checkpoint and the pointer (the same trajectory, saved
            # again when training reaches that step) or from a continuation a resumed run abandoned.
            name = self.read_pointer("latest") or available[-1][1]
            newer = [n for s, n in available if s > _step_of(name)]
            if newer:
                note = f"'latest' names it; the newer {', '.join(newer)} will be replaced by the first save"
        elif str(tag) in POINTERS:
            name = self.read_pointer(str(tag))
            if name is None:
                raise CheckpointError(
                    f"{self.path / str(tag)} does not exist: no {tag} checkpoint was saved (checkpoints there: "
                    f"{self._listing()})"
                )
        else:
            name = checkpoint_name(int(tag)) if str(tag).isdigit() else str(tag)
            if not (self.path / name).is_dir():
                raise CheckpointError(
                    f"checkpoint {str(tag)!r}: no folder {self.path / name} (checkpoints there: {self._listing()}; "
                    "or 'latest', 'best')"
                )
        manifest = read_manifest(self.path / name)
        return CheckpointInfo(
            name=name, path=self.path / name, step=int(manifest["step"]), manifest=manifest, note=note
        )
