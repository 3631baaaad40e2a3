"""What a run writes: its config, metrics (and W&B), checkpoints, final weights and report, in
the run folder, each also queued for upload to S3. Rank 0 writes; the other ranks hold an
instance that writes nothing, so the caller never asks which rank it is."""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

from dali_imagenet import distributed, s3
from dali_imagenet import run_folder as folder
from dali_imagenet.checkpoint import save_atomic
from dali_imagenet.html_report import write_report
from dali_imagenet.metrics import RunLogger, describe_cost, machine
from dali_imagenet.s3sync import S3Sync


class RunOutputs:
    def __init__(self, run_dir: Path, config: dict, processes: distributed.Processes, *, overwrite: bool,
                 s3_url: str | None, wandb: bool, wandb_id: str | None, extra: dict, s3_held: list[str] = (),
                 instance: dict | None = None):
        """Creates the run folder (after `--overwrite` removed the old run's files, here and at
        `s3_url`: `s3_held`) and starts the log; `extra`: what the config does not say (loader,
        world size, data), logged with it; `instance`: the cloud's word on the machine (type, spot)."""
        instance = instance or {}
        self.run_dir = run_dir
        self.active = processes.master
        self.s3_url = s3_url
        self.logger = None
        self.uploader = None
        if not self.active:
            return
        if overwrite:
            folder.clear(run_dir)
            if s3_url:
                s3.delete(s3_url, list(s3_held))
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

    def _push(self, name: str) -> None:
        if self.uploader:
            self.uploader.push(self.run_dir / name, replaced_by_rename=name.endswith(".pt"))

    def log(self, record: dict) -> None:
        if self.logger:
            self.logger.log(record)

    def note(self, message: str) -> None:
        """Something the run should know of but that stops nothing (a rebalance hint): console and log."""
        if self.active:
            print(message, file=sys.stderr, flush=True)
            self.log({"event": "note", "message": message})

    def save(self, contents: dict, is_best: bool) -> None:
        """The checkpoint as last.pt (and best.pt), then its upload with the metrics so far."""
        if not self.active:
            return
        save_atomic(contents, self.run_dir / folder.LAST)
        if is_best:
            folder.mark_best(self.run_dir)
        for name in (folder.LAST, *((folder.BEST,) if is_best else ()), folder.METRICS):
            self._push(name)

    def finish(self, model, step: int, stopping: str | None, processes: distributed.Processes,
               flush_timeout_s: float, cost: dict) -> None:
        """On every rank: the replicas' checksums must agree. Then the final weights (a finished
        run only), the closing record with what the run cost, the report, and the last uploads."""
        checksums = distributed.gather(distributed.replica_checksum(model), processes)
        if not self.active:
            return
        if stopping is None:
            save_atomic(model.state_dict(), self.run_dir / folder.FINAL)
            self._push(folder.FINAL)
        self.close({"step": step, "event": "stopped" if stopping else "finished", "reason": stopping,
                    "replica_checksums": checksums, "replicas_identical": len(set(checksums)) == 1, "cost": cost},
                   summary=cost)
        self._push(folder.METRICS)
        write_report([self.run_dir], self.run_dir / folder.REPORT)
        self._push(folder.REPORT)
        print(f"{'stopped (' + stopping + ')' if stopping else 'finished'} at step {step} after {describe_cost(cost)}; "
              f"checkpoint {self.run_dir / folder.LAST}, report {self.run_dir / folder.REPORT}")
        if self.uploader:
            pending = self.uploader.close(flush_timeout_s)
            print(f"warning: {len(pending)} upload(s) to {self.s3_url} still pending at exit: {', '.join(pending)}"
                  if pending else f"uploaded to {self.s3_url}", file=sys.stderr if pending else sys.stdout)

    def close(self, record: dict | None = None, summary: dict | None = None) -> None:
        """Ends the log (with `record` as its last line; `summary` to W&B's run summary)."""
        if self.logger and not self.logger.closed:
            if record:
                self.logger.log(record)
            self.logger.close(summary)
