"""Loader throughput, measured in a process of its own, and the raw decode limit of the machine.

    python -m benchmarks.loaders --data SHARDS --backend dali --split train --batch-size 64
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from benchmarks.common import endless, summarize
from dali_imagenet.data.preprocess import HW_DECODER_LOAD


def measure_loader(data: str, backend: str, split: str, batch_size: int, device: str, image_size: int,
                   threads: int, warmup_batches: int, batches: int, repeats: int,
                   hw_decoder_load: float = HW_DECODER_LOAD) -> dict:
    from dali_imagenet import make_loader
    from dali_imagenet.data import decoder

    loader = make_loader(data, split, batch_size, device=device, image_size=image_size, backend=backend,
                         num_threads=threads, train=split == "train", hw_decoder_load=hw_decoder_load)
    decoding = decoder.describe(backend, torch.device(device), hw_decoder_load)

    stream = endless(loader)
    for _ in range(warmup_batches):  # pipeline start, worker start, first allocations
        next(stream)
    rates = []
    for _ in range(repeats):
        images = 0
        start = time.perf_counter()
        for _ in range(batches):
            batch, _ = next(stream)
            images += batch.shape[0]
        if device == "cuda":
            torch.cuda.synchronize()
        rates.append(images / (time.perf_counter() - start))
    return {**summarize(rates), "jpeg_decoder": decoding}


def jpegs_of(data: str, split: str, limit: int) -> list[bytes]:
    import itertools

    from dali_imagenet.data.shardformat import iter_components
    from dali_imagenet.data.shards import find_shards

    shards = find_shards(data, split)
    jpegs = (jpeg for tar, idx in zip(shards.tars, shards.indices) for _, jpeg in iter_components(tar, idx, "jpg"))
    return list(itertools.islice(jpegs, limit))


def decode_limit(data: str, split: str, limit: int, repeats: int, threads: int) -> dict:
    """The machine's ceiling for a loader on `threads` threads: `threads` x the single-thread
    libjpeg-turbo rate of full decodes (no resize) of the shards' JPEGs. Only decoding less (ROI
    decode of the crop) or decoding elsewhere (the GPU) beats it."""
    from torchvision.io import decode_jpeg

    torch.set_num_threads(1)
    tensors = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs_of(data, split, limit)]
    decode_jpeg(tensors[0])
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for t in tensors:
            decode_jpeg(t)
        rates.append(len(tensors) / (time.perf_counter() - start))
    single = summarize(rates)
    return {**summarize([rate * threads for rate in rates]), "single_thread_images_per_s": single["images_per_s"],
            "threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--backend", choices=["dali", "torchvision", "decode-limit"], required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--warmup-batches", type=int, default=5)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hw-decoder-load", type=float, default=HW_DECODER_LOAD,
                        help="GPU: share of JPEGs for the hardware decoder (0: nvJPEG's hybrid path)")
    args = parser.parse_args()
    if args.backend == "decode-limit":
        result = decode_limit(args.data, args.split, args.batches * args.batch_size, args.repeats, args.threads)
    else:
        result = measure_loader(args.data, args.backend, args.split, args.batch_size, args.device, args.image_size,
                                args.threads, args.warmup_batches, args.batches, args.repeats, args.hw_decoder_load)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
