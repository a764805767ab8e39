"""Process hygiene for launchers: no DeepSpeed shared-memory files left in /dev/shm, no misleading start-up lines.

Where a launcher calls it (every rank)::

    from zo2_ds import hygiene

    hygiene.silence_startup_noise()        # once, early (before deepspeed.initialize and the model's first loss)
    hygiene.init_distributed()             # instead of deepspeed.init_distributed(): quiet, and no /dev/shm leak

**The /dev/shm leak.** On a CPU machine DeepSpeed 0.19.8's comm backend loads its shm all-reduce op
(``deepspeed/comm/torch.py``, ``TorchBackend.__init__``); when every rank is on this host (``LOCAL_SIZE`` equals
the world size, which the ``deepspeed`` launcher sets) its ``shm_initialize`` (``ops/csrc/cpu/comm/shm.cpp``)
creates ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` (66 MB), maps the
other ranks' files, and never unlinks its own. Once every rank has returned from that initialisation (a
barrier), all of them hold their mappings, so each rank unlinks its own file at once: the memory stays mapped
until the processes end and nothing is left behind by a finished, failed or killed (even SIGKILLed) run.
If a rank fails before that point, an atexit handler and a SIGTERM handler (the launchers stop the other
ranks with SIGTERM) unlink its file.

**The noise.** Three lines every run printed that tell the user nothing: ``DeepSpeed
deepspeed.ops.comm.deepspeed_shm_comm_op built successfully`` (printed whenever the op is loaded; nothing is
built), DeepSpeed's ``Attempting to get learning rate from scheduler before it has started`` (its schedulers
log it from their own constructor), and transformers' ``loss_type=None was set in the config but it is
unrecognized`` (models whose config names no loss type: the default causal-LM loss is the right one). Each is
dropped by an exact-text filter; every other warning of those loggers, and every other line, still comes
through.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
import re
import signal
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["silence_startup_noise", "init_distributed", "quiet_stdout", "shm_buffer_path", "release_shm_buffer"]

SHM_DIR = "/dev/shm"
SHM_BUFFER_PREFIX = "deepspeed_allreduce_buffer"
_NOISE = (
    ("DeepSpeed", "Attempting to get learning rate from scheduler before it has started"),
    ("transformers.modeling_utils", "`loss_type=None` was set in the config but it is unrecognized"),
)
# e.g. "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"
_STDOUT_NOISE = re.compile(r"DeepSpeed \S*shm_comm\S* built successfully")


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def silence_startup_noise() -> None:
    """Drop the two log lines above from the DeepSpeed and transformers loggers (idempotent)."""
    for logger_name, prefix in _NOISE:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropMessages) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessages(prefix))


class _LineFilter(io.TextIOBase):
    """A text stream that passes whole lines on to ``target``, except those that ``drop`` matches in full."""

    def __init__(self, target: Any, drop: re.Pattern):
        self._target = target
        self._drop = drop
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            if not self._drop.fullmatch(line):
                self._target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self._pending and not self._drop.fullmatch(self._pending):
            self._target.write(self._pending)
        self._pending = ""
        self._target.flush()


@contextlib.contextmanager
def quiet_stdout(drop: re.Pattern = _STDOUT_NOISE) -> Iterator[None]:
    """For the duration, lines printed to ``sys.stdout`` that ``drop`` matches in full are dropped."""
    original = sys.stdout
    sys.stdout = _LineFilter(original, drop)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout = original


def shm_buffer_path(rank: int | None = None) -> str:
    """The /dev/shm file DeepSpeed's CPU shm all-reduce creates for ``rank`` (default: this process's)."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return os.path.join(SHM_DIR, f"{SHM_BUFFER_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}")


def release_shm_buffer(path: str | None = None) -> bool:
    """Unlink this rank's shm buffer file (a no-op when there is none). Returns whether one was removed.

    Safe only once every rank has mapped it, i.e. after ``deepspeed.init_distributed`` and a barrier.
    """
    try:
        os.unlink(path or shm_buffer_path())
        return True
    except FileNotFoundError:
        return False


def _sigterm_releasing(path: str) -> Any:
    """Install a SIGTERM handler that unlinks ``path`` and then does what the previous handler did."""
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: Any) -> None:
        release_shm_buffer(path)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)
    return previous


def init_distributed(**kwargs: Any) -> None:
    """``deepspeed.init_distributed(**kwargs)`` without its stdout noise and without a /dev/shm leak.

    Call it on every rank, from the main thread, before anything else creates the process group.
    """
    import deepspeed
    import torch.distributed as tdist

    path = shm_buffer_path()
    atexit.register(release_shm_buffer, path)  # a rank that fails before its buffer is released below
    previous = _sigterm_releasing(path)
    try:
        with quiet_stdout():
            deepspeed.init_distributed(**kwargs)
        # The buffer exists on every rank or on none (all ranks on this host); once all have passed the
        # barrier, every rank has mapped every buffer and the names can go.
        if os.path.exists(path) and tdist.is_initialized() and tdist.get_world_size() > 1:
            tdist.barrier()
        release_shm_buffer(path)
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        atexit.unregister(release_shm_buffer)
