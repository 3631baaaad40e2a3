"""Requests to stop from outside the loop: SIGTERM (a scheduler, a spot instance's shutdown),
SIGINT (Ctrl-C) and EC2's spot interruption notice (`spot.SpotWatcher`). Each sets a flag; the
loop reads it between steps, agrees on it across ranks, finishes the step, checkpoints and exits
0. A second SIGINT (an impatient Ctrl-C) stops at once.
`StopCheck` turns these requests and the run's limits into one decision per step."""
from __future__ import annotations

import signal
import sys
import time

from dali_imagenet import distributed


class StopRequest:
    """Installs the handlers when made; `reason` is None until a stop was asked for."""

    def __init__(self, announce: bool = True):
        self.reason: str | None = None
        self._announce = announce
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.reason == "SIGINT" and name == "SIGINT":
            raise KeyboardInterrupt
        self.ask(name)

    def ask(self, reason: str) -> None:
        """Stop after the current step, for `reason` (a signal's name, or the spot notice)."""
        if self.reason is not None:
            return  # the first reason is the one the run records
        self.reason = reason
        if self._announce:
            print(f"\n{reason}: stopping after this step with a checkpoint (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)


class StopCheck:
    """After a step: should the run stop, and is a mid-epoch checkpoint due? Decided alike on every
    rank (one all-reduce), so all stop and checkpoint at the same step; in one process every
    step, under torchrun at log steps only (an all-reduce is a sync)."""

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

    def after_step(self, step: int, at_log: bool) -> tuple[str | None, bool]:
        """(why to stop now, or None; whether a checkpoint is due) after global step `step`."""
        stop, due = None, False
        if self.processes.world == 1 or at_log:
            now = time.monotonic()
            asked, due, late = distributed.any_rank(
                [self.request.reason is not None, now - self.last_checkpoint > self.checkpoint_s,
                 0 < self.max_s < now - self.started], self.processes)
            if asked:
                stop = self.request.reason or "signal on another rank"
            elif late:
                stop = f"max_minutes={self.max_s / 60:g}"
        if stop is None and self.max_steps and step >= self.max_steps:
            stop = f"max_steps={self.max_steps}"
        return stop, due

    def checkpointed(self) -> None:
        self.last_checkpoint = time.monotonic()

    def elapsed_s(self) -> float:
        """Seconds since this process started training."""
        return time.monotonic() - self.started

    def run_s(self) -> float:
        """Wall-clock seconds of the whole run so far, over every process that resumed it."""
        return self.earlier_s + self.elapsed_s()
