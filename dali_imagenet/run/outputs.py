"""What a run writes: its config, metrics (and W&B), checkpoints, final weights and report, in
the run folder, each also queued for upload to S3. Rank 0 writes; the other ranks hold an
instance that writes nothing, so the caller never asks which rank it is."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import yaml

from dali_imagenet import distributed, s3
from dali_imagenet.run import run_folder as folder
from dali_imagenet.run.checkpoint import save_atomic
from dali_imagenet.run.metrics import RunLogger, machine
from dali_imagenet.run.s3sync import S3Sync, lineage_metadata


class RunOutputs:
    def __init__(self, run_dir: Path, config: dict, processes: distributed.Processes, *, overwrite: bool,
                 s3_url: str | None, wandb: bool, wandb_id: str | None, extra: dict, s3_held: list[str] = (),
                 instance: dict | None = None, write_report: Callable[[list, Path], object] | None = None):
        """Creates the run folder (after `--overwrite` removed the old run's files, here and at
        `s3_url`: `s3_held`) and starts the log; `extra`: what the config does not say (loader,
        world size, data), logged with it; `instance`: the cloud's word on the machine (type, spot);
        `write_report(run_folders, page)`: writes the run's page at the end (the report layer's,
        handed in: the run layer does not import the pages built on it)."""
        instance = instance or {}
        self.run_dir = run_dir
        self.active = processes.master
        self.s3_url = s3_url
        self.logger = None
        self.uploader = None
        self.ended = False
        self.write_report = write_report
        self.checkpoint_step: int | None = None  # of the last checkpoint written
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
        state = contents["state"]
        self.checkpoint_step = state["step"]
        lineage = lineage_metadata(state["run_id"], state["step"])
        if is_best:
            folder.mark_best(self.run_dir)
        for name in (folder.LAST, *((folder.BEST,) if is_best else ()), folder.METRICS):
            self._push(name, lineage)

    def save_predictions(self, predictions) -> None:
        """The final validation's top-5 of every val sample (`predictions.Predictions`), and its upload."""
        if self.active:
            predictions.save(self.run_dir / folder.PREDICTIONS)
            self._push(folder.PREDICTIONS)

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
        weights (a finished run), `record` as the log's last line, the report, and the uploads,
        waited for up to `flush_timeout_s` or until `give_up()`. Returns the S3 keys still not
        uploaded then."""
        if not self.active or self.ended:
            return []
        self.ended = True
        if final_model is not None:
            save_atomic(final_model.state_dict(), self.run_dir / folder.FINAL)
            self._push(folder.FINAL)
        self.close({**record, "checkpoint_step": self.checkpoint_step}, summary)
        self._push(folder.METRICS)
        try:
            if self.write_report is not None:
                self.write_report([self.run_dir], self.run_dir / folder.REPORT)
                self._push(folder.REPORT)
        except Exception as error:  # noqa: BLE001 - a report that fails must not hide why the run ended
            print(f"warning: the report could not be written ({type(error).__name__}: {error})", file=sys.stderr)
        return self.uploader.close(flush_timeout_s, give_up) if self.uploader else []

    def stuck(self) -> bool:
        """An upload is still in flight after `end`'s deadline (the process should leave now)."""
        return bool(self.uploader and self.uploader.stuck())

    def pending_line(self, pending: list[str]) -> str:
        """One line for uploads that did not make it, naming the keys and where the files are."""
        why = self.uploader.refused or self.uploader.last_error if self.uploader else None
        return (f"error: {len(pending)} file(s) not uploaded to {self.s3_url}: {', '.join(pending)}"
                f"{f' ({why})' if why else ''}; they are in {self.run_dir}")

    def close(self, record: dict | None = None, summary: dict | None = None) -> None:
        """Ends the log (with `record` as its last line; `summary` to W&B's run summary)."""
        if self.logger and not self.logger.closed:
            if record:
                self.logger.log(record)
            self.logger.close(summary)
