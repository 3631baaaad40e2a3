"""Train a ResNet on ImageNet webdataset shards, with JPEG decoding on the GPU through DALI.

    python train.py --dali --data SHARDS --config configs/imagenet1k.yaml --out runs/r50 [--s3 s3://b/p]
    torchrun --nproc_per_node 8 train.py --dali --data SHARDS ...      # DDP: NCCL on GPU, gloo on CPU

The story: `setup` (config, processes, data, model, resume), then per epoch `train_one_epoch`,
`validate` and a checkpoint, then `finish`. A run never loses more than `checkpoint_minutes` of
work: checkpoints are atomic, SIGTERM/SIGINT finish the step, checkpoint and exit 0, and
`--resume auto` continues exactly where the last checkpoint left off, locally or from S3.
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
from dali_imagenet.step import train_step


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="shard folder, s3://bucket/prefix, or timm-layout folder")
    parser.add_argument("--dali", action="store_true", help="DALI loader (GPU decoding); without it: the torchvision baseline")
    parser.add_argument("--config", help="YAML file overriding the TrainConfig defaults")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config field")
    parser.add_argument("--out", default=None, help="run folder (default: runs/<arch>-<time>)")
    parser.add_argument("--resume", default=None, help="'auto' (newest checkpoint in --out, else in --s3) or a path")
    parser.add_argument("--overwrite", action="store_true", help="replace the run that --out holds")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--s3", default=None, help="s3://bucket/prefix for checkpoints, weights and metrics")
    parser.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=None,
                        help="log to Weights & Biases (default: on when WANDB_API_KEY or WANDB_MODE is set)")
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
    r = SimpleNamespace(cfg=cfg, procs=procs, precision=precision, shards=shards, model=model, peak_lr=peak_lr,
                        optimizer=torch.optim.SGD(parameter_groups(model, cfg.weight_decay), lr=peak_lr, momentum=
                                                  cfg.momentum, nesterov=cfg.nesterov, fused=procs.device.type == "cuda"),
                        scaler=precision.scaler(), mix=MixConfig.from_config(cfg), stop=runs.StopRequest(procs.master),
                        ema=WeightEMA(model, cfg.ema_decay, cfg.ema_warmup_power) if cfg.ema_decay else None,
                        steps_per_epoch=batches_per_epoch(shards.samples, procs.world, cfg.batch_size, train=True),
                        first_bad_step=torch.full((), -1, dtype=torch.int64, device=procs.device))
    r.state = runs.resume(args.resume, run_dir, args.s3, procs, model=model, optimizer=r.optimizer, scaler=r.scaler,
                          ema=r.ema, seed=cfg.seed)
    r.loader_options = dict(batch_size=cfg.batch_size, device=procs.device, rank=procs.rank, world_size=procs.world,
                            dtype=precision.loader_dtype, backend="dali" if args.dali else "torchvision",
                            num_threads=cfg.loader_threads)
    r.val_loader = make_loader(val_shards, "validation", image_size=cfg.val_image_size,
                               crop_fraction=cfg.val_crop_fraction, **r.loader_options)
    r.train_model = model
    if procs.world > 1:
        r.train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[procs.local_rank] if procs.device.type == "cuda" else None, gradient_as_bucket_view=True)
    if cfg.compile:
        r.train_model = torch.compile(r.train_model, dynamic=False)  # one graph per image size of the ramp
    r.out = runs.RunOutputs(run_dir, to_dict(cfg), procs, overwrite=args.overwrite, s3_url=args.s3,
                            wandb=wandb_wanted(args.wandb), wandb_id=r.state.wandb_id,
                            extra={"loader": r.loader_options["backend"], "world_size": procs.world, "data": args.data})
    return r


def train_one_epoch(r) -> str | None:
    """Trains the rest of epoch `r.state.epoch`; returns why it stopped early, or None."""
    cfg, state, procs = r.cfg, r.state, r.procs
    loader = make_loader(r.shards, "train", seed=cfg.seed, epoch=state.epoch, image_size=cfg.train_image_size(
        state.epoch), shuffle_buffer=cfg.shuffle_buffer, resume=state.loader and state.loader[procs.rank],
        **r.loader_options)
    total_steps, warmup_steps = cfg.epochs * r.steps_per_epoch, round(cfg.warmup_epochs * r.steps_per_epoch)
    progress = tqdm(total=r.steps_per_epoch, initial=state.batch_in_epoch, unit="step", leave=False,
                    desc=f"epoch {state.epoch + 1}/{cfg.epochs}", disable=None if procs.master else True)
    r.meter, last_checkpoint, loss_sum, window_steps, stopping, due = ThroughputMeter(procs.world), time.monotonic(), 0, 0, None, False
    r.train_model.train()
    for images, labels in r.meter.batches(loader):
        lr = lr_at(state.step, peak_lr=r.peak_lr, total_steps=total_steps, warmup_steps=warmup_steps,
                   min_lr=cfg.min_lr, shape=cfg.lr_schedule)
        # The mixing RNG depends only on (seed, step, rank): resumable without saving its state.
        generator = torch.Generator(procs.device).manual_seed(seeding.derive_seed(cfg.seed, "mixing", state.step, procs.rank))
        loss = train_step(r.train_model, images, labels, r.optimizer, r.scaler, lr=lr, num_classes=r.shards.num_classes,
                          mix=r.mix, generator=generator, precision=r.precision)
        if r.ema is not None:
            r.ema.update(r.model, state.step)
        r.first_bad_step = torch.where((r.first_bad_step < 0) & ~torch.isfinite(loss), state.step, r.first_bad_step)
        loss_sum, window_steps = loss_sum + loss, window_steps + 1
        state.step, state.batch_in_epoch = state.step + 1, state.batch_in_epoch + 1
        progress.update(1)
        at_log = state.step % cfg.log_every == 0 or state.batch_in_epoch == r.steps_per_epoch
        if at_log:  # the only host sync of the step loop
            record = {"step": state.step, "epoch": state.epoch, "lr": lr, "image_size": images.shape[-1],
                      "loss": check_loss(r, loss_sum) / window_steps, **r.meter.take_window()}
            if procs.device.type == "cuda":
                record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(procs.device) / 2**30
            r.out.log(record)
            progress.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['images_per_s']:.0f}",
                                 wait=f"{record['data_wait']:.0%}")
            loss_sum, window_steps = 0, 0
        if procs.world == 1 or at_log:  # ranks must agree: they stop and checkpoint at the same step
            signalled, due = distributed.any_rank(
                [r.stop.signal is not None, time.monotonic() - last_checkpoint > cfg.checkpoint_minutes * 60], procs)
            stopping = (r.stop.signal or "signal on another rank") if signalled else None
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
    bad = int(r.first_bad_step.item())
    if bad >= 0:
        r.out.close()
        sys.exit(f"error: loss is NaN or inf at step {bad}; stopping with the last good checkpoint "
                 f"({r.out.run_dir / ckpt.LAST}) untouched")
    return float(loss_sum)


def validate(r) -> bool:
    """Validates the raw (and EMA) weights after an epoch; True if this is the best so far."""
    models = {"": r.model, **({"ema": r.ema.module} if r.ema else {})}
    metrics = evaluate(models, r.val_loader, r.precision, flip=r.cfg.val_flip, channels_last=r.cfg.channels_last)
    metrics.update(step=r.state.step, epoch=r.state.epoch)
    r.state.history.append(metrics)
    top1 = max(metrics["top1"], metrics.get("ema_top1", -1.0))
    is_best, r.state.best_top1 = top1 > r.state.best_top1, max(r.state.best_top1, top1)
    r.out.log({k if k in ("step", "epoch") else f"val_{k}": v for k, v in metrics.items()})
    if r.procs.master:
        ema = f"; EMA top-1 {metrics['ema_top1']:.2f}%" if r.ema else ""
        print(f"epoch {r.state.epoch}/{r.cfg.epochs}: val top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  "
              f"loss {metrics['loss']:.3f}{ema}  ({metrics['images']} images)")
    return is_best


def save_checkpoint(r, is_best: bool = False) -> None:
    if r.procs.master:
        check_loss(r, 0)  # never let a NaN model replace a good checkpoint
        r.state.wandb_id = r.out.wandb_id
        r.out.save(ckpt.contents(r.state, model=r.model, optimizer=r.optimizer, scaler=r.scaler, ema=r.ema,
                                 config=to_dict(r.cfg), class_names=r.shards.class_names), is_best)


def finish(r, stopping: str | None) -> None:
    """Replicas must agree; the weights, logs and uploads must reach the run folder and S3."""
    checksums = distributed.gather(distributed.replica_checksum(r.model), r.procs)
    r.out.finish(r.model.state_dict() if stopping is None else None, {
        "step": r.state.step, "event": "stopped" if stopping else "finished", "reason": stopping,
        "replica_checksums": checksums, "replicas_identical": len(set(checksums)) == 1}, r.cfg.s3_flush_timeout_s)
    if r.procs.master:
        print(f"{'stopped (' + stopping + ')' if stopping else 'finished'} at step {r.state.step}; "
              f"checkpoint {r.out.run_dir / ckpt.LAST}")
    distributed.teardown(r.procs)


def main() -> None:
    try:
        r = setup(parse_args())
    except (ConfigError, ShardError, ckpt.CheckpointError, runs.RunError, distributed.DeviceError, ValueError) as error:
        sys.exit(f"error: {error}")
    cfg, state = r.cfg, r.state
    if r.procs.master:
        print(f"{cfg.arch}, {r.shards.num_classes} classes, {r.shards.samples} train images, {r.steps_per_epoch} "
              f"steps/epoch x {cfg.epochs} epochs, global batch {cfg.batch_size * r.procs.world}, peak LR "
              f"{r.peak_lr:g}, {r.loader_options['backend']} loader on {r.procs.device.type}, {r.procs.world} "
              f"process(es), run folder {r.out.run_dir}")
    stopping = None
    while state.epoch < cfg.epochs and stopping is None:
        stopping = train_one_epoch(r)
        if state.batch_in_epoch == 0:  # the epoch is complete
            if r.procs.master:
                rates = r.meter.epoch()
                print(f"epoch {state.epoch}/{cfg.epochs} ({cfg.train_image_size(state.epoch - 1)} px): train "
                      f"{rates['images_per_s']:.0f} img/s, data wait {rates['data_wait']:.0%}")
            validating = (cfg.val_every and state.epoch % cfg.val_every == 0) or state.epoch == cfg.epochs
            save_checkpoint(r, validate(r) if validating else False)
    finish(r, stopping)


if __name__ == "__main__":
    main()
