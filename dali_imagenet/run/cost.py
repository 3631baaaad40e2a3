"""What a run cost: its machines' hours and dollars over every launch, its S3 traffic, and the line
that says both."""
from __future__ import annotations

from dali_imagenet.run import launches as launch_records


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
