"""Train a ResNet on ImageNet webdataset shards, with JPEG decoding on the GPU through DALI.

    python train.py --dali --data SHARDS --config configs/imagenet1k.yaml --out runs/r50 [--s3 s3://b/p]
    torchrun --nproc_per_node 8 train.py --dali --data SHARDS ...      # DDP: NCCL on GPU, gloo on CPU

The story: `setup` (config, processes, data, model, resume), then per epoch `train_one_epoch` and
`end_epoch` (validation, checkpoint), then the run's outputs are finished. A run never loses more
than `checkpoint_minutes` of work: checkpoints are atomic, SIGTERM/SIGINT finish the step,
checkpoint and exit 0, and `--resume auto` continues exactly where the last checkpoint left off,
locally or from S3, without decoding the epoch's earlier batches again.
"""
from __future__ import annotations

import argparse
import sys
import time
from types import SimpleNamespace

import torch
from tqdm import tqdm

from dali_imagenet import checkpoint as ckpt
from dali_imagenet import distributed, make_loader, runs, seeding
from dali_imagenet.config import ConfigError, load_config, to_dict
from dali_imagenet.ema import WeightEMA
from dali_imagenet.evaluation import evaluate
from dali_imagenet.loader import batches_per_epoch
from dali_imagenet.metrics import ThroughputMeter, wandb_wanted
from dali_imagenet.mixing import MixConfig
from dali_imagenet.model import build_model
from dali_imagenet.precision import Precision
from dali_imagenet.schedule import lr_at, parameter_groups, scaled_lr
from dali_imagenet.shards import ShardError, find_shards
from dali_imagenet.step import GraphedTrainStep, TrainStep


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
    return parser.parse_args()


def setup(args) -> SimpleNamespace:
    """Everything the loop needs; nothing is written until every check has passed."""
    cfg = load_config(args.config, args.set)
    procs = distributed.setup(args.device, cfg.deterministic)
    precision = Precision.for_device(cfg.amp_dtype, procs.device)
    torch.manual_seed(seeding.derive_seed(cfg.seed, "torch", procs.rank))
    shards, val_shards = find_shards(args.data, "train"), find_shards(args.data, "validation")
    run_dir = runs.run_folder(args.out, cfg.arch, resume=args.resume, overwrite=args.overwrite, world=procs.world)
    model = build_model(cfg.arch, shards.num_classes, cfg.drop_path, cfg.zero_init_last_bn, cfg.blurpool).to(
        procs.device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    peak_lr = scaled_lr(cfg.lr, cfg.batch_size * procs.world, cfg.lr_reference_batch)
    optimizer = torch.optim.SGD(parameter_groups(model, cfg.weight_decay), lr=peak_lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov, fused=procs.device.type == "cuda")
    scaler, ema = precision.scaler(), WeightEMA(model, cfg.ema_decay, cfg.ema_warmup_power) if cfg.ema_decay else None
    state = runs.resume(args.resume, run_dir, args.s3, procs, model=model, optimizer=optimizer, scaler=scaler,
                        ema=ema, seed=cfg.seed)
    loader_options = dict(batch_size=cfg.batch_size, device=procs.device, rank=procs.rank, world_size=procs.world,
                          dtype=precision.loader_dtype, backend="dali" if args.dali else "torchvision",
                          num_threads=cfg.loader_threads)
    val_loader = make_loader(val_shards, "validation", image_size=cfg.val_image_size,
                             crop_fraction=cfg.val_crop_fraction, **loader_options)
    train_model = model if procs.world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[procs.local_rank] if procs.device.type == "cuda" else None, gradient_as_bucket_view=True)
    if cfg.compile:
        train_model = torch.compile(train_model, dynamic=False)  # one graph per image size of the ramp
    step = (GraphedTrainStep if cfg.cuda_graph else TrainStep)(
        model, train_model, optimizer, scaler, precision=precision, mix=MixConfig.from_config(cfg),
        num_classes=shards.num_classes, ema=ema, seed=cfg.seed, rank=procs.rank)
    out = runs.RunOutputs(run_dir, to_dict(cfg), procs, overwrite=args.overwrite, s3_url=args.s3,
                          wandb=wandb_wanted(args.wandb), wandb_id=state.wandb_id,
                          extra={"loader": loader_options["backend"], "world_size": procs.world, "data": args.data})
    steps_per_epoch = batches_per_epoch(shards.samples, procs.world, cfg.batch_size, train=True)
    if procs.master:
        print(f"{cfg.arch}, {shards.num_classes} classes, {shards.samples} train images, {steps_per_epoch} steps/"
              f"epoch x {cfg.epochs} epochs, global batch {cfg.batch_size * procs.world}, peak LR {peak_lr:g}, "
              f"{loader_options['backend']} loader on {procs.device.type}, {procs.world} process(es), run folder {run_dir}")
    return SimpleNamespace(
        cfg=cfg, procs=procs, precision=precision, shards=shards, model=model, ema=ema, state=state, out=out,
        optimizer=optimizer, scaler=scaler, peak_lr=peak_lr, steps_per_epoch=steps_per_epoch, val_loader=val_loader,
        loader_options=loader_options, step=step, stop=runs.StopRequest(procs.master), started=time.monotonic())


def train_one_epoch(r) -> str | None:
    """Trains the rest of epoch `r.state.epoch`; returns why it stopped early, or None."""
    cfg, state, procs = r.cfg, r.state, r.procs
    loader = make_loader(r.shards, "train", seed=cfg.seed, epoch=state.epoch, image_size=cfg.train_image_size(
        state.epoch), shuffle_buffer=cfg.shuffle_buffer, crop_min_area=cfg.crop_min_area,
        resume=state.loader and state.loader[procs.rank],
        **r.loader_options)
    total_steps, warmup_steps = cfg.epochs * r.steps_per_epoch, round(cfg.warmup_epochs * r.steps_per_epoch)
    progress = tqdm(total=r.steps_per_epoch, initial=state.batch_in_epoch, unit="step", leave=False,
                    desc=f"epoch {state.epoch + 1}/{cfg.epochs}", disable=None if procs.master else True)
    r.meter, last_checkpoint, loss_sum, window, stopping, due = ThroughputMeter(procs.world), time.monotonic(), 0, 0, None, False
    r.step.train_model.train()
    for images, labels in r.meter.batches(loader):
        lr = lr_at(state.step, peak_lr=r.peak_lr, total_steps=total_steps, warmup_steps=warmup_steps,
                   min_lr=cfg.min_lr, shape=cfg.lr_schedule)
        loss_sum, window = loss_sum + r.step(images, labels, step=state.step, lr=lr), window + 1
        state.step, state.batch_in_epoch = state.step + 1, state.batch_in_epoch + 1
        progress.update(1)
        at_log = state.step % cfg.log_every == 0 or state.batch_in_epoch == r.steps_per_epoch
        if at_log:  # the only host sync of the step loop
            record = {"step": state.step, "epoch": state.epoch, "lr": lr, "image_size": images.shape[-1],
                      "loss": check_loss(r, loss_sum) / window, **r.meter.take_window()}
            if procs.device.type == "cuda":
                record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(procs.device) / 2**30
            r.out.log(record)
            progress.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['images_per_s']:.0f}",
                                 wait=f"{record['data_wait']:.0%}")
            loss_sum, window = 0, 0
        if procs.world == 1 or at_log:  # ranks must agree: they stop and checkpoint at the same step
            signalled, due, late = distributed.any_rank([
                r.stop.signal is not None, time.monotonic() - last_checkpoint > cfg.checkpoint_minutes * 60,
                0 < cfg.max_minutes * 60 < time.monotonic() - r.started], procs)
            stopping = (r.stop.signal or "signal on another rank") if signalled else (
                f"max_minutes={cfg.max_minutes:g}" if late else None)
        if cfg.max_steps and state.step >= cfg.max_steps:
            stopping = f"max_steps={cfg.max_steps}"
        if (stopping or due) and state.batch_in_epoch < r.steps_per_epoch:  # an epoch's end checkpoints anyway
            # Every rank's reader state: a resume starts each where it stopped, decoding nothing twice.
            state.loader = distributed.gather(loader.state_dict(), procs)
            save_checkpoint(r)
            last_checkpoint, due = time.monotonic(), False
        if stopping:
            break
    progress.close()
    if state.batch_in_epoch == r.steps_per_epoch:
        state.epoch, state.batch_in_epoch, state.loader = state.epoch + 1, 0, None
    return stopping


def check_loss(r, loss_sum) -> float:
    """Reads the window's loss (a host sync); stops the run if any step's loss was NaN or inf."""
    bad = r.step.bad_step()
    if bad is not None:
        r.out.close()
        sys.exit(f"error: loss is NaN or inf at step {bad}; stopping with the last good checkpoint "
                 f"({r.out.run_dir / ckpt.LAST}) untouched")
    return float(loss_sum)


def end_epoch(r) -> None:
    """Validates the raw (and EMA) weights when due, prints the epoch's numbers, checkpoints."""
    cfg, state, rates = r.cfg, r.state, r.meter.epoch()
    line = (f"epoch {state.epoch}/{cfg.epochs} ({cfg.train_image_size(state.epoch - 1)} px): train "
            f"{rates['images_per_s']:.0f} img/s, data wait {rates['data_wait']:.0%}")
    is_best = False
    if (cfg.val_every and state.epoch % cfg.val_every == 0) or state.epoch == cfg.epochs:
        models = {"": r.model, **({"ema": r.ema.module} if r.ema else {})}
        metrics = evaluate(models, r.val_loader, r.precision, flip=cfg.val_flip, channels_last=cfg.channels_last)
        state.history.append({**metrics, "step": state.step, "epoch": state.epoch})
        top1 = max(metrics["top1"], metrics.get("ema_top1", -1.0))
        is_best, state.best_top1 = top1 > state.best_top1, max(state.best_top1, top1)
        r.out.log({"step": state.step, "epoch": state.epoch, "images_seen": state.step * cfg.batch_size * r.procs.world,
                   "time_s": time.monotonic() - r.started, **{f"val_{k}": v for k, v in metrics.items()}})
        line += (f"; val top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.3f}"
                 + (f"; EMA top-1 {metrics['ema_top1']:.2f}%" if r.ema else "") + f"  ({metrics['images']} images)")
    if r.procs.master:
        print(line)
    save_checkpoint(r, is_best)


def save_checkpoint(r, is_best: bool = False) -> None:
    if r.procs.master:
        check_loss(r, 0)  # never let a NaN model replace a good checkpoint
        r.state.wandb_id = r.out.wandb_id
        r.out.save(ckpt.contents(r.state, model=r.model, optimizer=r.optimizer, scaler=r.scaler, ema=r.ema,
                                 config=to_dict(r.cfg), class_names=r.shards.class_names), is_best)


def main() -> None:
    try:
        r = setup(parse_args())
    except (ConfigError, ShardError, ckpt.CheckpointError, runs.RunError, distributed.DeviceError, ValueError) as error:
        sys.exit(f"error: {error}")
    stopping = None
    while r.state.epoch < r.cfg.epochs and stopping is None:
        stopping = train_one_epoch(r)
        if r.state.batch_in_epoch == 0:  # the epoch is complete
            end_epoch(r)
    r.out.finish(r.model, r.state.step, stopping, r.procs, r.cfg.s3_flush_timeout_s)
    distributed.teardown(r.procs)


if __name__ == "__main__":
    main()
