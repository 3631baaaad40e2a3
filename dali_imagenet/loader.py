"""`make_loader`: batches of (images, labels) as PyTorch tensors, from DALI or the baseline.

images: N×3×H×W, ImageNet-normalised, `dtype`, channels_last memory, on the requested device.
labels: int64, same device. `len(loader)` is batches per epoch; iterating again starts the next
epoch. Validation yields every sample of the split exactly once across ranks; all ranks yield
the same number of batches (a rank's last batches may be short or empty).
"""
from __future__ import annotations

import os

import torch

from dali_imagenet.shards import ShardError, SplitShards, find_shards, find_undecodable

SHUFFLE_BUFFER = 4096  # samples; the shards are already shuffled when written


def make_loader(data, split: str, batch_size: int, *, device: str = "cuda", image_size: int = 224,
                rank: int = 0, world_size: int = 1, seed: int = 0, epoch: int = 0, dtype: torch.dtype = torch.float16,
                backend: str = "dali", train: bool | None = None, num_threads: int | None = None,
                shuffle_buffer: int = SHUFFLE_BUFFER, cache_dir=None):
    """`train` defaults to `split == "train"` (random crops, flips, shuffling, dropped last batch).

    A loader iterates epoch after epoch by itself. `epoch` is for a trainer that builds one loader
    per epoch to make each epoch reproducible on its own (exact resume): the order and the
    augmentations then depend only on (seed, epoch), and each rank reads another part of the data
    each epoch (train only; validation is always read the same way).
    """
    if backend not in ("dali", "torchvision"):
        raise ValueError(f"backend must be 'dali' or 'torchvision', not {backend!r}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be float16, bfloat16 or float32, not {dtype}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    shards = find_shards(data, split, cache_dir)
    train = split == "train" if train is None else train
    if train and epoch:
        seed = seed * 100_003 + epoch
        rank = (rank + epoch) % world_size
    threads = num_threads or max(1, min(os.cpu_count() or 1, 8))
    if backend == "torchvision":
        from dali_imagenet.baseline import TorchvisionLoader

        return TorchvisionLoader(shards, batch_size, device=device, image_size=image_size, rank=rank,
                                 world_size=world_size, seed=seed, dtype=dtype, train=train, workers=threads,
                                 shuffle_buffer=shuffle_buffer)
    return DaliLoader(shards, batch_size, device=device, image_size=image_size, rank=rank, world_size=world_size,
                      seed=seed, dtype=dtype, train=train, num_threads=threads, shuffle_buffer=shuffle_buffer)


def rank_sample_counts(samples: int, world_size: int) -> list[int]:
    """Samples DALI's reader gives each shard_id: [floor(i*N/W), floor((i+1)*N/W))."""
    return [(i + 1) * samples // world_size - i * samples // world_size for i in range(world_size)]


class DaliLoader:
    def __init__(self, shards: SplitShards, batch_size: int, *, device: torch.device, image_size: int, rank: int,
                 world_size: int, seed: int, dtype: torch.dtype, train: bool, num_threads: int, shuffle_buffer: int):
        from nvidia.dali import types
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        from dali_imagenet.pipelines import imagenet_pipeline

        self.shards, self.batch_size, self.train = shards, batch_size, train
        self.num_samples = shards.samples
        self.num_classes = shards.num_classes
        # DALI has no bfloat16 output: emit float16 and convert on the device (one cheap kernel).
        self._cast_to = torch.bfloat16 if dtype == torch.bfloat16 else None
        dali_dtype = types.FLOAT if dtype == torch.float32 else types.FLOAT16
        on_gpu = device.type == "cuda"
        pipe = imagenet_pipeline(
            shards.tars, shards.indices, device="gpu" if on_gpu else "cpu", train=train, image_size=image_size,
            dtype=dali_dtype, shard_id=rank, num_shards=world_size, shuffle_buffer=shuffle_buffer,
            batch_size=batch_size, num_threads=num_threads, device_id=device.index if on_gpu else None,
            seed=seed * 1009 + rank, prefetch_queue_depth=2)
        try:
            pipe.build()
        except RuntimeError as error:
            raise ShardError(_dali_message(error, shards)) from None
        padded_rank_samples = -(-shards.samples // world_size)  # pad_last_batch: every rank this many
        self._real_rank_samples = rank_sample_counts(shards.samples, world_size)[rank]
        if train:
            self._batches = padded_rank_samples // batch_size
            policy = LastBatchPolicy.DROP
        else:
            self._batches = -(-padded_rank_samples // batch_size)
            policy = LastBatchPolicy.FILL  # padded to full batches; the padding is cut off below
        if self._batches == 0:
            raise ValueError(f"batch size {batch_size} is larger than this rank's {padded_rank_samples} samples")
        self._iterator = DALIGenericIterator([pipe], ["images", "labels"], reader_name="reader",
                                             last_batch_policy=policy, auto_reset=True)

    def __len__(self) -> int:
        return self._batches

    def __iter__(self):
        remaining = self._real_rank_samples
        for _ in range(self._batches):
            try:
                batch = next(self._iterator)[0]
            except StopIteration:  # fewer batches on one rank would leave the others waiting
                raise RuntimeError(f"DALI's epoch is shorter than the {self._batches} batches computed for it") from None
            except RuntimeError as error:
                raise ShardError(_dali_message(error, self.shards)) from None
            images = batch["images"].permute(0, 3, 1, 2)  # NHWC memory -> NCHW view, channels_last
            labels = batch["labels"].view(-1)
            if self._cast_to is not None:
                images = images.to(self._cast_to, memory_format=torch.channels_last)
            if not self.train:  # drop the reader's padding so each image counts once
                keep = max(0, min(self.batch_size, remaining))
                remaining -= self.batch_size
                images, labels = images[:keep], labels[:keep]
            yield images, labels
        # All our batches were taken; DALI must now be at its epoch end (auto_reset then starts
        # the next epoch). A batch here would mean our count and DALI's disagree.
        try:
            next(self._iterator)
        except StopIteration:
            return
        raise RuntimeError(f"DALI's epoch is longer than the {self._batches} batches computed for it")


def _dali_message(error: Exception, shards: SplitShards) -> str:
    """DALI's errors are pages long and its decoder errors name no file: keep the line that says
    what went wrong and, for a decoder error, find the sample that does not decode."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    cause = next((line for line in lines if ".tar" in line or ".idx" in line), None)
    if cause is None:
        after = lines.index("encountered:") + 1 if "encountered:" in lines else 0
        cause = next((line for line in lines[after:] if "pipeline object" not in line), lines[0] if lines else "")
    if "decoder" in str(error):
        culprit = find_undecodable(shards)
        cause += f"; {culprit}" if culprit else "; no undecodable sample found in the local shards within 60 s"
    return f"DALI failed reading shards under {os.path.dirname(shards.tars[0])}: {cause}"
