"""`make bench` / `python -m benchmarks`: images/s of every stage, each against its baseline and limit.

    python -m benchmarks                     # all, on the bundled sample (built if missing)
    python -m benchmarks --only loader step  # a subset
    python -m benchmarks --only s3           # shards on S3 behind 0/10/20 ms: streamed vs staged (benchmarks.s3)
    python -m benchmarks --only serve        # serve.py over HTTP: 1/8/32 clients, batching on/off (benchmarks.serve)
    python -m benchmarks --only step --arch resnet18 timm:efficientnet_b0   # the step of several networks
    python -m benchmarks --smoke             # seconds: tiny sizes, checks the plumbing only

Every measurement runs in a process of its own, after a warm-up, as >= 3 repeats (median and
spread). Results: JSON lines in --out (default bench-results/results.jsonl, one per measurement,
each with the machine, versions and options), a markdown table on stdout, a PNG chart beside it.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import torch

from benchmarks.common import REPO, machine, run_isolated
from benchmarks.report import add_ratios, markdown_table, save_chart

STAGES = ("loader", "step", "end-to-end", "s3", "serve")


def ensure_shards(work: Path, smoke: bool) -> dict[str, Path]:
    """The bundled sample, sharded at full size and with --max-side 256."""
    from shard_tools.convert import Options, convert
    from shard_tools.sample import make_sample

    sample = work / ("sample-smoke" if smoke else "sample")
    if not (sample / "data").is_dir():
        make_sample(sample, *((3, 2) if smoke else (60, 20)))
    shards = {}
    for name, max_side in (("full", None),) if smoke else (("full", None), ("max-side-256", 256)):
        out = work / f"shards-{name}{'-smoke' if smoke else ''}"
        if not (out / "manifest.json").is_file():
            convert(sample, str(out), ("train", "validation"), Options(shard_size=64, max_side=max_side),
                    overwrite=True, progress=False)
        shards[name] = out
    return shards


def loader_runs(shards: dict[str, Path], device: str, smoke: bool):
    batch, size = (8, 64) if smoke else (64, 224)
    timing = ["--warmup-batches", "1", "--batches", "2", "--repeats", "3"] if smoke else \
             ["--warmup-batches", "5", "--batches", "30", "--repeats", "3"]
    threads = str(os.cpu_count())
    for shard_name, path in shards.items():
        common = ["--data", str(path), "--batch-size", str(batch), "--image-size", str(size), "--threads", threads]
        yield ({"stage": "limit", "name": f"decode limit: 1-thread libjpeg-turbo x {threads}", "shards": shard_name},
               ["--backend", "decode-limit", *common, *timing])
        for backend in ("dali", "torchvision"):
            for split in ("train",) if smoke else ("train", "validation"):
                devices = ["cpu"] + (["cuda"] if device == "cuda" and backend == "dali" else [])
                for dev in devices:
                    yield ({"stage": "loader", "name": f"{backend} {split} ({dev})", "backend": backend,
                            "split": split, "device": dev, "shards": shard_name, "batch_size": batch},
                           ["--backend", backend, "--split", split, "--device", dev, *common, *timing])


def step_sizes(device: str, smoke: bool) -> tuple[str, int, int, list[str]]:
    """(arch, batch, image size, timing flags), shared by the synthetic and end-to-end runs so that
    an end-to-end rate is always compared with the ceiling measured at the same sizes."""
    if smoke:
        return "resnet18", 4, 32, ["--warmup-steps", "1", "--steps", "2", "--repeats", "3"]
    if device == "cuda":
        return "resnet50", 256, 224, ["--warmup-steps", "5", "--steps", "20", "--repeats", "3"]
    # 2 CPU cores: a smaller input keeps this stage to minutes
    return "resnet50", 16, 128, ["--warmup-steps", "1", "--steps", "3", "--repeats", "3"]


def step_runs(device: str, smoke: bool, sizes: list[int] | None = None, arch: str | None = None):
    """Every dtype x layout x compile at one size; with `sizes`, the size sweep of the product's
    own setting (channels-last; bf16 on a GPU, fp32 on a CPU without fast bf16), eager and compiled.
    `arch`: another network than the stage's ResNet (ours or `timm:NAME`)."""
    default_arch, batch, size, timing = step_sizes(device, smoke)
    arch = arch or default_arch
    dtypes = ["float32", "bfloat16"] + (["float16"] if device == "cuda" else [])
    if smoke:  # the plumbing, once: the product's own dtype on this device
        dtypes = ["bfloat16" if device == "cuda" else "float32"]
    if sizes:
        dtypes = ["bfloat16" if device == "cuda" else "float32"]
    layouts = (True,) if (smoke or sizes) else (True, False)
    compiles = (False,) if smoke else (False, True)
    for image_size, dtype, channels_last, compiled in itertools.product(sizes or [size], dtypes, layouts, compiles):
        name = f"{arch} {dtype} {'NHWC' if channels_last else 'NCHW'}{' compiled' if compiled else ''}"
        yield ({"stage": "step", "name": name, "arch": arch, "dtype": dtype, "channels_last": channels_last,
                "compile": compiled, "device": device, "batch_size": batch, "image_size": image_size},
               ["synthetic", "--arch", arch, "--device", device, "--dtype", dtype, "--batch-size", str(batch),
                "--image-size", str(image_size), "--channels-last" if channels_last else "--no-channels-last",
                "--compile" if compiled else "--no-compile", *timing])


def end_to_end_runs(shards: dict[str, Path], device: str, smoke: bool):
    arch, batch, size, timing = step_sizes(device, smoke)
    dtype = "bfloat16"
    for backend in ("dali",) if smoke else ("dali", "torchvision"):
        yield ({"stage": "end-to-end", "name": f"{backend} -> {arch} {dtype} NHWC", "backend": backend, "arch": arch,
                "dtype": dtype, "device": device, "batch_size": batch, "image_size": size, "shards": "full",
                "ceiling": f"{arch} {dtype} NHWC"},
               ["end-to-end", "--data", str(shards["full"]), "--backend", backend, "--arch", arch, "--device", device,
                "--dtype", dtype, "--batch-size", str(batch), "--image-size", str(size), *timing])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", default="build/bench", help="where the sample and its shards are built")
    parser.add_argument("--out", default="bench-results/results.jsonl")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that everything runs")
    parser.add_argument("--image-size", type=int, nargs="+", help="step stage: sweep these train sizes (px)")
    parser.add_argument("--arch", nargs="+", help="step stage: these networks (ours or timm:NAME) instead of ResNet-50")
    args = parser.parse_args()

    work, out = Path(args.work), Path(args.out)
    if not work.is_absolute():
        work = REPO / work
    out.parent.mkdir(parents=True, exist_ok=True)
    env = machine()
    shards = ensure_shards(work, args.smoke) if set(args.only) - {"serve"} else {}
    plans = []
    if "loader" in args.only:
        plans += [("benchmarks.loaders", *run) for run in loader_runs(shards, args.device, args.smoke)]
    if "step" in args.only:
        plans += [("benchmarks.steps", *run) for arch in (args.arch or [None])
                  for run in step_runs(args.device, args.smoke, args.image_size, arch)]
    if "end-to-end" in args.only:
        plans += [("benchmarks.steps", *run) for run in end_to_end_runs(shards, args.device, args.smoke)]

    results = []
    if "s3" in args.only:  # its own table: streamed and staged at each latency, measured side by side
        from benchmarks import s3

        print(f"[s3] shards on a local S3 server behind a latency ({shards['full'].name})", flush=True)
        s3_results = s3.run(shards["full"], [0, 10] if args.smoke else [0, 10, 20], args.smoke, os.cpu_count())
        with open(out, "a") as sink:
            sink.writelines(json.dumps({**r, "env": env, "options": {"smoke": args.smoke}}) + "\n" for r in s3_results)
        print(s3.table(s3_results) + "\n")
    if "serve" in args.only:  # its own table: batching on and off at each client count, measured in turns
        from benchmarks import serve

        served = serve.run(work, args.device, args.smoke)
        with open(out, "a") as sink:
            sink.writelines(json.dumps({**r, "env": env, "options": {"smoke": args.smoke}}) + "\n" for r in served)
        print(serve.table(served) + "\n")
    for i, (module, meta, cli) in enumerate(plans, 1):
        print(f"[{i}/{len(plans)}] {meta['stage']}: {meta['name']} ({meta.get('shards', meta.get('device'))})",
              flush=True)
        try:
            measured = run_isolated(module, cli)
        except RuntimeError as error:  # e.g. torch.compile without a compiler: say so, go on
            measured = {"error": str(error).splitlines()[-1][:300]}
            print(f"    failed: {measured['error']}")
        results.append({**meta, **measured, "env": env, "options": {"smoke": args.smoke, "cli": cli}})
    if not results:
        return
    add_ratios(results)  # ratios only mean something within one run: they go into its records
    with open(out, "a") as sink:
        sink.writelines(json.dumps(record) + "\n" for record in results)
    print()
    print(markdown_table(results))
    chart = save_chart(results, out.with_suffix(".png"))
    print(f"\nresults: {out} (JSON lines)  chart: {chart}")


if __name__ == "__main__":
    main()
