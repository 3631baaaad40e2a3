"""Every way out of a training process, in one object: finished or stopped (`finish`), an
exception on this rank (`failed`), another rank's error (`peer_failed`), a second Ctrl-C. Each is
taken once, from the main thread or from the thread that hears of another rank's error: rank 0
writes the closing record and the report and waits for the uploads (`s3_flush_timeout_s`); each
rank prints its line; the exit code says how the run ended (`exits`: 0 complete, 75 stopped for a
reclaim: relaunch) and is written for the cloud task's `run:` (`exits.record`).

`Leaving` makes what a way out must close before the run exists (`connect`: the other ranks'
errors, the spot watcher, the lease on the S3 prefix) and is then given the `Run` once. It holds
the launch's clock (`launches.LaunchClock`) from the process's start: every way out, even one
before the run exists (a reclaim during staging), adds this launch to the run's `launches.json`.
"""
from __future__ import annotations

import os
import sys
import threading
import traceback

from dali_imagenet import distributed, s3
from dali_imagenet.data import staging
from dali_imagenet.errors import DaliImagenetError, debug
from dali_imagenet.run import exits, launches, run_folder, spot
from dali_imagenet.run.cost import cost, data_cost, describe_cost
from dali_imagenet.run.interrupts import StopRequest
from dali_imagenet.run.launches import LaunchClock
from dali_imagenet.run.lease import Lease
from dali_imagenet.run.parts import LossDiverged, Run

WAIT_EXTRA_S = 15  # beyond the flush timeout, for the other ranks to hear and answer


def leave_now(code: int) -> None:
    """Exits at once, threads and all (an upload stuck in its timeout, a peer's error)."""
    exits.record(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Leaving:
    def __init__(self, request: StopRequest, flush_timeout_s: float, started: float):
        """`started`: time.time() when the process started (its launch's clock counts from there)."""
        self.request = request
        self.flush_timeout_s = flush_timeout_s
        self.clock = LaunchClock(started)
        self.launch_basis: dict | None = None  # `metrics.cost_basis`, once the config and machine are known
        self.launch_store: tuple | None = None  # (the run's S3 prefix or None, a timeout) once the lease is held
        self.master = True
        self.lock = threading.Lock()
        self.run: Run | None = None
        self.peers: distributed.PeerErrors | None = None
        self.watcher: spot.SpotWatcher | None = None
        self.lease: Lease | None = None  # the run's hold on its S3 prefix, released on the way out

    def connect(self, procs: distributed.Processes, spot_mode: str, poll_s: float) -> str:
        """The other ranks' errors and EC2's spot notice, watched from here on; returns the line
        saying whether the notice is watched."""
        self.peers = distributed.PeerErrors(procs, self.peer_failed)
        self.master = procs.master
        imds, watching = spot.connect(spot_mode)
        if imds:
            self.watcher = spot.SpotWatcher(imds, self.request.ask, log=lambda m: print(m, file=sys.stderr, flush=True),
                                            interval_s=poll_s)
        return watching

    def hold(self, s3_url: str, lease_s: float, timeout_s: float) -> None:
        """Takes the lease on the run's S3 prefix (rank 0): no other job writes there meanwhile."""
        self.lease = Lease(s3_url, lease_s).acquire(timeout_s)

    @property
    def step(self) -> int:
        return self.run.state.step if self.run else 0

    def end_outputs(self, record: dict, **kwargs) -> list[str]:
        """The outputs' last word (rank 0), one line for what did not reach S3 (the closing record's
        exit code then amended to the process's), and the other ranks told that it is done."""
        outputs = self.run.outputs if self.run else None
        pending = outputs.end(record, flush_timeout_s=self.flush_timeout_s, give_up=lambda: self.request.hurry,
                              **kwargs) if outputs else []
        if pending:
            print(outputs.pending_line(pending), file=sys.stderr, flush=True)
            outputs.amend_closing_record({"exit_code": exits.with_uploads(record["exit_code"], pending),
                                          "not_uploaded": pending})
        elif outputs and outputs.uploader:
            print(f"uploaded to {outputs.s3_url}", flush=True)
        if self.peers is not None:
            self.peers.flushed()  # rank 0: the others may leave now (torchrun would end it as they exit)
        return pending

    def finish(self, stop: str | None) -> int:
        """Every rank, together: the replicas' checksums; rank 0 writes the final weights (a
        finished run), the closing record and the report and waits for the uploads; every rank
        then exits with rank 0's code."""
        run = self.run
        checksums = distributed.gather(distributed.replica_checksum(run.train_step.model), run.procs)
        code = exits.for_stop(stop)
        self.clock.leave()
        run_cost = self._cost(self.close_launch(code, stop))
        notice = run.spot.timing() if run.spot and stop and stop.startswith(spot.NOTICE) else {}
        record = {"step": run.state.step, "event": "stopped" if stop else "finished", "reason": stop,
                  "exit_code": code, "replica_checksums": checksums, "replicas_identical": len(set(checksums)) == 1,
                  "cost": run_cost, "launches": run_cost.pop("every_launch"), **({"notice": notice} if notice else {})}
        if run.procs.master:
            print(f"{'stopped (' + stop + ')' if stop else 'finished'} at step {run.state.step} after "
                  f"{describe_cost(run_cost)}; checkpoint {run.outputs.run_dir / run_folder.LAST}, report "
                  f"{run.outputs.run_dir / run_folder.REPORT}")
        with self.lock:
            self.request.leaving()
            pending = self.end_outputs(record, final_model=run.train_step.model if stop is None else None,
                                       summary=run_cost)
        code = distributed.broadcast(exits.with_uploads(code, pending), run.procs)
        exits.record(code)  # now: once the other ranks exit, torchrun may SIGTERM this one before its end
        if run.procs.master and code in (exits.RECLAIM, exits.INTERRUPTED):
            timing = run.spot.timing() if notice else {}  # now, after the uploads
            print(f"exit {code}: continue with --resume auto{_since_notice(timing)}", file=sys.stderr, flush=True)
        return code

    def _cost(self, every_launch: list[dict]) -> dict:
        """What the run cost over `every_launch`, machines and S3, every rank's requests (a
        collective); the launches themselves under "every_launch", for the closing record."""
        run = self.run
        images = run.state.step * run.cfg.batch_size * run.procs.world + sum(e.get("images", 0)
                                                                               for e in run.state.history)
        streamed_gets = staging.GETS_PER_SAMPLE * images if run.streamed else 0
        usage = s3.merged(distributed.gather(s3.usage.snapshot(), run.procs))
        return {**cost(every_launch, gpus=run.cost_basis["gpus"], lifecycle=run.cost_basis["lifecycle"],
                       data=data_cost(usage, streamed_gets=streamed_gets, **run.data_basis)),
                "every_launch": every_launch}

    def close_launch(self, code: int, reason: str | None, before_the_run: bool = False) -> list[dict]:
        """Rank 0: this launch's record (its last phase counted up to now, its machine priced), added
        to the run's earlier ones in `launches.json` (the run folder's, uploaded with the rest; with
        `before_the_run`, a stop before the run folder exists, straight to S3: a relaunch follows
        and must count it; a failed start writes nothing); returns them all. [] on the other ranks,
        or before the config and the run's place are known (nothing to add it to)."""
        outputs = self.run.outputs if self.run else None
        in_folder = outputs is not None and outputs.logger is not None
        if not self.master or self.launch_basis is None or self.launch_store is None:
            return []
        s3_url, timeout_s = self.launch_store
        if not in_folder and not (before_the_run and s3_url):
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
                launches.upload(every, s3_url, timeout_s)
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
        if isinstance(error, KeyboardInterrupt):  # a second Ctrl-C: leave now, waiting for nothing
            code, message, self.flush_timeout_s = exits.INTERRUPTED, "stopped at once by a second Ctrl-C", 0.0
        else:
            code = exits.ERROR
            message = str(error) if isinstance(error, DaliImagenetError) else f"{type(error).__name__}: {error}"
        exits.record(code)  # before the others hear of it: torchrun SIGTERMs this rank as soon as they exit
        tell_others = self.peers is not None and not isinstance(error, LossDiverged)
        if tell_others:
            self.peers.post(message)
        step = getattr(error, "step", self.step)
        reason = (f"loss NaN or inf at step {step}" if isinstance(error, LossDiverged)
                  else message if code == exits.INTERRUPTED else f"error: {message}")
        self.clock.leave()
        every = self.close_launch(code, reason)
        basis = self.launch_basis or {}
        self.end_outputs({"step": step, "event": "stopped", "reason": reason, "exit_code": code,
                          **({"launches": every, "cost": cost(every, gpus=basis.get("gpus", 0),
                                                              lifecycle=basis.get("lifecycle"))} if every else {})})
        if isinstance(error, (DaliImagenetError, KeyboardInterrupt)) and not debug():
            print(f"error: {message}", file=sys.stderr, flush=True)
        else:
            traceback.print_exception(error)
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
        self.end_outputs({"step": self.step, "event": "stopped", "reason": f"error on {line}",
                          "exit_code": exits.ERROR})
        print(f"error: stopping: {line}", file=sys.stderr, flush=True)
        self.peers.acknowledge()
        self.peers.wait_for_flush(self.flush_timeout_s + WAIT_EXTRA_S)  # rank 0 uploads first: torchrun ends it
        self.release_lease()
        leave_now(exits.ERROR)

    def release_lease(self) -> None:
        if self.lease is not None:
            self.lease.release()

    def close(self) -> None:
        for part in (self.watcher, self.peers):
            if part is not None:
                part.close()
        self.release_lease()
        self.request.restore()

    def after(self, code: int) -> int:
        """The last steps of a run that got as far as its end: the process group down, and an
        upload still in its timeout not allowed to outlive the interpreter."""
        run = self.run
        if run.procs.world > 1:
            run.stops.close()
            distributed.teardown(run.procs)
        if run.outputs.stuck():
            leave_now(code)
        return code


def _since_notice(notice: dict) -> str:
    if not notice:
        return ""
    reclaim = f"; EC2 reclaims at {notice['reclaim_at']}" if notice.get("reclaim_at") else ""
    return f" ({notice['since_notice_s']:.1f} s after the spot notice{reclaim})"
