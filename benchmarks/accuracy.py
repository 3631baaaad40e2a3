"""Accuracy on real photos against time: each recipe trained and evaluated by the real train.py.

    python -m benchmarks.accuracy --data IMAGENETTE_DIR --config configs/imagenette-cpu.yaml \\
        --config configs/imagenette-cpu-seed.yaml [--minutes 15] [--device cpu]
    # transfer: train on half the classes, then fine-tune on the other half against training from scratch
    python -m benchmarks.accuracy --data IMAGENETTE_DIR --classes 0:5 --config configs/imagenette-cpu.yaml --work W1
    python -m benchmarks.accuracy --data IMAGENETTE_DIR --classes 5:10 --config configs/imagenette-cpu.yaml \\
        --config configs/imagenette-finetune.yaml --init imagenette-finetune=W1/runs/imagenette-cpu --work W2

IMAGENETTE_DIR is an ImageFolder tree (`train/<synset>/*.JPEG`, `val/<synset>/*.JPEG`; Imagenette
from fast.ai, downloaded by you) or anything else `shard-imagenet` reads. It is sharded once into
--work; then each config trains in its own process, one after the other on the same machine, for
at most --minutes (train.py's `max_minutes`: a recipe must fit the budget by its own epochs).
A run cut short by the budget is evaluated from its last checkpoint. `--classes A:B` keeps the
sorted classes A to B-1 of the tree (a split of the classes, for transfer); `--init NAME=SOURCE`
starts config NAME from trained weights (train.py's --init).

Writes JSON lines (one per config: top-1 of the raw and EMA weights, wall seconds, images seen,
the validation curve), a PNG of val top-1 against wall-clock seconds and against images seen (one
line per config), and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, machine, save_figure

SMOKE_SETTINGS = ["arch=resnet10", "width=16", "epochs=1", "image_size=32", "min_image_size=0", "val_image_size=32",
                  "batch_size=8", "loader_threads=1", "log_every=1", "compile=false", "val_every=1"]


def shard(data: Path, work: Path) -> Path:
    """Shards `data` into `work/shards` (kept for later runs of the same source)."""
    from shard_tools.convert import Options, convert
    from shard_tools.sources import open_source

    out = work / "shards"
    manifest = out / "manifest.json"
    fingerprint = open_source(data, ("train", "validation")).fingerprint
    if manifest.is_file() and json.loads(manifest.read_text()).get("source", {}).get("fingerprint") == fingerprint:
        return out
    convert(data, str(out), ("train", "validation"), Options(shard_size=512), workers=os.cpu_count() or 1,
            overwrite=True, progress=True)
    return out


def class_subset(data: Path, classes: str, work: Path) -> Path:
    """An ImageFolder tree of the sorted classes `A:B` of `data` (links, no copies), in `work`."""
    first, _, end = classes.partition(":")
    synsets = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())[int(first):int(end)]
    if not synsets:
        sys.exit(f"error: --classes {classes}: no classes there ({data / 'train'} has {len(synsets)})")
    subset = work / f"classes-{first}-{end}"
    for split in ("train", "val"):
        (subset / split).mkdir(parents=True, exist_ok=True)
        for synset in synsets:
            link = subset / split / synset
            if not link.exists():
                link.symlink_to((data / split / synset).resolve(), target_is_directory=True)
    return subset


def train(config: Path, shards: Path, run_dir: Path, *, minutes: float, device: str, sets: list[str],
          init: str | None = None, budget_minutes: float | None = None) -> dict:
    command = [
        sys.executable,
        str(REPO / "train.py"),
        "--dali",
        "--spot",
        "off",
        "--data",
        str(shards),
        "--config",
        str(config),
        "--out",
        str(run_dir),
        "--overwrite",
        "--device",
        device,
        "--no-wandb",
        "--set",
        f"max_minutes={minutes}",
        *[a for s in sets for a in ("--set", s)],
        *(["--init", init] if init else []),
        *(["--budget-hours", str(budget_minutes / 60)] if budget_minutes else []),
    ]
    started = time.perf_counter()
    with open(run_dir.with_suffix(".log"), "w") as log:
        result = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    if result.returncode != 0:
        tail = run_dir.with_suffix(".log").read_text()[-2000:]
        raise RuntimeError(f"{config}: train.py failed (exit {result.returncode}):\n{tail}")
    return {"wall_s": time.perf_counter() - started}


def evaluate(checkpoint: Path, shards: Path, device: str, weights: str) -> dict:
    result = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--checkpoint", str(checkpoint), "--data",
                             str(shards), "--dali", "--device", device, "--weights", weights, "--json"],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def summarize(name: str, config: Path, run_dir: Path, shards: Path, device: str, wall_s: float) -> dict:
    """The run's validation curve and final numbers; a run the budget cut short is evaluated now."""
    from dali_imagenet.run.checkpoint import load
    from dali_imagenet.run.run_folder import LAST, METRICS
    from dali_imagenet.training.evaluation import better_weights

    records = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]
    # an --init run's first point is its initial weights' score, before any step (time 0, no image seen)
    curve = [{"epoch": r["epoch"], "time_s": r.get("time_s", 0.0), "images_seen": r.get("images_seen", 0),
              "top1": r["val_top1"], **({"ema_top1": r["val_ema_top1"]} if "val_ema_top1" in r else {})}
             for r in records if "val_top1" in r]
    end = records[-1]
    last = load(run_dir / LAST)
    state, cfg = last["state"], last["config"]
    if not curve or curve[-1]["images_seen"] != state["step"] * cfg["batch_size"]:  # stopped by the budget
        point = {"epoch": state["epoch"], "time_s": max(r.get("time_s", 0) for r in records if "time_s" in r)
                 if curve else wall_s, "images_seen": state["step"] * cfg["batch_size"],
                 "top1": evaluate(run_dir / LAST, shards, device, "raw")["top1"]}
        if last.get("ema") is not None:
            point["ema_top1"] = evaluate(run_dir / LAST, shards, device, "ema")["top1"]
        curve.append(point)
    final = curve[-1]
    samples = json.loads((shards / "manifest.json").read_text())["splits"]["train"]["samples"]
    steps_per_epoch = samples // cfg["batch_size"]
    sizes = sorted({r["image_size"] for r in records if "image_size" in r})
    return {"config": name, "path": str(config), "arch": cfg["arch"], "epochs_planned": cfg["epochs"],
            "epochs_done": round(state["step"] / steps_per_epoch, 2),
            "steps": state["step"], "finished": end.get("event") == "finished", "stop_reason": end.get("reason"),
            "train_sizes": sizes, "val_image_size": cfg["val_image_size"], "wall_s": wall_s,
            "images_seen": final["images_seen"], "top1": final["top1"], "ema_top1": final.get("ema_top1"),
            "best_top1": better_weights(final)[1], "curve": curve}


def save_chart(results: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dali_imagenet.training.evaluation import better_weights

    fig, (by_time, by_images) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for result in results:
        best = [better_weights(point)[1] for point in result["curve"]]
        label = f"{result['config']} (best of raw/EMA {result['best_top1']:.1f} %)"
        line, = by_time.plot([p["time_s"] / 60 for p in result["curve"]], best, marker="o", label=label)
        by_images.plot([p["images_seen"] for p in result["curve"]], best, marker="o", color=line.get_color())
    by_time.set_xlabel("wall-clock minutes of training")
    by_images.set_xlabel("training images seen")
    by_time.set_ylabel("val top-1 %, best of raw and EMA weights")
    for ax in (by_time, by_images):
        ax.grid(alpha=0.3)
    by_time.legend(fontsize=8)
    return save_figure(fig, results, "accuracy on real photos", path)


def markdown_table(results: list[dict]) -> str:
    lines = ["| config | arch | starts from | train px | val px | epochs | stopped by | images seen | wall min | top-1 "
             "| EMA top-1 |", "| --- | --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        ema = f"{r['ema_top1']:.2f}" if r["ema_top1"] is not None else ""
        start = "/".join(Path(r["init"]).parts[-3:]) if r.get("init") else "scratch"
        lines.append(f"| {r['config']} | {r['arch']} | {start} | {'-'.join(map(str, r['train_sizes']))} | "
                     f"{r['val_image_size']} | "
                     f"{r['epochs_done']}/{r['epochs_planned']} | {r['stop_reason'] or 'finished'} | "
                     f"{r['images_seen']:,} | {r['wall_s'] / 60:.1f} | {r['top1']:.2f} | {ema} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="ImageFolder tree (train/, val/) or HF parquet folder")
    parser.add_argument("--config", action="append", required=True, type=Path, help="a recipe; repeat to compare")
    parser.add_argument("--minutes", type=float, default=15.0, help="training budget per config (wall clock)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override in every config")
    parser.add_argument("--work", type=Path, default=REPO / "build" / "accuracy")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "accuracy.jsonl")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and one epoch: checks the plumbing")
    parser.add_argument("--classes", metavar="A:B", help="only the sorted classes A to B-1 (a split, for transfer)")
    parser.add_argument("--budget-minutes", type=float, help="train.py --budget-hours: each config picks the schedule "
                        "that fits (--minutes then only stops a run that overruns)")
    parser.add_argument("--init", action="append", default=[], metavar="NAME=SOURCE",
                        help="start config NAME (its file's stem) from SOURCE's weights (train.py --init)")
    args = parser.parse_args()
    inits = dict(item.split("=", 1) for item in args.init)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for config in args.config:
        if not config.is_file():
            sys.exit(f"error: {config}: no such config file")
    if not args.data.is_dir():
        sys.exit(f"error: {args.data}: no such folder")
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shards = shard(class_subset(args.data, args.classes, args.work) if args.classes else args.data, args.work)
    sets = [*(SMOKE_SETTINGS if args.smoke else []), *args.set]
    env, results = machine(), []
    for i, config in enumerate(args.config, 1):
        name = config.stem + (f"@budget-{args.budget_minutes:g}min" if args.budget_minutes else "")
        run_dir = args.work / "runs" / name
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        print(f"[{i}/{len(args.config)}] {name}: training for at most {args.minutes:g} min on {device} "
              f"(log: {run_dir.with_suffix('.log')})", flush=True)
        timing = train(config, shards, run_dir, minutes=args.minutes, device=device, sets=sets,
                       init=inits.get(config.stem), budget_minutes=args.budget_minutes)
        result = {**summarize(name, config, run_dir, shards, device, timing["wall_s"]), "env": env,
                  "init": inits.get(config.stem), "classes": args.classes,
                  "options": {"minutes": args.minutes, "sets": sets, "smoke": args.smoke, "device": device,
                              "budget_minutes": args.budget_minutes}}
        print(f"    top-1 {result['top1']:.2f}%"
              + (f", EMA {result['ema_top1']:.2f}%" if result["ema_top1"] is not None else "")
              + f" after {result['wall_s'] / 60:.1f} min", flush=True)
        results.append(result)
    with open(args.out, "a") as sink:
        sink.writelines(json.dumps(r) + "\n" for r in results)
    print()
    print(markdown_table(results))
    chart = save_chart(results, args.out.with_suffix(".png"))
    print(f"\nresults: {args.out} (JSON lines)  chart: {chart}")


if __name__ == "__main__":
    main()
