"""Converting straight from the Hub against converting a local copy: img/s, MB/s, disk, in one run.

    python -m benchmarks.hub [--data FOLDER] [--workers N] [--shard-size 64] [--repeats 3] [--smoke]

FOLDER holds the hub's parquet files (`data/*.parquet`), or is an ImageFolder tree (such as
Imagenette) that is first written in the hub's format (rows shuffled, 1,000 a file, 100 a row
group, as the Hub's ImageNet files have); default: the bundled sample, built in build/bench. Small
data mostly measures fixed costs (the Hub client's import, resolving the repo, the footers: about
a second a run here); give thousands of images to see the steady rate. The stand-in Hub
(standins/hub.py) serves the same files on 127.0.0.1, and
`shard-imagenet` converts them alternately from the folder (the baseline) and from
`hf://datasets/...`, each run in a process of its own, `--repeats` times; every Hub run's shards
must equal the local run's byte for byte. Reported: the median img/s and MB/s of each, the ratio,
and for the Hub run its peak scratch disk (all it writes outside its output: its temporary
folder and the Hub client's home, sampled every 50 ms), the peak of shards in flight (`*.tmp` in
the output) and the peak RSS. On 127.0.0.1 the link is never the limit: this measures what
reading by byte range costs the converter, not a real Hub's bandwidth.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.common import REPO, machine
from standins.hub import StandInHub

REPO_ID = "ILSVRC/imagenet-1k"


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    total = 0
    for path in folder.rglob(pattern) if folder.exists() else ():
        try:
            total += path.stat().st_size if path.is_file() else 0
        except FileNotFoundError:  # renamed into place while we looked
            pass
    return total


class PeakDisk:
    """The largest total size seen of some folders (and of `*.tmp` files in another), every 50 ms."""

    def __init__(self, scratch: list[Path], output: Path):
        self.scratch, self.output = scratch, output
        self.peak_scratch = self.peak_in_flight = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak_scratch = max(self.peak_scratch, sum(folder_bytes(f) for f in self.scratch))
            self.peak_in_flight = max(self.peak_in_flight, folder_bytes(self.output, "*.tmp"))
            self._stop.wait(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def convert_once(source: str, output: Path, args, env: dict) -> dict:
    shutil.rmtree(output, ignore_errors=True)
    command = [sys.executable, "-m", "shard_tools.cli", source, str(output), "--shard-size", str(args.shard_size),
               "--workers", str(args.workers), "--quiet"]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    manifest = json.loads((output / "manifest.json").read_text())
    images = sum(info["read"] for info in manifest["splits"].values())
    peak_rss = float(result.stdout.split("peak RSS ")[1].split(" MB")[0])
    return {"seconds": seconds, "images": images, "images_per_s": images / seconds, "peak_rss_mb": peak_rss}


def shard_digest(output: Path) -> dict[str, str]:
    return {str(p.relative_to(output)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(output.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def ensure_data(work: Path, smoke: bool) -> Path:
    from shard_tools.sample import make_sample

    sample = work / ("sample-smoke" if smoke else "sample")
    if not (sample / "data").is_dir():
        make_sample(sample, *((3, 2) if smoke else (60, 20)))
    return sample


def hub_parquet_from_imagefolder(tree: Path, out: Path, rows_per_file: int = 1000, rows_per_group: int = 100) -> Path:
    """An ImageFolder tree written once as the hub's parquet files (out/data/*.parquet)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shard_tools.sample import hf_schema
    from shard_tools.sources import open_source, read_unit

    if (out / "data").is_dir():
        return out
    source = open_source(tree, ("train", "validation"))
    schema = hf_schema(source.class_names)
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "data").mkdir(parents=True)
    for split, info in source.splits.items():
        units = [info.units[i] for i in np.random.default_rng(0).permutation(len(info.units))]
        count = -(-len(units) // rows_per_file)
        for index in range(count):
            records = [
                r for u in units[index * rows_per_file : (index + 1) * rows_per_file] for r in read_unit(u, tree)[0]
            ]
            table = pa.Table.from_pydict({"image": [{"bytes": r.data, "path": Path(r.path).name} for r in records],
                                          "label": [r.label for r in records]}, schema=schema)
            pq.write_table(table, staging / "data" / f"{split}-{index:05d}-of-{count:05d}.parquet",
                           row_group_size=rows_per_group)
    staging.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a folder of the hub's parquet files (data/*.parquet); default: the sample")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default="build/bench", help="where the sample and the outputs go")
    parser.add_argument("--out", default="bench-results/hub.jsonl")
    parser.add_argument("--smoke", action="store_true", help="tiny: checks that everything runs")
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.shard_size, args.workers = 1, 8, 1
    work = Path(args.work) if Path(args.work).is_absolute() else REPO / args.work
    data = Path(args.data) if args.data else ensure_data(work, args.smoke)
    if not list(data.glob("*.parquet")) and not list(data.glob("data/*.parquet")):
        data = hub_parquet_from_imagefolder(data, work / f"hub-parquet-{data.name}")
    files = sorted((data / "data" if (data / "data").is_dir() else data).glob("*.parquet"))
    source_bytes = sum(p.stat().st_size for p in files)
    hub = StandInHub(data, REPO_ID)  # data/*.parquet, or parquet files at the top: both found as locally
    scratch = [work / "hub-scratch" / "tmp", work / "hub-scratch" / "hf-home"]
    for folder in scratch:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    hub_env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_accepted", "TMPDIR": str(scratch[0]),
               "HF_HOME": str(scratch[1])}
    runs: dict[str, list[dict]] = {"local": [], "hub": []}
    peaks = {"scratch": 0, "in_flight": 0}
    try:
        for repeat in range(args.repeats):
            runs["local"].append(convert_once(str(data), work / "hub-bench-local", args, dict(os.environ)))
            output = work / "hub-bench-hub"
            with PeakDisk(scratch, output) as disk:
                runs["hub"].append(convert_once(f"hf://datasets/{REPO_ID}", output, args, hub_env))
            peaks["scratch"] = max(peaks["scratch"], disk.peak_scratch)
            peaks["in_flight"] = max(peaks["in_flight"], disk.peak_in_flight)
            if shard_digest(output) != shard_digest(work / "hub-bench-local"):
                raise SystemExit(f"repeat {repeat}: the Hub run's shards differ from the local run's")
    finally:
        hub.close()
    print(report(runs, source_bytes, peaks, args, Path(args.out)))


def report(runs: dict[str, list[dict]], source_bytes: int, peaks: dict, args, out: Path) -> str:
    rows, records = [], []
    for name, label in (("local", "local copy (baseline)"), ("hub", "stand-in Hub, hf://")):
        rate = statistics.median(r["images_per_s"] for r in runs[name])
        seconds = statistics.median(r["seconds"] for r in runs[name])
        mb_per_s = source_bytes / 1e6 / seconds
        records.append({"benchmark": "hub", "source": name, "images": runs[name][0]["images"],
                        "source_mb": source_bytes / 1e6, "images_per_s": rate, "mb_per_s": mb_per_s,
                        "all_images_per_s": [r["images_per_s"] for r in runs[name]],
                        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[name]),
                        "workers": args.workers, "shard_size": args.shard_size, "env": machine()})
        rows.append((label, rate, mb_per_s, max(r["peak_rss_mb"] for r in runs[name])))
    records[1].update(ratio_to_local=records[1]["images_per_s"] / records[0]["images_per_s"],
                      peak_scratch_mb=peaks["scratch"] / 1e6, peak_in_flight_mb=peaks["in_flight"] / 1e6,
                      shards_identical=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    lines = [f"{records[0]['images']} images, {source_bytes / 1e6:.1f} MB of parquet, {args.workers} worker(s), "
             f"median of {args.repeats}",
             "| source | img/s | MB/s | peak RSS (MB) |", "|---|---:|---:|---:|"]
    lines += [f"| {label} | {rate:.0f} | {mb:.1f} | {rss:.0f} |" for label, rate, mb, rss in rows]
    lines.append(f"Hub / local: {records[1]['ratio_to_local']:.2f}x; shards byte-identical; Hub run's scratch disk "
                 f"outside its output: peak {peaks['scratch'] / 1e6:.1f} MB; shards in flight: peak "
                 f"{peaks['in_flight'] / 1e6:.1f} MB")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
