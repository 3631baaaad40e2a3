"""Train to a budget: which schedule fits H hours (or D dollars), from rates measured beforehand.
Pure arithmetic: the caller measures and passes the rates, the seconds already spent and the
budget; nothing here reads a clock.

The schedules a recipe can be stretched or shrunk to (`ladder`): a recipe with one of FFCV's
epoch counts climbs FFCV's ladder (16, 24, 32, 40, 56, 88; below 16, every whole count); any other
recipe every whole count from 1 to 2.2 x its own (FFCV's longest over its middle one, 88/40). Each
count keeps the recipe's resolution ramp where FFCV puts it (`scaled`), which reproduces FFCV's six
configs exactly from its 40-epoch one, and the recipe's LR warm-up (FFCV keeps 2 epochs at every
count) up to a quarter of the run. The LR schedule is laid over the chosen epochs, so it reaches
its floor at the last step, which the plan puts before the budget's end.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from dali_imagenet.errors import UsageError
from dali_imagenet.training.schedule import image_size_at

# ResNet-50 on 8 x A100, top-1 %, by epochs (libffcv/ffcv-imagenet's README; rn50_configs/rn50_*_epochs.yaml).
FFCV_TOP1 = {16: 73.8, 24: 75.6, 32: 76.6, 40: 77.2, 56: 78.0, 88: 78.4}
DERIVED_STRETCH = 88 / 40  # a derived ladder goes up to this times the recipe's epochs
MAX_WARMUP_SHARE = 0.25  # of the run's epochs: the rest brings the LR down to its floor


@dataclass(frozen=True)
class Schedule:
    """What a budget changes in a recipe: its length, where its resolution ramp sits, its warm-up."""
    epochs: int
    ramp_start_epoch: int
    ramp_end_epoch: int
    warmup_epochs: float


@dataclass(frozen=True)
class Recipe:
    """What the arithmetic reads of a `TrainConfig` (the recipe as written, before any budget)."""
    epochs: int
    ramp_start_epoch: int
    ramp_end_epoch: int
    warmup_epochs: float
    image_size: int
    min_image_size: int
    image_size_step: int
    val_every: int
    checkpoint_minutes: float

    @classmethod
    def of(cls, cfg) -> Recipe:
        return cls(cfg.epochs, cfg.ramp_start_epoch, cfg.ramp_end_epoch, cfg.warmup_epochs, cfg.image_size,
                   cfg.min_image_size, cfg.image_size_step, cfg.val_every, cfg.checkpoint_minutes)

    def size(self, schedule: Schedule, epoch: int) -> int:
        """Train px of `epoch` (0-based) under `schedule`."""
        return image_size_at(epoch, image_size=self.image_size, min_image_size=self.min_image_size,
                             ramp_start_epoch=schedule.ramp_start_epoch, ramp_end_epoch=schedule.ramp_end_epoch,
                             step=self.image_size_step)


@dataclass(frozen=True)
class Rates:
    """Measured (or given) before the schedule is fixed; seconds are wall-clock."""
    train: dict  # px -> images/s of the whole train step with its loader
    warmup_s: dict  # px -> seconds a new size costs before the steady rate (compile, autotune, first batches)
    val: float  # images/s of a validation pass (every model and flip it scores)
    checkpoint_s: float  # one checkpoint written
    train_images: int  # per epoch (steps x global batch)
    val_images: int
    loader_s: float = 0.0  # each epoch's train loader built (its pipelines started)
    estimated: tuple = ()  # what was not measured but scaled from what was (px sizes, "val"): measuring's cap


@dataclass(frozen=True)
class Overheads:
    spent_s: float  # already gone when the schedule is fixed: start-up and the measuring itself
    reserve_share: float  # of the budget, held back for the rates' noise
    relaunches: float  # expected (spot) relaunches
    relaunch_s: float  # each: a new machine's start, staging, compile, the work since the last checkpoint


def _round(x: float) -> int:
    return math.floor(x + 0.5)


def scaled(recipe: Recipe, epochs: int) -> Schedule:
    """The recipe at `epochs`, its ramp where FFCV puts it: FFCV's 16..88-epoch configs start and
    end their ramp at round(f x epochs) - 1 for fixed f (0.75 and 0.875: 29 and 34 of 40, 11 and 13
    of 16, 65 and 76 of 88), i.e. f = (ramp epoch + 1) / epochs of the recipe as written."""
    if not recipe.min_image_size:
        start = end = 0
    else:
        def at(ramp_epoch: int) -> int:
            return min(epochs, max(0, _round((ramp_epoch + 1) * epochs / recipe.epochs) - 1))
        start = at(recipe.ramp_start_epoch)
        end = max(start, at(recipe.ramp_end_epoch))
    return Schedule(epochs, start, end, min(recipe.warmup_epochs, MAX_WARMUP_SHARE * epochs))


def ladder(recipe: Recipe) -> list[int]:
    """The epoch counts a budget may pick, shortest first."""
    if recipe.epochs in FFCV_TOP1:
        return [*range(1, min(FFCV_TOP1)), *FFCV_TOP1]
    return list(range(1, max(recipe.epochs, math.floor(DERIVED_STRETCH * recipe.epochs)) + 1))


@dataclass(frozen=True)
class Prediction:
    schedule: Schedule
    epoch_s: tuple  # seconds of each epoch: training, its new size's warm-up, its validation, its checkpoints
    total_s: float  # the run from start to end: spent + epochs + relaunch reserve
    reserve_s: float  # the share held back for noise (not in total_s)
    fits: bool
    ffcv_top1: float | None

    def record(self) -> dict:
        return {"schedule": asdict(self.schedule), "epoch_s": list(self.epoch_s), "total_s": self.total_s,
                "reserve_s": self.reserve_s, "fits": self.fits, "ffcv_top1": self.ffcv_top1}


def predict(recipe: Recipe, schedule: Schedule, rates: Rates, overheads: Overheads, budget_s: float) -> Prediction:
    """The run's seconds under `schedule`: each epoch's images at its size's rate, a warm-up at each
    new size, validations, a checkpoint at each epoch's end and every checkpoint_minutes, then the
    relaunch reserve; it fits when that and the noise reserve end by `budget_s`."""
    epoch_s, seen = [], set()
    for epoch in range(schedule.epochs):
        size = recipe.size(schedule, epoch)
        train_s = rates.train_images / rates.train[size]
        seconds = train_s + rates.loader_s + (0.0 if size in seen else rates.warmup_s[size])
        seen.add(size)
        e = epoch + 1
        if (recipe.val_every and e % recipe.val_every == 0) or e == schedule.epochs:
            seconds += rates.val_images / rates.val
        mid = math.floor(train_s / (recipe.checkpoint_minutes * 60)) if recipe.checkpoint_minutes > 0 else 0
        epoch_s.append(seconds + (1 + mid) * rates.checkpoint_s)
    relaunch_s = overheads.relaunches * overheads.relaunch_s
    total = overheads.spent_s + sum(epoch_s) + relaunch_s
    reserve = overheads.reserve_share * budget_s
    return Prediction(schedule, tuple(epoch_s), total, reserve, total + reserve <= budget_s,
                      FFCV_TOP1.get(schedule.epochs))


def table(recipe: Recipe, rates: Rates, overheads: Overheads, budget_s: float) -> list[Prediction]:
    """Every schedule of the ladder, predicted; shortest first."""
    return [predict(recipe, scaled(recipe, epochs), rates, overheads, budget_s) for epochs in ladder(recipe)]


class TooSmall(UsageError):
    """Not even the shortest schedule fits; the message is one line."""


def choose(recipe: Recipe, rates: Rates, overheads: Overheads, budget_s: float) -> Prediction:
    """The longest schedule of the ladder that fits the budget; `TooSmall` when none does."""
    options = table(recipe, rates, overheads, budget_s)
    fitting = [p for p in options if p.fits]
    if not fitting:
        shortest = options[0]
        raise TooSmall(f"a budget of {clock(budget_s)} is too small for one epoch: {shortest.schedule.epochs} "
                       f"epoch(s) need {clock(shortest.total_s + shortest.reserve_s)} here ({clock(overheads.spent_s)} "
                       f"already spent measuring and starting, {clock(shortest.reserve_s)} reserve)")
    return fitting[-1]


def budget_seconds(hours: float, dollars: float, price_per_hour: float) -> float:
    """The budget in machine-seconds: the smaller of `hours` and what `dollars` buys at
    `price_per_hour` (a 0 is not given)."""
    limits = [hours * 3600] if hours > 0 else []
    if dollars > 0:
        if price_per_hour <= 0:
            raise TooSmall("a dollar budget needs the machine's price: pass --price-per-hour (or price_per_hour)")
        limits.append(dollars / price_per_hour * 3600)
    return min(limits)


TRAIN_STEP_FORWARDS = 3  # a train step costs about three forward passes (forward, and backward twice that)


def pixel_rate(rate: float, from_px: int, to_px: int) -> float:
    """A rate at `from_px` carried to `to_px`: the work per image goes with its pixels."""
    return rate * (from_px / to_px) ** 2


def interpolated_rate(rates: dict, px: int) -> float:
    """The rate at `px` from those measured at other sizes (`rates`: px -> images/s): the seconds
    an image takes, linear in its pixels between the nearest measured sizes below and above (the
    nearest one's rate outside them)."""
    below = [p for p in rates if p <= px]
    above = [p for p in rates if p >= px]
    if not below or not above:
        return rates[min(rates, key=lambda p: abs(p - px))]
    low, high = max(below), min(above)
    if low == high:
        return rates[low]
    share = (px * px - low * low) / (high * high - low * low)
    return 1.0 / ((1 - share) / rates[low] + share / rates[high])


def validation_rate(train_rate: float, train_px: int, val_px: int, forwards: int) -> float:
    """A validation pass's images/s from the train step's at `train_px`: `forwards` passes an
    image (models x flips) at `val_px` against a train step's ~3 at its size."""
    return pixel_rate(train_rate * TRAIN_STEP_FORWARDS / forwards, train_px, val_px)


def measure_seconds(budget_s: float, share: float, sizes: int, most_s: float = 20.0) -> float:
    """Seconds to time the steady rate at each of `sizes` train sizes (and the validation), so that
    measuring takes about `share` of the budget, at most `most_s` each."""
    return min(most_s, share * budget_s / (sizes + 1))


def planned_s(epoch_s: list, epochs: float) -> float:
    """Seconds the plan gives the first `epochs` epochs (a fraction of an epoch: that share of it)."""
    whole = min(len(epoch_s), math.floor(epochs))
    part = epoch_s[whole] * (epochs - whole) if whole < len(epoch_s) else 0.0
    return sum(epoch_s[:whole]) + part


def projection(prediction: dict, spent_s: float, epochs_done: float, now_s: float, budget_s: float) -> dict:
    """Where a run stands after `epochs_done` epochs at `now_s` seconds from its start: how far
    behind the plan it is (seconds; < 0: ahead) and its predicted finish, the epochs left taken at
    the pace of those done so far (never faster than planned); `prediction` is `Prediction.record()`."""
    epoch_s = prediction["epoch_s"]
    done_s = planned_s(epoch_s, epochs_done)
    behind = now_s - (spent_s + done_s)
    pace = max(1.0, (now_s - spent_s) / done_s) if done_s > 0 else 1.0
    left = (sum(epoch_s) - done_s) * pace
    relaunch_s = prediction["total_s"] - spent_s - sum(epoch_s)
    finish = now_s + left + relaunch_s
    return {"behind_s": behind, "finish_s": finish, "over_s": finish - budget_s,
            "late": behind > prediction["reserve_s"]}


def clock(seconds: float) -> str:
    """A duration as people read it: 42 s, 12.5 min, 3.20 h."""
    if abs(seconds) < 120:
        return f"{seconds:.0f} s"
    if abs(seconds) < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"
