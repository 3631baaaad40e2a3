"""Where a run continues from: the checkpoint `--resume` names, restored into the model, optimiser,
scaler and EMA, with the train state and the RNG. Every rank must find the same step.

`--resume auto` looks in both places a run's checkpoint can be, the run folder and `--s3`, and
never goes back in time without saying so:
- the newer of the two wins, by step within one run (a checkpoint carries its run's id, S3 holds
  it as object metadata): S3 newer, its `last.pt`, `metrics.jsonl` and `best.pt` replace the
  folder's (fetched once per machine); the folder newer, they are uploaded over S3's first;
- an unreadable `last.pt`, here or at S3, stops the run with one line: no older `best.pt`, no
  fresh start; checkpoints of two different runs in the folder and at S3 stop it too;
- a run of another config (beyond `config.CHANGEABLE_ON_RESUME`) is refused, naming the fields.
S3 at resume: only "no checkpoint at that prefix" counts as none. Any other failure (S3
unreachable, a refused or throttled request, a typo'd endpoint) is retried with backoff for
`s3_resume_timeout_s`, then stops the run with one line, having written nothing locally or to S3.
"""
from __future__ import annotations

import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from dali_imagenet import distributed, s3, seeding
from dali_imagenet.config import TrainConfig, differences
from dali_imagenet.errors import DaliImagenetError
from dali_imagenet.run import checkpoint as ckpt
from dali_imagenet.run.checkpoint import CheckpointError
from dali_imagenet.run.run_folder import BEST, CONFIG, LAST, METRICS, RUN_FILES, RunError
from dali_imagenet.run.s3sync import RUN_ID, STEP, lineage_metadata

FETCHED_WITH_THE_CHECKPOINT = (METRICS, BEST)  # what the run appends to or keeps: its history goes on


@dataclass(frozen=True)
class ResumePoint:
    state: ckpt.TrainState
    path: Path | None  # the checkpoint restored; None: a fresh start
    s3_behind: bool = False  # the run folder's checkpoint is newer than S3's: upload it before anything else


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def lineage(checkpoint: dict) -> dict[str, str]:
    """A checkpoint's run id and step, as S3 metadata."""
    state = checkpoint["state"]
    return lineage_metadata(state.get("run_id", ""), state["step"])


def read_last(run_dir: Path) -> dict | None:
    """The run folder's `last.pt`, or None when it has none. An unreadable one is an error: an
    older `best.pt` beside it is never taken instead without being asked for."""
    path = Path(run_dir) / LAST
    if not path.exists():
        if (Path(run_dir) / BEST).exists():
            raise RunError(f"{run_dir} holds best.pt but no last.pt: pass --resume {Path(run_dir) / BEST} to continue "
                           f"from the best checkpoint, or --overwrite")
        return None
    try:
        return ckpt.load_training(path)
    except CheckpointError as error:
        raise RunError(f"{error}; no older checkpoint is used instead: pass --resume PATH to continue from another "
                       f"file, or --overwrite") from None


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


def _two_runs(a: dict[str, str], b: dict[str, str]) -> bool:
    return bool(a.get(RUN_ID) and b.get(RUN_ID) and a[RUN_ID] != b[RUN_ID])


def _different_runs(run_dir: Path, ours: dict, s3_url: str, theirs: dict) -> RunError:
    return RunError(f"{run_dir / LAST} (run {ours.get(RUN_ID) or '?'}, step {ours.get(STEP)}) and {s3_url}/{LAST} "
                    f"(run {theirs.get(RUN_ID) or '?'}, step {theirs.get(STEP)}) belong to different runs: resume one "
                    f"of them (an empty --out, or another --s3)")


def _fetch(s3_url: str, staging: Path, timeout_s: float) -> dict:
    """S3's last.pt with the run's history into `staging`; the checkpoint, read back."""
    if not s3.download(s3_url, LAST, staging / LAST, timeout_s):
        raise RunError(f"{s3_url}/{LAST} went away while resuming: start again")
    for name in FETCHED_WITH_THE_CHECKPOINT:
        s3.download(s3_url, name, staging / name, timeout_s)
    try:
        return ckpt.load_training(staging / LAST)
    except CheckpointError as error:
        message = str(error).replace(str(staging / LAST), f"{s3_url}/{LAST}")
        raise RunError(f"{message}; S3 is left as it is and no older checkpoint is used instead: remove or replace "
                       f"it, or pass --overwrite") from None


def choose(run_dir: Path, s3_url: str | None, timeout_s: float, config: TrainConfig) -> bool:
    """--resume auto on one machine: leaves the newer of the folder's and S3's checkpoint (with its
    history) in `run_dir`. True when the folder's is newer than S3's (S3 must catch up)."""
    local = read_last(run_dir)
    if not s3_url:
        return False
    theirs = s3.metadata(s3_url, LAST, timeout_s)
    if theirs is None:
        return local is not None
    ours = lineage(local) if local else None
    if ours is not None and theirs.get(STEP, "").isdigit():  # S3 says what it holds: no download to compare
        if _two_runs(ours, theirs):
            raise _different_runs(run_dir, ours, s3_url, theirs)
        if int(theirs[STEP]) <= int(ours[STEP]):
            return int(theirs[STEP]) < int(ours[STEP])
    staging = Path(tempfile.mkdtemp(prefix="dali-imagenet-resume-"))
    try:
        fetched = _fetch(s3_url, staging, timeout_s)
        remote = lineage(fetched)
        if ours is not None:
            if _two_runs(ours, remote):
                raise _different_runs(run_dir, ours, s3_url, remote)
            if int(remote[STEP]) <= int(ours[STEP]):
                return int(remote[STEP]) < int(ours[STEP])
        check_config(f"{s3_url}/{LAST}", fetched["config"], config)  # before anything is written here
        run_dir.mkdir(parents=True, exist_ok=True)
        for path in staging.iterdir():
            shutil.move(str(path), run_dir / path.name)  # another file system, often: a copy
        return False
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def saved_config(run_dir: Path, s3_url: str | None, timeout_s: float) -> tuple[str, dict] | None:
    """(where, config) of a run that left no checkpoint: its config.yaml here, else at S3."""
    if (Path(run_dir) / CONFIG).is_file():
        return str(Path(run_dir) / CONFIG), yaml.safe_load((Path(run_dir) / CONFIG).read_text()) or {}
    if s3_url:
        with tempfile.TemporaryDirectory(prefix="dali-imagenet-config-") as folder:
            if s3.download(s3_url, CONFIG, Path(folder) / CONFIG, timeout_s):
                return f"{s3_url}/{CONFIG}", yaml.safe_load((Path(folder) / CONFIG).read_text()) or {}
    return None


def check_config(where: str, saved: dict, config: TrainConfig) -> None:
    changed = differences(saved, config)
    if changed:
        shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise RunError(f"{where}: a run of another config ({shown}); --resume auto continues a run with the config "
                       f"it started with, but for how it runs, logs and checkpoints (config.CHANGEABLE_ON_RESUME): "
                       f"pass that config, or another --out / --s3")


def find_checkpoint(resume: str | None, run_dir: Path, s3_url: str | None, processes: distributed.Processes,
                    config: TrainConfig, s3_timeout_s: float = 0.0) -> tuple[Path | None, dict | None, bool]:
    """(path, checkpoint, s3_behind): --resume PATH: that file, which must be a training
    checkpoint; --resume auto: `choose` on each machine's first process, then every rank reads
    the folder's last.pt. Refusals reach every rank, so all stop with the same line."""
    if not resume:
        return None, None, False
    if resume != "auto":
        return Path(resume), ckpt.load_training(resume), False
    behind, error = False, None
    if processes.local_master:
        try:
            behind = choose(run_dir, s3_url, s3_timeout_s, config)
            if read_last(run_dir) is None:
                found = saved_config(run_dir, s3_url, s3_timeout_s)
                if found:
                    check_config(*found, config)
        except DaliImagenetError as refused:
            error = str(refused)
    errors = [e for e in distributed.gather(error, processes) if e]
    if errors:
        raise RunError(errors[0])
    checkpoint = read_last(run_dir)
    if checkpoint is None:
        return None, None, False
    check_config(str(run_dir / LAST), checkpoint["config"], config)
    return run_dir / LAST, checkpoint, any(distributed.gather(behind, processes))


def resume(resume: str | None, run_dir: Path, s3_url: str | None, processes: distributed.Processes, *,
           model, optimizer, scaler, ema, config: TrainConfig, s3_timeout_s: float = 0.0) -> ResumePoint:
    """Restores weights, optimiser, scaler, EMA and RNG from the checkpoint `--resume` names;
    returns its train state (a fresh one, with a new run id, without a checkpoint)."""
    path, checkpoint, s3_behind = find_checkpoint(resume, run_dir, s3_url, processes, config, s3_timeout_s)
    state = ckpt.TrainState(run_id=new_run_id())
    if checkpoint is not None:
        state = ckpt.restore(checkpoint, model=model, optimizer=optimizer, scaler=scaler, ema=ema)
        state.run_id = state.run_id or new_run_id()  # a checkpoint from before run ids: from now on, one
        if processes.world == 1:
            ckpt.restore_rng_state(checkpoint["rng"])
        else:  # one saved state for all ranks would make their drop-path masks equal
            torch.manual_seed(seeding.derive_seed(config.seed, "torch", processes.rank, state.step))
    steps = distributed.gather(state.step, processes)  # each machine reads its own disk: all must agree
    if len(set(steps)) > 1:
        raise RunError(f"ranks found checkpoints of different steps {steps}; put the same last.pt in every "
                       f"machine's {run_dir} or resume from --s3 with empty run folders")
    if state.loader and len(state.loader) != processes.world:
        raise RunError(f"the checkpoint stopped mid-epoch with {len(state.loader)} process(es); resume it with "
                       f"as many (this run has {processes.world})")
    if resume and processes.master:
        print(f"resumed from {path} at step {state.step} (epoch {state.epoch + 1}, batch {state.batch_in_epoch})"
              if checkpoint is not None else "no checkpoint to resume from; starting fresh")
    return ResumePoint(state, path, s3_behind)
