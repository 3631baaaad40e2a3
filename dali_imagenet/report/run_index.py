"""An index of runs: one page with a row per run found in a folder (its subfolders) or under an
`s3://bucket/prefix/` (its "subfolders"), sortable, each row linking to that run's page, and
top-1 against wall-clock hours for all of them in one plot.

A row: name, arch, config, epochs validated of planned, the last val top-1/top-5 of the raw and EMA
weights, wall-clock hours, dollars (the machine's, then S3's), median images/s, the state (running,
complete, stopped and why) and when the run last wrote anything. From S3 only each run's small
files are fetched (metrics.jsonl, config.yaml); a run's page is linked where one exists (written
at its end).
"""
from __future__ import annotations

import html
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dali_imagenet import s3
from dali_imagenet.report.html_page import page, plot_uri, sortable
from dali_imagenet.report.html_report import ReportError, RunRecords, read_run
from dali_imagenet.run.run_folder import CONFIG, METRICS, REPORT
from dali_imagenet.training.evaluation import better_weights


@dataclass
class Listed:
    run: RunRecords
    updated: float  # Unix time of the run's last write (metrics.jsonl)
    page: str | None  # the run's page, relative to the index (None: not written yet)


def runs_in(root: str) -> list[Listed]:
    """The runs under a local folder or an s3:// prefix; a subfolder without metrics.jsonl is no run."""
    if s3.is_s3(root):
        return _runs_on_s3(root)
    base = Path(root)
    if not base.is_dir():
        raise ReportError(f"{base}: no such folder")
    listed = []
    for folder in sorted(p for p in base.iterdir() if (p / METRICS).is_file()):
        listed.append(Listed(read_run(folder), (folder / METRICS).stat().st_mtime,
                             f"{folder.name}/{REPORT}" if (folder / REPORT).is_file() else None))
    return listed


def _runs_on_s3(url: str) -> list[Listed]:
    bucket, prefix = s3.split_s3_url(url)
    folder = f"{prefix}/" if prefix else ""
    client = s3.client()
    try:
        objects = [item for page_ in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder)
                   for item in page_.get("Contents", [])]
    except Exception as error:  # botocore's many types: its reason, on one line
        raise ReportError(f"{url}: cannot list ({s3.reason(error)})") from None
    by_run: dict[str, dict[str, dict]] = {}
    for item in objects:
        parts = item["Key"][len(folder):].split("/")
        if len(parts) == 2:
            by_run.setdefault(parts[0], {})[parts[1]] = item
    listed = []
    with tempfile.TemporaryDirectory(prefix="dali-imagenet-index-") as staging:
        for name, files in sorted(by_run.items()):
            if METRICS not in files:
                continue
            local = Path(staging, name)
            local.mkdir()
            for file in (METRICS, CONFIG):
                if file in files:
                    client.download_file(bucket, files[file]["Key"], str(local / file))
            listed.append(Listed(read_run(local), files[METRICS]["LastModified"].timestamp(),
                                 f"{name}/{REPORT}" if REPORT in files else None))
    return listed


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return "just now"


def _plot(listed: list[Listed]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for item in listed:
        points = [((v.get("run_s") if v.get("run_s") is not None else v.get("time_s", 0)) / 3600,
                   better_weights(v, "val_")[1]) for v in item.run.validations]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=item.run.name)
    ax.set_xlabel("wall-clock hours (over every resume)")
    ax.set_ylabel("val top-1 % (raw or EMA, the better)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.13, top=0.9)
    return plot_uri(fig)


def _row(item: Listed, now: float) -> list[tuple[object, object]]:
    run, final = item.run, item.run.final
    ended, config = run.ended, run.config

    def number(value, text: str):
        return (text, value) if value is not None else ("", -1)

    cost = ended.get("cost") or {}
    data = cost.get("data") or {}  # S3's requests and bytes, priced (runs from before it was counted: none)
    hours, rate = run.wall_hours(), run.median_rate()
    name = html.escape(run.name)
    link = f"<a href=\"{html.escape(item.page)}\">{name}</a>" if item.page else f"{name} <small>(no page yet)</small>"
    config_file = run.started.get("config_file")
    return [
        (link, run.name),
        (html.escape(str(config.get("arch", "?"))), config.get("arch", "")),
        (html.escape(Path(config_file).name if config_file else "defaults"), config_file or ""),
        (f"{final.get('epoch', 0)} / {config.get('epochs', '?')}", final.get("epoch", 0)),
        number(final.get("val_top1"), f"{final.get('val_top1', 0):.2f}"),
        number(final.get("val_top5"), f"{final.get('val_top5', 0):.2f}"),
        number(final.get("val_ema_top1"), f"{final.get('val_ema_top1', 0):.2f}"),
        number(final.get("val_ema_top5"), f"{final.get('val_ema_top5', 0):.2f}"),
        number(hours, f"{hours or 0:.2f}" if (hours or 0) >= 0.1 else f"{hours or 0:.2g}"),  # a short run: not 0.00
        number(cost.get("launches"), f"{cost.get('launches', 0)}"),
        number(cost.get("overhead_hours"), _minutes(cost.get("overhead_hours", 0) * 60)),
        number(cost.get("dollars"), f"${cost.get('dollars', 0):,.2f}"),
        number(data.get("dollars"), f"${data.get('dollars', 0):,.2f}"),
        number(rate, f"{rate or 0:,.0f}"),
        (html.escape(run.state()), run.state()),
        (f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(item.updated))} ({_ago(now - item.updated)})", item.updated),
    ]


def _minutes(value: float) -> str:
    return f"{value:,.1f}" if value >= 0.1 else f"{value:.2g}"  # seconds outside training: not 0.0


def render_index(listed: list[Listed], where: str) -> str:
    now = time.time()
    header = ["run", "arch", "config", "epochs", "top-1 %", "top-5 %", "EMA top-1 %", "EMA top-5 %", "hours",
              "launches", "outside training min", "dollars", "S3 dollars", "images/s", "state", "last update"]
    rows = sorted((_row(item, now) for item in listed), key=lambda row: -row[-1][1])  # newest first
    body = (f"<p>{len(listed)} run(s) under {html.escape(where)}; click a column's head to sort by it.</p>"
            f"{sortable(header, rows, 'runs')}<h2>top-1 against hours</h2>"
            f"<img class=curves alt=\"top-1 against hours\" src=\"{_plot(listed)}\">")
    return page(f"dali-imagenet runs: {where}", body)
