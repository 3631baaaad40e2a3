"""Where a run continues from: the checkpoint `--resume` names (`auto`: the newest valid one in
the run folder, else the one at `--s3`, fetched once per machine), restored into the model,
optimiser, scaler and EMA, with the train state and the RNG. Every rank must find the same step.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dali_imagenet import checkpoint as ckpt
from dali_imagenet import distributed, s3, seeding
from dali_imagenet.run_folder import CHECKPOINTS, LAST, RunError


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


def find_checkpoint(resume: str | None, run_dir: Path, s3_url: str | None,
                    processes: distributed.Processes) -> tuple[Path, dict] | None:
    """--resume auto: the newest valid checkpoint in the run folder, else the one at --s3
    (downloaded once per machine); --resume PATH: that file, which must be a training checkpoint."""
    if not resume:
        return None
    if resume != "auto":
        return Path(resume), ckpt.load_training(resume)
    found = newest_valid(run_dir)
    if found is None and s3_url and processes.local_master:
        run_dir.mkdir(parents=True, exist_ok=True)
        s3.download(s3_url, LAST, run_dir / LAST)
    distributed.barrier(processes)
    return found or newest_valid(run_dir)


def resume(resume: str | None, run_dir: Path, s3_url: str | None, processes: distributed.Processes, *,
           model, optimizer, scaler, ema, seed: int) -> tuple[ckpt.TrainState, Path | None]:
    """Restores weights, optimiser, scaler, EMA and RNG from the checkpoint `--resume` names;
    returns its train state (a fresh one without a checkpoint) and the file it came from."""
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
    return state, found[0] if found else None
