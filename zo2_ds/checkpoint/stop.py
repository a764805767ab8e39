"""Stopping a run on purpose: Ctrl-C / SIGTERM at a step boundary on every rank, and a run whose steps are
all skipped as non-finite."""

from __future__ import annotations

import math
import shlex
import signal
import sys
import threading
import time
from typing import Any, TextIO

from zo2_ds.checkpoint import _dist

__all__ = ["GracefulStop", "NonFiniteGuard", "NonFiniteError", "resume_command"]


def resume_command(argv: list[str] | None = None) -> str:
    """The command that resumes this run: ``python`` and ``argv`` (default ``sys.argv``) with ``--resume``
    added and ``--overwrite_output_dir`` and the launcher's ``--local_rank`` left out.

    Under a launcher (``deepspeed``, ``torchrun``) the ranks do not see its command line; the launcher
    script can prefix its own instead.
    """
    argv = list(sys.argv if argv is None else argv)
    kept = [a for a in argv if a != "--overwrite_output_dir" and not a.startswith("--local_rank")]
    if "--local_rank" in argv:  # "--local_rank N": its value goes too
        i = argv.index("--local_rank")
        kept = [a for j, a in enumerate(argv) if j not in (i, i + 1) and a != "--overwrite_output_dir"]
    if "--resume" not in kept:
        kept.append("--resume")
    return " ".join(["python", *(shlex.quote(a) for a in kept)])


class GracefulStop:
    """SIGINT / SIGTERM ask the run to stop after the current step instead of killing it.

    Use it as a context manager around the training loop, and ask :meth:`should_stop` once per optimizer
    step at the same point on every rank; when it says True, save and leave the loop::

        with GracefulStop() as stop:
            while engine.global_steps < max_steps:
                ...  # one step
                if stop.should_stop():
                    ckpt.save(state)
                    print(stop.message())  # "... to resume: python launch/train.py ... --resume"
                    break

    The first signal sets the flag and prints one line; a second Ctrl-C (SIGINT) aborts at once
    (KeyboardInterrupt; the last complete checkpoint stays), unless it comes within ``repeat_window_s`` of the
    first: a Ctrl-C in a terminal reaches every rank and the launcher, and ``torchrun`` passes it on to its
    ranks as a second SIGINT at once (the ``deepspeed`` launcher as SIGTERM), both to be read as one request.
    SIGTERM never aborts. Both launchers kill their ranks 30 s after a Ctrl-C, which bounds the time a step
    and the save may take. With several ranks, :meth:`should_stop` all-reduces the flag (one int over a CPU
    group, so no GPU sync) every ``sync_every`` calls, so all stop at the same step even when the signal
    reached them at different times; with one rank it reads the flag. Handlers are installed only from the
    main thread; the previous ones come back on exit.
    """

    def __init__(self, *, sync_every: int = 1, repeat_window_s: float = 2.0, stream: TextIO | None = None):
        if not isinstance(sync_every, int) or sync_every < 1:
            raise ValueError(f"sync_every must be an integer >= 1, got {sync_every!r}")
        self.sync_every = sync_every
        self.repeat_window_s = repeat_window_s
        self._stream = stream
        self._requested: str | None = None
        self._requested_at = 0.0
        self._calls = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        _dist.require_initialized("GracefulStop")
        if _dist.world_size() > 1:
            _dist.cpu_group()  # made now, by every rank together, not at a first signal on one rank
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._requested is not None:
            again = time.monotonic() - self._requested_at >= self.repeat_window_s
            if signum == signal.SIGINT and self._requested == "SIGINT" and again:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt("second Ctrl-C: aborted without saving")
            return
        self._requested, self._requested_at = name, time.monotonic()
        stream = self._stream or sys.stderr
        stream.write(
            f"\n{name} received (rank {_dist.rank()}): finishing this step, then saving a checkpoint and "
            "stopping; Ctrl-C again to abort at once\n"
        )
        stream.flush()

    @property
    def requested(self) -> bool:
        """Whether this process received a stop signal (its own view; see :meth:`should_stop`)."""
        return self._requested is not None

    @property
    def reason(self) -> str | None:
        """What this process received: ``"SIGINT"``, ``"SIGTERM"``, ``"request"``, or None."""
        return self._requested

    def request(self) -> None:
        """Ask for a stop as a signal would (e.g. a time limit reached)."""
        self._requested = self._requested or "request"

    def should_stop(self) -> bool:
        """Whether every rank stops after this step. Call it once per step on every rank."""
        if _dist.world_size() == 1:
            return self.requested
        self._calls += 1
        if self._calls % self.sync_every:
            return False
        return _dist.any_rank(self.requested)

    def message(self, command: str | None = None) -> str:
        """The one line to print after the stop's checkpoint is saved; ``command`` (default
        :func:`resume_command`) is how to resume."""
        command = command or resume_command()
        return f"stopped by {self._requested} at a step boundary, checkpoint saved; to resume: {command}"


class NonFiniteError(RuntimeError):
    """Every step for a while was skipped because its projected gradient was not finite."""


class NonFiniteGuard:
    """Stops a run whose last ``max_consecutive`` optimizer steps were all skipped as non-finite (NaN / inf
    loss), instead of letting it finish and save a model that stopped learning.

    Call :meth:`check` after ``engine.step()`` at the accumulation boundary, and with ``wait=True`` before any
    save of that step. It reads the engine's step figures (``engine.zo_step_figures``): with ``wait=False``
    those the host already has, which with zo2.async_step are the previous step's (no device wait), so each
    step is counted once, whenever its figures arrive; a second call for the same step is a no-op.
    """

    def __init__(self, max_consecutive: int = 20):
        if not isinstance(max_consecutive, int) or max_consecutive < 1:
            raise ValueError(f"max_consecutive must be an integer >= 1, got {max_consecutive!r}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self._last_step: int | None = None

    def check(self, engine: Any, wait: bool = True) -> None:
        """Raise :class:`NonFiniteError` once ``max_consecutive`` steps in a row were skipped."""
        since = -1 if self._last_step is None else self._last_step
        for figures in engine.zo_step_figures(since=since, wait=wait):
            self._count(engine, figures.step, figures.g)

    def _count(self, engine: Any, step: int, g: list[float]) -> None:
        self._last_step = step
        self.consecutive = self.consecutive + 1 if g and not all(math.isfinite(v) for v in g) else 0
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"the last {self.consecutive} steps ({step - self.consecutive + 1}..{step}) were all skipped: the "
                f"loss or projected gradient was not finite (last g={g}; {engine.zo_skipped_steps} skipped in all). "
                "Stopping without saving; check the data, the lr and eps, and the dtype (fp16 overflows: bf16 "
                "or fp32), then resume from the last checkpoint"
            )
