"""What a run reports: a local metrics.jsonl (always), Weights & Biases (optionally), and the
throughput and data-wait meter behind the numbers."""
from __future__ import annotations

import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path

from dali_imagenet.atomic import write_atomic
from dali_imagenet.run import launches as launch_records
from dali_imagenet.run.run_folder import METRICS


class RunLogger:
    """Rank 0 only: every record goes to `metrics.jsonl` (flushed per line) and, if on, to W&B."""

    def __init__(self, run_dir: str | Path, config: dict, use_wandb: bool, project: str, resume_id: str | None = None):
        self.path = Path(run_dir) / METRICS
        self._file = open(self.path, "a")
        self._wandb = None
        if use_wandb:
            import wandb

            # Only the config dataclass goes to W&B: no environment, so no AWS or W&B key.
            self._wandb = wandb.init(project=project, config=config, dir=str(run_dir), id=resume_id,
                                     resume="allow" if resume_id else None, name=Path(run_dir).name)

    @property
    def wandb_id(self) -> str | None:
        return self._wandb.id if self._wandb is not None else None

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    @property
    def closed(self) -> bool:
        return self._file.closed

    def amend_last(self, fields: dict) -> None:
        """Rewrites the log's last record with `fields` added (atomically: `atomic.write_atomic`)."""
        lines = self.path.read_text().splitlines()
        if not lines:
            return
        lines[-1] = json.dumps({**json.loads(lines[-1]), **fields}, sort_keys=True)
        write_atomic(self.path, "\n".join(lines) + "\n")

    @property
    def wandb_on(self) -> bool:
        return self._wandb is not None

    def close(self, summary: dict | None = None, media: dict | None = None, page: Path | None = None) -> None:
        """Ends the log; `summary` (numbers) goes to W&B's run summary too, `media` (Tables,
        Images) logged at the last step, and `page` (the run's report.html) as an artifact."""
        if not self._file.closed:
            self._file.close()
        if self._wandb is None:
            return
        run, self._wandb = self._wandb, None
        try:
            for key, value in (summary or {}).items():
                if isinstance(value, (int, float)):
                    run.summary[key] = value
            if media:
                run.log(media)
            if page is not None and Path(page).is_file():
                import wandb

                artifact = wandb.Artifact(f"report-{run.id}", type="report")
                artifact.add_file(str(page))
                run.log_artifact(artifact)
        finally:
            run.finish()


def machine() -> dict:
    """What ran it: host, CPU count, GPU, Python and the versions that change the numbers."""
    import torch

    info = {"machine": platform.node(), "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for package in ("torch", "torchvision", "nvidia-dali-cuda120", "webdataset", "pillow"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    return info


def cost(launches: list[dict], *, gpus: int, lifecycle: str | None, data: dict | None = None) -> dict:
    """What a run cost over all its launches (`launches.LaunchClock.record`: each priced as it ran,
    on spot at what EC2 charged when known): wall-clock hours from each machine's start, GPU-hours,
    the hours outside training (provisioning, setup, staging, resume, compile, the way out) and
    dollars, with what the same hours cost on demand; with `data` (`data_cost`), what S3 charged
    beside them, and the sum."""
    summed = launch_records.totals(launches)
    hours = summed["seconds"] / 3600
    last = launches[-1] if launches else {}
    return {"wall_hours": hours, "gpu_hours": hours * gpus, "machines": last.get("machines", 1),
            "lifecycle": lifecycle or "unknown", "price_per_hour": last.get("price_per_hour", 0.0),
            "price_source": last.get("price_source", ""), "launches": summed["launches"],
            "overhead_hours": summed["overhead_s"] / 3600, "phases_s": summed["phases_s"],
            "dollars": summed["dollars"], "on_demand_dollars": summed["on_demand_dollars"],
            **({"data": data, "total_dollars": summed["dollars"] + data["dollars"]} if data else {})}


def data_cost(usage: dict, *, instance_region: str | None, get_price_per_1000: float, put_price_per_1000: float,
              cross_region_price_per_gb: float, streamed_gets: int = 0) -> dict:
    """What a run's S3 traffic cost: its requests by price class (`s3.Usage.snapshot()`, staging,
    checkpoints and uploads included), `streamed_gets` that DALI made itself when it read s3://
    (estimated: its own S3 client is not boto3's), and the bytes moved between a bucket's region
    and the instance's (free within one region)."""
    buckets = usage.get("buckets", {})
    moved = lambda entry: entry["bytes_in"] + entry["bytes_out"]  # noqa: E731
    cross = sum(moved(entry) for entry in buckets.values()
                if instance_region and entry.get("region") and entry["region"] != instance_region) / 1e9
    gets, puts = usage.get("get", 0), usage.get("put", 0)
    dollars = ((gets + streamed_gets) * get_price_per_1000 + puts * put_price_per_1000) / 1000 + \
        cross * cross_region_price_per_gb
    return {
        "get_requests": gets,
        "put_requests": puts,
        "streamed_gets_estimated": streamed_gets,
        "gb_in": sum(e["bytes_in"] for e in buckets.values()) / 1e9,
        "gb_out": sum(e["bytes_out"] for e in buckets.values()) / 1e9,
        "cross_region_gb": cross,
        "instance_region": instance_region,
        "bucket_regions": {name: e.get("region") for name, e in buckets.items()},
        "dollars": dollars,
    }


def cost_basis(cfg, processes, instance: dict) -> dict:
    """What a launch's price and `cost` need besides the hours: GPUs, machines, prices (the
    config's), the lifecycle (spot or on demand, from the instance metadata)."""
    from dali_imagenet.distributed import machines

    return dict(gpus=processes.world if processes.device.type == "cuda" else 0, machines=machines(processes),
                price_per_hour=cfg.price_per_hour, spot_price_per_hour=cfg.spot_price_per_hour,
                lifecycle=instance.get("lifecycle"))


def data_basis(cfg, instance: dict) -> dict:
    """What `data_cost` needs besides the S3 usage: S3's prices and the instance's region."""
    return dict(instance_region=instance.get("region"), get_price_per_1000=cfg.s3_get_price_per_1000,
                put_price_per_1000=cfg.s3_put_price_per_1000, cross_region_price_per_gb=cfg.cross_region_price_per_gb)


def describe_cost(cost: dict) -> str:
    """"3.52 h (3.52 GPU-h), $2.83; S3 $0.04 (1,234 GETs, 56 PUTs, 140.2 GB in)"; a run shorter than
    an hour in minutes or seconds (a demo, a test)."""
    hours = cost["wall_hours"]
    wall = f"{hours:.2f} h" if hours >= 1 else f"{hours * 60:.1f} min" if hours >= 1 / 60 else f"{hours * 3600:.0f} s"
    line = wall + (f" ({cost['gpu_hours']:.2f} GPU-h)" if cost["gpu_hours"] else "") + f", ${cost['dollars']:,.2f}"
    if cost["dollars"] != cost["on_demand_dollars"]:
        line += f" on spot (${cost['on_demand_dollars']:,.2f} on demand)"
    if cost.get("launches"):
        line += (f"; {cost['launches']} launch{'es' if cost['launches'] > 1 else ''}, "
                 f"{cost['overhead_hours'] * 60:.1f} min outside training")
    data = cost.get("data")
    if data and data["get_requests"] + data["put_requests"] + data["streamed_gets_estimated"]:  # else no S3 part
        gets = data["get_requests"] + data["streamed_gets_estimated"]
        line += (f"; S3 ${data['dollars']:,.2f} ({gets:,} GETs" + (" (est.)" if data["streamed_gets_estimated"] else "")
                 + f", {data['put_requests']:,} PUTs, {data['gb_in']:.2f} GB in"
                 + (f", {data['cross_region_gb']:.2f} GB across regions" if data["cross_region_gb"] else "") + ")")
    return line


def wandb_wanted(flag: bool | None) -> bool:
    """--wandb / --no-wandb decide; without either, W&B is on only where it is set up."""
    if flag is not None:
        return flag
    return bool(os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"))


class ThroughputMeter:
    """Images per second and the share of time spent waiting for the loader, over a window of
    steps (reset at each log) and over the epoch; what the epoch's first step cost (a compile, a
    graph capture, cuDNN's autotuning at a new size) and the rate after it; on a GPU, the peak
    memory. Host clocks only, but for one GPU sync an epoch, after its first step."""

    def __init__(self, world_size: int = 1, device=None):
        import torch

        self.world_size = world_size
        self.gpu = device if device is not None and torch.device(device).type == "cuda" else None
        self._epoch = self._window = None
        self._warm = None  # (time, images) after the epoch's first step

    def batches(self, loader):
        """Iterates `loader`, timing each wait for a batch and counting its images."""
        import torch

        if self.gpu is not None:
            torch.cuda.reset_peak_memory_stats(self.gpu)  # each image size's own peak
        # What the loader waited for before its first batch (tars still being staged) is data wait too.
        waited = getattr(loader, "build_wait_s", 0.0)
        now = time.perf_counter() - waited
        self._epoch, self._window = [now, 0, waited], [now, 0, waited]  # start, images, seconds waited
        self._warm = None
        batches = iter(loader)
        while True:
            started = time.perf_counter()
            batch = next(batches, None)
            waited = time.perf_counter() - started
            for totals in (self._epoch, self._window):
                totals[2] += waited
                totals[1] += 0 if batch is None else batch[0].shape[0]
            if batch is None:
                return
            yield batch
            if self._warm is None:
                self._first_step_done()

    def _first_step_done(self) -> None:
        import torch

        if self.gpu is not None:
            torch.cuda.synchronize(self.gpu)  # once an epoch: what the first step (a compile) cost
        self._warm = (time.perf_counter(), self._epoch[1] * self.world_size)

    @staticmethod
    def _rates(totals, world_size: int) -> dict:
        elapsed = max(time.perf_counter() - totals[0], 1e-9)
        return {"images_per_s": totals[1] * world_size / elapsed, "data_wait": totals[2] / elapsed}

    def take_window(self) -> dict:
        """The window's rates (and, on a GPU, the peak memory so far), then a new window."""
        import torch

        rates = self._rates(self._window, self.world_size)
        if self.gpu is not None:
            rates["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.gpu) / 2**30
        self._window = [time.perf_counter(), 0, 0.0]
        return rates

    def epoch(self) -> dict:
        """The epoch's rates and the images it trained, over all ranks; with first_step_s,
        warm_images_per_s (the steps after the first), peak_gpu_mem_gb and peak_gpu_reserved_gb
        once a step ran (the caller's last log step synced: nothing is waited for here)."""
        import torch

        rates = {**self._rates(self._epoch, self.world_size), "images": self._epoch[1] * self.world_size}
        if self._warm is None:
            return rates
        warm_images = rates["images"] - self._warm[1]
        on_gpu = self.gpu is not None
        return {**rates, "first_step_s": self._warm[0] - self._epoch[0],
                "warm_images_per_s": warm_images / max(time.perf_counter() - self._warm[0], 1e-9)
                if warm_images else None,
                "peak_gpu_mem_gb": torch.cuda.max_memory_allocated(self.gpu) / 2**30 if on_gpu else None,
                "peak_gpu_reserved_gb": torch.cuda.max_memory_reserved(self.gpu) / 2**30 if on_gpu else None}
