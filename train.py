"""Train a ResNet on ImageNet webdataset shards, with JPEG decoding on the GPU through DALI.

    python train.py --dali --data SHARDS --config configs/imagenet1k.yaml --out runs/r50 [--s3 s3://b/p]
    torchrun --nproc_per_node 8 train.py --dali --data SHARDS ...      # DDP: NCCL on GPU, gloo on CPU

A run never loses more than `checkpoint_minutes` of work: checkpoints are atomic, SIGTERM/SIGINT
(a spot interruption, Ctrl-C) finish the step, checkpoint, flush uploads and exit 0, and
`--resume auto` continues exactly where the last checkpoint left off, locally or from S3.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from dali_imagenet import checkpoint as ckpt
from dali_imagenet import make_loader, s3
from dali_imagenet.config import ConfigError, load_config, to_dict
from dali_imagenet.metrics import RunLogger, evaluate, wandb_wanted
from dali_imagenet.mixing import MixConfig
from dali_imagenet.model import build_model
from dali_imagenet.s3sync import S3Sync
from dali_imagenet.schedule import lr_at, parameter_groups, scaled_lr
from dali_imagenet.shards import ShardError
from dali_imagenet.step import AMP_DTYPES, input_dtype, train_step


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="shard folder, s3://bucket/prefix, or timm-layout folder")
    parser.add_argument("--dali", action="store_true", help="DALI loader (GPU decoding); without it: the torchvision baseline")
    parser.add_argument("--config", help="YAML file overriding the TrainConfig defaults")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config field")
    parser.add_argument("--out", default=None, help="run folder (default: runs/<arch>-<time>)")
    parser.add_argument("--resume", default=None, help="'auto' (newest checkpoint in --out, else in --s3) or a path")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--s3", default=None, help="s3://bucket/prefix for checkpoints, weights and metrics")
    parser.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=None,
                        help="log to Weights & Biases (default: on when WANDB_API_KEY or WANDB_MODE is set)")
    return parser.parse_args()


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, checkpoints and exits."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    args = parse_args()
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as error:
        fail(str(error))

    # ---- processes and devices: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        if not torch.cuda.is_available():
            fail("--device cuda but no CUDA GPU is visible (use --device cpu)")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cudnn.deterministic = cfg.deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    if cfg.amp_dtype == "float16" and device.type != "cuda":
        fail("amp_dtype float16 needs a GPU; use bfloat16 or float32 on the CPU")
    amp_dtype = AMP_DTYPES[cfg.amp_dtype]
    batch_dtype = input_dtype(amp_dtype, device)
    torch.manual_seed(cfg.seed * 1009 + rank)

    if world > 1 and args.out is None:
        fail("--out is needed with torchrun: every rank must use the same run folder")
    run_dir = Path(args.out or f"runs/{cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}")
    if master:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.clean_temporaries(run_dir)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    stop = StopRequest()
    uploader = S3Sync(args.s3) if (args.s3 and master) else None

    # ---- data: the train loader is rebuilt each epoch, so each epoch depends only on (seed, epoch)
    backend = "dali" if args.dali else "torchvision"

    def train_loader(epoch: int):
        return make_loader(args.data, "train", cfg.batch_size, device=device, image_size=cfg.image_size,
                           rank=rank, world_size=world, seed=cfg.seed, epoch=epoch, dtype=batch_dtype,
                           backend=backend, num_threads=cfg.loader_threads, shuffle_buffer=cfg.shuffle_buffer)

    try:
        loader, loader_epoch = train_loader(0), 0  # also tells the epoch length and the classes
        val_loader = make_loader(args.data, "validation", cfg.batch_size, device=device,
                                 image_size=cfg.val_image_size, rank=rank, world_size=world, dtype=batch_dtype,
                                 backend=backend, num_threads=cfg.loader_threads)
    except (ShardError, ValueError) as error:
        fail(str(error))
    num_classes, steps_per_epoch = loader.num_classes, len(loader)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    global_batch = cfg.batch_size * world
    peak_lr = scaled_lr(cfg.lr, global_batch, cfg.lr_reference_batch)

    # ---- model and optimiser
    model = build_model(cfg.arch, num_classes, cfg.drop_path, cfg.zero_init_last_bn).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(parameter_groups(model, cfg.weight_decay), lr=peak_lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov, fused=device.type == "cuda")
    # fp16 needs loss scaling; the fused SGD checks for inf on the GPU, with no host sync.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp_dtype == "float16")
    mix = MixConfig(cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_switch_prob, cfg.label_smoothing)

    # ---- resume
    step, epoch, batch_in_epoch, best_top1, history, wandb_id = 0, 0, 0, -1.0, [], None
    if args.resume:
        found = None
        if args.resume == "auto":
            found = ckpt.newest_valid(run_dir)
            if found is None and args.s3 and local_rank == 0:  # one download per machine
                run_dir.mkdir(parents=True, exist_ok=True)
                s3.download(args.s3, ckpt.LAST, run_dir / ckpt.LAST)
            if world > 1:
                dist.barrier()
            found = found or ckpt.newest_valid(run_dir)
        else:
            try:
                found = (Path(args.resume), ckpt.load(args.resume))
            except Exception as error:
                fail(f"{args.resume}: cannot load checkpoint ({str(error).splitlines()[0]})")
        if found is not None:
            path, state = found
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
            best_top1, history, wandb_id = state["best_top1"], state["history"], state.get("wandb_id")
            if world == 1:
                ckpt.restore_rng_state(state["rng"])
            else:  # one saved state for all ranks would make their drop-path masks equal
                torch.manual_seed(cfg.seed * 1009 + rank + 7919 * step)
            if master:
                print(f"resumed from {path} at step {step} (epoch {epoch}, batch {batch_in_epoch})")
        elif master:
            print("no checkpoint to resume from; starting fresh")
        if world > 1:  # machines read their own disks: they must have found the same checkpoint
            steps = [None] * world
            dist.all_gather_object(steps, step)
            if len(set(steps)) > 1:
                fail(f"ranks found checkpoints of different steps {steps}; put the same last.pt in every "
                     f"machine's {run_dir} or resume from --s3 with empty run folders")

    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    if cfg.compile:
        train_model = torch.compile(train_model)
    logger = RunLogger(run_dir, {**to_dict(cfg), "loader": backend, "world_size": world, "data": str(args.data)},
                       wandb_wanted(args.wandb), cfg.wandb_project, wandb_id) if master else None
    if uploader:
        uploader.push(run_dir / "config.yaml")

    def stop_if_loss_went_bad() -> None:
        bad = int(first_bad_step.item())  # a host sync: only at log steps and before checkpoints
        if bad >= 0:
            if logger:
                logger.close()
            fail(f"loss is NaN or inf at step {bad}; stopping with the last good checkpoint "
                 f"({run_dir / ckpt.LAST}) untouched")

    def save_checkpoint(is_best: bool = False) -> None:
        if not master:
            return
        stop_if_loss_went_bad()  # never let a NaN model replace a good checkpoint
        state = {"model": ckpt.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                 "rng": ckpt.rng_state(), "config": to_dict(cfg), "arch": cfg.arch, "num_classes": num_classes,
                 "best_top1": best_top1, "history": history, "wandb_id": logger.wandb_id}
        ckpt.save_atomic(state, run_dir / ckpt.LAST)
        if is_best:
            ckpt.mark_best(run_dir)
        if uploader:
            uploader.push(run_dir / ckpt.LAST, replaced_by_rename=True)
            if is_best:
                uploader.push(run_dir / ckpt.BEST, replaced_by_rename=True)
            uploader.push(logger.path)

    def agree(flag: bool) -> bool:
        """True on every rank if it is true on any: all ranks must stop at the same step."""
        if world == 1:
            return flag
        value = torch.tensor([float(flag)], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    # ---- the loop
    loss_sum = torch.zeros((), device=device)
    first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)  # NaN/inf seen, checked at log time
    last_checkpoint = time.monotonic()
    stopping = None
    if master:
        print(f"{cfg.arch}, {num_classes} classes, {loader.num_samples} train images, {steps_per_epoch} steps/epoch "
              f"x {cfg.epochs} epochs, global batch {global_batch}, peak LR {peak_lr:g}, {backend} loader on "
              f"{device.type}, {world} process(es), run folder {run_dir}")
    while epoch < cfg.epochs and stopping is None:
        if loader_epoch != epoch:
            del loader  # free the previous epoch's DALI pipeline (and its GPU buffers) first
            loader, loader_epoch = train_loader(epoch), epoch
        batches = iter(loader)
        for _ in range(batch_in_epoch):  # resuming mid-epoch: replay the epoch's order up to where it stopped
            next(batches)
        progress = tqdm(total=steps_per_epoch, initial=batch_in_epoch, desc=f"epoch {epoch}", unit="step",
                        disable=None if master else True, leave=False)
        window_start, window_steps, window_images, window_wait = time.perf_counter(), 0, 0, 0.0
        epoch_start, epoch_images, epoch_wait = time.perf_counter(), 0, 0.0
        train_model.train()
        while True:
            wait_start = time.perf_counter()
            batch = next(batches, None)
            waited = time.perf_counter() - wait_start
            window_wait, epoch_wait = window_wait + waited, epoch_wait + waited
            if batch is None:
                break
            images, labels = batch
            lr = lr_at(step, peak_lr=peak_lr, total_steps=total_steps, warmup_steps=warmup_steps, min_lr=cfg.min_lr)
            # The mixing RNG depends only on (seed, step): resumable without saving its state.
            generator = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + step * 101 + rank)
            loss = train_step(train_model, images, labels, optimizer, scaler, lr=lr, num_classes=num_classes,
                              mix=mix, generator=generator, amp_dtype=amp_dtype)
            loss_sum += loss
            first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss), step, first_bad_step)
            step, batch_in_epoch = step + 1, batch_in_epoch + 1
            window_steps, window_images = window_steps + 1, window_images + images.shape[0]
            epoch_images += images.shape[0]
            progress.update(1)

            at_log = step % cfg.log_every == 0 or batch_in_epoch == steps_per_epoch
            if at_log:  # the only host sync of the step loop
                stop_if_loss_went_bad()
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "epoch": epoch, "lr": lr, "loss": loss_sum.item() / window_steps,
                          "images_per_s": window_images * world / elapsed, "data_wait": window_wait / elapsed}
                if device.type == "cuda":
                    record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                if logger:
                    logger.log(record)
                progress.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['images_per_s']:.0f}",
                                     wait=f"{record['data_wait']:.0%}")
                loss_sum.zero_()
                window_start, window_steps, window_images, window_wait = time.perf_counter(), 0, 0, 0.0
            if world == 1 or at_log:
                if agree(stop.signal is not None):
                    stopping = stop.signal or "signal"
            if cfg.max_steps and step >= cfg.max_steps:
                stopping = f"max_steps={cfg.max_steps}"
            if stopping:
                break
            if master and time.monotonic() - last_checkpoint > cfg.checkpoint_minutes * 60:
                save_checkpoint()
                last_checkpoint = time.monotonic()
        progress.close()
        epoch_seconds = time.perf_counter() - epoch_start
        throughput = (f"train {epoch_images * world / epoch_seconds:.0f} img/s, "
                      f"data wait {epoch_wait / epoch_seconds:.0%}")

        if batch_in_epoch == steps_per_epoch:  # the epoch is complete
            epoch, batch_in_epoch = epoch + 1, 0
            is_best = False
            if (cfg.val_every and epoch % cfg.val_every == 0) or epoch == cfg.epochs:
                metrics = evaluate(train_model, val_loader, device, amp_dtype, cfg.channels_last)
                metrics.update(step=step, epoch=epoch)
                history.append(metrics)
                is_best = metrics["top1"] > best_top1
                best_top1 = max(best_top1, metrics["top1"])
                if logger:
                    logger.log({f"val_{k}" if k not in ("step", "epoch") else k: v for k, v in metrics.items()})
                if master:
                    print(f"epoch {epoch}: {throughput}; val top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%"
                          f"  loss {metrics['loss']:.3f}  ({metrics['images']} images)")
            elif master:
                print(f"epoch {epoch}: {throughput}")
            save_checkpoint(is_best)
            last_checkpoint = time.monotonic()
        elif stopping:
            save_checkpoint()

    # ---- the end: replicas must agree, weights and logs must reach S3
    checksum = hashlib.sha256(b"".join(p.detach().float().cpu().numpy().tobytes()
                                       for p in ckpt.unwrap(model).parameters())).hexdigest()[:16]
    checksums = [checksum]
    if world > 1:
        checksums = [None] * world
        dist.all_gather_object(checksums, checksum)
    if master:
        if stopping is None:
            ckpt.save_atomic(ckpt.unwrap(model).state_dict(), run_dir / "final_weights.pt")
        logger.log({"step": step, "event": "stopped" if stopping else "finished", "reason": stopping,
                    "replica_checksums": checksums, "replicas_identical": len(set(checksums)) == 1})
        logger.close()
        print(f"{'stopped (' + stopping + ')' if stopping else 'finished'} at step {step}; "
              f"checkpoint {run_dir / ckpt.LAST}")
        if uploader:
            if stopping is None:
                uploader.push(run_dir / "final_weights.pt", replaced_by_rename=True)
            uploader.push(logger.path)
            pending = uploader.close(cfg.s3_flush_timeout_s)
            if pending:
                print(f"warning: {len(pending)} upload(s) to {args.s3} still pending at exit: {', '.join(pending)}",
                      file=sys.stderr)
            else:
                print(f"uploaded to {args.s3}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
