"""Run P forwards of one model block-major instead of pass-major, without touching the model's code.

The offloader wants every pass to run block k while block k is on the GPU, i.e. the order

    prefix(pass 0) .. prefix(pass P-1), block 0(pass 0) .. block 0(pass P-1), block 1(pass 0) ...

where "prefix" is everything before block 0 (embeddings) and the last segment is block N-1 plus the tail
(final norm, head, loss). An HF forward is one Python call that loops over its blocks, so each pass runs
in its own thread (pass 0 in the caller's), and the threads take turns: a thread runs one segment, then
at the next block's forward pre-hook hands the turn to the next pass and waits for its own. Exactly one
thread runs at any time, in a fixed order, so the result is the same as running the passes one after the
other (the maths of each pass is unchanged; only the order between passes differs).

What a worker copies (:class:`_ThreadContext`). torch keeps some state per thread; a worker enters the
caller's values for the pass it runs, and leaves them after:

- grad mode (``torch.is_grad_enabled``; the ZO passes run under ``no_grad``);
- autocast, per device type ("cuda", "cpu"): whether it is on and its dtype;
- the current CUDA device and the current stream, so kernels of every pass go to the caller's stream in
  issue order (the offloader's events order the side streams against that one stream).

Not copied: ``torch.inference_mode`` (the engine uses ``no_grad``), the hooks of
``torch.autograd.graph.saved_tensors_hooks`` and other autograd thread-locals (nothing is recorded under
``no_grad``), and any library's own thread-local state (cuBLAS / cuDNN handles are made once per worker,
which is why the workers live for the whole run: :class:`PassPool`). Python-level state read by the model
(module attributes, HF configs) is shared, as it is when the passes run one after the other.

Failure: the first exception (in any pass) aborts the others: they raise :class:`Aborted` where they
wait, unwind through the model (its always-call hooks run) and the caller re-raises the original error.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["LockStep", "Aborted", "PassPool"]


class Aborted(BaseException):
    """Raised in a pass's thread when another pass failed; never escapes :meth:`LockStep.run`."""


class LockStep:
    """Turn-taking for ``num_passes`` forwards through ``num_blocks`` blocks.

    ``on_turn(j)`` is called (in the thread of pass j) each time pass j gets the turn, before it runs.
    """

    def __init__(
        self,
        num_passes: int,
        num_blocks: int,
        on_turn: Callable[[int], None] | None = None,
        order: Sequence[int] | None = None,
    ):
        self.num_passes = num_passes
        self.num_blocks = num_blocks
        self._on_turn = on_turn
        # The units in the order the forward calls them; None: not known yet, learned from pass 0 (``sequence``).
        self._order = None if order is None else list(order)
        self.sequence: list[int] = []  # the units pass 0 called, in order
        self._cond = threading.Condition()
        self._turn = 0  # segment s of pass j has turn s * num_passes + j
        self._stage = [0] * num_passes  # segment each pass is in (the k-th unit's forward is in segment k + 1)
        self._finished = [False] * num_passes
        self._gathered = 0  # 1 once a pass called gather_passes: every pass has one more segment
        self._error: BaseException | None = None
        self._local = threading.local()

    # -- called from the model's hooks -----------------------------------------------------------
    @property
    def current_pass(self) -> int:
        return self._local.index

    @property
    def aborted(self) -> bool:
        return self._error is not None

    def enter_block(self, block: int) -> int:
        """At unit ``block``'s pre-hook: end the current segment, wait for this pass's turn at the unit.

        Returns the pass index. Raises RuntimeError when the units are not called once each, in the order
        given (or, without one, in the order pass 0 called them).
        """
        j = self._local.index
        stage = self._stage[j]
        learning = j == 0 and self._order is None  # pass 0 of a run whose order is not known: it sets the order
        if block in self.sequence if learning else block != self._expected(stage):
            due = "a unit it had not called yet" if learning else f"unit {self._expected(stage)}"
            raise RuntimeError(
                f"zo2.offload: pass {j} called unit {block} where {due} was due; the offloader "
                'needs the model to call every streamed unit (a block, or at granularity "layer" a block\'s large '
                "sub-module) exactly once per forward, in the same order every time (see zo2.offload.blocks_attr; "
                'zo2.offload.granularity "block" streams whole blocks)'
            )
        with self._cond:
            if learning:
                self.sequence.append(block)
            self._stage[j] = stage + 1
            self._advance()
            self._wait(j)
        return j

    def gather_passes(self) -> int:
        """In the last segment (after the last unit): wait until every pass has called this, then go on one at a
        time in pass order, as at a unit (the streamed head's loss: :mod:`zo2_ds.offload.head`). Returns the
        pass index. Every pass must call it once, or none."""
        j = self._local.index
        if self._stage[j] != self.num_blocks:
            raise RuntimeError(
                f"zo2.offload: pass {j} reached the head's loss after {self._stage[j]} of the {self.num_blocks} "
                "streamed units (or twice); the head's loss must come after the last unit, once per forward"
            )
        with self._cond:
            early = [i for i in range(self.num_passes) if self._finished[i] and self._stage[i] == self.num_blocks]
            if early:
                raise RuntimeError(f"zo2.offload: pass {early[0]} did not reach the head's loss, which pass {j} did")
            self._gathered = 1
            self._stage[j] += 1
            self._advance()
            self._wait(j)
        return j

    def _expected(self, stage: int) -> int:
        order = self._order if self._order is not None else self.sequence
        return order[stage] if 0 <= stage < len(order) else -1

    # -- driving ---------------------------------------------------------------------------------
    def run(self, forwards: Sequence[Callable[[], Any]], pool: PassPool | None = None) -> list[Any]:
        """Run ``forwards[j]`` as pass j (pass 0 in this thread, the others on ``pool``'s workers)."""
        assert len(forwards) == self.num_passes
        results: list[Any] = [None] * self.num_passes
        context = _ThreadContext.capture()
        own_pool = pool is None
        pool = pool if pool is not None else PassPool()
        done = [
            pool.submit(j - 1, lambda j=j: self._run_pass(j, forwards[j], results, context))
            for j in range(1, self.num_passes)
        ]
        try:
            self._run_pass(0, forwards[0], results, None)
        finally:
            for event in done:
                event.wait()
            if own_pool:
                pool.close()
        if self._error is not None:
            raise self._error
        return results

    def _run_pass(self, j: int, forward: Callable[[], Any], results: list[Any], context: _ThreadContext | None) -> None:
        self._local.index = j
        try:
            stack = context.enter() if context is not None else []
            try:
                with self._cond:
                    self._wait(j)
                results[j] = forward()
            finally:
                _ThreadContext.exit(stack)
            if self._stage[j] != self.num_blocks + self._gathered:
                if self._stage[j] == self.num_blocks:
                    raise RuntimeError(f"zo2.offload: pass {j} did not reach the head's loss, which other passes did")
                raise RuntimeError(
                    f"zo2.offload: pass {j} called {self._stage[j]} of the {self.num_blocks} streamed units; the "
                    'offloader needs the model to call every unit (a block, or at granularity "layer" a block\'s '
                    "large sub-module) exactly once per forward (see zo2.offload.blocks_attr; zo2.offload.granularity "
                    '"block" streams whole blocks)'
                )
        except Aborted:
            pass
        except BaseException as exc:  # noqa: BLE001 - re-raised by run() in the caller's thread
            with self._cond:
                if self._error is None:
                    self._error = exc
                self._cond.notify_all()
        finally:
            with self._cond:
                self._finished[j] = True
                if self._turn % self.num_passes == j and self._error is None:
                    self._advance()
                self._cond.notify_all()

    # -- turn bookkeeping (hold self._cond) ------------------------------------------------------
    def _advance(self) -> None:
        self._turn += 1
        end = (self.num_blocks + 1 + self._gathered) * self.num_passes
        while self._turn < end and self._finished[self._turn % self.num_passes]:
            self._turn += 1
        self._cond.notify_all()

    def _wait(self, j: int) -> None:
        target = self._stage[j] * self.num_passes + j
        while self._turn != target and self._error is None:
            self._cond.wait()
        if self._error is not None:
            raise Aborted()
        if self._on_turn is not None:
            self._on_turn(j)


class PassPool:
    """Long-lived worker threads for passes 1..P-1, reused every step.

    Reuse matters on CUDA: libraries keep per-thread state (cuBLAS / cuDNN handles, workspaces and
    cuDNN's attention graph cache); a fresh thread per step would rebuild it every step.
    """

    def __init__(self) -> None:
        self._queues: list[queue.SimpleQueue] = []
        self._threads: list[threading.Thread] = []

    def submit(self, worker: int, job: Callable[[], None]) -> threading.Event:
        while len(self._queues) <= worker:
            q: queue.SimpleQueue = queue.SimpleQueue()
            t = threading.Thread(target=self._loop, args=(q,), daemon=True, name=f"zo2-pass-{len(self._queues) + 1}")
            self._queues.append(q)
            self._threads.append(t)
            t.start()
        done = threading.Event()
        self._queues[worker].put((job, done))
        return done

    @staticmethod
    def _loop(q: queue.SimpleQueue) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            job, done = item
            try:
                job()  # _run_pass catches everything; nothing escapes to kill the worker
            finally:
                done.set()

    def close(self) -> None:
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join()
        self._queues.clear()
        self._threads.clear()


class _ThreadContext:
    """The caller's thread-local torch state, re-entered in a worker thread."""

    def __init__(self, grad: bool, device: int | None, stream: Any, autocast: list[tuple[str, torch.dtype]]):
        self.grad, self.device, self.stream, self.autocast = grad, device, stream, autocast

    @classmethod
    def capture(cls) -> _ThreadContext:
        device = stream = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            device = torch.cuda.current_device()
            stream = torch.cuda.current_stream(device)
        autocast = [
            (kind, torch.get_autocast_dtype(kind)) for kind in ("cuda", "cpu") if torch.is_autocast_enabled(kind)
        ]
        return cls(torch.is_grad_enabled(), device, stream, autocast)

    def enter(self) -> list[Any]:
        stack: list[Any] = [torch.set_grad_enabled(self.grad)]
        if self.device is not None:
            torch.cuda.set_device(self.device)
            stack.append(torch.cuda.stream(self.stream))
        for kind, dtype in self.autocast:
            stack.append(torch.autocast(kind, dtype=dtype))
        for ctx in stack:
            ctx.__enter__()
        return stack

    @staticmethod
    def exit(stack: list[Any]) -> None:
        for ctx in reversed(stack):
            ctx.__exit__(None, None, None)
