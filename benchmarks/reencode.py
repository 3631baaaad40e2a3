"""Bytes per image and DALI's CPU decode rate for three shard sets made from one source, in one run:
the originals (pass-through), `--max-side N` (only larger images re-encoded) and `--reencode
--max-side N --quality Q` (FFCV's ImageNet: every image re-encoded). Host Huffman decoding costs
time per compressed byte: what an L4 host (no hardware JPEG decoder, 4 vCPUs) decodes per second.

    python -m benchmarks.reencode --source /path/to/imagefolder-or-shards [--split validation]

Decoding: DALI's `decoders.image` on the CPU (full decode, no resize), `--threads` threads,
batches of 128, in one process of its own: a warm-up pass of each set, then `--repeats` rounds of
one timed pass of each set in turn (median, min-max), so a drifting machine load shifts all alike.
Beside the wall-clock rate, the process's CPU time per image (all its threads): what decoding
costs a core; its least value over the rounds is the one a busy shared machine disturbed least.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, run_isolated, summarize


def decode_rates(sets: list[str], split: str, threads: int, repeats: int, batch: int = 128) -> list[dict]:
    """DALI CPU decode img/s over the whole split of each set: one warm-up pass each, then
    `repeats` rounds, each timing one pass of every set in turn (a machine whose load drifts
    then shifts all sets alike). One pipeline runs at a time."""
    from nvidia.dali import fn, pipeline_def, types

    from dali_imagenet.data.shards import find_shards

    @pipeline_def
    def decode(shards):
        jpegs = fn.readers.webdataset(paths=list(shards.tars), index_paths=list(shards.indices), ext=["jpg"],
                                      name="reader", pad_last_batch=False)
        return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)

    pipes, passes = [], []
    for data in sets:
        shards = find_shards(data, split)
        pipe = decode(shards, batch_size=batch, num_threads=threads, device_id=None, seed=0, prefetch_queue_depth=1)
        pipe.build()
        passes.append(-(-shards.samples // batch))
        for _ in range(passes[-1]):  # warm-up: file cache, allocations
            pipe.run()
        pipes.append(pipe)
    rates: list[list[float]] = [[] for _ in sets]
    cpu_ms: list[list[float]] = [[] for _ in sets]
    for _ in range(repeats):
        for i, pipe in enumerate(pipes):
            started, cpu_started = time.perf_counter(), time.process_time()
            for _ in range(passes[i]):
                pipe.run()
            rates[i].append(passes[i] * batch / (time.perf_counter() - started))
            cpu_ms[i].append((time.process_time() - cpu_started) * 1000 / (passes[i] * batch))
    return [{**summarize(r), "cpu_ms_per_image": statistics.median(c), "cpu_ms_per_image_min": min(c),
             "cpu_ms_per_image_all": c,
             "threads": threads, "batch": batch} for r, c in zip(rates, cpu_ms)]


def set_stats(folder: Path, split: str) -> dict:
    from PIL import Image

    from dali_imagenet.data.shardformat import iter_components

    sizes, sides, pixels = [], [], []
    for tar in sorted((folder / split).glob("*.tar")):
        for _, data in iter_components(tar, tar.with_suffix(".idx")):
            sizes.append(len(data))
            with Image.open(io.BytesIO(data)) as image:
                sides.append(max(image.size))
                pixels.append(image.size[0] * image.size[1])
    return {"images": len(sizes), "bytes_per_image": sum(sizes) / len(sizes), "max_side_px": max(sides),
            "mean_pixels": sum(pixels) / len(pixels), "bytes_per_pixel": sum(sizes) / sum(pixels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="an ImageFolder tree, the Hub's parquet files or shards")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--max-side", type=int, default=500)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", help="where the three sets go (default: a temporary folder)")
    parser.add_argument("--decode", nargs="+", metavar="SHARDS", help=argparse.SUPPRESS)  # the isolated measurement
    args = parser.parse_args()
    if args.decode:
        print(json.dumps({"rates": decode_rates(args.decode, args.split, args.threads, args.repeats)}))
        return
    from shard_tools.convert import Options, convert

    work = Path(args.work or tempfile.mkdtemp(prefix="reencode-"))
    sets = {"originals": Options(shard_size=512),
            f"--max-side {args.max_side}": Options(shard_size=512, max_side=args.max_side, quality=args.quality),
            f"--reencode --max-side {args.max_side} --quality {args.quality}":
                Options(shard_size=512, max_side=args.max_side, quality=args.quality, reencode=True)}
    rows = []
    for name, options in sets.items():
        out = work / name.replace("--", "").replace(" ", "-")
        if not (out / "manifest.json").is_file():
            convert(args.source, str(out), (args.split,), options, overwrite=True, progress=False,
                    workers=os.cpu_count() or 1)
        rows.append({"set": name, **set_stats(out, args.split), "path": str(out)})
    rates = run_isolated("benchmarks.reencode", ["--source", args.source, "--split", args.split, "--threads",
                                                 str(args.threads), "--repeats", str(args.repeats), "--decode",
                                                 *[row["path"] for row in rows]])["rates"]
    for row, rate in zip(rows, rates):
        row["decode"] = rate
    base = rows[0]
    print(f"{args.source} ({args.split}), DALI CPU decode on {args.threads} thread(s), "
          f"{machine()['cpu_count']} CPUs; medians of {args.repeats}\n")
    print("| set | bytes/image | vs originals | max side | DALI CPU decode img/s (min-max) | vs originals "
          "| CPU ms/image, median (least) | img/s per busy core (from the least) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        decode = row["decode"]
        print(f"| {row['set']} | {row['bytes_per_image'] / 1000:.1f} KB | "
              f"{row['bytes_per_image'] / base['bytes_per_image']:.2f}x | {row['max_side_px']} px | "
              f"{decode['images_per_s']:,.0f} ({decode['images_per_s_min']:,.0f}-{decode['images_per_s_max']:,.0f}) | "
              f"{decode['images_per_s'] / base['decode']['images_per_s']:.2f}x | {decode['cpu_ms_per_image']:.3f} "
              f"({decode['cpu_ms_per_image_min']:.3f}) | {1000 / decode['cpu_ms_per_image_min']:,.0f} |")
    print(json.dumps({"machine": machine(), "rows": rows}))


if __name__ == "__main__":
    main()
