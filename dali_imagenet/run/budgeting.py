"""train.py's `--budget-hours` / `--budget-dollars`: the rates measured on this machine before the
schedule is fixed, the schedule chosen (`training.budget`), kept in the run's state across
resumes, and each epoch's line of where the run stands against its budget.

The budget's clock: the seconds from this module's import (train.py's start, after its own imports)
to the choice, then the run's trained wall-clock (`StopCheck.run_s`, summed over resumes). Each
relaunch's start-up is covered by the relaunch reserve (`budget_relaunches`)."""
from __future__ import annotations

import dataclasses
import gc
import io
import time

import torch

from dali_imagenet import distributed
from dali_imagenet.config import TrainConfig
from dali_imagenet.data.loader import build_loader
from dali_imagenet.data.partition import batches_per_epoch
from dali_imagenet.errors import Interrupted, UsageError
from dali_imagenet.run.interrupts import StopRequest
from dali_imagenet.run.loaders import RunLoaders
from dali_imagenet.training import budget, recipe
from dali_imagenet.training.evaluation import predict_logits
from dali_imagenet.training.precision import Precision

STARTED = time.monotonic()  # train.py's start (`start`): the budget's clock runs from here
WARMUP_STEPS = 2  # per size, before the timed ones: compile, autotuning, the loader's first batches
MIN_TIMED_STEPS = 3
MEASURING_STEP0 = 10**9  # the throwaway model's step numbers: none of the run's (whatever is keyed on a step)


def start(started: float | None = None) -> None:
    """The budget's clock starts at `started` (Unix time: the process's start, its imports count;
    default now: a test runs several mains in one process)."""
    global STARTED
    STARTED = time.monotonic() - (max(0.0, time.time() - started) if started is not None else 0.0)


def wanted(cfg: TrainConfig) -> bool:
    return cfg.budget_hours > 0 or cfg.budget_dollars > 0


def fix_schedule(cfg: TrainConfig, state, *, resumed: bool, procs: distributed.Processes, precision: Precision,
                 loaders: RunLoaders, request: StopRequest) -> TrainConfig:
    """The config the run trains: a resumed budget run's schedule as it was chosen (`state.budget`),
    a new budget run's measured and chosen now (recorded in `state.budget`), else `cfg` as it is.
    A budget too small for one epoch is refused in one line; a stop request while measuring (EC2's
    notice) raises `Interrupted` at the next step: nothing is written yet to keep."""
    if state.budget:
        cfg = dataclasses.replace(cfg, **state.budget["schedule"])
        if wanted(cfg) and procs.master:
            print(resumed_line(cfg, state, loaders.train.shards, procs), flush=True)
        return cfg
    if not wanted(cfg):
        return cfg
    if resumed:  # a run started without a budget keeps its own schedule
        if procs.master:
            print("budget: not applied: the run resumed was started without one, and a resume keeps its schedule "
                  f"({cfg.epochs} epochs)", flush=True)
        return cfg
    budget_s = budget.budget_seconds(cfg.budget_hours, cfg.budget_dollars, cfg.price_per_hour)
    plan = budget.Recipe.of(cfg)
    sizes = sorted({plan.size(budget.scaled(plan, e), epoch) for e in budget.ladder(plan) for epoch in range(e)})
    seconds = budget.measure_seconds(budget_s, cfg.budget_measure_share, len(sizes))
    rates = measure(cfg, procs, precision, loaders, sizes, seconds, cap_s=cfg.budget_measure_share * budget_s,
                    request=request)
    spent_s = max(distributed.gather(time.monotonic() - STARTED, procs))
    overheads = budget.Overheads(spent_s, cfg.budget_reserve, cfg.budget_relaunches, cfg.budget_relaunch_minutes * 60)
    try:
        chosen = budget.choose(plan, rates, overheads, budget_s)
    except budget.TooSmall as error:
        raise UsageError(f"{error}; measured {measured_line(rates)}") from None
    state.budget = {**chosen.record(), "budget_s": budget_s, "spent_s": spent_s, "measure_s": seconds,
                    "rates": dataclasses.asdict(rates), "recipe_epochs": cfg.epochs}
    if procs.master:
        print(chosen_line(chosen, rates, spent_s, budget_s), flush=True)
    return dataclasses.replace(cfg, **state.budget["schedule"])


def chosen_line(chosen: budget.Prediction, rates: budget.Rates, spent_s: float, budget_s: float) -> str:
    s = chosen.schedule
    ffcv = f" (FFCV's top-1 at {s.epochs} epochs: {chosen.ffcv_top1} %)" if chosen.ffcv_top1 else ""
    return (f"budget {budget.clock(budget_s)}: {s.epochs} epochs{ffcv}, ramp {s.ramp_start_epoch}-{s.ramp_end_epoch}, "
            f"warm-up {s.warmup_epochs:g}; measured {measured_line(rates)} ({budget.clock(spent_s)} spent measuring "
            f"and starting); predicted end "
            f"{budget.clock(chosen.total_s)} + {budget.clock(chosen.reserve_s)} reserve")


def measured_line(rates: budget.Rates) -> str:
    train = ", ".join(f"{px} px {rate:,.0f} img/s (+{rates.warmup_s[px]:.0f} s warm-up)"
                      for px, rate in sorted(rates.train.items()))
    scaled = f" ({', '.join(map(str, rates.estimated))} not measured but interpolated: measuring hit its cap)" \
        if rates.estimated else ""
    return (f"train {train}, validation {rates.val:,.0f} img/s, checkpoint {rates.checkpoint_s:.1f} s, "
            f"loader start {rates.loader_s:.1f} s{scaled}")


def resumed_line(cfg: TrainConfig, state, shards, procs) -> str:
    """A resume keeps its schedule; this says whether the budget still holds, and by how much not."""
    record = state.budget
    budget_s = budget.budget_seconds(cfg.budget_hours, cfg.budget_dollars, cfg.price_per_hour)
    steps = batches_per_epoch(shards.samples, procs.world, cfg.batch_size, train=True)
    now_s = record["spent_s"] + state.wall_s + time.monotonic() - STARTED
    where = budget.projection(record, record["spent_s"], state.epoch + state.batch_in_epoch / steps, now_s, budget_s)
    verdict = (f"predicted to end {budget.clock(where['over_s'])} past the budget; the schedule is kept"
               if where["over_s"] > 0 else f"predicted to end {budget.clock(-where['over_s'])} within it")
    return (f"budget {budget.clock(budget_s)}: resumed with the schedule chosen at the start ({cfg.epochs} epochs) "
            f"at {budget.clock(now_s)}; {verdict}")


def epoch_note(run, epochs_done: int) -> str:
    """The end of an epoch's line: the predicted finish against the budget ("" without one); a run
    more than the reserve behind its plan also says so on a line of its own."""
    record, cfg = run.state.budget, run.cfg
    if not record or not wanted(cfg):
        return ""
    budget_s = budget.budget_seconds(cfg.budget_hours, cfg.budget_dollars, cfg.price_per_hour)
    now_s = record["spent_s"] + run.stops.run_s()
    where = budget.projection(record, record["spent_s"], epochs_done, now_s, budget_s)
    run.outputs.log({"event": "budget", "epoch": epochs_done, "time_s": now_s, **where, "budget_s": budget_s})
    if where["late"]:
        run.outputs.note(f"budget: {budget.clock(where['behind_s'])} behind the plan, more than its "
                         f"{budget.clock(record['reserve_s'])} reserve; the schedule is kept (no epoch cut, the LR "
                         f"still ends at its floor), so the run is predicted to end at "
                         f"{budget.clock(where['finish_s'])}, {budget.clock(max(0.0, where['over_s']))} past the "
                         f"budget")
    return (f"; budget: {budget.clock(now_s)} of {budget.clock(budget_s)}, predicted end "
            f"{budget.clock(where['finish_s'])}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(cfg: TrainConfig, procs: distributed.Processes, precision: Precision, loaders: RunLoaders,
            sizes: list[int], seconds: float, cap_s: float, request: StopRequest) -> budget.Rates:
    """The train step with its loader at each of `sizes` (a model of the run's own, thrown away; the
    run's random state is left as it was), the validation pass and a checkpoint's save: what the
    run will do, for about `seconds` each after a warm-up. Every rank measures; the slowest counts.
    The largest and the smallest size are always measured; past `cap_s` (a slow machine: the
    warm-up and the fewest steps took longer) the sizes between take a rate interpolated by
    pixels, and the validation's is scaled from the train step's by its pixels and passes."""
    devices = [procs.device] if procs.device.type == "cuda" else []
    shards = loaders.train.shards

    def agreed(*flags: bool) -> list[bool]:
        """`flags` all-reduced with this rank's stop request, which leaves at once (Interrupted)."""
        *out, asked = distributed.any_rank([*flags, request.reason is not None], procs)
        if asked:
            raise Interrupted(request.reason or "a stop request on another rank")
        return out

    with torch.random.fork_rng(devices=devices):
        training = recipe.build(cfg, shards.num_classes, procs, precision)
        step = training.step(cfg, procs, precision, shards.num_classes)
        step.train_model.train()
        train, warmup, loader_s, counter, estimated, began = {}, {}, [], MEASURING_STEP0, [], time.perf_counter()
        ends = [max(sizes), min(sizes)][:len(set(sizes))]
        for size in [*ends, *sorted(set(sizes) - set(ends), reverse=True)]:
            if agreed(time.perf_counter() - began > cap_s)[0] and size not in ends:
                estimated.append(size)
                continue
            for _ in range(1 if loader_s else 2):  # the first build in a process is DALI's cold start: paid once
                loader = None  # the last build's pipeline goes first: one at a time on an L4's memory
                gc.collect()
                started = time.perf_counter()
                loader = build_loader(loaders.train.for_epoch(0, size))
                loader_s.append(time.perf_counter() - started)
            batches, timed = _endless(loader), 0
            started = time.perf_counter()
            for _ in range(WARMUP_STEPS):
                step(*next(batches), step=counter, lr=training.peak_lr)
                counter += 1
            _sync(procs.device)
            warm_s = time.perf_counter() - started
            started = time.perf_counter()
            for images, labels in batches:
                step(images, labels, step=counter, lr=training.peak_lr)
                counter, timed = counter + 1, timed + 1
                enough = timed >= MIN_TIMED_STEPS and time.perf_counter() - started >= seconds
                if agreed(enough)[0]:  # every rank stops at the same step (DDP)
                    break
            _sync(procs.device)
            timed_s = max(distributed.gather(time.perf_counter() - started, procs))
            train[size] = timed * cfg.batch_size * procs.world / timed_s
            warmup[size] = max(0.0, max(distributed.gather(warm_s, procs)) - WARMUP_STEPS * timed_s / timed)
            del batches, loader
            gc.collect()
        for size in estimated:
            measured = {px: rate for px, rate in train.items() if px not in estimated}
            train[size] = budget.interpolated_rate(measured, size)
            warmup[size] = max(warmup[px] for px in measured)
        if agreed(time.perf_counter() - began > cap_s)[0]:
            forwards = (2 if training.ema else 1) * (2 if cfg.val_flip else 1)
            val = budget.validation_rate(train[max(sizes)], max(sizes), cfg.val_image_size, forwards)
            estimated.append("val")
        else:
            val = _validation_rate(cfg, procs, precision, loaders, training, seconds)
        started = time.perf_counter()
        torch.save({"model": training.model.state_dict(), "optimizer": training.optimizer.state_dict(),
                    "ema": training.ema.state_dict() if training.ema else None}, io.BytesIO())
        checkpoint_s = time.perf_counter() - started
    steps = batches_per_epoch(shards.samples, procs.world, cfg.batch_size, train=True)
    rates = budget.Rates(train, warmup, val, checkpoint_s, steps * cfg.batch_size * procs.world,
                         loaders.val.shards.samples, max(distributed.gather(min(loader_s), procs)), tuple(estimated))
    del training, step
    gc.collect()
    return rates


@torch.no_grad()
def _validation_rate(cfg: TrainConfig, procs, precision: Precision, loaders: RunLoaders, training,
                     seconds: float) -> float:
    """Images/s of a validation pass: each model it scores (raw, EMA), each with its mirror under val_flip."""
    loader = build_loader(loaders.val)
    models = [training.model.eval(), *([training.ema.module.eval()] if training.ema else [])]
    batches, images_done, started = _endless(loader), 0, 0.0
    for i, (images, _) in enumerate(batches):
        if i == 1:  # the first batch starts the pipeline: not the steady rate
            _sync(procs.device)
            started = time.perf_counter()
        with precision.autocast():
            for model in models:
                predict_logits(model, images, cfg.val_flip)
        if i >= 1:
            images_done += images.shape[0]
            if images_done >= MIN_TIMED_STEPS * cfg.batch_size and time.perf_counter() - started >= seconds:
                break
    _sync(procs.device)
    elapsed = max(distributed.gather(time.perf_counter() - started, procs))
    return min(distributed.gather(images_done / elapsed, procs)) * procs.world


def _endless(loader):
    """Batches across epoch boundaries: a small split must not end a timed window."""
    while True:
        yield from loader
