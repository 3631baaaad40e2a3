"""What an L4 host (a g6.xlarge: 4 vCPUs = 2 cores with SMT) gets from DALI: the loader feeding the
real `l4-16h` train step (EMA, compile, BlurPool, no mixup), with the hardware JPEG decoder off
(an L4 most likely has none DALI uses: nvJPEG's hybrid path Huffman-decodes on the host threads),
at several loader thread counts and `hybrid_huffman_threshold` values, per train size.

    taskset -c CPUS python -m benchmarks.l4_host --data SHARDS --config configs/l4-16h.yaml

Run it pinned (benchmarks.gpu_check pins it to 2 cores and their SMT siblings: `host_cpus`).
Per size: one step is built (one compile), measured alone on tensors already on the device, then
fed by one loader after another (each built, warmed up, timed, dropped). Each measurement is one
JSON line on stdout as soon as it is made (`{"row": {...}}`), so a caller keeps what finished.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.common import endless, summarize

# The L4 step, estimated (not measured on one; shared field notes: an L4 ~0.25-0.33 of an A100 on
# ResNet-50; FFCV's A100 logs ~3,500 img/s at 160 px, ~2,600 at 192): img/s at 160 and 192 px.
L4_STEP_ESTIMATE = {160: (870, 1160), 192: (650, 860)}
NEEDED_IMG_S = 925  # 40 epochs of 1,281,167 images in ~15.4 h of training (16 h less start-up and validations)


def host_cpus(siblings: dict[int, str], cores: int = 2) -> tuple[list[int], str]:
    """The CPUs of `cores` physical cores and their SMT siblings (a g6.xlarge's 4 vCPUs), from
    each CPU's `thread_siblings_list` ("0,16" or "0-1"), and what was found, in words."""
    groups: list[list[int]] = []
    for cpu in sorted(siblings):
        group = sorted(_cpu_list(siblings[cpu]))
        if group not in groups:
            groups.append(group)
    chosen = groups[:cores]
    cpus = sorted(c for g in chosen for c in g)
    smt = all(len(g) > 1 for g in chosen)
    words = (f"{len(chosen)} cores + their SMT siblings: CPUs {','.join(map(str, cpus))}" if smt else
             f"{len(chosen)} cores, no SMT siblings here: CPUs {','.join(map(str, cpus))} (a g6.xlarge has 4 vCPUs)")
    return cpus, words


def _cpu_list(text: str) -> list[int]:
    cpus = []
    for part in text.strip().split(","):
        first, _, last = part.partition("-")
        cpus += list(range(int(first), int(last or first) + 1))
    return cpus


def machine_siblings() -> dict[int, str]:
    found = {}
    for topology in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology/thread_siblings_list"):
        found[int(topology.parent.parent.name[3:])] = topology.read_text()
    return found


def verdict(rows: list[dict], threads: int) -> dict:
    """Who sets the pace on an L4 host, per size, from the loader-fed rows at `threads` threads
    (this machine's step is faster than an L4's, so a row that waits on data measures the loader;
    one that does not shows only a floor) and the L4 step estimate; what the loader gives."""
    lines, pace = [], {}
    for size in sorted({r["image_size"] for r in rows if r.get("threads") == threads}):
        fed = [r for r in rows if r["image_size"] == size and r.get("threads") == threads]
        best = max(fed, key=lambda r: r["images_per_s"])
        loader, bound = best["images_per_s"], best["data_wait"] >= 0.1
        estimate = L4_STEP_ESTIMATE.get(size)
        if estimate is None:
            who = f"no L4 step estimate at {size} px"
        elif bound and loader < estimate[0]:
            who = "the loader"
        elif not bound or loader > estimate[1]:
            who = "the step"
        else:
            who = "either (the loader is within the L4 step's estimate)"
        pace[size] = {"loader_images_per_s": loader, "loader_bound_here": bound, "sets_pace": who,
                      "threshold": best["hybrid_huffman_threshold"]}
        step = f" vs an L4 step of ~{estimate[0]:,}-{estimate[1]:,} (est.)" if estimate else ""
        lines.append(f"{size} px: loader {'' if bound else '>= '}{loader:,.0f} img/s (threshold "
                     f"{best['hybrid_huffman_threshold']:,}, data wait {best['data_wait']:.0%}){step}: {who}")
    expect = min((p["loader_images_per_s"] for p in pace.values()), default=None)
    text = "; ".join(lines) or f"no loader-fed rows at {threads} threads"
    if expect is not None:
        text += (f". An L4 host can expect ~{expect:,.0f} img/s from the loader at {threads} threads "
                 f"({'enough for' if expect >= NEEDED_IMG_S else 'short of'} the {NEEDED_IMG_S} that 40 epochs in "
                 f"16 h need)")
    return {"what": f"verdict ({threads} loader threads)", "result": text, "pace": pace,
            "expected_loader_images_per_s": expect}


def build_step(config: str, sets: list[str], device: torch.device, num_classes: int):
    from dali_imagenet.config import load_config
    from dali_imagenet.distributed import Processes
    from dali_imagenet.training import recipe
    from dali_imagenet.training.precision import Precision

    cfg = load_config(config, sets)
    processes, precision = Processes(0, 1, 0, device), Precision.for_device(cfg.amp_dtype, device)
    training = recipe.build(cfg, num_classes, processes, precision)
    step = training.step(cfg, processes, precision, num_classes)
    counter = iter(range(10**9))
    return cfg, precision, (lambda images, labels: step(images, labels, step=next(counter), lr=0.1))


def timed(step, batches, warmup: int, steps: int, repeats: int, batch: int) -> dict:
    """img/s (median, spread) and the share of the time spent waiting for `batches`."""
    for _ in range(warmup):
        loss = step(*next(batches))
    loss.item()
    rates, waits = [], []
    for _ in range(repeats):
        wait = 0.0
        started = time.perf_counter()
        for _ in range(steps):
            before = time.perf_counter()
            images, labels = next(batches)
            wait += time.perf_counter() - before
            loss = step(images, labels)
        loss.item()  # the sync that makes the wall time the device's
        elapsed = time.perf_counter() - started
        rates.append(steps * batch / elapsed)
        waits.append(wait / elapsed)
    return {**summarize(rates), "data_wait": sorted(waits)[len(waits) // 2]}


def emit(row: dict) -> None:
    print(json.dumps({"row": row}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], help="config overrides (--smoke: a tiny model)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", type=int, nargs="+", default=[160, 192])
    parser.add_argument("--threads", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--thresholds", type=int, nargs="+", default=[1_000_000, 0])
    parser.add_argument("--hw-decoder-load", type=float, default=0.0)
    parser.add_argument("--warmup-steps", type=int, default=3, choices=range(1, 1000), metavar="N (1-999)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--host", default="", help="what the process is pinned to, for the rows")
    args = parser.parse_args()
    from dali_imagenet import make_loader
    from dali_imagenet.config import load_config
    from dali_imagenet.data import decoder
    from dali_imagenet.data.shards import find_shards

    device = torch.device(args.device)
    shards = find_shards(args.data, "train")
    cpus = len(os.sched_getaffinity(0))
    configured = load_config(args.config, args.set).loader_threads
    decoding = (f"hw decoder off (hw_decoder_load {args.hw_decoder_load:g})" if device.type == "cuda"
                else "CPU decoding (the threshold does nothing there)")
    rows = []
    for size in args.sizes:
        started = time.monotonic()
        cfg, precision, step = build_step(args.config, [*args.set, f"image_size={size}", "min_image_size=0"], device,
                                          shards.num_classes)
        batch = cfg.batch_size
        images = torch.randn(batch, 3, size, size, device=device, dtype=precision.loader_dtype).contiguous(
            memory_format=torch.channels_last)
        labels = torch.randint(0, shards.num_classes, (batch,), device=device)
        alone = timed(step, iter(lambda: (images, labels), None), args.warmup_steps, args.steps, args.repeats, batch)
        emit({"what": f"l4-16h step alone, {size} px, b{batch} (compile {cfg.compile}, EMA {bool(cfg.ema_decay)})",
              "image_size": size, **alone, "seconds": time.monotonic() - started, "host": args.host})
        for threads in args.threads:
            for threshold in args.thresholds:
                started = time.monotonic()
                loader = make_loader(shards, "train", batch, device=device, image_size=size, num_threads=threads,
                                     hw_decoder_load=args.hw_decoder_load, hybrid_huffman_threshold=threshold,
                                     dtype=precision.loader_dtype, crop_min_area=cfg.crop_min_area,
                                     shuffle_buffer=cfg.shuffle_buffer)
                fed = timed(step, endless(loader), args.warmup_steps, args.steps, args.repeats, batch)
                row = {"what": f"loader -> l4-16h step, {size} px, {threads} thread(s), {decoding}, "
                               f"hybrid_huffman_threshold {threshold:,}", "image_size": size, "threads": threads,
                       "hybrid_huffman_threshold": threshold, "hw_decoder_load": args.hw_decoder_load, **fed,
                       "cpus": cpus, "host": args.host, "seconds": time.monotonic() - started,
                       "jpeg_decoder": decoder.describe("dali", device, args.hw_decoder_load)}
                rows.append(row)
                emit(row)
                del loader
    emit(verdict(rows, configured if configured in args.threads else max(args.threads)))


if __name__ == "__main__":
    main()
