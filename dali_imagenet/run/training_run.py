"""A training run as its loop sees it (`TrainingRun`, built once by `train.py`'s setup): the model's
step, the data, the schedule, the state that changes, the stop checks and the outputs; how it
checkpoints and refuses a diverged loss (from values the loop gathers over the ranks, in view);
what a validation scores; each epoch's loader."""
from __future__ import annotations

from dataclasses import dataclass

from dali_imagenet import distributed, s3
from dali_imagenet.config import TrainConfig, to_dict
from dali_imagenet.data.loader import Loader, build_loader
from dali_imagenet.data.shards import SplitShards
from dali_imagenet.errors import DaliImagenetError
from dali_imagenet.run import run_folder
from dali_imagenet.run.checkpoint import TrainState, contents
from dali_imagenet.run.initial import Initialised
from dali_imagenet.run.interrupts import StopCheck
from dali_imagenet.run.launches import LaunchClock
from dali_imagenet.run.loaders import RunLoaders
from dali_imagenet.run.outputs import RunOutputs
from dali_imagenet.training.precision import Precision
from dali_imagenet.training.schedule import LRSchedule
from dali_imagenet.training.step import TrainStep


class LossDiverged(DaliImagenetError):
    """A NaN or inf loss, agreed on by every rank (each raises it at the same step)."""

    def __init__(self, step: int, last: str):
        super().__init__(f"loss is NaN or inf at step {step}; stopping with the last good checkpoint ({last}) "
                         f"untouched")
        self.step = step


@dataclass
class TrainingRun:
    """Only `state` changes as the run goes on (its step counters, loader position, best top-1 and
    history); every other field is fixed for the whole run."""
    cfg: TrainConfig
    procs: distributed.Processes
    precision: Precision
    shards: SplitShards  # the train split
    val_shards: SplitShards
    train_step: TrainStep  # holds the model, its DDP/compiled wrapper, optimizer, scaler and EMA
    loaders: RunLoaders  # the train loader (each epoch's: `for_epoch`) and the val loader, described once
    schedule: LRSchedule
    stops: StopCheck
    outputs: RunOutputs
    state: TrainState
    initialised: Initialised | None  # where a fresh run's weights came from (--init); None: random, or resumed
    clock: LaunchClock  # this launch's phases (the loop marks its first step and the stop)

    def train_loader(self) -> Loader:
        """The loader of epoch `state.epoch`, at that epoch's image size, restored mid-epoch if the
        checkpoint stopped there (a replay, where one is needed, can be cut short by a stop request)."""
        cfg, state = self.cfg, self.state
        resume_at = state.loader[self.procs.rank] if state.loader else None
        return build_loader(self.loaders.train.for_epoch(state.epoch, cfg.train_image_size(state.epoch),
                                                         resume=resume_at, interrupt=self.stops.interrupt_if_asked))

    def val_loader(self) -> Loader:
        """A new loader of the val split, built for each validation and gone with it: its DALI
        pipeline's device memory (nvJPEG's buffers, DALI#5087) is never held beside an epoch's
        train pipeline for the whole run (one pipeline at a time on an L4's 24 GB)."""
        return build_loader(self.loaders.val)

    def refuse_diverged(self, bad_steps: list[int | None]) -> None:
        """Raises LossDiverged at the first step (1-based, as metrics.jsonl counts) whose loss was
        NaN or inf on any rank; `bad_steps`: every rank's `train_step.bad_step()`, gathered by the
        caller, so that every rank raises at the same step and all stop together instead of
        waiting for one that left."""
        bad = [step + 1 for step in bad_steps if step is not None]
        if bad:
            raise LossDiverged(min(bad), str(self.outputs.run_dir / run_folder.LAST))

    def save_checkpoint(self, s3_usage: list[dict], is_best: bool = False) -> None:
        """Saves last.pt (and best.pt) on rank 0, with the wall-clock seconds trained and
        `s3_usage`, every rank's S3 requests so far (`s3.usage.snapshot()`, gathered by the caller).
        The caller refuses a diverged loss first: a NaN model never replaces a good checkpoint."""
        state, step = self.state, self.train_step
        state.wall_s = self.stops.run_s()
        state.s3_usage = s3.merged(s3_usage)
        if self.procs.master:
            state.wandb_id = self.outputs.wandb_id
            self.outputs.save(contents(state, model=step.model, optimizer=step.optimizer, scaler=step.scaler,
                                       ema=step.ema, config=to_dict(self.cfg), class_names=self.shards.class_names),
                              is_best)

    def models(self) -> dict:
        """What a validation scores: the raw weights ("") and their EMA, when the run keeps one."""
        ema = self.train_step.ema
        return {"": self.train_step.model, **({"ema": ema.module} if ema else {})}


@dataclass(frozen=True)
class EpochResult:
    """What `train.py`'s `train_one_epoch` saw: the loop decides from it, not from side effects
    on the state."""
    ended: bool  # the epoch's last batch was trained
    stop: str | None  # why the run stops early (a signal, max_steps, max_minutes), or None
    rates: dict  # the epoch's `ThroughputMeter.epoch()`: rates, first step, peak memory
