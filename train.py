"""Train a ResNet on ImageNet webdataset shards, with JPEG decoding on the GPU through DALI.

    python train.py --dali --data SHARDS --config configs/imagenet1k.yaml --out runs/r50 [--s3 s3://b/p]
    torchrun --nproc_per_node 8 train.py --dali --data SHARDS ...      # DDP: NCCL on GPU, gloo on CPU

The story: `setup` builds everything and checks every input before anything is written; then,
epoch by epoch, `train_one_epoch` trains (checkpointing mid-epoch when due) and `end_epoch`
checkpoints, then validates. Every way out goes through `Leaving`: the closing record, the report
and the uploads, waited for, then an exit code that says how the run ended (`exits`: 0 complete,
75 stopped for a reclaim: relaunch). A run never loses more than `checkpoint_minutes` of work:
checkpoints are atomic; EC2's spot notice and SIGTERM are acted on at the next step or batch
(validation, a replay and start-up included), with a checkpoint in S3; `--resume auto` continues
exactly where the newest checkpoint, local or in S3, left off, decoding no batch twice.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import torch
from tqdm import tqdm

from dali_imagenet import distributed, make_loader, s3
from dali_imagenet.config import TrainConfig, load_config, to_dict
from dali_imagenet.data import decoder, staging
from dali_imagenet.data.loader import Loader
from dali_imagenet.data.partition import batches_per_epoch
from dali_imagenet.data.shards import SplitShards, find_shards, sample_locations
from dali_imagenet.errors import DaliImagenetError, Interrupted, debug
from dali_imagenet.report.html_report import write_report
from dali_imagenet.report.wandb_media import wandb_media
from dali_imagenet.run import exits, resume, run_folder, spot
from dali_imagenet.run.checkpoint import TrainState, contents
from dali_imagenet.run.interrupts import StopCheck, StopRequest
from dali_imagenet.run.lease import Lease
from dali_imagenet.run.metrics import ThroughputMeter, cost, data_cost, describe_cost, wandb_wanted
from dali_imagenet.run.outputs import RunOutputs
from dali_imagenet.run.spot import SpotWatcher
from dali_imagenet.seeding import derive_seed
from dali_imagenet.training import predictions, recipe
from dali_imagenet.training.evaluation import evaluate, evaluate_with_top5
from dali_imagenet.training.initial import Initialised, initialise
from dali_imagenet.training.precision import Precision
from dali_imagenet.training.schedule import LRSchedule
from dali_imagenet.training.step import TrainStep


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=exits.TABLE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--data", required=True, help="shard folder, s3://bucket/prefix (staged to a local disk first), or "
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
    add("--init", metavar="SOURCE", help="a new run starting from these weights: a checkpoint, a run folder, a state "
        "dict, or 'timm' (a timm: arch's pretrained weights); other classes get a new classifier")
    add("--overwrite", action="store_true", help="replace the run that --out holds")
    add("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    add("--s3", help="s3://bucket/prefix for checkpoints, weights and metrics")
    add("--wandb", action=argparse.BooleanOptionalAction, help="log to Weights & Biases (default: on when "
        "WANDB_API_KEY or WANDB_MODE is set)")
    add("--spot", choices=["auto", "on", "off"], default="auto", help="watch EC2's spot interruption notice "
        "(auto: when the instance metadata service answers at start)")
    add("--price-per-hour", type=float, help="US$ per machine-hour, for the run's cost (default: the config's)")
    return parser.parse_args()


class LossDiverged(DaliImagenetError):
    """A NaN or inf loss, agreed on by every rank (each raises it at the same step)."""

    def __init__(self, step: int, last: str):
        super().__init__(f"loss is NaN or inf at step {step}; stopping with the last good checkpoint ({last}) untouched")
        self.step = step


@dataclass
class Run:
    """What `setup` builds once. Only `state` changes as the run goes on (its step counters,
    loader position, best top-1 and history); every other field is fixed for the whole run."""
    cfg: TrainConfig
    procs: distributed.Processes
    precision: Precision
    shards: SplitShards  # the train split
    val_shards: SplitShards
    train_step: TrainStep  # holds the model, its DDP/compiled wrapper, optimizer, scaler and EMA
    val_loader: Loader
    loader_options: dict  # what every epoch's train loader shares with the val loader
    schedule: LRSchedule
    stops: StopCheck
    outputs: RunOutputs
    state: TrainState
    spot: SpotWatcher | None  # EC2's interruption notice, polled on every machine of the run
    cost_basis: dict  # what `metrics.cost` needs besides the hours
    data_basis: dict  # what `metrics.data_cost` needs besides the S3 usage
    streamed: bool  # DALI reads s3:// itself, every epoch (--stream): its GETs are estimated
    initialised: Initialised | None  # where a fresh run's weights came from (--init); None: random, or resumed


@dataclass(frozen=True)
class EpochResult:
    """What `train_one_epoch` saw: the loop decides from it, not from side effects on the state."""
    ended: bool  # the epoch's last batch was trained
    stop: str | None  # why the run stops early (a signal, max_steps, max_minutes), or None
    rates: dict  # images_per_s, data_wait over the epoch's steps; first_step_s (a compile, a graph
    # capture or cuDNN's autotuning at a new size: what the first step cost), warm_images_per_s (the
    # steps after it), peak_gpu_mem_gb and peak_gpu_reserved_gb (this epoch's, on a GPU)


class Leaving:
    """Every way out of the process, taken once, from the main thread or from the thread that
    hears of another rank's error: rank 0 writes the closing record and the report and waits for
    the uploads (`s3_flush_timeout_s`); each rank prints its line; the exit code is returned (and
    written for the cloud task's `run:`, `exits.record`). Filled in as `setup` builds the run."""

    def __init__(self, request: StopRequest):
        self.request = request
        self.lock = threading.Lock()
        self.outputs: RunOutputs | None = None
        self.state: TrainState | None = None
        self.watcher: SpotWatcher | None = None
        self.peers: distributed.PeerErrors | None = None
        self.lease: Lease | None = None  # the run's hold on its S3 prefix, released on the way out
        self.flush_timeout_s = TrainConfig.s3_flush_timeout_s

    def end_outputs(self, record: dict, **kwargs) -> list[str]:
        """The outputs' last word (rank 0), one line for what did not reach S3 (the closing record's
        exit code then amended to the process's), and the other ranks told that it is done."""
        pending = self.outputs.end(record, flush_timeout_s=self.flush_timeout_s, give_up=lambda: self.request.hurry,
                                   **kwargs) if self.outputs else []
        if pending:
            print(self.outputs.pending_line(pending), file=sys.stderr, flush=True)
            self.outputs.amend_closing_record({"exit_code": exits.with_uploads(record["exit_code"], pending),
                                               "not_uploaded": pending})
        elif self.outputs and self.outputs.uploader:
            print(f"uploaded to {self.outputs.s3_url}", flush=True)
        if self.peers is not None:
            self.peers.flushed()  # rank 0: the others may leave now (torchrun would end it as they exit)
        return pending

    def failed(self, error: BaseException) -> int:
        """An exception ended the run on this rank: a user error is one line, a bug keeps its
        traceback; the other ranks are told (unless all raised it together, like a NaN loss)."""
        self.lock.acquire()
        self.request.leaving()
        if isinstance(error, KeyboardInterrupt):  # a second Ctrl-C: leave now, waiting for nothing
            code, message, self.flush_timeout_s = exits.INTERRUPTED, "stopped at once by a second Ctrl-C", 0.0
        else:
            code = exits.ERROR
            message = str(error) if isinstance(error, DaliImagenetError) else f"{type(error).__name__}: {error}"
        tell_others = self.peers is not None and not isinstance(error, LossDiverged)
        if tell_others:
            self.peers.post(message)
        step = getattr(error, "step", self.state.step if self.state else 0)
        reason = (f"loss NaN or inf at step {step}" if isinstance(error, LossDiverged)
                  else message if code == exits.INTERRUPTED else f"error: {message}")
        self.end_outputs({"step": step, "event": "stopped", "reason": reason, "exit_code": code})
        if isinstance(error, (DaliImagenetError, KeyboardInterrupt)) and not debug():
            print(f"error: {message}", file=sys.stderr, flush=True)
        else:
            traceback.print_exception(error)
        if tell_others:
            self.peers.wait_for_others(self.flush_timeout_s + 15)
        elif self.peers is not None:  # all failed together (a NaN): rank 0 uploads first, then all leave
            self.peers.wait_for_flush(self.flush_timeout_s + 15)
        return code

    def peer_failed(self, line: str) -> None:
        """Another rank failed (the peer-error thread): stop this one too, with one line, now."""
        if not self.lock.acquire(blocking=False):
            return  # the main thread is already leaving
        self.request.leaving()
        self.end_outputs({"step": self.state.step if self.state else 0, "event": "stopped",
                          "reason": f"error on {line}", "exit_code": exits.ERROR})
        print(f"error: stopping: {line}", file=sys.stderr, flush=True)
        self.peers.acknowledge()
        self.peers.wait_for_flush(self.flush_timeout_s + 15)  # rank 0 uploads first: torchrun ends it once we exit
        self.release_lease()
        leave_now(exits.ERROR)

    def release_lease(self) -> None:
        if self.lease is not None:
            self.lease.release()

    def close(self) -> None:
        for part in (self.watcher, self.peers):
            if part is not None:
                part.close()
        self.release_lease()
        self.request.restore()


def leave_now(code: int) -> None:
    """Exits at once, threads and all (an upload stuck in its timeout, a peer's error)."""
    exits.record(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def setup(args, leaving: Leaving) -> Run:
    """Everything the loop needs; nothing is written until every check has passed. EC2's notice
    is watched from the start: one during the resume download or the pipeline build is acted on
    before training starts."""
    s3.usage.reset()  # this process's S3 requests, for the cost record (a resume adds the earlier ones)
    cfg = load_config(args.config, [*args.set, *([f"price_per_hour={args.price_per_hour}"] if args.price_per_hour
                                                   is not None else [])])
    leaving.flush_timeout_s = cfg.s3_flush_timeout_s
    procs = distributed.setup(args.device, cfg.deterministic)
    leaving.peers = distributed.PeerErrors(procs, leaving.peer_failed)
    imds, watching = spot.connect(args.spot)
    if procs.master:
        print(watching, flush=True)
    watcher = spot.SpotWatcher(imds, leaving.request.ask, log=lambda m: print(m, file=sys.stderr, flush=True),
                               interval_s=cfg.spot_poll_seconds) if imds else None
    leaving.watcher = watcher
    precision = Precision.for_device(cfg.amp_dtype, procs.device)
    torch.manual_seed(derive_seed(cfg.seed, "torch", procs.rank))
    run_dir = run_folder.choose(args.out, cfg.arch, resume=args.resume, overwrite=args.overwrite, world=procs.world)
    s3_held = resume.check_s3_prefix(args.s3, resume=args.resume, overwrite=args.overwrite,
                                     timeout_s=cfg.s3_resume_timeout_s) if procs.master else []
    if args.s3 and procs.master:  # before anything is written or staged: S3 takes our files, no other job writes there
        s3.probe_writes(args.s3, cfg.s3_resume_timeout_s)
        leaving.lease = Lease(args.s3, cfg.lease_seconds).acquire(cfg.s3_resume_timeout_s)
    data = local_data(args, procs, leaving.request)
    shards = find_shards(data, "train")
    val_shards = find_shards(data, "validation")
    if args.stream and s3.is_s3(args.data) and procs.master:
        print(staging.streaming_line(args.data, shards.samples + val_shards.samples, cfg.epochs,
                                     cfg.s3_get_price_per_1000), file=sys.stderr, flush=True)
    shards.require_labels("training")
    val_shards.require_labels("validation")
    training = recipe.build(cfg, shards.num_classes, procs, precision)
    point = resume.resume(args.resume, run_dir, args.s3, procs, model=training.model, optimizer=training.optimizer,
                          scaler=training.scaler, ema=training.ema, config=cfg, s3_timeout_s=cfg.s3_resume_timeout_s)
    state = leaving.state = point.state
    if procs.master:
        s3.usage.add(state.s3_usage)  # the run's requests before this process: its cost record covers them all
    initialised = None
    if args.init and point.path is None:  # a resumed run has its own weights: --init only starts one
        initialised = initialise(args.init, training.model, cfg.arch, shards.class_names)
        training.restart_ema(cfg)
        if procs.master:
            print(initialised.line(shards.num_classes), flush=True)
    stops = StopCheck(leaving.request, procs, checkpoint_minutes=cfg.checkpoint_minutes, max_minutes=cfg.max_minutes,
                      max_steps=cfg.max_steps, earlier_s=state.wall_s)
    stops.interrupt_if_asked()  # a notice during the resume download: leave before anything is written
    backend = "dali" if args.dali else "torchvision"
    loader_options = dict(batch_size=cfg.batch_size, device=procs.device, rank=procs.rank, world_size=procs.world,
                          dtype=precision.loader_dtype, backend=backend, num_threads=cfg.loader_threads,
                          hw_decoder_load=cfg.hw_decoder_load, normalization=cfg.normalization())
    val_loader = make_loader(val_shards, "validation", image_size=cfg.val_image_size,
                             crop_fraction=cfg.val_crop_fraction, **loader_options)
    train_step = training.step(cfg, procs, precision, shards.num_classes)
    steps_per_epoch = batches_per_epoch(shards.samples, procs.world, cfg.batch_size, train=True)
    schedule = LRSchedule(training.peak_lr, cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch),
                          cfg.min_lr, cfg.lr_schedule)
    instance = imds.instance() if imds else {}
    decoding = decoder.describe(backend, procs.device, cfg.hw_decoder_load) if procs.master else {}
    outputs = RunOutputs(run_dir, to_dict(cfg), procs, overwrite=args.overwrite, s3_url=args.s3, s3_held=s3_held,
                         wandb=wandb_wanted(args.wandb), wandb_id=state.wandb_id,
                         instance={**instance, **decoding}, write_report=write_report, report_media=wandb_media,
                         lease=leaving.lease,
                         extra={"loader": backend, "world_size": procs.world, "data": args.data,
                                **({"staged_to": data} if data != args.data else {}), "config_file": args.config,
                                "spot_watch": watching, **({"init": initialised.record()} if initialised else {})})
    leaving.outputs = outputs
    if watcher:
        watcher.log = outputs.note
    cost_basis = dict(gpus=procs.world if procs.device.type == "cuda" else 0, machines=distributed.machines(procs),
                      price_per_hour=cfg.price_per_hour, spot_price_per_hour=cfg.spot_price_per_hour,
                      lifecycle=instance.get("lifecycle"))
    data_basis = dict(instance_region=instance.get("region"), get_price_per_1000=cfg.s3_get_price_per_1000,
                      put_price_per_1000=cfg.s3_put_price_per_1000,
                      cross_region_price_per_gb=cfg.cross_region_price_per_gb)
    if point.path is not None:
        outputs.checkpoint_step = state.step
        if point.s3_behind and procs.master:
            outputs.catch_up(state.run_id, state.step)
        outputs.log({"event": "resumed", "step": state.step, "epoch": state.epoch, "from": str(point.path)})
    if procs.master:
        print(f"{cfg.arch}, {shards.num_classes} classes, {shards.samples} train images, {steps_per_epoch} steps/"
              f"epoch x {cfg.epochs} epochs, global batch {cfg.batch_size * procs.world}, peak LR {training.peak_lr:g}, "
              f"{backend} loader on {procs.device.type}, {procs.world} process(es), run folder {run_dir}")
        print(decoder.line(decoding))
    return Run(cfg, procs, precision, shards, val_shards, train_step, val_loader, loader_options, schedule, stops, outputs,
               state, watcher, cost_basis, data_basis, streamed=args.stream and s3.is_s3(args.data),
               initialised=initialised)


def local_data(args, procs: distributed.Processes, request: StopRequest) -> str:
    """What the loaders read: `--data` itself, unless it is on S3 and not `--stream`ed: then its
    local copy, staged first (by one process per machine; the others wait for it and find it
    complete). A spot notice while staging stops the run before anything is written."""
    if not s3.is_s3(args.data) or args.stream:
        return args.data
    folder = args.stage_dir or staging.default_folder(args.data)

    def stop_if_asked():
        if request.reason is not None:
            raise Interrupted(request.reason)

    say = (lambda line: print(line, flush=True)) if procs.local_master else (lambda line: None)
    staged = staging.stage(args.data, folder, ("train", "validation"), progress=procs.local_master,
                           interrupt=stop_if_asked, log=say)
    say(staged.line(args.data))
    return str(folder)


def train_loader(run: Run) -> Loader:
    """The loader of epoch `run.state.epoch`, at that epoch's image size, restored mid-epoch if the
    checkpoint stopped there (a replay, where one is needed, can be cut short by a stop request)."""
    cfg, state = run.cfg, run.state
    resume_at = state.loader[run.procs.rank] if state.loader else None
    return make_loader(run.shards, "train", seed=cfg.seed, epoch=state.epoch,
                       image_size=cfg.train_image_size(state.epoch), shuffle_buffer=cfg.shuffle_buffer,
                       crop_min_area=cfg.crop_min_area, resume=resume_at, interrupt=run.stops.interrupt_if_asked,
                       **run.loader_options)


def check_loss(train_step: TrainStep, procs: distributed.Processes, outputs: RunOutputs) -> None:
    """Raises LossDiverged at the first step (1-based, as metrics.jsonl counts) whose loss was NaN
    or inf on any rank, the same on every rank (a host sync): all then stop together instead of
    waiting for one that left."""
    bad = [step + 1 for step in distributed.gather(train_step.bad_step(), procs) if step is not None]
    if bad:
        raise LossDiverged(min(bad), str(outputs.run_dir / run_folder.LAST))


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
    on_gpu = procs.device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(procs.device)  # each image size's own peak
    warm = None  # (time, images) after the epoch's first step
    train_step.train_model.train()
    epoch_started = time.perf_counter()
    for images, labels in meter.batches(loader):
        lr = schedule.at(state.step)
        loss_sum = loss_sum + train_step(images, labels, step=state.step, lr=lr)
        window += 1
        state.step += 1
        state.batch_in_epoch += 1
        progress.update(1)
        if warm is None:
            if on_gpu:
                torch.cuda.synchronize(procs.device)  # once an epoch: what the first step (a compile) cost
            warm = (time.perf_counter(), images.shape[0] * procs.world)
            first_step_s = warm[0] - epoch_started
        at_log = state.step % cfg.log_every == 0 or state.batch_in_epoch >= steps_in_epoch
        if at_log:  # the only host syncs of the step loop
            check_loss(train_step, procs, outputs)
            record = {"step": state.step, "epoch": state.epoch, "lr": lr, "image_size": images.shape[-1],
                      "loss": float(loss_sum) / window, **meter.take_window()}
            if procs.device.type == "cuda":
                record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(procs.device) / 2**30
            outputs.log(record)
            progress.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['images_per_s']:.0f}",
                                 wait=f"{record['data_wait']:.0%}")
            loss_sum = 0.0
            window = 0
        stop, checkpoint_due = stops.after_step(state.step)
        if (stop or checkpoint_due) and state.batch_in_epoch < steps_in_epoch:  # an epoch's end checkpoints anyway
            # Every rank's reader state: a resume starts each where it stopped, decoding nothing twice.
            state.loader = distributed.gather(loader.state_dict(), procs)
            save_checkpoint(train_step, state, outputs, cfg, procs, class_names, stops.run_s())
            stops.checkpointed()
        if stop:
            break
    progress.close()
    rates = meter.epoch()
    if warm is not None:  # the epoch's last step was a log step: its sync is behind us
        warm_images = rates["images"] - warm[1]
        rates.update(first_step_s=first_step_s,
                     warm_images_per_s=warm_images / max(time.perf_counter() - warm[0], 1e-9) if warm_images else None,
                     peak_gpu_mem_gb=torch.cuda.max_memory_allocated(procs.device) / 2**30 if on_gpu else None,
                     peak_gpu_reserved_gb=torch.cuda.max_memory_reserved(procs.device) / 2**30 if on_gpu else None)
    return EpochResult(state.batch_in_epoch >= steps_in_epoch, stop, rates)


def end_epoch(run: Run, rates: dict) -> None:
    """Checkpoints the finished epoch, then validates it when due: a stop request during the
    validation loses nothing, and the resumed run validates that epoch first."""
    cfg, state = run.cfg, run.state
    epoch = state.epoch + 1  # 1-based, as printed
    line = (f"epoch {epoch}/{cfg.epochs} ({cfg.train_image_size(state.epoch)} px): train "
            f"{rates['images_per_s']:.0f} img/s, data wait {rates['data_wait']:.0%}")
    run.outputs.log({"step": state.step, "epoch": epoch, "image_size": cfg.train_image_size(state.epoch),
                     **{f"epoch_{k}" if k in ("images_per_s", "data_wait", "images") else k: v
                        for k, v in rates.items()}})
    state.finish_epoch(validate=cfg.validates_after(epoch))
    save_checkpoint(run.train_step, state, run.outputs, cfg, run.procs, run.shards.class_names, run.stops.run_s())
    run.stops.checkpointed()
    if state.validation_due:
        run.stops.interrupt_if_asked()
        validate(run, line)
    elif run.procs.master:
        print(line)


def validate(run: Run, line: str = "") -> None:
    """Validates the raw (and EMA) weights for epoch `state.validation_due`, records it in the
    history and checkpoints (best.pt too, if it is the best so far)."""
    cfg, state, train_step = run.cfg, run.state, run.train_step
    epoch = state.validation_due
    models = {"": train_step.model, **({"ema": train_step.ema.module} if train_step.ema else {})}
    final = epoch == cfg.epochs and run.loader_options["backend"] == "dali"  # DALI keeps the shards' order
    metrics, top5 = (evaluate_with_top5 if final else _without_top5)(
        models, run.val_loader, run.precision, flip=cfg.val_flip, channels_last=cfg.channels_last,
        interrupt=run.stops.interrupt_if_asked)
    if final and run.procs.master:  # every val sample's top-5, for the run's page
        best = "ema" if metrics.get("ema_top1", -1.0) > metrics["top1"] else ""
        run.outputs.save_predictions(predictions.from_top5(
            [key for _, key, _ in sample_locations(run.val_shards)], *top5[best], "ema" if best else "raw", epoch))
    state.history.append({**metrics, "step": state.step, "epoch": epoch})
    top1 = max(metrics["top1"], metrics.get("ema_top1", -1.0))
    is_best = top1 > state.best_top1
    state.best_top1 = max(state.best_top1, top1)
    state.validation_due = 0
    run.outputs.log({"step": state.step, "epoch": epoch, "images_seen": state.step * cfg.batch_size * run.procs.world,
                     "time_s": run.stops.elapsed_s(), "run_s": run.stops.run_s(),
                     **{f"val_{k}": v for k, v in metrics.items()}})
    if run.procs.master:
        print(f"{line or f'epoch {epoch}/{cfg.epochs}'}; val top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  "
              f"loss {metrics['loss']:.3f}" + (f"; EMA top-1 {metrics['ema_top1']:.2f}%" if train_step.ema else "")
              + f"  ({metrics['images']} images)")
    save_checkpoint(train_step, state, run.outputs, cfg, run.procs, run.shards.class_names, run.stops.run_s(), is_best)


def validate_start(run: Run) -> None:
    """The initial weights' score (--init), before any step: where a fine-tuning starts from."""
    cfg, train_step = run.cfg, run.train_step
    models = {"": train_step.model, **({"ema": train_step.ema.module} if train_step.ema else {})}
    metrics = evaluate(models, run.val_loader, run.precision, flip=cfg.val_flip, channels_last=cfg.channels_last,
                       interrupt=run.stops.interrupt_if_asked)
    run.outputs.log({"event": "init_validation", "step": 0, "epoch": 0, **{f"val_{k}": v for k, v in metrics.items()}})
    if run.procs.master:
        print(f"before training ({run.initialised.source}): val top-1 {metrics['top1']:.2f}%  top-5 "
              f"{metrics['top5']:.2f}%  loss {metrics['loss']:.3f}  ({metrics['images']} images)", flush=True)


def _without_top5(*args, **kwargs) -> tuple[dict, dict]:
    return evaluate(*args, **kwargs), {}


def save_checkpoint(train_step: TrainStep, state: TrainState, outputs: RunOutputs, cfg: TrainConfig,
                    procs: distributed.Processes, class_names, run_s: float, is_best: bool = False) -> None:
    """Saves last.pt (and best.pt) on rank 0, with `run_s` wall-clock seconds trained and every
    rank's S3 requests so far, unless a loss went NaN on any rank: then nothing is written (a NaN
    model never replaces a good checkpoint)."""
    check_loss(train_step, procs, outputs)
    state.wall_s = run_s
    state.s3_usage = s3.merged(distributed.gather(s3.usage.snapshot(), procs))
    if procs.master:
        state.wandb_id = outputs.wandb_id
        outputs.save(contents(state, model=train_step.model, optimizer=train_step.optimizer, scaler=train_step.scaler,
                              ema=train_step.ema, config=to_dict(cfg), class_names=class_names), is_best)


def train(run: Run) -> str | None:
    """Trains the epochs left; returns why the run stopped early, or None when every epoch ran.
    A stop request outside a train step raises `Interrupted` (nothing new to checkpoint there)."""
    state = run.state
    if run.initialised and state.step == 0:
        validate_start(run)
    if state.validation_due:  # a stop cut that validation short: the resumed run does it first
        validate(run)
    while state.epoch < run.cfg.epochs:
        run.stops.interrupt_if_asked()  # before the epoch's loader is built and its first step compiles
        result = train_one_epoch(run.train_step, train_loader(run), state, run.schedule, run.stops, run.outputs,
                                 run.cfg, run.procs, run.shards.class_names)
        if result.ended:
            end_epoch(run, result.rates)
        if result.stop:
            return result.stop
    return None


def finish(run: Run, stop: str | None, leaving: Leaving) -> int:
    """Every rank, together: the replicas' checksums; rank 0 writes the final weights (a finished
    run), the closing record and the report and waits for the uploads; every rank then exits
    with rank 0's code."""
    checksums = distributed.gather(distributed.replica_checksum(run.train_step.model), run.procs)
    code = exits.for_stop(stop)
    streamed_gets = staging.GETS_PER_SAMPLE * (run.state.step * run.cfg.batch_size * run.procs.world + sum(
        entry.get("images", 0) for entry in run.state.history)) if run.streamed else 0
    usage = s3.merged(distributed.gather(s3.usage.snapshot(), run.procs))
    run_cost = cost(run.stops.run_s(), **run.cost_basis,
                    data=data_cost(usage, streamed_gets=streamed_gets, **run.data_basis))
    notice = run.spot.timing() if run.spot and stop and stop.startswith(spot.NOTICE) else {}
    record = {"step": run.state.step, "event": "stopped" if stop else "finished", "reason": stop,
              "exit_code": code, "replica_checksums": checksums, "replicas_identical": len(set(checksums)) == 1,
              "cost": run_cost, **({"notice": notice} if notice else {})}
    if run.procs.master:
        print(f"{'stopped (' + stop + ')' if stop else 'finished'} at step {run.state.step} after "
              f"{describe_cost(run_cost)}; checkpoint {run.outputs.run_dir / run_folder.LAST}, report "
              f"{run.outputs.run_dir / run_folder.REPORT}")
    with leaving.lock:
        leaving.request.leaving()
        pending = leaving.end_outputs(record, final_model=run.train_step.model if stop is None else None,
                                      summary=run_cost)
    code = distributed.broadcast(exits.with_uploads(code, pending), run.procs)
    if run.procs.master and code in (exits.RECLAIM, exits.INTERRUPTED):
        timing = run.spot.timing() if notice else {}
        print(f"exit {code}: continue with --resume auto" + (
              f" ({timing['since_notice_s']:.1f} s after the spot notice; EC2 reclaims at {timing['reclaim_at']})"
              if timing.get("reclaim_at") else f" ({timing['since_notice_s']:.1f} s after the spot notice)"
              if timing else ""), file=sys.stderr, flush=True)
    return code


def main() -> int:
    args = parse_args()
    leaving = Leaving(StopRequest(announce=os.environ.get("RANK", "0") == "0"))
    run = None
    try:
        try:
            run = setup(args, leaving)
            stop = train(run)
        except Interrupted as interrupted:
            stop = interrupted.reason
            if run is None:  # during start-up: nothing trained, nothing written
                print(f"{stop}: stopped during start-up, nothing trained; exit {exits.for_stop(stop)}",
                      file=sys.stderr, flush=True)
                return exits.for_stop(stop)
        code = finish(run, stop, leaving)
    except BaseException as error:  # noqa: BLE001 - every way out is closed properly, then reported
        if isinstance(error, SystemExit):
            raise
        return leaving.failed(error)
    finally:
        leaving.close()
    if run.procs.world > 1:
        run.stops.close()
        distributed.teardown(run.procs)
    if leaving.outputs is not None and leaving.outputs.stuck():
        leave_now(code)  # an upload still in its timeout must not outlive the interpreter
    return code


if __name__ == "__main__":
    exit_code = main()
    exits.record(exit_code)
    sys.exit(exit_code)
