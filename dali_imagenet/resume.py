"""Where a run continues from: the checkpoint `--resume` names (`auto`: the newest valid one in
the run folder, else the one at `--s3`, fetched once per machine with the files the run appends
to), restored into the model, optimiser, scaler and EMA, with the train state and the RNG. Every
rank must find the same step.

S3 at resume: only "no checkpoint at that prefix" starts a run fresh. Any other failure (S3
unreachable, a refused or throttled request, a typo'd endpoint) is retried with backoff for
`s3_resume_timeout_s`, then stops the run with one line, having written nothing locally or to S3:
a fresh start would otherwise replace the run's good `last.pt` there.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from dali_imagenet import checkpoint as ckpt
from dali_imagenet import distributed, s3, seeding
from dali_imagenet.run_folder import BEST, CHECKPOINTS, LAST, METRICS, RUN_FILES, RunError

FETCHED_WITH_THE_CHECKPOINT = (METRICS, BEST)  # what the run appends to or keeps: its history goes on


def newest_valid(run_dir: str | Path) -> tuple[Path, dict] | None:
    """The resumable checkpoint in `run_dir` with the highest step, or None."""
    newest = None
    for name in CHECKPOINTS:
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        try:
            checkpoint = ckpt.load_training(path)
        except ckpt.CheckpointError:  # truncated or foreign file: skip it, an older one may still be good
            continue
        if newest is None or checkpoint["state"]["step"] > newest[1]["state"]["step"]:
            newest = (path, checkpoint)
    return newest


def check_s3_prefix(s3_url: str | None, *, resume: str | None, overwrite: bool, timeout_s: float) -> list[str]:
    """The run files already at `--s3` (empty: a new run may upload there). A prefix that holds a
    run is never replaced by a fresh start, the same rule as for the run folder."""
    if not s3_url:
        return []
    held = s3.run_files_at(s3_url, RUN_FILES, timeout_s)
    if held and not resume and not overwrite:
        raise RunError(f"{s3_url} holds a run ({', '.join(held)}): pass --resume auto to continue it, "
                       f"--overwrite to replace it, or another --s3")
    return held


def fetch_from_s3(s3_url: str, run_dir: Path, timeout_s: float) -> bool:
    """last.pt and the run's history (metrics.jsonl, best.pt) from `--s3` into `run_dir`; False
    when S3 holds no checkpoint there. Staged apart, so a failure leaves nothing in `run_dir`."""
    staging = Path(tempfile.mkdtemp(prefix="dali-imagenet-resume-"))
    try:
        if not s3.download(s3_url, LAST, staging / LAST, timeout_s):
            return False
        for name in FETCHED_WITH_THE_CHECKPOINT:
            s3.download(s3_url, name, staging / name, timeout_s)
        run_dir.mkdir(parents=True, exist_ok=True)
        for path in staging.iterdir():
            shutil.move(str(path), run_dir / path.name)  # another file system, often: a copy
        return True
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def find_checkpoint(resume: str | None, run_dir: Path, s3_url: str | None, processes: distributed.Processes,
                    s3_timeout_s: float = 0.0) -> tuple[Path, dict] | None:
    """--resume auto: the newest valid checkpoint in the run folder, else the one at --s3
    (fetched once per machine); --resume PATH: that file, which must be a training checkpoint."""
    if not resume:
        return None
    if resume != "auto":
        return Path(resume), ckpt.load_training(resume)
    found = newest_valid(run_dir)
    if found is None and s3_url and processes.local_master:
        fetch_from_s3(s3_url, run_dir, s3_timeout_s)
    distributed.barrier(processes)
    return found or newest_valid(run_dir)


def resume(resume: str | None, run_dir: Path, s3_url: str | None, processes: distributed.Processes, *,
           model, optimizer, scaler, ema, seed: int, s3_timeout_s: float = 0.0) -> tuple[ckpt.TrainState, Path | None]:
    """Restores weights, optimiser, scaler, EMA and RNG from the checkpoint `--resume` names;
    returns its train state (a fresh one without a checkpoint) and the file it came from."""
    found = find_checkpoint(resume, run_dir, s3_url, processes, s3_timeout_s)
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
    return state, found[0] if found else None
