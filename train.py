"""Train a ResNet on ImageNet webdataset shards, with JPEG decoding on the GPU through DALI.

    python train.py --dali --data SHARDS --config configs/imagenet1k.yaml --out runs/r50 [--s3 s3://b/p]
    torchrun --nproc_per_node 8 train.py --dali --data SHARDS ...      # DDP: NCCL on GPU, gloo on CPU

The story: `setup` builds everything and checks every input before anything is written; then,
epoch by epoch, `train_one_epoch` trains (checkpointing mid-epoch when due) and says what
happened, and `end_epoch` validates and checkpoints; a NaN loss on any rank stops every rank with
the last good checkpoint untouched. A run never loses more than `checkpoint_minutes` of work:
checkpoints are atomic; SIGTERM, SIGINT and EC2's spot notice finish the step, checkpoint and
exit 0; `--resume auto` continues exactly where the last checkpoint left off, locally or from S3
(with the run's history), without decoding the epoch's earlier batches again.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

from dali_imagenet import distributed, make_loader, recipe, resume, run_folder, spot
from dali_imagenet.checkpoint import TrainState, contents
from dali_imagenet.config import TrainConfig, load_config, to_dict
from dali_imagenet.errors import DaliImagenetError, one_line_errors
from dali_imagenet.evaluation import evaluate
from dali_imagenet.interrupts import StopCheck, StopRequest
from dali_imagenet.loader import Loader
from dali_imagenet.metrics import ThroughputMeter, cost, wandb_wanted
from dali_imagenet.outputs import RunOutputs
from dali_imagenet.partition import batches_per_epoch
from dali_imagenet.precision import Precision
from dali_imagenet.schedule import LRSchedule
from dali_imagenet.seeding import derive_seed
from dali_imagenet.shards import SplitShards, find_shards
from dali_imagenet.spot import SpotWatcher
from dali_imagenet.step import TrainStep


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--data", required=True, help="shard folder, s3://bucket/prefix, or timm-layout folder")
    add("--dali", action="store_true", help="DALI loader (GPU decoding); without it: the torchvision baseline")
    add("--config", help="YAML file overriding the TrainConfig defaults")
    add("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config field")
    add("--out", help="run folder (default: runs/<arch>-<time>)")
    add("--resume", help="'auto' (newest checkpoint in --out, else in --s3) or a checkpoint path")
    add("--overwrite", action="store_true", help="replace the run that --out holds")
    add("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    add("--s3", help="s3://bucket/prefix for checkpoints, weights and metrics")
    add("--wandb", action=argparse.BooleanOptionalAction, help="log to Weights & Biases (default: on when "
        "WANDB_API_KEY or WANDB_MODE is set)")
    add("--spot", choices=["auto", "on", "off"], default="auto", help="watch EC2's spot interruption notice "
        "(auto: when the instance metadata service answers at start)")
    add("--price-per-hour", type=float, help="US$ per machine-hour, for the run's cost (default: the config's)")
    return parser.parse_args()


@dataclass
class Run:
    """What `setup` builds once. Only `state` changes as the run goes on (its step counters,
    loader position, best top-1 and history); every other field is fixed for the whole run."""
    cfg: TrainConfig
    procs: distributed.Processes
    precision: Precision
    shards: SplitShards  # the train split
    train_step: TrainStep  # holds the model, its DDP/compiled wrapper, optimizer, scaler and EMA
    val_loader: Loader
    loader_options: dict  # what every epoch's train loader shares with the val loader
    schedule: LRSchedule
    stops: StopCheck
    outputs: RunOutputs
    state: TrainState
    spot: SpotWatcher | None  # EC2's interruption notice, polled on every machine of the run
    cost_basis: dict  # what `metrics.cost` needs besides the hours


@dataclass(frozen=True)
class EpochResult:
    """What `train_one_epoch` saw: the loop decides from it, not from side effects on the state."""
    ended: bool  # the epoch's last batch was trained
    stop: str | None  # why the run stops early (a signal, max_steps, max_minutes), or None
    bad_step: int | None  # the first step whose loss was NaN or inf on any rank, or None
    rates: dict  # images_per_s, data_wait over the epoch's steps


def setup(args) -> Run:
    """Everything the loop needs; nothing is written until every check has passed."""
    cfg = load_config(args.config, [*args.set, *([f"price_per_hour={args.price_per_hour}"] if args.price_per_hour
                                                   is not None else [])])
    procs = distributed.setup(args.device, cfg.deterministic)
    precision = Precision.for_device(cfg.amp_dtype, procs.device)
    torch.manual_seed(derive_seed(cfg.seed, "torch", procs.rank))
    shards = find_shards(args.data, "train")
    val_shards = find_shards(args.data, "validation")
    run_dir = run_folder.choose(args.out, cfg.arch, resume=args.resume, overwrite=args.overwrite, world=procs.world)
    s3_held = resume.check_s3_prefix(args.s3, resume=args.resume, overwrite=args.overwrite,
                                     timeout_s=cfg.s3_resume_timeout_s) if procs.master else []
    training = recipe.build(cfg, shards.num_classes, procs, precision)
    state, resumed_from = resume.resume(args.resume, run_dir, args.s3, procs, model=training.model,
                                        optimizer=training.optimizer, scaler=training.scaler, ema=training.ema,
                                        seed=cfg.seed, s3_timeout_s=cfg.s3_resume_timeout_s)
    backend = "dali" if args.dali else "torchvision"
    loader_options = dict(batch_size=cfg.batch_size, device=procs.device, rank=procs.rank, world_size=procs.world,
                          dtype=precision.loader_dtype, backend=backend, num_threads=cfg.loader_threads,
                          hw_decoder_load=cfg.hw_decoder_load)
    val_loader = make_loader(val_shards, "validation", image_size=cfg.val_image_size,
                             crop_fraction=cfg.val_crop_fraction, **loader_options)
    train_step = training.step(cfg, procs, precision, shards.num_classes)
    steps_per_epoch = batches_per_epoch(shards.samples, procs.world, cfg.batch_size, train=True)
    schedule = LRSchedule(training.peak_lr, cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch),
                          cfg.min_lr, cfg.lr_schedule)
    request = StopRequest(announce=procs.master)
    stops = StopCheck(request, procs, checkpoint_minutes=cfg.checkpoint_minutes, max_minutes=cfg.max_minutes,
                      max_steps=cfg.max_steps, earlier_s=state.wall_s)
    imds = spot.connect(args.spot)
    instance = imds.instance() if imds else {}
    outputs = RunOutputs(run_dir, to_dict(cfg), procs, overwrite=args.overwrite, s3_url=args.s3, s3_held=s3_held,
                         wandb=wandb_wanted(args.wandb), wandb_id=state.wandb_id, instance=instance,
                         extra={"loader": backend, "world_size": procs.world, "data": args.data})
    watcher = spot.SpotWatcher(imds, request.ask, log=outputs.note, interval_s=cfg.spot_poll_seconds) if imds else None
    cost_basis = dict(gpus=procs.world if procs.device.type == "cuda" else 0, machines=distributed.machines(procs),
                      price_per_hour=cfg.price_per_hour, spot_price_per_hour=cfg.spot_price_per_hour,
                      lifecycle=instance.get("lifecycle"))
    if resumed_from:
        outputs.log({"event": "resumed", "step": state.step, "epoch": state.epoch, "from": str(resumed_from)})
    if procs.master:
        print(f"{cfg.arch}, {shards.num_classes} classes, {shards.samples} train images, {steps_per_epoch} steps/"
              f"epoch x {cfg.epochs} epochs, global batch {cfg.batch_size * procs.world}, peak LR {training.peak_lr:g}, "
              f"{backend} loader on {procs.device.type}, {procs.world} process(es), run folder {run_dir}")
    return Run(cfg, procs, precision, shards, train_step, val_loader, loader_options, schedule, stops, outputs, state,
               watcher, cost_basis)


def train_loader(run: Run) -> Loader:
    """The loader of epoch `run.state.epoch`, at that epoch's image size, restored mid-epoch if the
    checkpoint stopped there."""
    cfg, state = run.cfg, run.state
    resume_at = state.loader[run.procs.rank] if state.loader else None
    return make_loader(run.shards, "train", seed=cfg.seed, epoch=state.epoch,
                       image_size=cfg.train_image_size(state.epoch), shuffle_buffer=cfg.shuffle_buffer,
                       crop_min_area=cfg.crop_min_area, resume=resume_at, **run.loader_options)


def agreed_bad_step(train_step: TrainStep, procs: distributed.Processes) -> int | None:
    """The first step (1-based, as metrics.jsonl counts) whose loss was NaN or inf on any rank, the
    same on every rank (a host sync): all then stop together instead of waiting for one that left."""
    bad = [step + 1 for step in distributed.gather(train_step.bad_step(), procs) if step is not None]
    return min(bad) if bad else None


def train_one_epoch(train_step: TrainStep, loader: Loader, state: TrainState, schedule: LRSchedule,
                    stops: StopCheck, outputs: RunOutputs, cfg: TrainConfig, procs: distributed.Processes,
                    class_names) -> EpochResult:
    """Trains the rest of epoch `state.epoch`, advancing `state.step` and `state.batch_in_epoch`;
    checkpoints mid-epoch when one is due or the run stops."""
    steps_in_epoch = len(loader)
    meter = ThroughputMeter(procs.world)
    progress = tqdm(total=steps_in_epoch, initial=state.batch_in_epoch, unit="step", leave=False,
                    desc=f"epoch {state.epoch + 1}/{cfg.epochs}", disable=None if procs.master else True)
    loss_sum = 0.0
    window = 0
    stop = None
    train_step.train_model.train()
    for images, labels in meter.batches(loader):
        lr = schedule.at(state.step)
        loss_sum = loss_sum + train_step(images, labels, step=state.step, lr=lr)
        window += 1
        state.step += 1
        state.batch_in_epoch += 1
        progress.update(1)
        at_log = state.step % cfg.log_every == 0 or state.batch_in_epoch >= steps_in_epoch
        if at_log:  # the only host syncs of the step loop
            bad_step = agreed_bad_step(train_step, procs)
            if bad_step is not None:
                return EpochResult(False, None, bad_step, meter.epoch())
            record = {"step": state.step, "epoch": state.epoch, "lr": lr, "image_size": images.shape[-1],
                      "loss": float(loss_sum) / window, **meter.take_window()}
            if procs.device.type == "cuda":
                record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(procs.device) / 2**30
            outputs.log(record)
            progress.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['images_per_s']:.0f}",
                                 wait=f"{record['data_wait']:.0%}")
            loss_sum = 0.0
            window = 0
        stop, checkpoint_due = stops.after_step(state.step, at_log)
        if (stop or checkpoint_due) and state.batch_in_epoch < steps_in_epoch:  # an epoch's end checkpoints anyway
            # Every rank's reader state: a resume starts each where it stopped, decoding nothing twice.
            state.loader = distributed.gather(loader.state_dict(), procs)
            bad_step = save_checkpoint(train_step, state, outputs, cfg, procs, class_names, stops.run_s())
            if bad_step is not None:
                return EpochResult(False, None, bad_step, meter.epoch())
            stops.checkpointed()
        if stop:
            break
    progress.close()
    return EpochResult(state.batch_in_epoch >= steps_in_epoch, stop, None, meter.epoch())


def end_epoch(run: Run, rates: dict) -> int | None:
    """Validates the raw (and EMA) weights when due, prints the epoch's numbers, moves the state to
    the next epoch and checkpoints; returns the bad step if the loss went NaN instead."""
    cfg = run.cfg
    state = run.state
    train_step = run.train_step
    epoch = state.epoch + 1  # 1-based, as printed
    line = (f"epoch {epoch}/{cfg.epochs} ({cfg.train_image_size(state.epoch)} px): train "
            f"{rates['images_per_s']:.0f} img/s, data wait {rates['data_wait']:.0%}")
    is_best = False
    if (cfg.val_every and epoch % cfg.val_every == 0) or epoch == cfg.epochs:
        models = {"": train_step.model, **({"ema": train_step.ema.module} if train_step.ema else {})}
        metrics = evaluate(models, run.val_loader, run.precision, flip=cfg.val_flip, channels_last=cfg.channels_last)
        state.history.append({**metrics, "step": state.step, "epoch": epoch})
        top1 = max(metrics["top1"], metrics.get("ema_top1", -1.0))
        is_best = top1 > state.best_top1
        state.best_top1 = max(state.best_top1, top1)
        run.outputs.log({"step": state.step, "epoch": epoch, "images_seen": state.step * cfg.batch_size * run.procs.world,
                         "time_s": run.stops.elapsed_s(), **{f"val_{k}": v for k, v in metrics.items()}})
        line += (f"; val top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.3f}"
                 + (f"; EMA top-1 {metrics['ema_top1']:.2f}%" if train_step.ema else "") + f"  ({metrics['images']} images)")
    if run.procs.master:
        print(line)
    state.finish_epoch()
    return save_checkpoint(train_step, state, run.outputs, cfg, run.procs, run.shards.class_names, run.stops.run_s(),
                           is_best)


def save_checkpoint(train_step: TrainStep, state: TrainState, outputs: RunOutputs, cfg: TrainConfig,
                    procs: distributed.Processes, class_names, run_s: float, is_best: bool = False) -> int | None:
    """Saves last.pt (and best.pt) on rank 0, with `run_s` wall-clock seconds trained, unless a loss
    went NaN on any rank: then nothing is written (a NaN model never replaces a good checkpoint)
    and the bad step is returned."""
    bad_step = agreed_bad_step(train_step, procs)
    if bad_step is not None:
        return bad_step
    state.wall_s = run_s
    if procs.master:
        state.wandb_id = outputs.wandb_id
        outputs.save(contents(state, model=train_step.model, optimizer=train_step.optimizer, scaler=train_step.scaler,
                              ema=train_step.ema, config=to_dict(cfg), class_names=class_names), is_best)
    return None


def stop_on_bad_loss(bad_step: int, outputs: RunOutputs, procs: distributed.Processes) -> None:
    """Every rank ends here together, with the same one line and exit code 1."""
    outputs.close({"step": bad_step, "event": "stopped", "reason": f"loss NaN or inf at step {bad_step}"})
    distributed.teardown(procs)
    sys.exit(f"error: loss is NaN or inf at step {bad_step}; stopping with the last good checkpoint "
             f"({outputs.run_dir / run_folder.LAST}) untouched")


def main() -> None:
    run = setup(parse_args())
    state = run.state
    stop = None
    try:
        while state.epoch < run.cfg.epochs and stop is None:
            result = train_one_epoch(run.train_step, train_loader(run), state, run.schedule, run.stops, run.outputs,
                                     run.cfg, run.procs, run.shards.class_names)
            bad_step = result.bad_step
            if result.ended:
                bad_step = end_epoch(run, result.rates)
            if bad_step is not None:
                stop_on_bad_loss(bad_step, run.outputs, run.procs)
            stop = result.stop
    except DaliImagenetError as error:  # e.g. a sample that does not decode: the log says why the run ended
        run.outputs.close({"step": state.step, "event": "stopped", "reason": f"error: {error}"})
        raise
    if run.spot:
        run.spot.close()
    run_cost = cost(run.stops.run_s(), **run.cost_basis)
    run.outputs.finish(run.train_step.model, state.step, stop, run.procs, run.cfg.s3_flush_timeout_s, run_cost)
    distributed.teardown(run.procs)


if __name__ == "__main__":
    with one_line_errors():  # a user error is one line; any other exception is a bug and keeps its traceback
        main()
