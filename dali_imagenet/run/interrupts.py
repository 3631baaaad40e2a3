"""Requests to stop from outside the loop: SIGTERM (a scheduler, a spot instance's shutdown),
SIGINT (Ctrl-C) and EC2's spot interruption notice (`spot.SpotWatcher`). Each sets a flag that
the run reads wherever waiting would cost the two minutes a reclaim leaves: after train steps,
between validation batches, at an epoch's end, around a recompile, during a replay and at
start-up. The ranks agree on it, so all stop at the same point. A second SIGINT stops at once.
`StopCheck` turns these requests and the run's limits into one decision per step.
"""
from __future__ import annotations

import signal
import sys
import time
from contextlib import contextmanager

from dali_imagenet import distributed
from dali_imagenet.errors import Interrupted
from dali_imagenet.run import exits


class StopRequest:
    """Installs the handlers when made; `reason` is None until a stop was asked for."""

    def __init__(self, announce: bool = True):
        self.reason: str | None = None
        self.asked_at: float | None = None  # time.time() of the request
        self._announce = announce
        self._leaving = False
        self.hurry = False  # a Ctrl-C while leaving: stop waiting for the uploads
        self._at_once = False  # inside `at_once`: a request raises where the main thread is
        self._before = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore(self) -> None:
        """Puts back the handlers it replaced (train.py run in-process, in a test, leaves none behind)."""
        for sig, handler in self._before.items():
            signal.signal(sig, handler)

    def leaving(self) -> None:
        """The run is on its way out: SIGTERM now (torchrun's to the other ranks of a run that
        ended) changes nothing and says nothing; Ctrl-C sets `hurry` (a person does not want to
        wait for the uploads: the exit line then names what is not in S3)."""
        self._leaving = True

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self._leaving:
            if name == "SIGINT" and not self.hurry:
                self.hurry = True
                if self._announce:
                    print("\nSIGINT: not waiting for the uploads any longer", file=sys.stderr, flush=True)
            return
        if self.reason == "SIGINT" and name == "SIGINT":
            raise KeyboardInterrupt
        self.ask(name)
        if self._at_once:
            raise Interrupted(self.reason)

    @contextmanager
    def at_once(self):
        """Inside it a stop request raises `Interrupted` at once, wherever the main thread is: for
        work with nothing to keep that has no point to check at (building a large model takes
        minutes, one tensor's initialisation after another)."""
        self.interrupt_if_asked()
        self._at_once = True
        try:
            yield
        finally:
            self._at_once = False

    def interrupt_if_asked(self) -> None:
        """Raises `Interrupted` once a stop was asked for (where there is nothing to checkpoint)."""
        if self.reason is not None:
            raise Interrupted(self.reason)

    def ask(self, reason: str) -> None:
        """Stop at the next point that can, for `reason` (a signal's name, or the spot notice)."""
        if self.reason is not None:
            return  # the first reason is the one the run records
        self.reason = reason
        self.asked_at = time.time()
        if self._announce:
            print(f"\n{reason}: stopping at the next step or batch with a checkpoint (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)


class StopCheck:
    """After a step: should the run stop, and is a mid-epoch checkpoint due? Decided alike on every
    rank, so all stop and checkpoint at the same step. In one process, every step; under torchrun,
    every step too, one step late: each step's flags go out in a non-blocking all-reduce on the
    CPU (`distributed.FlagExchange`) that the next step reads, so a stop request is agreed within
    a step whatever `log_every` is, and the GPU is never waited for."""

    BATCHES_BETWEEN_CHECKS = 8  # under torchrun, outside train steps (validation, replay): one all-reduce per 8 batches

    def __init__(self, request: StopRequest, processes: distributed.Processes, *, checkpoint_minutes: float,
                 max_minutes: float, max_steps: int, earlier_s: float = 0.0):
        """`earlier_s`: the wall-clock seconds the run had trained before this process resumed it."""
        self.request = request
        self.earlier_s = earlier_s
        self.processes = processes
        self.checkpoint_s = checkpoint_minutes * 60
        self.max_s = max_minutes * 60
        self.max_steps = max_steps
        self.started = time.monotonic()
        self.last_checkpoint = self.started
        self._flags = distributed.FlagExchange(processes)
        self._stale_due = False  # the flags in flight were posted before the checkpoint just written

    def after_step(self, step: int) -> tuple[str | None, bool]:
        """(why to stop now, or None; whether a checkpoint is due) after global step `step`."""
        stop, due = None, False
        now = time.monotonic()
        agreed = self._flags.exchange([self.request.reason is not None, now - self.last_checkpoint > self.checkpoint_s,
                                       0 < self.max_s < now - self.started])
        if agreed is not None:
            asked, due, late = agreed
            due, self._stale_due = due and not self._stale_due, False
            if asked:
                stop = self.agreed_reason()
            elif late:
                stop = f"max_minutes={self.max_s / 60:g}"
        if stop is None and self.max_steps and step >= self.max_steps:
            stop = f"max_steps={self.max_steps}"
        return stop, due

    def agreed_reason(self) -> str:
        """The request that stops the run, the same on every rank (a gather: call it only once a
        stop was agreed): the strongest of the ranks' requests (a reclaim over a Ctrl-C)."""
        reasons = distributed.gather(self.request.reason, self.processes)
        asked = [(rank, reason) for rank, reason in enumerate(reasons) if reason is not None]
        rank, reason = max(asked, key=lambda pair: (exits.for_stop(pair[1]) == exits.RECLAIM, -pair[0]))
        return reason if rank == self.processes.rank or self.processes.world == 1 else f"{reason} on rank {rank}"

    def interrupt_if_asked(self, batch: int = 0) -> None:
        """Outside a train step (between validation or replay batches, at an epoch's end, at
        start-up): raises `Interrupted` if a stop was asked for on any rank. Nothing changed since
        the last checkpoint there, so the run can leave at once. Under torchrun it all-reduces
        only every `BATCHES_BETWEEN_CHECKS` batches (every rank counts the same batches)."""
        if self.processes.world > 1 and batch % self.BATCHES_BETWEEN_CHECKS:
            return
        if distributed.any_rank([self.request.reason is not None], self.processes)[0]:
            raise Interrupted(self.agreed_reason())

    def checkpointed(self) -> None:
        self.last_checkpoint = time.monotonic()
        self._stale_due = self.processes.world > 1  # the next agreed "due" was posted before this checkpoint

    def close(self) -> None:
        """Waits for the last flags in flight (every rank, before the process group goes)."""
        self._flags.drain()

    def elapsed_s(self) -> float:
        """Seconds since this process started training."""
        return time.monotonic() - self.started

    def run_s(self) -> float:
        """Wall-clock seconds of the whole run so far, over every process that resumed it."""
        return self.earlier_s + self.elapsed_s()
