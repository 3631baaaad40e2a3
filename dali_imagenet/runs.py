"""A run's life around the training loop: its folder (never another run's, unless asked), the
checkpoint it resumes from (local, or S3 once per machine), what it writes there (and to S3 and
W&B), and a clean stop on a signal."""
from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import yaml

from dali_imagenet import checkpoint as ckpt
from dali_imagenet import distributed, s3
from dali_imagenet.metrics import RunLogger, machine
from dali_imagenet.report import write_report
from dali_imagenet.s3sync import S3Sync


class RunError(Exception):
    """The run cannot start as asked; the message is one line."""


def run_folder(out: str | None, arch: str, *, resume: str | None, overwrite: bool, world: int) -> Path:
    """The run folder, checked but not yet created (a failed start must leave nothing behind)."""
    if world > 1 and out is None:
        raise RunError("--out is needed with torchrun: every rank must use the same run folder")
    if resume and overwrite:
        raise RunError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    run_dir = Path(out or f"runs/{arch}-{time.strftime('%Y%m%d-%H%M%S')}")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"{run_dir}: exists and is not a folder")
    held = ckpt.existing_run(run_dir)
    if held and not resume and not overwrite:
        raise RunError(f"{run_dir} holds a run ({', '.join(held)}): pass --resume auto to continue it, "
                       f"--overwrite to replace it, or another --out")
    return run_dir


def find_checkpoint(resume: str | None, run_dir: Path, s3_url: str | None,
                    processes: distributed.Processes) -> tuple[Path, dict] | None:
    """--resume auto: the newest valid checkpoint in the run folder, else the one at --s3
    (downloaded once per machine); --resume PATH: that file, which must be a training checkpoint."""
    if not resume:
        return None
    if resume != "auto":
        return Path(resume), ckpt.load_training(resume)
    found = ckpt.newest_valid(run_dir)
    if found is None and s3_url and processes.local_master:
        run_dir.mkdir(parents=True, exist_ok=True)
        s3.download(s3_url, ckpt.LAST, run_dir / ckpt.LAST)
    distributed.barrier(processes)
    return found or ckpt.newest_valid(run_dir)


def resume(resume: str | None, run_dir: Path, s3_url: str | None, processes: distributed.Processes, *,
           model, optimizer, scaler, ema, seed: int) -> ckpt.TrainState:
    """Restores weights, optimiser, EMA, RNG and the train state from the checkpoint `--resume`
    names (a fresh state without one); every rank must have found the same step."""
    import torch

    from dali_imagenet import seeding

    found = find_checkpoint(resume, run_dir, s3_url, processes)
    state = ckpt.TrainState()
    if found:
        state = ckpt.restore(found[1], model=model, optimizer=optimizer, scaler=scaler, ema=ema)
        if processes.world == 1:
            ckpt.restore_rng_state(found[1]["rng"])
        else:  # one saved state for all ranks would make their drop-path masks equal
            torch.manual_seed(seeding.derive_seed(seed, "torch", processes.rank, state.step))
    steps = distributed.gather(state.step, processes)  # each machine reads its own disk: all must agree
    if len(set(steps)) > 1:
        raise RunError(f"ranks found checkpoints of different steps {steps}; put the same last.pt in every "
                       f"machine's {run_dir} or resume from --s3 with empty run folders")
    if state.loader and len(state.loader) != processes.world:
        raise RunError(f"the checkpoint stopped mid-epoch with {len(state.loader)} process(es); resume it with "
                       f"as many (this run has {processes.world})")
    if resume and processes.master:
        print(f"resumed from {found[0]} at step {state.step} (epoch {state.epoch + 1}, batch {state.batch_in_epoch})"
              if found else "no checkpoint to resume from; starting fresh")
    return state


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, checkpoints and exits. A second
    SIGINT (an impatient Ctrl-C) stops at once."""

    def __init__(self, announce: bool = True):
        self.signal = None
        self._announce = announce
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal == "SIGINT" and name == "SIGINT":
            raise KeyboardInterrupt
        self.signal = name
        if self._announce:
            print(f"\n{name}: stopping after this step with a checkpoint (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)


class RunOutputs:
    """Rank 0's writer of the run folder: config, metrics (and W&B), checkpoints, final weights,
    each also queued for upload to `s3_url`. Other ranks get an instance that writes nothing."""

    def __init__(self, run_dir: Path, config: dict, processes: distributed.Processes, *, overwrite: bool,
                 s3_url: str | None, wandb: bool, wandb_id: str | None, extra: dict):
        self.run_dir, self.active, self.s3_url = run_dir, processes.master, s3_url
        self.logger = self.uploader = None
        if not self.active:
            return
        if overwrite:
            ckpt.clear_run(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.clean_temporaries(run_dir)
        (run_dir / ckpt.CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
        self.logger = RunLogger(run_dir, {**config, **extra}, wandb, config["wandb_project"], wandb_id)
        self.logger.log({"event": "started", "machine": machine(), **extra})
        self.uploader = S3Sync(s3_url) if s3_url else None
        self._push(ckpt.CONFIG)

    @property
    def wandb_id(self) -> str | None:
        return self.logger.wandb_id if self.logger else None

    def _push(self, name: str) -> None:
        if self.uploader:
            self.uploader.push(self.run_dir / name, replaced_by_rename=name.endswith(".pt"))

    def log(self, record: dict) -> None:
        if self.logger:
            self.logger.log(record)

    def save(self, contents: dict, is_best: bool) -> None:
        if not self.active:
            return
        ckpt.save_atomic(contents, self.run_dir / ckpt.LAST)
        if is_best:
            ckpt.mark_best(self.run_dir)
        for name in (ckpt.LAST, *((ckpt.BEST,) if is_best else ()), ckpt.METRICS):
            self._push(name)

    def finish(self, model, step: int, stopping: str | None, processes: distributed.Processes,
               flush_timeout_s: float) -> None:
        """On every rank: the replicas' checksums must agree. Then the final weights (a finished
        run only), the closing record, and the last uploads."""
        checksums = distributed.gather(distributed.replica_checksum(model), processes)
        if not self.active:
            return
        if stopping is None:
            ckpt.save_atomic(model.state_dict(), self.run_dir / ckpt.FINAL)
            self._push(ckpt.FINAL)
        self.close({"step": step, "event": "stopped" if stopping else "finished", "reason": stopping,
                    "replica_checksums": checksums, "replicas_identical": len(set(checksums)) == 1})
        self._push(ckpt.METRICS)
        write_report([self.run_dir], self.run_dir / ckpt.REPORT)
        self._push(ckpt.REPORT)
        print(f"{'stopped (' + stopping + ')' if stopping else 'finished'} at step {step}; checkpoint "
              f"{self.run_dir / ckpt.LAST}, report {self.run_dir / ckpt.REPORT}")
        if self.uploader:
            pending = self.uploader.close(flush_timeout_s)
            print(f"warning: {len(pending)} upload(s) to {self.s3_url} still pending at exit: {', '.join(pending)}"
                  if pending else f"uploaded to {self.s3_url}", file=sys.stderr if pending else sys.stdout)

    def close(self, record: dict | None = None) -> None:
        if self.logger and not self.logger.closed:
            if record:
                self.logger.log(record)
            self.logger.close()
