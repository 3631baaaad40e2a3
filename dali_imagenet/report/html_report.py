"""A run's page: one self-contained HTML file (plots and images embedded as data URIs, one small
inline script that sorts tables, nothing fetched) from the run folder's config.yaml, metrics.jsonl,
checkpoint and predictions. Several runs: their curves overlaid, their numbers side by side.

The page of one run says each fact once: its name in the title, the headline (final top-1, state,
cost), the curves, the results, what it learned (`run_results`: per-class accuracy, confusions,
example images with Grad-CAM), the machine and the config."""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dali_imagenet.atomic import write_atomic
from dali_imagenet.errors import DaliImagenetError
from dali_imagenet.report.html_page import page, plot_uri, sortable, table
from dali_imagenet.report.run_results import learned_sections
from dali_imagenet.run.checkpoint import CheckpointError, load
from dali_imagenet.run.cost import describe_cost
from dali_imagenet.run.launches import PHASES
from dali_imagenet.run.run_folder import BEST, CONFIG, FINAL, LAST, METRICS, PREDICTIONS
from dali_imagenet.training.evaluation import better_weights


class ReportError(DaliImagenetError):
    """A folder that is not a run folder, or a metrics file that is not JSON lines."""


@dataclass
class RunRecords:
    """What a run folder holds for its page, read once (`read_run`): its config and its metrics.jsonl's
    records, sorted by kind."""
    name: str
    folder: Path
    config: dict
    steps: list[dict]  # train windows: step, loss, lr, images_per_s, data_wait
    validations: list[dict]  # per validation: step, epoch, val_top1, val_top5, (val_ema_top1)
    events: list[dict]  # started / resumed / finished / stopped records
    epochs: list[dict] = field(default_factory=list)  # per finished epoch: first_step_s, warm rate, peak memory

    @property
    def final(self) -> dict:
        return self.validations[-1] if self.validations else {}

    @property
    def best_top1(self) -> float | None:
        """The best val top-1 of the raw weights or their EMA, whichever was higher: shown as such."""
        tops = [better_weights(v, "val_")[1] for v in self.validations]
        return max(tops) if tops else None

    @property
    def started(self) -> dict:
        return next((e for e in self.events if e["event"] == "started"), {})

    @property
    def ended(self) -> dict:
        """The closing record of the last process, if it closed (a run under way has none)."""
        last = next((e for e in reversed(self.events) if e["event"] in ("started", "finished", "stopped")), {})
        return last if last.get("event") in ("finished", "stopped") else {}

    def state(self) -> str:
        ended = self.ended
        if not ended:
            return "running"
        if ended["event"] == "finished":
            return "complete"
        return f"stopped ({ended['reason']})" if ended.get("reason") else "stopped"

    def wall_hours(self) -> float | None:
        """Wall-clock hours over every process of the run: the closing record's, else the last validation's."""
        if self.ended.get("cost"):
            return self.ended["cost"]["wall_hours"]
        runs = [v.get("run_s") for v in self.validations if v.get("run_s") is not None]
        return runs[-1] / 3600 if runs else None

    def median_rate(self) -> float | None:
        rates = sorted(r["images_per_s"] for r in self.steps)
        return rates[len(rates) // 2] if rates else None


def read_run(folder: str | Path, name: str | None = None) -> RunRecords:
    folder = Path(folder)
    metrics = folder / METRICS
    if not metrics.is_file():
        raise ReportError(f"{folder}: not a run folder (no {METRICS})")
    records = []
    for number, line in enumerate(metrics.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            raise ReportError(f"{metrics}: line {number} is not JSON") from None
    config = yaml.safe_load((folder / CONFIG).read_text()) if (folder / CONFIG).is_file() else {}
    return RunRecords(name or folder.name, folder, config or {}, [r for r in records if "loss" in r and "lr" in r],
               [r for r in records if "val_top1" in r], [r for r in records if "event" in r],
               [r for r in records if "first_step_s" in r])


def _plot(runs: list[RunRecords], records: str, panels: list[tuple[str, str, list[tuple[str, str]]]]) -> str:
    """A row of panels (title, x key, [(y key, label suffix)]) of each run's `records` ("steps" or
    "validations"), one line per run and series, as a PNG data URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, x_key, series) in zip(axes[0], panels):
        for run in runs:
            for y_key, suffix in series:
                points = [(r[x_key], r[y_key]) for r in getattr(run, records) if y_key in r and x_key in r]
                if points:
                    ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, markersize=3,
                            label=f"{run.name}{suffix}" if len(runs) > 1 else (suffix.strip() or "raw"))
        ax.set_title(title)
        ax.set_xlabel(x_key)
        ax.grid(alpha=0.3)
        if len(ax.lines) > 1:
            ax.legend(fontsize=7)
    # Fixed margins, not tight_layout: that draws the figure once more (~0.3 s a report, at every run's end).
    fig.subplots_adjust(left=0.06 if len(panels) > 3 else 0.07, right=0.99, bottom=0.14, top=0.9, wspace=0.28)
    return plot_uri(fig)


def training_curves(runs: list[RunRecords]) -> str:
    """Train loss, LR, images/s and data wait by step: a PNG data URI."""
    return _plot(runs, "steps", [("train loss", "step", [("loss", "")]), ("learning rate", "step", [("lr", "")]),
                                 ("images/s", "step", [("images_per_s", "")]),
                                 ("data wait (share of time)", "step", [("data_wait", "")])])


def validation_curves(runs: list[RunRecords]) -> str:
    """Val top-1, top-5 and loss by epoch, raw and EMA: a PNG data URI (the page's, the model card's)."""
    return _plot(runs, "validations", [("val top-1 %", "epoch", [("val_top1", ""), ("val_ema_top1", " EMA")]),
                                       ("val top-5 %", "epoch", [("val_top5", ""), ("val_ema_top5", " EMA")]),
                                       ("val loss", "epoch", [("val_loss", ""), ("val_ema_loss", " EMA")])])


def newest_checkpoint(run: RunRecords) -> tuple[str | None, dict | None]:
    """(the newest checkpoint's file name, its contents), or (name, None) for an unreadable one."""
    for name in (LAST, BEST):
        if (run.folder / name).is_file():
            try:
                return name, load(run.folder / name)
            except CheckpointError:  # a damaged file: the page says so instead of failing
                return name, None
    return None, None


def _numbers(run: RunRecords, checkpoint_name: str | None, checkpoint: dict | None) -> list[tuple[str, object]]:
    final, ended = run.final, run.ended
    epochs_done = final.get("epoch", 0)
    rate = run.median_rate()
    rows = [
        ("final val top-1", f"{final['val_top1']:.2f} %" if final else "no validation yet"),
        *([("final val top-5", f"{final['val_top5']:.2f} %")] if final else []),
        *([("final EMA val top-1", f"{final['val_ema_top1']:.2f} %")] if "val_ema_top1" in final else []),
        *([("best of raw/EMA val top-1", f"{run.best_top1:.2f} %")] if run.best_top1 is not None else []),
        ("epochs validated", f"{epochs_done} of {run.config.get('epochs', '?')}"),
        ("steps", ended.get("step", run.steps[-1]["step"] if run.steps else 0)),
        *([("median images/s", f"{rate:,.0f}")] if rate else []),
    ]
    if checkpoint_name:
        saved = checkpoint.get("saved_at", "") if checkpoint else "unreadable"
        rows.append(("checkpoint", f"{checkpoint_name}, saved {saved}" +
                     (f", {checkpoint.get('num_classes')} classes" if checkpoint else "")))
    if (run.folder / FINAL).is_file():
        rows.append(("final weights", FINAL))
    for epoch in run.epochs:  # the first step at each size: a compile or a graph capture
        memory = f", peak {epoch['peak_gpu_mem_gb']:.1f} GiB" if epoch.get("peak_gpu_mem_gb") is not None else ""
        rows.append((f"epoch {epoch['epoch']} ({epoch['image_size']} px)",
                     f"first step {epoch['first_step_s']:.1f} s, then {epoch.get('warm_images_per_s') or 0:,.0f} img/s"
                     f"{memory}"))
    return rows


def launches_table(launches: list[dict]) -> str:
    """The run's launches (the closing record's): each one's machine, phases in minutes, price and
    where it came from, dollars and how it ended; a relaunch after a reclaim is a row of its own."""
    if not launches:
        return ""
    header = ["launch", "machine", "started", *[f"{phase} min" for phase in PHASES], "outside training min",
              "$/h", "price from", "dollars", "exit"]
    rows = []
    for launch in launches:
        machine = launch.get("instance", {})
        where = " ".join(str(machine[k]) for k in ("instance_type", "zone", "lifecycle") if machine.get(k)) or "-"
        phases = launch.get("phases_s", {})
        rows.append([(launch["launch"], launch["launch"]), (html.escape(where), where),
                     (html.escape(launch.get("started_at", "")), launch.get("started_at", "")),
                     *[(f"{phases.get(phase, 0) / 60:.1f}", phases.get(phase, 0)) for phase in PHASES],
                     (f"{launch['overhead_s'] / 60:.1f}", launch["overhead_s"]),
                     (f"{launch['price_per_hour']:.4g}", launch["price_per_hour"]),
                     (html.escape(launch.get("price_source", "")), launch.get("price_source", "")),
                     (f"${launch['dollars']:,.2f}", launch["dollars"]),
                     (f"{launch.get('exit_code')} {html.escape(launch.get('reason') or '')}", launch.get("exit_code"))])
    return f"<h2>Launches</h2>{sortable(header, rows, 'launches')}"


def render(runs: list[RunRecords], title: str | None = None) -> str:
    single = len(runs) == 1
    title = title or (f"{runs[0].name} · dali-imagenet" if single else f"dali-imagenet: {len(runs)} runs")
    plots = [("training", training_curves(runs)), ("validation", validation_curves(runs))]
    figures = "".join(f"<h2>{name}</h2><img class=curves alt=\"{name} curves\" src=\"{uri}\">" for name, uri in plots)
    sections = []
    for run in runs:
        final, ended = run.final, run.ended
        checkpoint_name, checkpoint = newest_checkpoint(run)
        headline = (f"<p class=final>final top-1 <span class=top1>{final['val_top1']:.2f}</span> % · "
                    f"{html.escape(run.state())}</p>" if final
                    else f"<p class=final>no validation yet · {html.escape(run.state())}</p>")
        if ended.get("cost"):
            headline += f"<p class=cost>{html.escape(describe_cost(ended['cost']))}</p>"
        init = run.started.get("init")
        if init:  # train.py --init: where its weights came from
            start = (f"a new classifier for its classes ({init['source_classes']} there)" if init["new_head"]
                     else "every weight")
            headline += f"<p class=init>started from {html.escape(str(init['source']))}: {start}</p>"
        learned = learned_sections(run, checkpoint, run.folder / PREDICTIONS) if single else ""
        machine = run.started.get("machine", {})
        sections.append(f"<section>{'' if single else f'<h2>{html.escape(run.name)}</h2>'}{headline}"
                        f"<h2>Results</h2>{table(_numbers(run, checkpoint_name, checkpoint))}{learned}"
                        f"{launches_table(ended.get('launches') or [])}"
                        f"<h2>Machine</h2>{table(sorted(machine.items())) if machine else '<p>not recorded</p>'}"
                        f"<h2>Config</h2>{table(sorted(run.config.items()))}</section>")
    if single:  # the headline first, then the curves
        return page(title, sections[0].replace("<h2>Results</h2>", figures + "<h2>Results</h2>", 1))
    return page(title, figures + "".join(sections))


def write_page(text: str, output: str | Path) -> Path:
    return write_atomic(output, text)


def write_report(folders: list[str | Path], output: str | Path) -> Path:
    return write_page(render([read_run(folder) for folder in folders]), output)
