"""A run's report, rendered: one self-contained HTML page (plots embedded as PNG, no script, no network)
from the run folder's config.yaml, metrics.jsonl and checkpoint. Several runs: curves overlaid."""
from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from dali_imagenet.checkpoint import CheckpointError, load
from dali_imagenet.errors import DaliImagenetError
from dali_imagenet.metrics import describe_cost
from dali_imagenet.run_folder import BEST, CONFIG, FINAL, LAST, METRICS


class ReportError(DaliImagenetError):
    """A folder that is not a run folder, or a metrics file that is not JSON lines."""


@dataclass
class Run:
    name: str
    folder: Path
    config: dict
    steps: list[dict]  # train windows: step, loss, lr, images_per_s, data_wait
    validations: list[dict]  # per validation: step, epoch, val_top1, val_top5, (val_ema_top1)
    events: list[dict]  # started / finished / stopped records

    @property
    def final(self) -> dict:
        return self.validations[-1] if self.validations else {}

    @property
    def best_top1(self) -> float | None:
        """The best val top-1 of the raw weights or their EMA, whichever was higher: shown as such."""
        tops = [max(v["val_top1"], v.get("val_ema_top1", -1)) for v in self.validations]
        return max(tops) if tops else None


def read_run(folder: str | Path) -> Run:
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
    return Run(folder.name, folder, config or {}, [r for r in records if "loss" in r and "lr" in r],
               [r for r in records if "val_top1" in r], [r for r in records if "event" in r])


def _plot(runs: list[Run], records: str, panels: list[tuple[str, str, list[tuple[str, str]]]]) -> str:
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
                            label=f"{run.name}{suffix}")
        ax.set_title(title)
        ax.set_xlabel(x_key)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    # Fixed margins, not tight_layout: that draws the figure once more (~0.3 s a report, at every run's end).
    fig.subplots_adjust(left=0.06 if len(panels) > 3 else 0.07, right=0.99, bottom=0.14, top=0.9, wspace=0.28)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _checkpoint_summary(run: Run) -> dict:
    for name in (LAST, BEST):
        path = run.folder / name
        if path.is_file():
            try:
                checkpoint = load(path)
            except CheckpointError:  # a damaged file: the page says so instead of failing
                return {"checkpoint": f"{name} (unreadable)"}
            state = checkpoint.get("state", {})
            return {"checkpoint": name, "saved": checkpoint.get("saved_at", ""), "arch": checkpoint.get("arch"),
                    "classes": checkpoint.get("num_classes"), "steps": state.get("step"),
                    "ema": checkpoint.get("ema") is not None}
    return {"checkpoint": "none"}


def _table(rows: list[tuple[str, object]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                               for k, v in rows) + "</table>"


def render(runs: list[Run], title: str | None = None) -> str:
    title = title or ("dali-imagenet run " + runs[0].name if len(runs) == 1 else f"dali-imagenet: {len(runs)} runs")
    plots = [
        ("training", _plot(runs, "steps", [("train loss", "step", [("loss", "")]), ("learning rate", "step", [("lr", "")]),
                                  ("images/s", "step", [("images_per_s", "")]),
                                  ("data wait (share of time)", "step", [("data_wait", "")])])),
        ("validation", _plot(runs, "validations", [("val top-1 %", "epoch", [("val_top1", ""), ("val_ema_top1", " EMA")]),
                                    ("val top-5 %", "epoch", [("val_top5", ""), ("val_ema_top5", " EMA")]),
                                    ("val loss", "epoch", [("val_loss", ""), ("val_ema_loss", " EMA")])])),
    ]
    sections = []
    for run in runs:
        final, started = run.final, next((e for e in run.events if e["event"] == "started"), {})
        ended = next((e for e in reversed(run.events) if e["event"] in ("finished", "stopped")), {})
        rates = sorted(r["images_per_s"] for r in run.steps)
        numbers = [
            ("final val top-1", f"{final['val_top1']:.2f} %" if final else "no validation yet"),
            ("final val top-5", f"{final['val_top5']:.2f} %" if final else ""),
            *([("final EMA val top-1", f"{final['val_ema_top1']:.2f} %")] if "val_ema_top1" in final else []),
            ("best of raw/EMA val top-1", f"{run.best_top1:.2f} %" if run.best_top1 is not None else ""),
            ("epochs", f"{final.get('epoch', 0)} of {run.config.get('epochs', '?')}"),
            ("steps", ended.get("step", run.steps[-1]["step"] if run.steps else 0)),
            ("median images/s", f"{rates[len(rates) // 2]:,.0f}" if rates else ""),
            ("state", ended.get("event", "running") + (f" ({ended['reason']})" if ended.get("reason") else "")),
            *([("cost", describe_cost(ended["cost"]))] if ended.get("cost") else []),
            *_checkpoint_summary(run).items(),
            *([("final weights", FINAL)] if (run.folder / FINAL).is_file() else []),
        ]
        machine = started.get("machine", {})
        headline = (f"<p class=final>final top-1 <span class=top1>{final['val_top1']:.2f}</span> %</p>" if final
                    else "<p class=final>no validation yet</p>")
        if ended.get("cost"):
            headline += f"<p class=cost>{html.escape(describe_cost(ended['cost']))}</p>"
        sections.append(f"<section><h2>{html.escape(run.name)}</h2>{headline}<h3>Results</h3>{_table(numbers)}"
                        f"<h3>Machine</h3>{_table(sorted(machine.items())) if machine else '<p>not recorded</p>'}"
                        f"<h3>Config</h3>{_table(sorted(run.config.items()))}</section>")
    figures = "".join(f"<h2>{name}</h2><img alt=\"{name} curves\" src=\"{uri}\">" for name, uri in plots)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}}
img{{max-width:100%;display:block;margin:1em 0}}table{{border-collapse:collapse;margin:.5em 0}}
th,td{{border:1px solid #ccc;padding:2px 8px;text-align:left;font-size:90%}}th{{background:#f4f4f4}}
.final{{font-size:140%}}</style></head>
<body><h1>{html.escape(title)}</h1>{figures}{''.join(sections)}</body></html>
"""


def write_report(folders: list[str | Path], output: str | Path) -> Path:
    output = Path(output)
    text = render([read_run(folder) for folder in folders])
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(text)
    tmp.replace(output)
    return output
