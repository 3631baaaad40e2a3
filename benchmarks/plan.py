"""How long a config's run takes on this machine, and what it costs, measured rather than guessed.

    python -m benchmarks.plan --config configs/l4-16h.yaml [--data SHARDS] [--seconds 20]
                              [--price-per-hour 0.8048] [--spot-price-per-hour Q] [--json plan.json]
                              [--reclaims 0 2 4 | --interruption-rate R] [--shards-gb 147] [--network-gbit 2.5]
                              [--vcpus 4] [--provision-min 3.5] [--setup-min 2] [--cross-region]

For each train size the config's schedule visits, it measures the real train step (the config's
model, BlurPool, channels-last, compile, precision, batch, mixing: `recipe.build`, as train.py
builds it) for ~S seconds after its warm-up, and with `--data` the DALI train loader at that size
with the config's threads (the GPU `mixed` path on a GPU); then the validation pass (raw, EMA and
flip as the config asks) at the val size. Each phase is bounded by the slower of step and loader.
Without `--data` the loader is not measured and the table says so: the step is then an upper
bound. Hours count the real dataset's size (ImageNet-1K by default: `--train-images`), not the
shards given, which only serve to measure the loader. On a CPU (with a small batch) it checks the
plumbing, which is how CI runs it.

Each launch (the first, and each spot relaunch on a new machine) is billed before it trains:
provisioning and boot (`--provision-min`), the task's setup (`--setup-min`), the staging its first
step waits for (the rest of the shards arrive while it trains: `first_step_gb`, the indices, the
validation split, the shards DALI's reader reaches first, and on a relaunch mid-epoch, half an
epoch on average, the shards before the resume point) at the slower of `--network-gbit` (a
g6.xlarge's 2.5 Gbit/s baseline) and what `--vcpus` fetch and hash (`STAGING_CPU_S_PER_GB`,
`benchmarks.staging`), and its first step's compile (measured); a reclaim adds EC2's two minutes
between the notice and the end of the machine. `--reclaims` takes the numbers of reclaims to
price (each a line), `--interruption-rate` an expected rate per machine-hour instead. The data's
costs are added: the staging's S3 requests, the bytes moved across regions with `--cross-region`
(the bucket elsewhere), and, for comparison, what streaming from S3 every epoch would have cost in
requests at the GETs per sample `benchmarks --only s3` measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import endless, machine
from dali_imagenet.config import TrainConfig, load_config, to_dict
from dali_imagenet.distributed import Processes
from dali_imagenet.errors import one_line_errors
from dali_imagenet.training.precision import Precision
from dali_imagenet.training.recipe import build

IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000
IMAGENET_SHARDS_GB = 147.0  # shard-imagenet's train + validation shards, as they are in S3
IMAGENET_TRAIN_TARS = 1_025
IMAGENET_SHARD_FILES = 2 * (IMAGENET_TRAIN_TARS + 40)  # tars and their indices, train + validation
INDEX_BYTES_PER_SAMPLE = 155  # a wds2idx line per sample (the bundled sample's indices)
G6_XLARGE_GBIT = 2.5  # network baseline (bursts to 10 on credits)
G6_XLARGE_VCPUS = 4
# CPU-seconds per GB staged: s3transfer's copy + sha256, the median of `python -m benchmarks.staging` (2.1 and 2.9
# in two runs on a loaded 2-core machine; plain HTTP to a local server: S3's TLS adds some). s5cmd took 1.9 and 2.6,
# not a clear win; boto3's CRT client 3.3 and 4.8.
STAGING_CPU_S_PER_GB = 2.5
# Not measurable here (no cloud): field notes' AWS figures, until a launch's closing record says (its phases_s)
PROVISION_MIN = 3.5  # a spot request to a booted instance: 2-5 min
SETUP_MIN = 2.0  # cloud/setup.sh: uv, ~5 GB of wheels at a few hundred MB/s
NOTICE_MIN = 2.0  # EC2 bills the reclaimed machine until it goes, ~2 min after the notice
S3_RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results" / "s3.jsonl"  # `benchmarks --only s3`


@dataclass(frozen=True)
class Phase:
    image_size: int
    first_epoch: int  # 0-based
    epochs: int


def phases(cfg: TrainConfig) -> list[Phase]:
    """Runs of consecutive epochs at one train size, in schedule order."""
    result: list[Phase] = []
    for epoch in range(cfg.epochs):
        size = cfg.train_image_size(epoch)
        if result and result[-1].image_size == size:
            last = result[-1]
            result[-1] = Phase(size, last.first_epoch, last.epochs + 1)
        else:
            result.append(Phase(size, epoch, 1))
    return result


def validations(cfg: TrainConfig) -> int:
    """How many validation passes the run makes (train.py's rule: every val_every epochs and at the end)."""
    return sum(1 for epoch in range(1, cfg.epochs + 1) if cfg.validates_after(epoch))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rate(work, seconds: float, device: torch.device) -> float:
    """Images/s of `work()` (which returns the images it handled) over at least `seconds` and at
    least 3 calls, synced at both ends."""
    sync(device)
    start = time.perf_counter()
    calls = 0
    images = 0
    while calls < 3 or time.perf_counter() - start < seconds:
        images += work()
        calls += 1
    sync(device)
    return images / (time.perf_counter() - start)


def measure_steps(cfg: TrainConfig, sizes: list[int], device: torch.device, seconds: float) -> dict[int, dict]:
    """The train step at each size: one model through all sizes, as in a run (a new size
    recompiles once under torch.compile: that is the warm-up time reported)."""
    processes = Processes(0, 1, 0, device)
    precision = Precision.for_device(cfg.amp_dtype, device)
    training = build(cfg, 1000, processes, precision)
    train_step = training.step(cfg, processes, precision, 1000)
    train_step.train_model.train()
    labels = torch.randint(0, 1000, (cfg.batch_size,), device=device)
    counter = iter(range(10**9))
    results = {}
    for size in sizes:
        images = torch.randn(cfg.batch_size, 3, size, size, device=device).to(
            precision.loader_dtype).contiguous(memory_format=torch.channels_last)
        def step():
            train_step(images, labels, step=next(counter), lr=training.peak_lr)
            return cfg.batch_size

        started = time.perf_counter()
        for _ in range(4):  # compile, cuDNN autotuning, a CUDA graph's warm-up and capture
            step()
        sync(device)
        warmup_s = time.perf_counter() - started
        results[size] = {"images_per_s": timed_rate(step, seconds, device), "warmup_s": warmup_s}
    return results


def measure_validation(cfg: TrainConfig, device: torch.device, seconds: float) -> float:
    """Validation images/s at the val size: every forward pass a validation makes (raw weights,
    their EMA when the run keeps one, each with its mirror image under val_flip)."""
    from dali_imagenet.training import archs
    from dali_imagenet.training.evaluation import predict_logits

    precision = Precision.for_device(cfg.amp_dtype, device)
    model = archs.build(cfg.arch, 1000, blurpool=cfg.blurpool, width=cfg.width)
    model = model.to(device, memory_format=torch.channels_last).eval()
    models = 2 if cfg.ema_decay else 1
    size = cfg.val_image_size
    images = torch.randn(cfg.batch_size, 3, size, size, device=device).to(
        precision.loader_dtype).contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def forward():
        with precision.autocast():
            for _ in range(models):
                predict_logits(model, images, cfg.val_flip)
        return cfg.batch_size

    forward()
    return timed_rate(forward, seconds, device)


def measure_loader(cfg: TrainConfig, data: str, split: str, size: int, device: torch.device, seconds: float) -> float:
    from dali_imagenet import make_loader

    precision = Precision.for_device(cfg.amp_dtype, device)
    options = dict(device=device, dtype=precision.loader_dtype, backend="dali", num_threads=cfg.loader_threads,
                   normalization=cfg.normalization())
    if split == "train":
        loader = make_loader(data, "train", cfg.batch_size, image_size=size, crop_min_area=cfg.crop_min_area,
                             shuffle_buffer=min(cfg.shuffle_buffer, 1024), **options)
    else:
        loader = make_loader(data, "validation", cfg.batch_size, image_size=size, crop_fraction=cfg.val_crop_fraction,
                             **options)
    stream = endless(loader)
    next(stream)  # the pipeline's start-up and its first prefetch are not the steady rate
    return timed_rate(lambda: next(stream)[0].shape[0], seconds, device)


def measured_s3(path: Path = S3_RESULTS) -> dict:
    """What `benchmarks --only s3` measured (medians over its runs): DALI's GETs per sample when it
    streams s3:// (where there is no result file: staging's own figure of 2 GETs a sample)."""
    from dali_imagenet.data.staging import GETS_PER_SAMPLE

    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        rows = []
    gets = [r["gets_per_sample"] for r in rows
            if r.get("gets_counted_over") == "each epoch" and r.get("gets_per_sample")]
    return {"gets_per_sample": statistics.median(gets) if gets else GETS_PER_SAMPLE,
            "from": str(path) if rows else "no measurement"}


def data_costs(cfg: TrainConfig, *, launches: float, shards_gb: float, shard_files: int, cross_region: bool,
               train_images: int, val_images: int, gets_per_sample: float) -> dict:
    """What the data costs besides the machine: per launch, a GET per file plus a
    ranged GET per `staging.PART_SIZE` of it; across regions, the bytes; and, for comparison,
    streaming: DALI's GETs per sample (measured), every epoch (and every validation)."""
    from dali_imagenet.data.staging import PART_SIZE

    gets = round(launches * (shard_files + round(shards_gb * 1e9 / PART_SIZE)))  # no HEAD: sizes come from the listing
    cross_gb = launches * shards_gb if cross_region else 0.0
    streamed = round(gets_per_sample * (cfg.epochs * train_images + validations(cfg) * val_images))
    price = cfg.s3_get_price_per_1000 / 1000
    return {"staging_gets": gets, "cross_region_gb": cross_gb,
            "dollars": gets * price + cross_gb * cfg.cross_region_price_per_gb,
            "streamed_gets": streamed, "streamed_dollars": streamed * price, "gets_per_sample": gets_per_sample}


@dataclass(frozen=True)
class Launch:
    """What a launch costs before it trains (minutes), but its compile (measured with the step)."""
    provision_min: float = PROVISION_MIN
    setup_min: float = SETUP_MIN
    shards_gb: float = IMAGENET_SHARDS_GB
    network_gbit: float = G6_XLARGE_GBIT
    vcpus: int = G6_XLARGE_VCPUS
    staging_cpu_s_per_gb: float = STAGING_CPU_S_PER_GB  # measured (`benchmarks.staging`)
    notice_min: float = NOTICE_MIN

    def staging(self, gb: float) -> tuple[float, str]:
        """(minutes to stage `gb`, what bounds it: the network or the CPUs)."""
        return minutes_to_first_step(gb, self.network_gbit, self.vcpus, self.staging_cpu_s_per_gb)


def relaunches(base_hours: float, relaunch_hours: float, *, reclaims: list[float], rate: float | None) -> list[float]:
    """The reclaim counts to price: as given, or the expected count at `rate` reclaims per
    machine-hour over a run that every relaunch makes longer (r = rate * (base + r * relaunch))."""
    if rate is None:
        return list(reclaims)
    if rate * relaunch_hours >= 1:
        raise ValueError(f"--interruption-rate {rate:g}/h: a relaunch ({relaunch_hours * 60:.0f} min) is reclaimed "
                         f"before it trains; the run never ends")
    return [rate * base_hours / (1 - rate * relaunch_hours)]


def plan(cfg: TrainConfig, *, data: str | None, device: torch.device, seconds: float, train_images: int,
         val_images: int, price_per_hour: float, spot_price_per_hour: float | None, reclaims: list[float] = (0,),
         interruption_rate: float | None = None, launch: Launch = Launch(),
         shard_files: int = IMAGENET_SHARD_FILES, cross_region: bool = False, gets_per_sample: float = 2.0) -> dict:
    schedule = phases(cfg)
    sizes = sorted({p.image_size for p in schedule})
    steps = measure_steps(cfg, sizes, device, seconds)
    loaders = {size: measure_loader(cfg, data, "train", size, device, seconds) for size in sizes} if data else {}
    rows = []
    for phase in schedule:
        step_rate = steps[phase.image_size]["images_per_s"]
        loader_rate = loaders.get(phase.image_size)
        rate = min(step_rate, loader_rate) if loader_rate else step_rate
        rows.append({"phase": f"epochs {phase.first_epoch + 1}-{phase.first_epoch + phase.epochs}",
                     "epochs": phase.epochs, "image_size": phase.image_size, "step_images_per_s": step_rate,
                     "loader_images_per_s": loader_rate, "bound": _bound(step_rate, loader_rate),
                     "hours": phase.epochs * train_images / rate / 3600})
    val_rate = measure_validation(cfg, device, seconds)
    val_loader_rate = measure_loader(cfg, data, "validation", cfg.val_image_size, device, seconds) if data else None
    passes = validations(cfg)
    rows.append({"phase": f"validation x {passes}", "epochs": 0, "image_size": cfg.val_image_size,
                 "step_images_per_s": val_rate, "loader_images_per_s": val_loader_rate,
                 "bound": _bound(val_rate, val_loader_rate),
                 "hours": passes * val_images / min(val_rate, val_loader_rate or val_rate) / 3600})
    rows.append({"phase": f"warm-up/compile x {len(sizes)}", "epochs": 0, "image_size": None,
                 "step_images_per_s": None, "loader_images_per_s": None, "bound": "compile",
                 "hours": sum(steps[s]["warmup_s"] for s in sizes) / 3600})
    rows.append({"phase": "provisioning + setup", "epochs": 0, "image_size": None, "step_images_per_s": None,
                 "loader_images_per_s": None,
                 "bound": f"{launch.provision_min:g} + {launch.setup_min:g} min (AWS's figures)",
                 "hours": (launch.provision_min + launch.setup_min) / 60})
    staging_min, staging_bound = launch.staging(first_step_gb(cfg, launch.shards_gb, train_images, val_images))
    rows.append({"phase": "staging to the first step", "epochs": 0, "image_size": None, "step_images_per_s": None,
                 "loader_images_per_s": None, "bound": staging_bound, "hours": staging_min / 60})
    # a relaunch mid-epoch (half-way on average) waits for the shards before its resume point too
    relaunch_staging_min, _ = launch.staging(first_step_gb(cfg, launch.shards_gb, train_images, val_images,
                                                           epoch_done=0.5))
    hours = sum(row["hours"] for row in rows)
    training_hours = sum(row["hours"] for row in rows[:-3])  # the epochs and validations: the rest is overhead
    # a relaunch: a new machine (provisioning, setup, staging), the compile at the size it resumes at, and the
    # two minutes EC2 bills between the notice and the end of the reclaimed one
    compile_min = statistics.mean(steps[s]["warmup_s"] for s in sizes) / 60
    relaunch_min = launch.provision_min + launch.setup_min + relaunch_staging_min + compile_min + launch.notice_min
    scenarios = []
    for count in relaunches(hours, relaunch_min / 60, reclaims=list(reclaims), rate=interruption_rate):
        total = hours + count * relaunch_min / 60
        data_cost = data_costs(cfg, launches=1 + count, shards_gb=launch.shards_gb, shard_files=shard_files,
                               cross_region=cross_region, train_images=train_images, val_images=val_images,
                               gets_per_sample=gets_per_sample)
        scenarios.append({"reclaims": count, "relaunch_min": relaunch_min, "total_hours": total,
                          "overhead_hours": total - training_hours,
                          "dollars": total * price_per_hour,
                          "spot_dollars": total * spot_price_per_hour if spot_price_per_hour is not None else None,
                          "data": data_cost, "total_dollars": total * price_per_hour + data_cost["dollars"]})
    first = scenarios[0]
    return {"config": to_dict(cfg), "machine": machine(), "device": str(device), "seconds": seconds,
            "train_images": train_images, "val_images": val_images, "loader_measured": bool(data), "phases": rows,
            "launch": {**launch.__dict__, "staging_min": staging_min,
                       "relaunch_staging_min": relaunch_staging_min, "compile_min": compile_min,
                       "relaunch_min": relaunch_min}, "interruption_rate": interruption_rate,
            "reclaims": scenarios, "total_hours": first["total_hours"], "price_per_hour": price_per_hour,
            "dollars": first["dollars"], "spot_price_per_hour": spot_price_per_hour,
            "spot_dollars": first["spot_dollars"], "data": first["data"], "total_dollars": first["total_dollars"]}


def first_step_gb(cfg: TrainConfig, shards_gb: float, train_images: int, val_images: int, *,
                  train_tars: int = IMAGENET_TRAIN_TARS, epoch_done: float = 0.0) -> float:
    """The GB staged before a launch's first step (one process): every index, then (staging's
    order) the validation split (its loader is built at the start) and the train shards the reader
    reaches before its first batch (`reader_reach`, one more as a margin, at least `VAL_AFTER`);
    resumed `epoch_done` into an epoch, the shards before that point too (the reader's restored
    shuffle buffer holds samples from before it). The rest arrives while it trains."""
    from dali_imagenet.data.dali_loader import reader_reach
    from dali_imagenet.data.staging import VAL_AFTER

    images = train_images + val_images
    train_gb, val_gb = shards_gb * train_images / images, shards_gb * val_images / images
    per_tar = train_images / train_tars
    reach = epoch_done * train_images + reader_reach(0, cfg.batch_size, cfg.shuffle_buffer)
    tars = min(train_tars, max(VAL_AFTER, -(-reach // per_tar) + 1))
    return images * INDEX_BYTES_PER_SAMPLE / 1e9 + val_gb + tars * train_gb / train_tars


def minutes_to_first_step(gb_first: float, network_gbit: float, vcpus: int = G6_XLARGE_VCPUS,
                          cpu_s_per_gb: float = STAGING_CPU_S_PER_GB) -> tuple[float, str]:
    """(minutes of staging before a launch's first step, what bounds them): the GB the first step
    needs (`first_step_gb`) at the slower of the link and what `vcpus` can fetch and hash
    (`cpu_s_per_gb`, measured)."""
    link_gb_s, cpu_gb_s = network_gbit / 8, vcpus / cpu_s_per_gb
    if link_gb_s <= cpu_gb_s:
        return gb_first / link_gb_s / 60, f"network: {gb_first:.1f} GB at {network_gbit:g} Gbit/s"
    return gb_first / cpu_gb_s / 60, f"CPU: {gb_first:.1f} GB at {cpu_s_per_gb:g} CPU-s/GB on {vcpus} vCPUs"


def _bound(step_rate: float, loader_rate: float | None) -> str:
    if loader_rate is None:
        return "step (loader not measured)"
    return "loader" if loader_rate < step_rate else "step"


def table(result: dict) -> str:
    rate = lambda value: f"{value:,.0f}" if value else "-"  # noqa: E731
    lines = [
        "| phase | epochs | px | step img/s | loader img/s | bound by | hours |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for row in result["phases"]:
        lines.append(f"| {row['phase']} | {row['epochs'] or ''} | {row['image_size'] or ''} | "
                     f"{rate(row['step_images_per_s'])} | {rate(row['loader_images_per_s'])} | {row['bound']} | "
                     f"{row['hours']:.2f} |")
    gpu = result["machine"]["gpu"] or f"CPU ({result['machine']['cpu_count']} cores)"
    launch = result["launch"]
    lines.append(f"\na relaunch after a reclaim: {launch['relaunch_min']:.1f} min (provisioning "
                 f"{launch['provision_min']:g} + setup {launch['setup_min']:g} + staging to the first step mid-epoch "
                 f"{launch['relaunch_staging_min']:.1f} + "
                 f"compile {launch['compile_min']:.1f} + EC2's notice {launch['notice_min']:g})"
                 + (f"; {result['interruption_rate']:g} reclaims per machine-hour expected"
                    if result["interruption_rate"] is not None else ""))
    lines += ["", "| reclaims | hours | outside training h | $ on demand | $ on spot | S3 $ | $ in all (on demand) |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for case in result["reclaims"]:
        spot = f"${case['spot_dollars']:,.2f}" if case["spot_dollars"] is not None else "-"
        lines.append(f"| {case['reclaims']:g} | {case['total_hours']:.2f} | {case['overhead_hours']:.2f} | "
                     f"${case['dollars']:,.2f} | {spot} | ${case['data']['dollars']:,.3f} | "
                     f"${case['total_dollars']:,.2f} |")
    data = result["data"]
    lines.append(f"\non {gpu} for {result['train_images']:,} train images at ${result['price_per_hour']}/h on demand"
                 + (f", ${result['spot_price_per_hour']}/h on spot" if result["spot_price_per_hour"] is not None
                    else " (spot: pass --spot-price-per-hour; spot prices change by the hour)")
                 + ("" if result["loader_measured"] else "; the loader was not measured (no --data): a lower bound")
                 + f"; S3: {data['staging_gets']:,} GETs staging a launch"
                 + (f", {data['cross_region_gb']:,.0f} GB across regions" if data["cross_region_gb"] else "")
                 + f"; streaming from S3 every epoch instead: {data['streamed_gets']:,} GETs "
                 f"({data['gets_per_sample']:.2f} a sample, measured), ${data['streamed_dollars']:,.2f}")
    return "\n".join(lines)


def budget_rates(cfg: TrainConfig, *, rate: float | None, val_rate: float | None, data: str | None,
                 device: torch.device, seconds: float, train_images: int, val_images: int) -> tuple[dict, dict]:
    """(`budget.Rates` as a dict, where each number came from) for the budget table: `rate` img/s
    at every train size when given (an average over the run), else the step (and with `data` the
    loader) measured here at each size the ladder uses. A given rate's validation is scaled by the
    pixels and forward passes it costs (`budget.validation_rate`)."""
    from dali_imagenet.training import budget

    recipe = budget.Recipe.of(cfg)
    sizes = sorted({recipe.size(budget.scaled(recipe, e), epoch) for e in budget.ladder(recipe) for epoch in range(e)})
    if rate:
        forwards = (2 if cfg.ema_decay else 1) * (2 if cfg.val_flip else 1)
        estimated = budget.validation_rate(rate, cfg.image_size, cfg.val_image_size, forwards)
        train = {size: rate for size in sizes}
        warmup = {size: 60.0 if cfg.compile else 5.0 for size in sizes}
        source = {"train": f"given: {rate:g} img/s at every size", "val": f"given: {val_rate:g} img/s" if val_rate
                  else f"estimated from the train rate: {estimated:,.0f} img/s ({forwards} forward pass(es) at "
                  f"{cfg.val_image_size} px)", "warmup": f"assumed {warmup[sizes[0]]:g} s a size"}
        val = val_rate or estimated
    else:
        steps = measure_steps(cfg, sizes, device, seconds)
        loaders = {size: measure_loader(cfg, data, "train", size, device, seconds) for size in sizes} if data else {}
        train = {size: min(steps[size]["images_per_s"], loaders.get(size, float("inf"))) for size in sizes}
        warmup = {size: steps[size]["warmup_s"] for size in sizes}
        val = val_rate or measure_validation(cfg, device, seconds)
        source = {"train": f"measured on {device}" + (" with the loader" if data else " (step only: no --data)"),
                  "val": "given" if val_rate else f"measured on {device}", "warmup": "measured"}
    return dataclasses.asdict(budget.Rates(train, warmup, val, checkpoint_s=5.0, train_images=train_images,
                                           val_images=val_images)), source


def budget_table(cfg: TrainConfig, rates: dict, *, budget_s: float, price_per_hour: float, spent_s: float) -> str:
    """The schedules of the recipe's ladder that fit `budget_s`, and the first that does not:
    predicted hours and dollars (the start-up `spent_s`, e.g. staging, and the relaunch reserve
    included; the noise reserve beside), and FFCV's top-1 at that many epochs."""
    from dali_imagenet.training import budget

    recipe = budget.Recipe.of(cfg)
    overheads = budget.Overheads(spent_s, cfg.budget_reserve, cfg.budget_relaunches, cfg.budget_relaunch_minutes * 60)
    rows = budget.table(recipe, budget.Rates(**rates), overheads, budget_s)
    shown = [p for p in rows if p.fits and (p.ffcv_top1 or not any(r.ffcv_top1 for r in rows))]
    shown += [p for p in rows if not p.fits][:1]
    lines = [f"budget {budget.clock(budget_s)} at ${price_per_hour}/h ({cfg.budget_reserve:.0%} reserve, "
             f"{cfg.budget_relaunches:g} relaunch(es) expected):",
             "| epochs | ramp (epochs) | px | hours | $ | FFCV top-1 (8 x A100) | fits |",
             "| ---: | --- | --- | ---: | ---: | ---: | --- |"]
    for p in shown:
        s = p.schedule
        sizes = sorted({recipe.size(s, e) for e in range(s.epochs)})
        lines.append(f"| {s.epochs} | {s.ramp_start_epoch}-{s.ramp_end_epoch} | {'-'.join(map(str, sizes))} | "
                     f"{p.total_s / 3600:.2f} | {p.total_s / 3600 * price_per_hour:.2f} | "
                     f"{f'{p.ffcv_top1} %' if p.ffcv_top1 else '-'} | {'yes' if p.fits else 'no'} |")
    if not any(p.fits for p in rows):
        lines.append(f"a budget of {budget.clock(budget_s)} is too small for one epoch here")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--data", help="shards to measure the DALI loaders on (else: step only)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per item, after warm-up")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-images", type=int, default=IMAGENET_TRAIN, help="images per epoch (ImageNet-1K)")
    parser.add_argument("--val-images", type=int, default=IMAGENET_VAL)
    parser.add_argument("--price-per-hour", type=float, default=None, help="default: the config's price_per_hour")
    parser.add_argument("--spot-price-per-hour", type=float, default=None)
    parser.add_argument("--json", help="write the plan here too")
    reclaims = parser.add_mutually_exclusive_group()
    reclaims.add_argument("--reclaims", type=float, nargs="+", default=[0], metavar="N",
                          help="spot reclaims to price, each a line (each: a relaunch on a new machine)")
    reclaims.add_argument("--interruption-rate", type=float, metavar="R", help="expected reclaims per machine-hour")
    parser.add_argument("--shards-gb", type=float, default=IMAGENET_SHARDS_GB, help="the shards staged per launch")
    parser.add_argument("--network-gbit", type=float, default=G6_XLARGE_GBIT, help="the machine's network to S3")
    parser.add_argument("--vcpus", type=int, default=G6_XLARGE_VCPUS, help="the machine's vCPUs (staging is CPU-bound)")
    parser.add_argument("--provision-min", type=float, default=PROVISION_MIN, help="a spot request to a booted machine")
    parser.add_argument("--setup-min", type=float, default=SETUP_MIN, help="the task's setup (cloud/setup.sh)")
    parser.add_argument("--cross-region", action="store_true", help="the bucket is in another region than the machine")
    parser.add_argument("--budget-hours", type=float, help="instead: the table of schedules that fit this budget")
    parser.add_argument("--budget-dollars", type=float, help="the same in US$ at --price-per-hour")
    parser.add_argument("--rate", type=float, help="with a budget: train img/s (an average over the run) instead of "
                        "measuring here")
    parser.add_argument("--val-rate", type=float, help="with --rate: validation img/s (default: estimated from it)")
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    if args.budget_hours or args.budget_dollars:
        print(budget_main(args, cfg))
        return
    measured = measured_s3()
    launch = Launch(provision_min=args.provision_min, setup_min=args.setup_min, shards_gb=args.shards_gb,
                    network_gbit=args.network_gbit, vcpus=args.vcpus)
    result = plan(cfg, data=args.data, device=torch.device(args.device), seconds=args.seconds,
                  train_images=args.train_images, val_images=args.val_images,
                  price_per_hour=args.price_per_hour if args.price_per_hour is not None else cfg.price_per_hour,
                  spot_price_per_hour=args.spot_price_per_hour, reclaims=args.reclaims,
                  interruption_rate=args.interruption_rate, launch=launch, cross_region=args.cross_region,
                  gets_per_sample=measured["gets_per_sample"])
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def budget_main(args, cfg: TrainConfig) -> str:
    from dali_imagenet.errors import UsageError
    from dali_imagenet.training import budget

    price = args.price_per_hour if args.price_per_hour is not None else cfg.price_per_hour
    try:
        budget_s = budget.budget_seconds(args.budget_hours or 0.0, args.budget_dollars or 0.0, price)
    except budget.TooSmall as error:
        raise UsageError(str(error)) from None
    rates, source = budget_rates(cfg, rate=args.rate, val_rate=args.val_rate, data=args.data,
                                 device=torch.device(args.device), seconds=args.seconds,
                                 train_images=args.train_images, val_images=args.val_images)
    # the launch before its first step: provisioning, setup, and the staging that step waits for
    launch = Launch(provision_min=args.provision_min, setup_min=args.setup_min, shards_gb=args.shards_gb,
                    network_gbit=args.network_gbit, vcpus=args.vcpus)
    staging_min, staging_bound = launch.staging(first_step_gb(cfg, args.shards_gb, args.train_images, args.val_images))
    before_s = (launch.provision_min + launch.setup_min + staging_min) * 60
    text = budget_table(cfg, rates, budget_s=budget_s, price_per_hour=price, spent_s=before_s)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"budget_s": budget_s, "rates": rates, "source": source, "before_first_step_s": before_s}, f,
                      indent=1)
    return (f"{text}\ntrain rate {source['train']}; validation {source['val']}; warm-up {source['warmup']}; "
            f"checkpoints {rates['checkpoint_s']:g} s each (assumed); before the first step {before_s / 60:.1f} min "
            f"counted (provisioning {launch.provision_min:g} + setup {launch.setup_min:g} + staging "
            f"{staging_min:.1f}: {staging_bound})")


if __name__ == "__main__":
    with one_line_errors():
        main()
