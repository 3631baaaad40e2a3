"""Turns benchmark records into a markdown table (with ratios to the baseline and the limit) and a chart."""
from __future__ import annotations

from pathlib import Path

from benchmarks.common import save_figure
from dali_imagenet.data.decoder import short


def _rate(record: dict) -> float | None:
    return record.get("images_per_s")


def add_ratios(results: list[dict]) -> None:
    """Each loader against the decode limit and the baseline on the same shards; each end-to-end run
    against its synthetic ceiling; each step against float32 NCHW eager of the same network."""
    limits = {r["shards"]: _rate(r) for r in results if r["stage"] == "limit" and _rate(r)}
    baselines = {(r["shards"], r["split"]): _rate(r) for r in results
                 if r["stage"] == "loader" and r["backend"] == "torchvision" and _rate(r)}
    ceilings = {(r["name"], r["image_size"]): _rate(r) for r in results
                if r["stage"] == "step" and not r["compile"] and _rate(r)}
    eager_fp32 = {r["arch"]: _rate(r) for r in reversed(results) if r["stage"] == "step" and r["dtype"] == "float32"
                  and not r["channels_last"] and not r["compile"] and _rate(r)}  # each network against its own
    for r in results:
        rate = _rate(r)
        if rate is None:
            continue
        if r["stage"] == "loader":
            if r["shards"] in limits:
                r["vs_limit"] = rate / limits[r["shards"]]
            if (r["shards"], r["split"]) in baselines:
                r["vs_baseline"] = rate / baselines[(r["shards"], r["split"])]
        elif r["stage"] == "end-to-end" and (r["ceiling"], r["image_size"]) in ceilings:
            r["vs_ceiling"] = rate / ceilings[(r["ceiling"], r["image_size"])]
        elif r["stage"] == "step" and r["arch"] in eager_fp32:
            r["vs_baseline"] = rate / eager_fp32[r["arch"]]


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| stage | what | shards / device | img/s (median) | spread | vs baseline | vs limit / ceiling | data wait "
        "| JPEG decoder |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        where = r.get("shards") or r.get("device", "")
        if r["stage"] == "step":
            where = f"{r['device']}, batch {r['batch_size']}, {r['image_size']} px"
        if "error" in r:
            lines.append(f"| {r['stage']} | {r['name']} | {where} | failed | {r['error']} | | | | |")
            continue
        ratio = lambda key: f"{r[key]:.2f}x" if key in r else ""
        limit = ratio("vs_limit") or ratio("vs_ceiling")
        wait = f"{r['data_wait']:.0%}" if "data_wait" in r else ""
        decoding = short(r["jpeg_decoder"]) if "jpeg_decoder" in r else ""
        lines.append(
            f"| {r['stage']} | {r['name']} | {where} | {r['images_per_s']:,.0f} | "
            f"{r['images_per_s_min']:,.0f}-{r['images_per_s_max']:,.0f} | {ratio('vs_baseline')} | {limit} | {wait} "
            f"| {decoding} |"
        )
    machine = results[0]["env"] if results else {}
    lines.append("")
    lines.append(
        f"machine: {machine.get('cpu_count')} CPUs, GPU {machine.get('gpu') or 'none'}; torch "
        f"{machine.get('torch')}, DALI {machine.get('nvidia-dali-cuda120')}, commit {machine.get('git_commit')}"
    )
    return "\n".join(lines)


def save_chart(results: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in results if _rate(r)]
    colours = {"limit": "#999999", "loader": "#4c72b0", "step": "#dd8452", "end-to-end": "#55a868"}
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(shown) + 1.5))
    labels = [f"{r['stage']}: {r['name']} [{r.get('shards', r.get('device', ''))}]" for r in shown]
    medians = [r["images_per_s"] for r in shown]
    errors = [[m - r["images_per_s_min"] for m, r in zip(medians, shown)],
              [r["images_per_s_max"] - m for m, r in zip(medians, shown)]]
    ax.barh(range(len(shown)), medians, xerr=errors, color=[colours[r["stage"]] for r in shown])
    ax.set_yticks(range(len(shown)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")  # loaders run at thousands, a CPU train step at tens: both must be readable
    for y, value in enumerate(medians):
        ax.text(value, y, f" {value:,.0f}", va="center", fontsize=7)
    ax.set_xlabel("images / s, log scale (median of repeats; whiskers: min-max)")
    return save_figure(fig, results, "dali-imagenet benchmarks", path)
