"""Where launch/train.py saves and loads its checkpoints: the one seam for checkpointing.

Today: DeepSpeed's own ``save_checkpoint`` / ``load_checkpoint`` into ``output_dir`` (the final
checkpoint, named by DeepSpeed's ``latest`` file) and the tag ``best`` (the best-dev checkpoint, which
leaves ``latest`` alone), each with its HF copy. The run's settings that shape the lr (``run_info``:
``max_steps`` and the scheduler block) travel in the checkpoint, and a resume that would change the
lr schedule is refused. Periodic, atomic and verified saves (zo2_ds.checkpoint) replace the insides of this class;
the launcher calls only its methods.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

__all__ = ["BEST_TAG", "RunCheckpoints"]

BEST_TAG = "best"  # <output_dir>/best: a DeepSpeed tag folder, with its HF copy inside


class RunCheckpoints:
    """Save / resume for one run in ``output_dir``.

    ``hf_save(folder)`` writes the HF-format copy next to a checkpoint (or None for none);
    ``run_info`` is what a resumed run must share with the saved one (JSON-like values).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        run_info: dict[str, Any],
        hf_save: Callable[[str], None] | None = None,
    ) -> None:
        self.output_dir = os.fspath(output_dir)
        self.run_info = run_info
        self.hf_save = hf_save

    def has(self, tag: str | None = None) -> bool:
        """Whether there is a checkpoint to load: DeepSpeed's ``latest`` file, or ``tag``'s folder."""
        if tag is not None:
            return os.path.isdir(os.path.join(self.output_dir, tag))
        return os.path.isfile(os.path.join(self.output_dir, "latest"))

    def require(self, tag: str | None = None) -> None:
        """Raise a ValueError for ``--resume`` with nothing to resume (checked before the model loads)."""
        if self.has(tag):
            return
        what = f"tag {tag!r}" if tag else "'latest' file"
        hint = ""
        if tag is None and self.has(BEST_TAG):
            hint = f"; it has a best-dev checkpoint: add --checkpoint_tag {BEST_TAG} to resume from that one"
        raise ValueError(f"--resume: no checkpoint in --output_dir {self.output_dir!r} (no {what}){hint}")

    def resume(self, engine, tag: str | None = None, *, train: bool = True) -> dict[str, Any]:
        """Load the checkpoint (``latest``, or ``tag``) into ``engine``; returns its run summary. To
        ``train`` on, refuses one whose lr schedule differs from this run's (a silent lr jump otherwise)."""
        _, client_state = engine.load_checkpoint(self.output_dir, tag=tag)
        client_state = client_state or {}
        if train:
            self._check_same_run(client_state.get("run_info"))
        return dict(client_state.get("run_summary", {}))

    def save(self, engine, summary: dict[str, Any], *, best: bool = False) -> None:
        """The final checkpoint (``latest``), or with ``best`` the best-dev one; then the HF copy."""
        client_state = {"run_summary": summary, "run_info": self.run_info}
        tag = BEST_TAG if best else None
        engine.save_checkpoint(self.output_dir, tag=tag, client_state=client_state, save_latest=not best)
        if self.hf_save is not None and engine.global_rank == 0:
            self.hf_save(os.path.join(self.output_dir, BEST_TAG) if best else self.output_dir)

    def load_best(self, engine) -> None:
        engine.load_checkpoint(self.output_dir, tag=BEST_TAG)

    def _check_same_run(self, saved: dict[str, Any] | None) -> None:
        """The lr schedule must be the one the checkpoint was trained with; ``max_steps`` alone may change
        (a constant lr, or a schedule of explicit length, does not depend on it)."""
        if saved is None or saved.get("scheduler") == self.run_info.get("scheduler"):
            return  # also a checkpoint from before run_info was saved: nothing to compare
        saved_steps, steps = saved.get("max_steps"), self.run_info.get("max_steps")
        if _schedule_length(saved) == saved_steps and saved_steps != steps:
            raise ValueError(
                f"--resume: the checkpoint in {self.output_dir!r} was trained toward --max_steps {saved_steps}, "
                f"the length of its lr schedule; resuming with --max_steps {steps} would change the lr mid-run. "
                f"Resume with --max_steps {saved_steps}; or, to train longer, start a new --output_dir, or give "
                "the schedule an explicit length (scheduler.params.total_num_steps in the DeepSpeed config)"
            )
        raise ValueError(
            f"--resume: the checkpoint in {self.output_dir!r} was trained with the lr schedule "
            f"{saved.get('scheduler')}; this run's is {self.run_info.get('scheduler')}. Resume with the "
            "saved run's DeepSpeed config and --max_steps, or start a new --output_dir"
        )


def _schedule_length(run_info: dict[str, Any]) -> int | None:
    return ((run_info.get("scheduler") or {}).get("params") or {}).get("total_num_steps")
