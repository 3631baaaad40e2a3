"""The GPU-only checks, for a lent NVIDIA machine that has PyTorch, torchvision and Triton but no
DALI and no internet. Finishes in a few minutes and prints a short table.

    bash benchmarks/gpu_check.sh            # or: python3 -m benchmarks.gpu_check

1. ResNet-50 train step (bf16, channels-last, batch 256) with and without torch.compile
2. Mixup/CutMix cost per step on GPU tensors, and that it never syncs with the host
3. Batched nvJPEG decode (torchvision.io.decode_jpeg on the GPU) of the bundled sample's JPEGs,
   against single-thread CPU decode of the same bytes
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from benchmarks.common import machine, run_isolated


def sample_jpegs(count: int, seed: int = 0) -> list[bytes]:
    from shard_tools.sample import CLASSES, draw_image, encode

    rng = np.random.default_rng(seed)
    return [encode(draw_image(i % len(CLASSES), rng), "jpeg", rng) for i in range(count)]


def time_cuda(fn, repeats: int) -> list[float]:
    """Seconds per call, measured with CUDA events (no host timing of async work)."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def mixing_cost(batch: int, size: int, device: torch.device, repeats: int) -> dict:
    from dali_imagenet.config import TrainConfig
    from dali_imagenet.mixing import MixConfig, mix_batch

    images = torch.randn(batch, 3, size, size, device=device, dtype=torch.float16).contiguous(
        memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device=device)
    generator = torch.Generator(device).manual_seed(0)
    run = lambda: mix_batch(images, labels, 1000, MixConfig.from_config(TrainConfig()), generator)
    run()
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")  # any host sync inside raises
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        times = time_cuda(run, repeats)
    else:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return {"mix_ms_median": 1e3 * float(np.median(times)), "no_host_sync": device.type == "cuda"}


def decode_rates(jpegs: list[bytes], device: torch.device, batch: int, repeats: int) -> dict:
    from torchvision.io import decode_jpeg

    tensors = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    torch.set_num_threads(1)
    start = time.perf_counter()
    for t in tensors:
        decode_jpeg(t)
    cpu_rate = len(tensors) / (time.perf_counter() - start)
    result = {"cpu_1thread_images_per_s": cpu_rate, "images": len(tensors),
              "mean_kb": sum(map(len, jpegs)) / len(jpegs) / 1e3}
    if device.type != "cuda":
        return result
    batches = [tensors[i:i + batch] for i in range(0, len(tensors), batch)]
    for b in batches[:2]:
        decode_jpeg(b, device=device)  # nvJPEG handle and buffers
    rates = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for b in batches:
            decode_jpeg(b, device=device)
        torch.cuda.synchronize()
        rates.append(len(tensors) / (time.perf_counter() - start))
    result["gpu_images_per_s"] = float(np.median(rates))
    result["gpu_vs_cpu_1thread"] = result["gpu_images_per_s"] / cpu_rate
    result["gpu_vs_all_cpu_cores"] = result["gpu_images_per_s"] / (cpu_rate * (os.cpu_count() or 1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (runs on a CPU too)")
    args = parser.parse_args()
    device = torch.device(args.device)
    smoke = args.smoke
    arch, batch, size = ("resnet18", 4, 32) if smoke else ("resnet50", 256, 224)
    steps = ["--warmup-steps", "1", "--steps", "1", "--repeats", "3"] if smoke else \
            ["--warmup-steps", "5", "--steps", "20", "--repeats", "3"]
    rows = {"machine": machine()}
    print(f"device: {rows['machine']['gpu'] or 'cpu'}; torch {rows['machine']['torch']}", flush=True)
    for compiled in ([False] if smoke else [False, True]):
        name = f"{arch} bf16 NHWC batch {batch}{' compiled' if compiled else ''}"
        rows[name] = run_isolated("benchmarks.steps", [
            "synthetic", "--arch", arch, "--device", args.device, "--dtype", "bfloat16", "--batch-size", str(batch),
            "--image-size", str(size), "--channels-last", "--compile" if compiled else "--no-compile", *steps])
        print(f"{name}: {rows[name]['images_per_s']:.0f} img/s", flush=True)
    rows["mixing"] = mixing_cost(batch, size, device, 5 if smoke else 50)
    step_rate = rows[f"{arch} bf16 NHWC batch {batch}"]["images_per_s"]
    rows["mixing"]["share_of_step"] = rows["mixing"]["mix_ms_median"] / 1e3 / (batch / step_rate)
    print(f"mixup/cutmix: {rows['mixing']['mix_ms_median']:.3f} ms/step", flush=True)
    rows["decode"] = decode_rates(sample_jpegs(16 if smoke else 512), device, 8 if smoke else 128, 3)
    print(json.dumps(rows["decode"]), flush=True)

    print("\n| check | result |\n| --- | --- |")
    for name, value in rows.items():
        if name in ("machine", "mixing", "decode"):
            continue
        print(f"| train step {name} | {value['images_per_s']:,.0f} img/s ({value['images_per_s_min']:,.0f}-"
              f"{value['images_per_s_max']:,.0f}), warm-up {value['warmup_s']:.0f} s |")
    mixing = rows["mixing"]
    print(f"| Mixup/CutMix, batch {batch} | {mixing['mix_ms_median']:.3f} ms/step = {mixing['share_of_step']:.1%} "
          f"of a step; host syncs: {'none' if mixing['no_host_sync'] else 'not checked (CPU)'} |")
    decode = rows["decode"]
    gpu = (f"nvJPEG {decode['gpu_images_per_s']:,.0f} img/s = {decode['gpu_vs_cpu_1thread']:.1f}x one CPU thread, "
           f"{decode['gpu_vs_all_cpu_cores']:.1f}x all {os.cpu_count()} cores") if "gpu_images_per_s" in decode else "no GPU"
    print(f"| JPEG decode, {decode['images']} sample images ({decode['mean_kb']:.0f} KB) | "
          f"CPU 1 thread {decode['cpu_1thread_images_per_s']:,.0f} img/s; {gpu} |")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_check.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
