"""Train-step throughput: on synthetic tensors already on the device (the model's ceiling), and
end to end with the real loader feeding the real step. Each configuration in its own process.

    python -m benchmarks.steps synthetic --arch resnet50 --device cuda --dtype bfloat16 --batch-size 256
    python -m benchmarks.steps end-to-end --data SHARDS --backend dali --device cuda ...
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.common import endless, summarize
from dali_imagenet.config import TrainConfig
from dali_imagenet.data.preprocess import HW_DECODER_LOAD
from dali_imagenet.distributed import Processes
from dali_imagenet.training.precision import AMP_DTYPES, Precision
from dali_imagenet.training.recipe import build


def make_training(arch: str, num_classes: int, device: torch.device, dtype: str, channels_last: bool,
                  compile_model: bool, cuda_graph: bool = False, blurpool: bool = False):
    """The trainer's step, built as train.py builds it (`recipe.build`), with the default recipe
    (mixup/cutmix, drop path) and these settings."""
    cfg = TrainConfig(arch=arch, amp_dtype=dtype, channels_last=channels_last, compile=compile_model,
                      cuda_graph=cuda_graph, blurpool=blurpool)
    processes = Processes(0, 1, 0, device)
    precision = Precision.for_device(dtype, device)
    training = build(cfg, num_classes, processes, precision)
    train_step = training.step(cfg, processes, precision, num_classes)
    counter = iter(range(10**9))
    return lambda images, labels: train_step(images, labels, step=next(counter), lr=0.1)


def synthetic(args) -> dict:
    device = torch.device(args.device)
    step = make_training(args.arch, 1000, device, args.dtype, args.channels_last, args.compile, args.cuda_graph,
                         args.blurpool)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    images = torch.randn(
        args.batch_size,
        3,
        args.image_size,
        args.image_size,
        device=device,
        dtype=Precision.for_device(args.dtype, device).loader_dtype,
    ).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 1000, (args.batch_size,), device=device)
    start = time.perf_counter()
    for _ in range(args.warmup_steps):  # cuDNN autotuning, torch.compile
        loss = step(images, labels)
    loss.item()
    warmup_s = time.perf_counter() - start
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = step(images, labels)
        loss.item()  # the sync that makes the wall time the GPU's time
        rates.append(args.steps * args.batch_size / (time.perf_counter() - start))
    return {**summarize(rates), "warmup_s": warmup_s}


def end_to_end(args) -> dict:
    from dali_imagenet import make_loader
    from dali_imagenet.data import decoder

    device = torch.device(args.device)
    loader = make_loader(args.data, "train", args.batch_size, device=device, image_size=args.image_size,
                         backend=args.backend, num_threads=args.threads,
                         dtype=Precision.for_device(args.dtype, device).loader_dtype)
    step = make_training(args.arch, loader.num_classes, device, args.dtype, args.channels_last, args.compile,
                         args.cuda_graph, args.blurpool)

    stream = endless(loader)
    for _ in range(args.warmup_steps):
        loss = step(*next(stream))
    loss.item()
    rates, waits = [], []
    for _ in range(args.repeats):
        wait = 0.0
        start = time.perf_counter()
        for _ in range(args.steps):
            before = time.perf_counter()
            images, labels = next(stream)
            wait += time.perf_counter() - before
            loss = step(images, labels)
        loss.item()
        elapsed = time.perf_counter() - start
        rates.append(args.steps * args.batch_size / elapsed)
        waits.append(wait / elapsed)
    return {**summarize(rates), "data_wait": sorted(waits)[len(waits) // 2],
            "jpeg_decoder": decoder.describe(args.backend, device, HW_DECODER_LOAD)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["synthetic", "end-to-end"])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(AMP_DTYPES), default="bfloat16")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--blurpool", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data")
    parser.add_argument("--backend", choices=["dali", "torchvision"], default="dali")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    result = synthetic(args) if args.mode == "synthetic" else end_to_end(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
