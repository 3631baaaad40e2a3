"""Train a ResNet on ImageNet webdataset shards, with JPEG decoding on the GPU through DALI.

    python train.py --dali --data SHARDS --config configs/imagenet1k.yaml --out runs/r50 [--s3 s3://b/p]
    torchrun --nproc_per_node 8 train.py --dali --data SHARDS ...      # DDP: NCCL on GPU, gloo on CPU

The story: `setup` builds everything and checks every input before anything is written; then,
epoch by epoch, `train_one_epoch` trains (checkpointing mid-epoch when due) and `end_epoch`
checkpoints, then validates. Every way out goes through the `RunSession` (`run/session.py`): the
closing record, the report, the uploads, then an exit code that says how the run ended. EC2's spot notice
and SIGTERM are acted on at the next step or batch; `--resume auto` continues exactly where the
newest checkpoint, local or in S3, left off.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from tqdm import tqdm

from dali_imagenet import distributed, s3
from dali_imagenet.config import TrainConfig, load_config, to_dict
from dali_imagenet.cuda_check import cuda_available
from dali_imagenet.data import decoder, staging
from dali_imagenet.data.folders import refuse_overlap
from dali_imagenet.data.loader import Loader, build_loader
from dali_imagenet.data.partition import batches_per_epoch
from dali_imagenet.data.shards import find_shards, sample_locations
from dali_imagenet.errors import Interrupted
from dali_imagenet.inference import predictions
from dali_imagenet.report.html_report import write_report
from dali_imagenet.report.wandb_media import wandb_media
from dali_imagenet.run import budgeting, exits, launches, resume, run_folder
from dali_imagenet.run.checkpoint import TrainState
from dali_imagenet.run.initial import initialise
from dali_imagenet.run.interrupts import StopCheck, StopRequest
from dali_imagenet.run.loaders import run_loaders
from dali_imagenet.run.logger import wandb_wanted
from dali_imagenet.run.outputs import RunOutputs
from dali_imagenet.run.session import RunSession, ending, say_error
from dali_imagenet.run.training_run import EpochResult, TrainingRun
from dali_imagenet.seeding import derive_seed
from dali_imagenet.training import recipe
from dali_imagenet.training.evaluation import better_weights, evaluate, evaluate_with_top5
from dali_imagenet.training.precision import Precision
from dali_imagenet.training.schedule import LRSchedule
from dali_imagenet.training.step import TrainStep
from dali_imagenet.training.throughput import ThroughputMeter


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=exits.TABLE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--data", required=True, help="shard folder, s3://bucket/prefix (staged to a local disk as it trains), or "
        "timm-layout folder")
    add("--stage-dir", help="where s3:// data is staged (default: $DALI_IMAGENET_STAGE_DIR or ~/.cache/dali_imagenet/"
        "staged/BUCKET/PREFIX); a second start on the same machine fetches only what is missing")
    add("--stream", action="store_true", help="read s3:// data straight from S3 every epoch instead of staging it "
        "(~2 GETs per sample and epoch, one after another: slow and billed per request)")
    add("--dali", action="store_true", help="DALI loader (GPU decoding); without it: the torchvision baseline")
    add("--config", help="YAML file overriding the TrainConfig defaults")
    add("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config field")
    add("--out", help="run folder (default: runs/<arch>-<time>)")
    add("--resume", help="'auto' (the newer checkpoint of --out and --s3) or a checkpoint path")
    add("--init", metavar="SOURCE", help="a new run from these weights (other classes: a new classifier): a checkpoint,"
        " a run folder, a published folder or hf://USER/NAME, a state dict, or 'timm' (its pretrained weights)")
    add("--overwrite", action="store_true", help="replace the run that --out holds")
    add("--device", choices=["cuda", "cpu"], help="cuda: stop at once, naming why, if CUDA cannot run here (the "
        "cloud tasks ask for it); default: cuda if usable, else cpu")
    add("--s3", help="s3://bucket/prefix for checkpoints, weights and metrics")
    add("--wandb", action=argparse.BooleanOptionalAction, help="log to W&B (default: on when WANDB_API_KEY or "
        "WANDB_MODE is set)")
    add("--spot", choices=["auto", "on", "off"], default="auto", help="watch EC2's spot interruption notice "
        "(auto: when the instance metadata service answers at start)")
    add("--price-per-hour", type=float, help="US$ per machine-hour, for the run's cost (default: the config's)")
    add("--budget-hours", type=float, help="train the longest schedule that fits this many machine-hours, from rates "
        "measured first (docs/training.md#training-to-a-budget)")
    add("--budget-dollars", type=float, help="the same for US$ at --price-per-hour (with --budget-hours: the smaller)")
    return parser.parse_args()


def setup(args, cfg: TrainConfig, procs: distributed.Processes, session: RunSession) -> TrainingRun:
    """Everything the loop needs (given to `session` as soon as it exists); nothing is written until
    every check has passed. EC2's notice is watched from the start: one during the resume download
    or the pipeline build is acted on before training starts."""
    precision = Precision.for_device(cfg.amp_dtype, procs.device)
    torch.manual_seed(derive_seed(cfg.seed, "torch", procs.rank))
    run_dir = run_folder.choose(args.out, cfg.arch, resume=args.resume, overwrite=args.overwrite, world=procs.world)
    if not s3.is_s3(args.data):  # a run never writes into the shards it reads (nor around them)
        refuse_overlap(run_dir, args.data, output_name="--out", source_name="--data")
    s3_held = resume.check_s3_prefix(args.s3, resume=args.resume, overwrite=args.overwrite,
                                     timeout_s=cfg.s3_resume_timeout_s) if procs.master else []
    session.claim(run_dir, args.s3, overwrite=args.overwrite)  # S3 takes our files, and no other job writes there
    session.clock.enter("staging")  # the indices and placeholders; the tars arrive while training
    staged, shards, val_shards = read_splits(args, cfg, procs, session.request)
    data = staged.data
    session.clock.enter("resume")
    with session.request.at_once():  # a stop during the build: nothing made yet to keep, no step to wait for
        training = recipe.build(cfg, shards.num_classes, procs, precision)
    point, initialised = starting_weights(args, cfg, procs, training, run_dir, shards)
    # The tars still to stage arrive while training, in the order this epoch reads them; the loaders wait on them.
    staged.begin(staging.run_order(shards, val_shards, cfg.seed, point.state.epoch, procs.world,
                                   staging.machine_ranks(procs.rank, procs.local_rank)))
    session.clock.enter("start")  # the loaders, the step, the run folder
    backend = "dali" if args.dali else "torchvision"
    loaders = run_loaders(cfg, procs, precision, backend, staged.landing, shards, val_shards)
    # SYNC (torchrun), with a budget: every rank measures the same steps and agrees on the schedule
    cfg = budgeting.fix_schedule(cfg, point.state, resumed=point.path is not None, procs=procs, precision=precision,
                                 loaders=loaders, request=session.request)
    stops = StopCheck(session.request, procs, checkpoint_minutes=cfg.checkpoint_minutes, max_minutes=cfg.max_minutes,
                      max_steps=cfg.max_steps, earlier_s=point.state.wall_s)
    stops.interrupt_if_asked()  # SYNC (torchrun): a notice during the resume download leaves before anything is written
    if staged.landing is None:  # the val split checked before anything is written (staging checks each tar as it lands)
        build_loader(loaders.val)  # built and dropped
    train_step = training.step(cfg, procs, precision, shards.num_classes)  # SYNC (torchrun): DDP sends rank 0's weights
    steps_per_epoch = batches_per_epoch(shards.samples, procs.world, cfg.batch_size, train=True)
    schedule = LRSchedule(training.peak_lr, cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch),
                          cfg.min_lr, cfg.lr_schedule)
    decoding = decoder.describe(backend, procs.device, cfg.hw_decoder_load) if procs.master else {}
    if args.overwrite and procs.master:  # every check passed: only now does the old run go, here and in S3
        run_folder.clear(run_dir)
        if args.s3:
            s3.delete(args.s3, s3_held)
    outputs = RunOutputs(run_dir, to_dict(cfg), procs, s3_url=args.s3, wandb=wandb_wanted(args.wandb),
                         wandb_id=point.state.wandb_id, instance={**session.instance, **decoding},
                         write_report=write_report, report_media=wandb_media, lease=session.lease,
                         extra={"loader": backend, "world_size": procs.world, "data": args.data,
                                **({"staged_to": data} if data != args.data else {}), "config_file": args.config,
                                "spot_watch": session.watching,
                                **({"init": initialised.record()} if initialised else {}),
                                **({"budget": point.state.budget} if point.state.budget else {})})
    run = TrainingRun(cfg, procs, precision, shards, val_shards, train_step, loaders, schedule, stops, outputs,
                      point.state, initialised, session.clock)
    session.begin(run)
    if point.path is not None:
        outputs.resumed(point)
    if procs.master:
        print(f"{cfg.network}, {shards.num_classes} classes, {shards.samples} train images, {steps_per_epoch} steps/"
              f"epoch x {cfg.epochs} epochs, global batch {cfg.batch_size * procs.world}, peak LR "
              f"{training.peak_lr:g}, {backend} loader on {procs.device.type}, {procs.world} process(es), run folder "
              f"{run_dir}\n{decoder.line(decoding)}", flush=True)
    return run


def read_splits(args, cfg: TrainConfig, procs: distributed.Processes, request: StopRequest):
    """(what the loaders read and wait on: `staging.Staging`, the train split, the val split):
    s3:// data is staged to a local disk unless streamed (which then says what it costs); both
    splits must be labelled."""
    staged = staging.local_data(args.data, args.stage_dir, stream=args.stream, here=procs.local_master,
                                interrupt=request.interrupt_if_asked)
    under_way = staged.landing is not None  # the tars still arriving: the loaders wait for each
    shards = find_shards(staged.data, "train", staging=under_way)
    val_shards = find_shards(staged.data, "validation", staging=under_way)
    if args.stream and s3.is_s3(args.data) and procs.master:
        print(staging.streaming_line(args.data, shards.samples + val_shards.samples, cfg.epochs,
                                     cfg.s3_get_price_per_1000), file=sys.stderr, flush=True)
    shards.require_labels("training")
    val_shards.require_labels("validation")
    return staged, shards, val_shards


def starting_weights(args, cfg: TrainConfig, procs: distributed.Processes, training, run_dir, shards):
    """(the resume point, where --init's weights came from): a resumed run's checkpoint loaded into
    `training` (the run's S3 requests so far counted), else --init's weights, else none."""
    point = resume.resume(args.resume, run_dir, args.s3, procs, model=training.model, optimizer=training.optimizer,
                          scaler=training.scaler, ema=training.ema, config=cfg, s3_timeout_s=cfg.s3_resume_timeout_s)
    if procs.master:
        s3.usage.add(point.state.s3_usage)  # the run's requests before this process: its cost record covers them all
    if not args.init or point.path is not None:  # a resumed run has its own weights: --init only starts one
        return point, None
    initialised = initialise(args.init, training.model, cfg.arch, shards.class_names, cfg.width)
    training.restart_ema(cfg)
    if procs.master:
        print(initialised.line(shards.num_classes), flush=True)
    return point, initialised


def train_one_epoch(train_step: TrainStep, loader: Loader, schedule: LRSchedule, state: TrainState,
                    run: TrainingRun) -> EpochResult:
    """Trains the rest of epoch `state.epoch`: `train_step` (its model, optimizer and EMA change) on
    `loader`'s batches at `schedule`'s LR, advancing `state`'s step and batch counters. From `run`,
    what does not change in a step: the config, the processes, the log (`outputs`), the stop
    checks (`stops`: a mid-epoch checkpoint when one is due or the run stops) and the launch clock."""
    cfg = run.cfg
    procs = run.procs
    steps_in_epoch = len(loader)
    meter = ThroughputMeter(procs.world, procs.device)
    progress = tqdm(total=steps_in_epoch, initial=state.batch_in_epoch, unit="step", leave=False,
                    desc=f"epoch {state.epoch + 1}/{cfg.epochs}", disable=None if procs.master else True)
    loss_sum = 0.0  # a device tensor after the first step: read only when logging
    window = 0  # steps since the last log
    stop = None
    train_step.train_model.train()
    for images, labels in meter.batches(loader):
        lr = schedule.at(state.step)
        loss_sum = loss_sum + train_step(images, labels, step=state.step, lr=lr)
        run.clock.first_step()
        window += 1
        state.step += 1
        state.batch_in_epoch += 1
        progress.update(1)
        if state.step % cfg.log_every == 0 or state.batch_in_epoch >= steps_in_epoch:  # the only host syncs
            run.refuse_diverged(distributed.gather(train_step.bad_step(), procs))  # SYNC: a NaN stops every rank
            record = {"step": state.step, "epoch": state.epoch, "lr": lr, "image_size": images.shape[-1],
                      "loss": float(loss_sum) / window, **meter.take_window()}
            run.outputs.log(record)
            progress.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['images_per_s']:.0f}",
                                 wait=f"{record['data_wait']:.0%}")
            loss_sum = 0.0
            window = 0
        # SYNC (torchrun): this step's flags go out in a non-blocking all-reduce; the last step's are read
        stop, checkpoint_due = run.stops.after_step(state.step)
        if stop:
            run.clock.leave()  # the stop's checkpoint and uploads: the way out
        if (stop or checkpoint_due) and state.batch_in_epoch < steps_in_epoch:  # an epoch's end checkpoints anyway
            # Every rank's reader state: a resume starts each where it stopped, decoding nothing twice.
            state.loader = distributed.gather(loader.state_dict(), procs)  # SYNC
            checkpoint(run)
            run.stops.checkpointed()  # the next one is due checkpoint_minutes from now
        if stop:
            break
    progress.close()
    return EpochResult(state.batch_in_epoch >= steps_in_epoch, stop, meter.epoch())


def checkpoint(run: TrainingRun, is_best: bool = False) -> None:
    """Every rank: last.pt (and best.pt) written by rank 0, unless a loss went NaN on any rank."""
    run.refuse_diverged(distributed.gather(run.train_step.bad_step(), run.procs))  # SYNC: no NaN model saved
    run.save_checkpoint(distributed.gather(s3.usage.snapshot(), run.procs), is_best)  # SYNC: every rank's S3 requests


def end_epoch(run: TrainingRun, rates: dict) -> None:
    """Checkpoints the finished epoch, then validates it when due: a stop request during the
    validation loses nothing, and the resumed run validates that epoch first."""
    cfg = run.cfg
    state = run.state
    epoch = state.epoch + 1  # 1-based, as printed
    line = (f"epoch {epoch}/{cfg.epochs} ({cfg.train_image_size(state.epoch)} px): train "
            f"{rates['images_per_s']:.0f} img/s, data wait {rates['data_wait']:.0%}")
    run.outputs.log({"step": state.step, "epoch": epoch, "image_size": cfg.train_image_size(state.epoch),
                     **{f"epoch_{k}" if k in ("images_per_s", "data_wait", "images") else k: v
                        for k, v in rates.items()}})
    line += budgeting.epoch_note(run, epoch)
    state.finish_epoch(validate=cfg.validates_after(epoch))
    checkpoint(run)
    run.stops.checkpointed()
    if state.validation_due:
        run.stops.interrupt_if_asked()  # SYNC (torchrun): any rank's stop request
        validate(run, line)
    elif run.procs.master:
        print(line)


def validate(run: TrainingRun, line: str = "") -> None:
    """Validates the raw (and EMA) weights for epoch `state.validation_due`, records it in the
    history and checkpoints (best.pt too, if it is the best so far). The run's last validation
    (with the DALI loader, which keeps the shards' order) keeps every sample's top-5 for its page."""
    cfg = run.cfg
    state = run.state
    epoch = state.validation_due
    final = epoch == cfg.epochs and run.loaders.val.backend == "dali"
    # SYNC (torchrun): the metrics are all-reduced, and stop requests every few batches
    metrics, top5 = evaluate_with_top5(run.models(), run.val_loader(), run.precision, flip=cfg.val_flip,
                                       channels_last=cfg.channels_last, interrupt=run.stops.interrupt_if_asked,
                                       keep=final)
    best, best_top1 = better_weights(metrics)
    if final and run.procs.master:
        run.outputs.save_predictions(predictions.from_top5(  # top5 is keyed by run.models()' names: "" is raw
            [key for _, key, _ in sample_locations(run.val_shards)], *top5["" if best == "raw" else best], best, epoch))
    state.history.append({**metrics, "step": state.step, "epoch": epoch})
    is_best = best_top1 > state.best_top1
    state.best_top1 = max(state.best_top1, best_top1)
    state.validation_due = 0
    run.outputs.log({"step": state.step, "epoch": epoch, "images_seen": state.step * cfg.batch_size * run.procs.world,
                     "time_s": run.stops.elapsed_s(), "run_s": run.stops.run_s(),
                     **{f"val_{k}": v for k, v in metrics.items()}})
    if run.procs.master:
        print(f"{line or f'epoch {epoch}/{cfg.epochs}'}; val top-1 {metrics['top1']:.2f}%  top-5 "
              f"{metrics['top5']:.2f}%  loss {metrics['loss']:.3f}"
              + (f"; EMA top-1 {metrics['ema_top1']:.2f}%" if run.train_step.ema else "")
              + f"  ({metrics['images']} images)")
    checkpoint(run, is_best)


def validate_start(run: TrainingRun) -> None:
    """The initial weights' score (--init), before any step: where a fine-tuning starts from."""
    metrics = evaluate(run.models(), run.val_loader(), run.precision, flip=run.cfg.val_flip,
                       channels_last=run.cfg.channels_last, interrupt=run.stops.interrupt_if_asked)  # SYNC, as validate
    run.outputs.log({"event": "init_validation", "step": 0, "epoch": 0, **{f"val_{k}": v for k, v in metrics.items()}})
    if run.procs.master:
        print(f"before training ({run.initialised.source}): val top-1 {metrics['top1']:.2f}%  top-5 "
              f"{metrics['top5']:.2f}%  loss {metrics['loss']:.3f}  ({metrics['images']} images)", flush=True)


def train(run: TrainingRun) -> str | None:
    """Trains the epochs left; returns why the run stopped early, or None when every epoch ran.
    A stop request outside a train step raises `Interrupted`: nothing new to checkpoint there, but
    for one that comes while a loader waits for a shard still being staged (one process: the steps
    taken so far are saved first)."""
    state = run.state
    run.clock.enter("training")
    if run.initialised and state.step == 0:
        validate_start(run)
    if state.validation_due:  # a stop cut that validation short: the resumed run does it first
        validate(run)
    run.clock.enter("compile")  # the first epoch's loader and step (torch.compile's graphs, cuDNN's autotuning)
    while state.epoch < run.cfg.epochs:
        # SYNC (torchrun): any rank's stop request, before the epoch's loader is built and its first step compiles
        run.stops.interrupt_if_asked()
        loader = run.train_loader()
        try:
            result = train_one_epoch(run.train_step, loader, run.schedule, state, run)
        except Interrupted:  # a notice while the loader waited for a shard still being staged
            if state.batch_in_epoch and run.procs.world == 1:  # the steps so far are kept (one process: no peer)
                state.loader = [loader.state_dict()]
                checkpoint(run)
            raise
        del loader  # its DALI pipeline's memory goes before validation (and the next epoch) build their own
        if result.ended:
            end_epoch(run, result.rates)
        if result.stop:
            return result.stop
    return None


def main(started: float | None = None) -> int:
    """`started`: when the process started (its launch is counted from there; default: now)."""
    started = time.time() if started is None else started
    args = parse_args()
    budgeting.start(started)
    s3.usage.reset()  # this process's S3 requests, for the cost record (a resume adds the earlier ones)
    # From here a SIGTERM or a Ctrl-C is a request, acted on at the first point that can (exit 75 or 130).
    request = StopRequest(announce=os.environ.get("RANK", "0") == "0")
    try:
        cfg = load_config(args.config, [*args.set, *[f"{key}={value}" for key, value in (
            ("price_per_hour", args.price_per_hour), ("budget_hours", args.budget_hours),
            ("budget_dollars", args.budget_dollars)) if value is not None]])
        procs = distributed.setup(args.device or ("cuda" if cuda_available() else "cpu"), cfg.deterministic)
    except BaseException as error:  # noqa: BLE001 - a bad config or device, a second Ctrl-C: nothing to close yet
        if isinstance(error, SystemExit):
            raise
        request.restore()
        code, message = ending(error)
        exits.record(code)
        say_error(error, message)
        return code
    with RunSession(cfg, procs, request, started, spot_mode=args.spot,
                    streamed=args.stream and s3.is_s3(args.data)) as session:
        session.connect()  # the other ranks' errors and EC2's notice, heard from here on
        run = setup(args, cfg, procs, session)
        stop = train(run)
        session.finish(stop)  # SYNC: the replicas' checksums, every rank's S3 requests, rank 0's exit code
    return session.code


if __name__ == "__main__":
    sys.exit(main(launches.process_started()))
