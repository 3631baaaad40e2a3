"""Where each launch of a run spent its seconds, and what the launches cost together.

A launch is one process of the run on one machine; a spot relaunch is a new machine, billed from
its start. The clock covers the whole process (start-up, staging, resume, the first step with its
compile, training, the way out) and, on EC2, the time before it: from the instance's launch
(`pendingTime`, in the instance identity document) to the start of `cloud/setup.sh` (provisioning,
boot) and the setup itself (the times it writes to `SETUP_TIMES`). Each way out of a launch adds its
record (the phases in seconds, the machine, the price and where it came from, the exit code) to
`launches.json` beside the run's checkpoints, here and in S3, so that the next launch carries the
earlier ones on, even those that ended before anything was trained (a reclaim during staging).

The machine price of a spot launch is what EC2 charged for that instance type in that zone while
the launch ran (`DescribeSpotPriceHistory`, when the instance's role may call it), else the
config's `spot_price_per_hour`, else the on-demand `price_per_hour`; the record says which.
"""
from __future__ import annotations

import datetime
import json
import os
import tempfile
import time
from pathlib import Path

from dali_imagenet import s3
from dali_imagenet.atomic import write_atomic
from dali_imagenet.run.run_folder import LAUNCHES
from dali_imagenet.run.spot import utc_seconds

PHASES = ("provisioning", "setup", "start", "staging", "resume", "compile", "training", "leaving")
TRAINING = "training"  # every other phase is overhead: what a launch costs before and after it trains
START_SLACK_S = 1.0  # the process's start and setup's end come from different clocks (both to ~10 ms here)
SETUP_TIMES = "~/.dali-imagenet-setup.json"  # cloud/setup.sh's start and end (Unix times); $SETUP_TIMES overrides
PRICE_TIMEOUT_S = 5.0  # EC2's price history is asked during the way out (a reclaim leaves two minutes)


class LaunchClock:
    """This launch's phases: the process is in one phase at a time (`start` first), and `enter`
    gives the seconds since the last change to the phase it leaves."""

    def __init__(self, started: float):
        """`started`: time.time() when the process started (`process_started`: its imports count)."""
        self.started = started
        self.phases = dict.fromkeys(PHASES, 0.0)  # this process's; the time before it is added by `record`
        self.current = "start"
        self.instance: dict = {}
        self.setup: dict | None = None  # cloud/setup.sh's start and end on this machine (`setup_times`)
        self.earlier: list[dict] = []  # the run's launches before this one (`launches.json`)
        self._since = started

    def enter(self, phase: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.phases[self.current] += max(0.0, now - self._since)
        self.current, self._since = phase, max(self._since, now)

    def first_step(self) -> None:
        """After every step: the launch's first one (its compile, the first batch) ends `compile`."""
        if self.current == "compile":
            self.enter(TRAINING)

    def leave(self) -> None:
        """On every way out (a stop decided after a step enters it before its checkpoint)."""
        if self.current != "leaving":
            self.enter("leaving")

    def on_machine(self, instance: dict, setup: dict | None) -> None:
        """`instance` (`spot.IMDS.instance()`; empty off EC2) and `setup` (`setup_times`): with the
        instance's launch time, the seconds from there to this process are billed too."""
        self.instance, self.setup = instance, setup

    def before_start(self) -> dict[str, float]:
        """The machine's billed seconds before this process, by phase: from EC2's launch (or, on a
        machine an earlier launch of the run used, from that launch's end) to setup's start
        (provisioning), setup, and on to the process (start). Empty off EC2."""
        launched = self.instance.get("pending_time")
        same = [utc_seconds(e["ended_at"]) for e in self.earlier
                if self.instance.get("instance_id") and e.get("instance", {}).get("instance_id") ==
                self.instance["instance_id"]]
        if launched is None or launched > self.started:
            return {}
        launched = max([launched, *same])
        setup = self.setup
        if setup and launched <= setup["started"] <= setup["ended"] <= self.started + START_SLACK_S:
            return {"provisioning": setup["started"] - launched, "setup": setup["ended"] - setup["started"],
                    "start": max(0.0, self.started - setup["ended"])}
        return {"provisioning": self.started - launched}

    def record(self, *, exit_code: int, reason: str | None, machines: int, price: tuple[float, str],
               on_demand_per_hour: float, now: float | None = None) -> dict:
        """This launch as `launches.json` keeps it, its phases counted up to `now`."""
        now = time.time() if now is None else now
        self.enter(self.current, now)
        before = self.before_start()
        phases = {phase: seconds + before.get(phase, 0.0) for phase, seconds in self.phases.items()}
        seconds = sum(phases.values())
        price_per_hour, source = price
        return {"launch": len(self.earlier) + 1, "started_at": _iso(self.started - sum(before.values())),
                "ended_at": _iso(now), "instance": {k: v for k, v in self.instance.items() if k != "pending_time"},
                "phases_s": {k: round(v, 2) for k, v in phases.items()}, "seconds": round(seconds, 2),
                "overhead_s": round(seconds - phases[TRAINING], 2), "machines": machines,
                "price_per_hour": price_per_hour, "price_source": source,
                "dollars": seconds / 3600 * machines * price_per_hour,
                "on_demand_dollars": seconds / 3600 * machines * on_demand_per_hour,
                "exit_code": exit_code, "reason": reason}

    def window(self) -> tuple[float, float]:
        """(when the machine started, now), for the price it was charged meanwhile."""
        return self.started - sum(self.before_start().values()), time.time()


def process_started() -> float:
    """When this process started (Unix time, to a clock tick): its interpreter's start-up and
    imports count too. Its age from /proc (ticks since boot) against the boot clock now, not
    /proc/stat's boot time, which is whole seconds (a process then seemed to start before the
    setup that ran it had ended). Where /proc cannot say: now."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return time.time() - max(0.0, age)
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


def setup_times(path: str | None = None) -> dict | None:
    """cloud/setup.sh's {"started", "ended"} on this machine, or None (not there, not readable)."""
    path = Path(os.path.expanduser(path or os.environ.get("SETUP_TIMES") or SETUP_TIMES))
    try:
        times = json.loads(path.read_text())
        return {"started": float(times["started"]), "ended": float(times["ended"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read(run_dir: Path, s3_url: str | None, timeout_s: float) -> list[dict]:
    """The run's launches so far: the run folder's `launches.json` or its S3 prefix's, whichever
    counts more (both only ever grow; a new machine has only S3's)."""
    found = [_load(Path(run_dir) / LAUNCHES)]
    if s3_url:
        with tempfile.TemporaryDirectory() as folder:
            if s3.download(s3_url, LAUNCHES, Path(folder) / LAUNCHES, timeout_s):
                found.append(_load(Path(folder) / LAUNCHES))
    return max(found, key=len)


def save(launches: list[dict], path: Path) -> None:
    write_atomic(path, json.dumps(launches, indent=1, sort_keys=True) + "\n")


def upload(launches: list[dict], s3_url: str, timeout_s: float) -> None:
    """`launches.json` straight to the run's prefix: a launch that ends before its run folder exists
    (stopped or failed while staging) has no uploader, and the next launch must count it."""
    bucket, prefix = s3.split_s3_url(s3_url)
    body = (json.dumps(launches, indent=1, sort_keys=True) + "\n").encode()
    s3.retrying(f"{s3_url}/{LAUNCHES}: cannot upload", lambda: s3.client().put_object(
        Bucket=bucket, Key=s3.join_key(prefix, LAUNCHES), Body=body), timeout_s)


def _load(path: Path) -> list[dict]:
    try:
        launches = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except ValueError as error:
        raise s3.S3Error(f"{path}: not a launches file ({error}): remove it, or pass --overwrite") from None
    return launches if isinstance(launches, list) else []


def totals(launches: list[dict]) -> dict:
    """The launches summed: how many, their seconds (overhead apart, each phase summed) and dollars."""
    phases = dict.fromkeys(PHASES, 0.0)
    for launch in launches:
        for phase, seconds in launch.get("phases_s", {}).items():
            phases[phase] = phases.get(phase, 0.0) + seconds
    return {"launches": len(launches), "seconds": sum(launch["seconds"] for launch in launches),
            "overhead_s": sum(launch["overhead_s"] for launch in launches),
            "phases_s": {k: round(v, 2) for k, v in phases.items()},
            "dollars": sum(launch["dollars"] for launch in launches),
            "on_demand_dollars": sum(launch["on_demand_dollars"] for launch in launches)}


def average_price(history: list[tuple[float, float]], start: float, end: float) -> float | None:
    """The time-weighted mean of a price over [start, end], from its changes `(Unix time, price)`
    (each holds until the next); None when no price was in effect during the window."""
    changes = sorted(history)
    before = [price for when, price in changes if when <= start]
    inside = [(when, price) for when, price in changes if start < when < end]
    if before:
        since, current = start, before[-1]
    elif inside:  # nothing known before the first change in the window: the mean over the known part
        (since, current), inside = inside[0], inside[1:]
    else:
        return None
    began = since
    if end <= began:
        return current
    total = 0.0
    for when, price in inside:
        total += current * (when - since)
        since, current = when, price
    total += current * (end - since)
    return total / (end - began)


def spot_price_history(instance: dict, start: float, end: float, timeout_s: float = PRICE_TIMEOUT_S) -> float | None:
    """What EC2 charged for this spot instance's type in its zone over [start, end] (US$ an hour,
    time-weighted), from `DescribeSpotPriceHistory`; raises what boto3 raises (no permission...)."""
    import boto3
    from botocore.config import Config

    ec2 = boto3.client("ec2", region_name=instance["region"],
                       config=Config(connect_timeout=timeout_s, read_timeout=timeout_s, retries={"max_attempts": 1}))
    changes = []
    pages = ec2.get_paginator("describe_spot_price_history").paginate(
        InstanceTypes=[instance["instance_type"]], AvailabilityZone=instance["zone"],
        ProductDescriptions=["Linux/UNIX"], StartTime=_utc(start), EndTime=_utc(end))
    for page in pages:
        for entry in page.get("SpotPriceHistory", []):
            if entry.get("AvailabilityZone") == instance["zone"] and entry.get("ProductDescription", "").startswith(
                    "Linux/UNIX"):
                changes.append((entry["Timestamp"].timestamp(), float(entry["SpotPrice"])))
    return average_price(changes, start, end)


def machine_price(instance: dict, window: tuple[float, float], *, price_per_hour: float, spot_price_per_hour: float,
                  history=spot_price_history) -> tuple[float, str]:
    """(US$ per machine-hour, where it came from) for one launch: on spot, EC2's price history for
    the launch's `window`, else the config's spot price, else on demand; off spot, on demand."""
    if instance.get("lifecycle") != "spot":
        return price_per_hour, "price_per_hour (on demand)"
    why = "the instance metadata names no zone"
    if all(instance.get(key) for key in ("instance_type", "zone", "region")):
        try:
            paid = history(instance, *window)
            if paid is not None:
                return paid, f"EC2 spot price history ({instance['instance_type']}, {instance['zone']})"
            why = "EC2 lists no price for that window"
        except Exception as error:  # noqa: BLE001 - no permission, no network: the next price down, with why
            why = f"{type(error).__name__}: {str(error)[:200]}"
    if spot_price_per_hour > 0:
        return spot_price_per_hour, f"spot_price_per_hour (config; EC2's price history: {why})"
    return price_per_hour, f"price_per_hour (on demand: no spot price known; EC2's price history: {why})"


def _utc(unix: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(unix, datetime.timezone.utc)


def _iso(unix: float) -> str:
    return _utc(unix).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"  # milliseconds
