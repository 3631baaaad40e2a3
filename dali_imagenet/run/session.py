"""A training process's session: everything a run must close on its way out, owned by one object.

`train.py`'s `main` reads `with RunSession(cfg, procs, request, started, ...) as session:`, then
`session.connect()` first inside it (its failures go out through the session too). The session
is made once the config and the processes exist; from then on it owns the stop requests
(signals, `interrupts.StopRequest`), the other ranks' errors (`distributed.PeerErrors`), EC2's spot
notice (`spot.SpotWatcher`), the lease on the run's S3 prefix, the launch's clock and its cost,
the closing record and the exit code. Every way out goes through it, taken once, from the main
thread or from the thread that hears of another rank's error:

- `finish(stop)`: the run trained every epoch, or stopped at a step for `stop` (every rank together);
- an `Interrupted` raised in the `with` block: before the run exists, a stop during start-up (only
  this launch's record is kept); after, the same as `finish`;
- any other exception on this rank (`failed`), another rank's error (`peer_failed`), a second Ctrl-C.

On each, rank 0 writes the closing record (once, with its exit code) and the report and waits for
the uploads (`s3_flush_timeout_s`); each rank prints its line; the exit code says how the run ended
(`exits`: 0 complete, 75 stopped for a reclaim: relaunch) and is written for the cloud task's
`run:` (`exits.record`) as soon as it is known: torchrun may end this process before it returns.
Every way out, even one before the run exists (a reclaim during staging), adds this launch to the
run's `launches.json`.
"""
from __future__ import annotations

import os
import sys
import threading
import traceback
from pathlib import Path

from dali_imagenet import distributed, s3
from dali_imagenet.config import TrainConfig
from dali_imagenet.data import staging
from dali_imagenet.errors import DaliImagenetError, Interrupted, debug
from dali_imagenet.run import exits, launches, run_folder, spot
from dali_imagenet.run.cost import cost, cost_basis, data_basis, data_cost, describe_cost
from dali_imagenet.run.interrupts import StopRequest
from dali_imagenet.run.launches import LaunchClock
from dali_imagenet.run.lease import Lease
from dali_imagenet.run.training_run import LossDiverged, TrainingRun

WAIT_EXTRA_S = 15  # beyond the flush timeout, for the other ranks to hear and answer


def leave_now(code: int) -> None:
    """Exits at once, threads and all (an upload stuck in its timeout, a peer's error)."""
    exits.record(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class RunSession:
    def __init__(self, cfg: TrainConfig, procs: distributed.Processes, request: StopRequest, started: float, *,
                 spot_mode: str, streamed: bool):
        """`request`: the stop requests, heard since the process started (a SIGTERM during start-up
        is acted on at the first check); `started`: time.time() when the process started (its
        launch's clock counts from there); `spot_mode`: whether to watch EC2's notice (--spot);
        `streamed`: DALI reads s3:// itself every epoch (--stream), its GETs then estimated."""
        self.cfg = cfg
        self.procs = procs
        self.request = request
        self.streamed = streamed
        self.clock = LaunchClock(started)
        self.flush_timeout_s = cfg.s3_flush_timeout_s  # how long rank 0 waits for the uploads (0 after a second Ctrl-C)
        self.lock = threading.Lock()
        self.code: int | None = None  # the exit code, once a way out was taken
        self.run: TrainingRun | None = None  # the loop's parts, once `begin` was given them
        self.lease: Lease | None = None  # the run's hold on its S3 prefix (`claim`), released on the way out
        self.s3_url: str | None = None  # where `launches.json` goes when the run folder does not exist yet
        self._spot_mode = spot_mode
        self._claimed = False
        self._finished = False
        self.peers: distributed.PeerErrors | None = None  # from `connect` on
        self.watcher: spot.SpotWatcher | None = None
        self.watching = ""  # the line saying whether EC2's notice is watched
        self.instance: dict = {}  # the cloud's word on the machine (type, region, spot), empty off EC2
        self.launch_basis: dict | None = None  # what this launch's price and the run's cost need (`cost.cost_basis`)
        self.data_basis: dict | None = None  # what S3's cost needs (`cost.data_basis`)

    def connect(self) -> None:
        """The other ranks' errors and EC2's spot notice, watched from here on (one during start-up
        is acted on before training starts); the machine and its prices, for the launch's cost."""
        self.peers = distributed.PeerErrors(self.procs, self.peer_failed)
        imds, self.watching = spot.connect(self._spot_mode)
        if imds:
            self.watcher = spot.SpotWatcher(imds, self.request.ask, log=_to_stderr,
                                            interval_s=self.cfg.spot_poll_seconds)
            self.instance = imds.instance()
        self.clock.on_machine(self.instance, launches.setup_times())  # on EC2: the machine's time before this process
        self.launch_basis = cost_basis(self.cfg, self.procs, self.instance)
        self.data_basis = data_basis(self.cfg, self.instance)
        if self.procs.master:
            print(self.watching, flush=True)

    def __enter__(self) -> RunSession:
        return self

    def claim(self, run_dir: Path, s3_url: str | None, *, overwrite: bool) -> None:
        """Rank 0, once the run's place is chosen and checked, before anything is written or
        staged: S3 takes our files (a probe), the lease on the prefix is held (no other job writes
        there meanwhile), and the run's earlier launches are read (a reclaim's relaunch: this one
        is added to them on the way out; `overwrite`: a new run, none)."""
        if not self.procs.master:
            return
        if s3_url:
            s3.probe_writes(s3_url, self.cfg.s3_resume_timeout_s)
            self.lease = Lease(s3_url, self.cfg.lease_seconds).acquire(self.cfg.s3_resume_timeout_s)
        self.clock.earlier = [] if overwrite else launches.read(run_dir, s3_url, self.cfg.s3_resume_timeout_s)
        self.s3_url = s3_url
        self._claimed = True

    def begin(self, run: TrainingRun) -> None:
        """The run exists (its folder, its log): from here every way out closes it."""
        self.run = run
        if self.watcher:
            self.watcher.log = run.outputs.note  # the notice's lines go to the run's log too

    @property
    def step(self) -> int:
        return self.run.state.step if self.run else 0

    def finish(self, stop: str | None) -> None:
        """Every rank, together: the replicas' checksums; rank 0 writes the final weights (a
        finished run), the closing record and the report and waits for the uploads; every rank
        then exits with rank 0's code."""
        run = self.run
        checksums = distributed.gather(distributed.replica_checksum(run.train_step.model), run.procs)  # SYNC
        code = exits.for_stop(stop)
        self.clock.leave()
        run_cost = self._cost(self._close_launch(code, stop))  # SYNC: every rank's S3 requests
        notice = self.watcher.timing() if self.watcher and stop and stop.startswith(spot.NOTICE) else {}
        record = {"step": run.state.step, "event": "stopped" if stop else "finished", "reason": stop,
                  "exit_code": code, "replica_checksums": checksums, "replicas_identical": len(set(checksums)) == 1,
                  "cost": run_cost, "launches": run_cost.pop("every_launch"), **({"notice": notice} if notice else {})}
        if run.procs.master:
            print(f"{'stopped (' + stop + ')' if stop else 'finished'} at step {run.state.step} after "
                  f"{describe_cost(run_cost)}; checkpoint {run.outputs.run_dir / run_folder.LAST}, report "
                  f"{run.outputs.run_dir / run_folder.REPORT}")
        with self.lock:
            self.request.leaving()
            code = self._end_outputs(record, final_model=run.train_step.model if stop is None else None,
                                     summary=run_cost)
        self.code = distributed.broadcast(code, run.procs)  # SYNC: every rank exits with rank 0's code
        exits.record(self.code)  # now: once the other ranks exit, torchrun may SIGTERM this one before its end
        if run.procs.master and self.code in (exits.RECLAIM, exits.INTERRUPTED):
            timing = self.watcher.timing() if notice else {}  # now, after the uploads
            print(f"exit {self.code}: continue with --resume auto{_since_notice(timing)}", file=sys.stderr, flush=True)
        self._finished = True

    def __exit__(self, kind, error, traceback_) -> bool:
        """Takes the way out an exception asks for (a stop request outside a step, an error), then
        closes what the session holds. An exception does not leave it (the exit code says how the
        run ended), but SystemExit, and one raised by `failed` itself (nothing is left to try)."""
        try:
            if isinstance(error, Interrupted):
                try:
                    self._interrupted(error.reason)
                except BaseException as during:  # noqa: BLE001 - the stop's own way out failed: closed as a failure
                    if isinstance(during, SystemExit):
                        raise
                    self.code = self.failed(during)
            elif error is not None and not isinstance(error, SystemExit):
                self.code = self.failed(error)
        finally:
            self._close()
        if self._finished:
            self._after()
        return error is not None and not isinstance(error, SystemExit)

    def _interrupted(self, stop: str) -> None:
        """A stop request heard outside a train step: nothing new to checkpoint; during start-up,
        nothing trained and nothing written but this launch's record."""
        if self.run is not None:
            self.finish(stop)
            return
        self.clock.leave()
        self.code = exits.for_stop(stop)
        exits.record(self.code)  # first: the other ranks exit now, and torchrun may end this one soon after
        self._close_launch(self.code, stop, before_the_run=True)
        print(f"{stop}: stopped during start-up, nothing trained; exit {self.code}", file=sys.stderr, flush=True)

    def _end_outputs(self, record: dict, **kwargs) -> int:
        """The outputs' last word (rank 0: the closing record with the exit code the uploads leave,
        one line for what did not reach S3), and the other ranks told that it is done; returns the
        exit code."""
        outputs = self.run.outputs if self.run else None
        pending = outputs.end(record, flush_timeout_s=self.flush_timeout_s,
                              give_up=lambda: self.request.hurry, **kwargs) if outputs else []
        if pending:
            print(outputs.pending_line(pending), file=sys.stderr, flush=True)
        elif outputs and outputs.uploader:
            print(f"uploaded to {outputs.s3_url}", flush=True)
        if self.peers is not None:
            self.peers.flushed()  # rank 0: the others may leave now (torchrun would end it as they exit)
        return exits.with_uploads(record["exit_code"], pending)

    def _cost(self, every_launch: list[dict]) -> dict:
        """What the run cost over `every_launch`, machines and S3, every rank's requests (a
        collective); the launches themselves under "every_launch", for the closing record."""
        run = self.run
        images = run.state.step * run.cfg.batch_size * run.procs.world + sum(e.get("images", 0)
                                                                               for e in run.state.history)
        streamed_gets = staging.GETS_PER_SAMPLE * images if self.streamed else 0
        usage = s3.merged(distributed.gather(s3.usage.snapshot(), run.procs))
        return {**cost(every_launch, gpus=self.launch_basis["gpus"], lifecycle=self.launch_basis["lifecycle"],
                       data=data_cost(usage, streamed_gets=streamed_gets, **self.data_basis)),
                "every_launch": every_launch}

    def _close_launch(self, code: int, reason: str | None, before_the_run: bool = False) -> list[dict]:
        """Rank 0: this launch's record (its last phase counted up to now, its machine priced), added
        to the run's earlier ones in `launches.json` (the run folder's, uploaded with the rest; with
        `before_the_run`, a stop before the run folder exists, straight to S3: a relaunch follows
        and must count it; a failed start writes nothing); returns them all. [] on the other ranks,
        or before the run's place is known (nothing to add it to)."""
        outputs = self.run.outputs if self.run else None
        in_folder = outputs is not None and outputs.logger is not None
        if not self.procs.master or not self._claimed:
            return []
        if not in_folder and not (before_the_run and self.s3_url):
            return []  # nowhere to keep it: a failed start, or a stop at start-up of a run without S3
        try:
            clock, basis = self.clock, self.launch_basis
            price = launches.machine_price(clock.instance, clock.window(), price_per_hour=basis["price_per_hour"],
                                           spot_price_per_hour=basis["spot_price_per_hour"])
            every = [*clock.earlier, clock.record(exit_code=code, reason=reason, machines=basis["machines"],
                                                  price=price, on_demand_per_hour=basis["price_per_hour"])]
            if in_folder:
                outputs.save_launches(every)
            else:
                launches.upload(every, self.s3_url, self.cfg.s3_flush_timeout_s)
            return every
        except Exception as error:  # noqa: BLE001 - the way out goes on; the count misses this launch, said once
            print(f"warning: this launch's record was not kept ({type(error).__name__}: {error})", file=sys.stderr,
                  flush=True)
            return []

    def failed(self, error: BaseException) -> int:
        """An exception ended the run on this rank: a user error is one line, a bug keeps its
        traceback; the other ranks are told (unless all raised it together, like a NaN loss)."""
        self.lock.acquire()
        self.request.leaving()
        code, message = ending(error)
        if code == exits.INTERRUPTED:  # a second Ctrl-C: leave now, waiting for nothing
            self.flush_timeout_s = 0.0
        exits.record(code)  # before the others hear of it: torchrun SIGTERMs this rank as soon as they exit
        tell_others = self.peers is not None and not isinstance(error, LossDiverged)
        if tell_others:
            self.peers.post(message)
        step = getattr(error, "step", self.step)
        reason = (f"loss NaN or inf at step {step}" if isinstance(error, LossDiverged)
                  else message if code == exits.INTERRUPTED else f"error: {message}")
        self.clock.leave()
        every = self._close_launch(code, reason)  # [] before the run's place is claimed
        basis = self.launch_basis
        self._end_outputs({"step": step, "event": "stopped", "reason": reason, "exit_code": code,
                           **({"launches": every, "cost": cost(every, gpus=basis["gpus"],
                                                               lifecycle=basis["lifecycle"])} if every else {})})
        say_error(error, message)
        if tell_others:
            self.peers.wait_for_others(self.flush_timeout_s + WAIT_EXTRA_S)
        elif self.peers is not None:  # all failed together (a NaN): rank 0 uploads first, then all leave
            self.peers.wait_for_flush(self.flush_timeout_s + WAIT_EXTRA_S)
        return code

    def peer_failed(self, line: str) -> None:
        """Another rank failed (the peer-error thread): stop this one too, with one line, now."""
        if not self.lock.acquire(blocking=False):
            return  # the main thread is already leaving
        self.request.leaving()
        self._end_outputs({"step": self.step, "event": "stopped", "reason": f"error on {line}",
                           "exit_code": exits.ERROR})
        print(f"error: stopping: {line}", file=sys.stderr, flush=True)
        self.peers.acknowledge()
        self.peers.wait_for_flush(self.flush_timeout_s + WAIT_EXTRA_S)  # rank 0 uploads first
        if self.lease is not None:
            self.lease.release()
        leave_now(exits.ERROR)

    def _close(self) -> None:
        for part in (self.watcher, self.peers):
            if part is not None:
                part.close()
        if self.lease is not None:
            self.lease.release()
        self.request.restore()

    def _after(self) -> None:
        """The last steps of a run that got as far as its end: the process group down, and an
        upload still in its timeout not allowed to outlive the interpreter."""
        run = self.run
        if run.procs.world > 1:
            run.stops.close()
            distributed.teardown(run.procs)
        if run.outputs.stuck():
            leave_now(self.code)


def ending(error: BaseException) -> tuple[int, str]:
    """(the exit code, the line) of a process that `error` ends: a second Ctrl-C, or an error."""
    if isinstance(error, KeyboardInterrupt):
        return exits.INTERRUPTED, "stopped at once by a second Ctrl-C"
    return exits.ERROR, str(error) if isinstance(error, DaliImagenetError) else f"{type(error).__name__}: {error}"


def say_error(error: BaseException, message: str | None = None) -> None:
    """A user's error (bad input, a data error) or a second Ctrl-C in one line; a bug with its traceback."""
    if isinstance(error, (DaliImagenetError, KeyboardInterrupt)) and not debug():
        print(f"error: {message or error}", file=sys.stderr, flush=True)
    else:
        traceback.print_exception(error)


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _since_notice(notice: dict) -> str:
    if not notice:
        return ""
    reclaim = f"; EC2 reclaims at {notice['reclaim_at']}" if notice.get("reclaim_at") else ""
    return f" ({notice['since_notice_s']:.1f} s after the spot notice{reclaim})"
