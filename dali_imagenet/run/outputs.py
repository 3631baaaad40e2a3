"""What a run writes: its config, metrics (and W&B), checkpoints, final weights and report, in
the run folder, each also queued for upload to S3. Rank 0 writes; the other ranks hold an
instance that writes nothing, so the caller never asks which rank it is."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from dali_imagenet import distributed, s3
from dali_imagenet.run import exits
from dali_imagenet.run import run_folder as folder
from dali_imagenet.run.checkpoint import save_atomic
from dali_imagenet.run.launches import save as save_launches
from dali_imagenet.run.lease import Lease
from dali_imagenet.run.logger import RunLogger, machine
from dali_imagenet.run.s3sync import S3Sync, lineage_metadata


class RunOutputs:
    def __init__(self, run_dir: Path, config: dict, processes: distributed.Processes, *, s3_url: str | None,
                 wandb: bool, wandb_id: str | None, extra: dict, instance: dict | None = None,
                 write_report: Callable[[list, Path], object] | None = None, lease: Lease | None = None,
                 report_media: Callable[[Path], dict] | None = None):
        """Creates the run folder (with --overwrite, the caller removed the old run first) and starts the log;
        `extra`: what the config does not say (loader,
        world size, data), logged with it; `instance`: the cloud's word on the machine (type, spot);
        `write_report(run_folders, page)`: writes the run's page at the end (the report layer's,
        handed in: the run layer does not import the pages built on it); `lease`: the run's hold on
        `s3_url` (`lease.Lease`), which the run must stop without; `report_media(run_folder)`: the
        page's tables and images for W&B (the report layer's too)."""
        instance = instance or {}
        self.run_dir = run_dir
        self.active = processes.master
        self.s3_url = s3_url
        self.logger = None
        self.uploader = None
        self.ended = False
        self.not_uploaded: list[str] = []  # what `end` found missing from S3 (a second call returns it again)
        self.lease = lease
        self.write_report = write_report
        self.report_media = report_media
        self.checkpoint_step: int | None = None  # of the last checkpoint written
        if not self.active:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        folder.clean_temporaries(run_dir)
        (run_dir / folder.CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
        self.logger = RunLogger(run_dir, {**config, **extra}, wandb, config["wandb_project"], wandb_id)
        self.logger.log({"event": "started", "machine": {**machine(), **instance}, **extra})
        self.uploader = S3Sync(s3_url, staging=run_dir / folder.S3_STAGING) if s3_url else None
        self._push(folder.CONFIG)

    @property
    def wandb_id(self) -> str | None:
        return self.logger.wandb_id if self.logger else None

    def _push(self, name: str, lineage: dict | None = None) -> None:
        if self.uploader:
            is_checkpoint = name in folder.CHECKPOINTS
            self.uploader.push(self.run_dir / name, replaced_by_rename=name.endswith(".pt"),
                               lineage=lineage if is_checkpoint else None)

    def log(self, record: dict) -> None:
        if self.logger:
            self.logger.log(record)

    def note(self, message: str) -> None:
        """Something the run should know of but that stops nothing (a rebalance hint): console and log."""
        if self.active:
            print(message, file=sys.stderr, flush=True)
            self.log({"event": "note", "message": message})

    def save(self, contents: dict, is_best: bool) -> None:
        """The checkpoint as last.pt (and best.pt), then its upload (with its run id and step, so
        that nothing older is ever uploaded over it) and the metrics so far."""
        if not self.active:
            return
        save_atomic(contents, self.run_dir / folder.LAST)
        self.check_s3()
        state = contents["state"]
        self.checkpoint_step = state["step"]
        lineage = lineage_metadata(state["run_id"], state["step"])
        if is_best:
            folder.mark_best(self.run_dir)
        for name in (folder.LAST, *((folder.BEST,) if is_best else ()), folder.METRICS):
            self._push(name, lineage)

    def check_s3(self) -> None:
        """Raises, in one line, when the run can no longer put its files in S3: S3 refuses the
        uploads for a reason no retry changes, another job writes the prefix, or the run's lease
        on it was taken over. Called at each checkpoint: the run stops within one interval, not
        hours later with nothing in S3 (the checkpoint just written stays in the run folder)."""
        why = (self.uploader.refused if self.uploader else None) or (self.lease.lost if self.lease else None)
        if why:
            raise s3.S3Error(f"{why}: stopping; the last checkpoint is in {self.run_dir}")

    def save_launches(self, launches: list[dict]) -> None:
        """The run's launches (`launches.json`: this one last) in the run folder, and its upload."""
        if self.active:
            save_launches(launches, self.run_dir / folder.LAUNCHES)
            self._push(folder.LAUNCHES)

    def save_predictions(self, predictions) -> None:
        """The final validation's top-5 of every val sample (`predictions.Predictions`), and its upload."""
        if self.active:
            predictions.save(self.run_dir / folder.PREDICTIONS)
            self._push(folder.PREDICTIONS)

    def resumed(self, point) -> None:
        """A resumed run (`resume.ResumePoint`): its checkpoint's step, the run folder's newer
        files up to S3 first when S3 is behind, and the `resumed` record."""
        state = point.state
        self.checkpoint_step = state.step
        if point.s3_behind and self.active:
            self.catch_up(state.run_id, state.step)
        self.log({"event": "resumed", "step": state.step, "epoch": state.epoch, "from": str(point.path)})

    def catch_up(self, run_id: str, step: int) -> None:
        """The run folder's checkpoint is newer than S3's (this machine trained on after its last
        upload): its checkpoint and history go up before anything else."""
        lineage = lineage_metadata(run_id, step)
        for name in (folder.LAST, folder.BEST, folder.METRICS):
            if (self.run_dir / name).exists():
                self._push(name, lineage)

    def end(self, record: dict, *, flush_timeout_s: float, final_model=None, summary: dict | None = None,
            give_up: Callable[[], bool] = lambda: False) -> list[str]:
        """The run's last word, on every way out (finished, stopped, failed; rank 0 only): the final
        weights (a finished run) and the uploads queued so far, waited for; then `record` as the
        log's last line, its exit code the one those uploads leave (`exits.with_uploads`, with what
        S3 has not got); the report; and the last uploads (the log, the page). The waits together
        take at most `flush_timeout_s`, or until `give_up()`. Returns what is not in S3 then: the
        keys still queued, and any file that could not even be written (each said in a warning
        line). The record is written once, so S3's copy says what the run folder's does; the run
        folder's is amended with the final list only when its own upload did not make it (S3 has
        no copy then). What misses the deadline after the record (the page) is named by the
        caller's line and exit code. A part that fails never skips the flush; a second call (the
        way out of a failure while finishing) returns the first call's answer."""
        if not self.active or self.ended:
            return self.not_uploaded
        self.ended = True
        missing = []

        def attempt(what: str, produces: str | None, work) -> None:
            try:
                work()
            except Exception as error:  # noqa: BLE001 - one part failing must not keep the rest from S3
                print(f"warning: {what} failed ({type(error).__name__}: {error})", file=sys.stderr, flush=True)
                if produces:
                    missing.append(f"{produces} (not written)")

        if final_model is not None:
            attempt(f"writing {folder.FINAL}", folder.FINAL, lambda: (
                save_atomic(final_model.state_dict(), self.run_dir / folder.FINAL), self._push(folder.FINAL)))
        # The closing record is written once, with its exit code: after the uploads it may have to name.
        waited = time.monotonic()
        before = missing + (self.uploader.drain(waited + flush_timeout_s, give_up) if self.uploader else [])
        left_s = max(0.0, flush_timeout_s - (time.monotonic() - waited))  # writing the page is not waiting
        closing = {**record, "checkpoint_step": self.checkpoint_step,
                   "exit_code": exits.with_uploads(record["exit_code"], before),
                   **({"not_uploaded": before} if before else {})}
        attempt("writing the closing record", None, lambda: self.log(closing))
        attempt(f"queueing {folder.METRICS}", folder.METRICS, lambda: self._push(folder.METRICS))
        if self.write_report is not None:
            attempt("writing the report", None, lambda: (
                self.write_report([self.run_dir], self.run_dir / folder.REPORT), self._push(folder.REPORT)))
        attempt("closing the log (W&B: the report's tables and page)", None, lambda: self.close(summary=summary))
        self.not_uploaded = missing + (self.uploader.close(left_s, give_up) if self.uploader else [])
        own = self.uploader.key(folder.METRICS) if self.uploader else None
        if own in self.not_uploaded or f"{folder.METRICS} (not written)" in self.not_uploaded:
            attempt("amending the closing record", None, lambda: self.logger.amend_last(
                {"exit_code": exits.with_uploads(record["exit_code"], self.not_uploaded),
                 "not_uploaded": self.not_uploaded}))
        return self.not_uploaded

    def stuck(self) -> bool:
        """An upload is still in flight after `end`'s deadline (the process should leave now)."""
        return bool(self.uploader and self.uploader.stuck())

    def pending_line(self, pending: list[str]) -> str:
        """One line for uploads that did not make it, naming the keys and where the files are."""
        why = self.uploader.refused or self.uploader.last_error if self.uploader else None
        where = f"uploaded to {self.s3_url}" if self.uploader else "written"
        return (f"error: {len(pending)} file(s) not {where}: {', '.join(pending)}"
                f"{f' ({why})' if why else ''}; the run folder: {self.run_dir}")

    def close(self, record: dict | None = None, summary: dict | None = None) -> None:
        """Ends the log (with `record` as its last line; `summary` to W&B's run summary, with the
        report's tables and page when there is one)."""
        if self.logger and not self.logger.closed:
            if record:
                self.logger.log(record)
            page = self.run_dir / folder.REPORT
            media = None
            if self.logger.wandb_on and self.report_media is not None and self.ended:
                try:
                    media = self.report_media(self.run_dir)
                except Exception as error:  # noqa: BLE001 - the tables are extra: W&B still gets closed
                    print(f"warning: the report's tables for W&B failed ({type(error).__name__}: {error})",
                          file=sys.stderr, flush=True)
            self.logger.close(summary, media, page if self.ended else None)
