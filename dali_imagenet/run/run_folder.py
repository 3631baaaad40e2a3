"""The run folder: the names of the files a run writes there, and the guards around it.

    RUN/config.yaml        the run's TrainConfig
    RUN/metrics.jsonl      one JSON record per log step, validation and event (appended)
    RUN/last.pt            the newest checkpoint (replaced atomically)
    RUN/best.pt            the checkpoint that scored best (a hard link to a former last.pt)
    RUN/final_weights.pt   the weights at the end of a finished run (a plain state dict)
    RUN/report.html        the run's report
    RUN/predictions.npz    the final validation's top-5 for each val sample (the report reads it)
    RUN/launches.json      each launch's phases, machine, price and exit code (`launches`)
    RUN/wandb/             W&B's files, when it is on

A folder that holds any of these holds a run: a new run never starts there unless asked
(`--overwrite` removes exactly these files), and a failed start leaves nothing behind.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from dali_imagenet.atomic import replacing, written_for
from dali_imagenet.errors import DaliImagenetError

LAST, BEST, FINAL = "last.pt", "best.pt", "final_weights.pt"
METRICS, CONFIG, REPORT = "metrics.jsonl", "config.yaml", "report.html"
PREDICTIONS, LAUNCHES = "predictions.npz", "launches.json"
WANDB = "wandb"
S3_STAGING = ".s3-staging"  # snapshots waiting for upload (hard links: the run folder's own file system)
RUN_FILES = (LAST, BEST, FINAL, METRICS, CONFIG, REPORT, PREDICTIONS, LAUNCHES)  # what makes a folder hold a run
CHECKPOINTS = (LAST, BEST)


class RunError(DaliImagenetError):
    """The run cannot start as asked; the message is one line."""


def choose(out: str | None, arch: str, *, resume: str | None, overwrite: bool, world: int) -> Path:
    """The run folder, checked but not yet created (a failed start must leave nothing behind)."""
    if world > 1 and out is None:
        raise RunError("--out is needed with torchrun: every rank must use the same run folder")
    if resume and overwrite:
        raise RunError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    run_dir = Path(out or f"runs/{arch}-{time.strftime('%Y%m%d-%H%M%S')}")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"{run_dir}: exists and is not a folder")
    held = existing_run(run_dir)
    if held and not resume and not overwrite:
        raise RunError(f"{run_dir} holds a run ({', '.join(held)}): pass --resume auto to continue it, "
                       f"--overwrite to replace it, or another --out")
    return run_dir


def existing_run(run_dir: str | Path) -> list[str]:
    """The run files `run_dir` already holds (empty: a new run may start there)."""
    return [name for name in RUN_FILES if (Path(run_dir) / name).exists()]


def clear(run_dir: str | Path) -> None:
    """--overwrite: removes an earlier run's files (only those; anything else in the folder stays)."""
    for name in existing_run(run_dir):
        (Path(run_dir) / name).unlink()
    shutil.rmtree(Path(run_dir) / WANDB, ignore_errors=True)


def clean_temporaries(run_dir: str | Path) -> None:
    """Removes the temporary files of writes a killed run never finished."""
    for tmp in Path(run_dir).glob(".*.tmp-*"):
        if written_for(tmp.name) in RUN_FILES:
            tmp.unlink(missing_ok=True)
    shutil.rmtree(Path(run_dir) / S3_STAGING, ignore_errors=True)


def mark_best(run_dir: str | Path) -> Path:
    """Makes best.pt the current last.pt (atomically, like last.pt itself)."""
    run_dir = Path(run_dir)
    with replacing(run_dir / BEST) as tmp:
        try:
            os.link(run_dir / LAST, tmp)
        except OSError:  # file systems without hard links
            shutil.copyfile(run_dir / LAST, tmp)
    return run_dir / BEST
