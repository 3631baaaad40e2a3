"""`make_loader`: batches of (images, labels) as PyTorch tensors, from DALI or the baseline.

images: N×3×H×W, ImageNet-normalised, channels_last memory, on the requested device.
labels: int64, same device. `len(loader)` is batches per epoch, from the shard metadata alone and
by one rule for both backends (`batches_per_epoch`), so every rank runs the same number of steps.
Iterating yields the rest of the current epoch; iterating again starts the next epoch.

Each rank reads a contiguous `1/world_size` of the split's samples (`rank_range`), so every sample
is read once per epoch. Train drops the last partial batch (every rank stops at the smallest
rank's count); validation yields every sample exactly once across ranks, and a rank's last
batches may be short or empty so that all ranks yield the same number.
"""
from __future__ import annotations

import os

import torch

from dali_imagenet import seeding
from dali_imagenet.config import TrainConfig
from dali_imagenet.preprocess import CROP_FRACTION, TRAIN_CROP_MIN_AREA
from dali_imagenet.shards import ShardError, SplitShards, find_shards, find_undecodable


def batches_per_epoch(samples: int, world_size: int, batch_size: int, train: bool) -> int:
    """The one batch-count rule (DALI's reader and iterator count so): train takes the full
    batches of the smallest rank's share, floor(samples / world_size); validation pads every
    rank to the largest share, ceil(samples / world_size), and keeps the last partial batch."""
    if train:
        return samples // world_size // batch_size
    return -(-(-(-samples // world_size)) // batch_size)


def rank_range(samples: int, world_size: int, rank: int) -> tuple[int, int]:
    """The rank's samples [first, end) of the split in reading order (DALI's `shard_id` split)."""
    return rank * samples // world_size, (rank + 1) * samples // world_size


def epoch_shards(shards: SplitShards, seed: int, epoch: int) -> SplitShards:
    """The shards in a new order for every (seed, epoch), the same on every rank: DALI's shuffle
    buffer only mixes a few thousand neighbours, so without this, epochs would see the samples
    in nearly the same order."""
    return shards.reordered(seeding.permutation(seed, "shard order", len(shards.tars), epoch))


def make_loader(data, split: str, batch_size: int, *, device: str | torch.device = "cuda", image_size: int = 224,
                rank: int = 0, world_size: int = 1, seed: int = 0, epoch: int = 0, dtype: torch.dtype | None = None,
                backend: str = "dali", train: bool | None = None, num_threads: int | None = None,
                shuffle_buffer: int = TrainConfig.shuffle_buffer, crop_fraction: float = CROP_FRACTION,
                crop_min_area: float = TRAIN_CROP_MIN_AREA, cache_dir=None, resume: dict | None = None):
    """`data`: a shard folder, `s3://` prefix or timm-layout folder, or the `SplitShards` of one.
    `train` defaults to `split == "train"` (random crops, flips, shuffling, dropped last batch).

    A trainer builds one loader per epoch: the shard order and the augmentations then depend
    only on (seed, epoch), so each epoch can be rebuilt on its own for an exact resume.
    `resume`: a `state_dict()` taken mid-epoch from a loader built with the same arguments; the
    DALI loader restores its reader there without decoding the batches before it, the baseline
    replays them. `dtype` defaults to float16 on a GPU and float32 on a CPU (the fastest there).
    """
    if backend not in ("dali", "torchvision"):
        raise ValueError(f"backend must be 'dali' or 'torchvision', not {backend!r}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be float16, bfloat16 or float32, not {dtype}")
    shards = data if isinstance(data, SplitShards) else find_shards(data, split, cache_dir)
    train = split == "train" if train is None else train
    if train:
        shards = epoch_shards(shards, seed, epoch)
    batches = batches_per_epoch(shards.samples, world_size, batch_size, train)
    if batches == 0:
        raise ValueError(f"batch size {batch_size} is larger than the {shards.samples // world_size} {split} "
                         f"samples each of {world_size} rank(s) reads (train.py: lower it with --set batch_size=N)")
    options = dict(device=device, image_size=image_size, rank=rank, world_size=world_size, batches=batches,
                   seed=seeding.derive_seed(seed, "loader", epoch, rank), dtype=dtype, train=train,
                   threads=num_threads or max(1, min(os.cpu_count() or 1, 8)), shuffle_buffer=shuffle_buffer,
                   crop_fraction=crop_fraction, crop_min_area=crop_min_area, resume=resume)
    if backend == "torchvision":
        from dali_imagenet.baseline import TorchvisionLoader

        return TorchvisionLoader(shards, batch_size, **options)
    return DaliLoader(shards, batch_size, **options)


class DaliLoader:
    def __init__(self, shards: SplitShards, batch_size: int, *, device: torch.device, image_size: int, rank: int,
                 world_size: int, batches: int, seed: int, dtype: torch.dtype, train: bool, threads: int,
                 shuffle_buffer: int, crop_fraction: float, crop_min_area: float, resume: dict | None):
        from nvidia.dali import types
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        from dali_imagenet.pipelines import imagenet_pipeline

        self.shards, self.batch_size, self.train = shards, batch_size, train
        self.num_samples, self.num_classes = shards.samples, shards.num_classes
        self._batches = batches
        self.position = resume["batch"] if resume else 0  # batches of this epoch already handed out
        self.batches_read = 0  # batches pulled from DALI by this process: a resume must not replay
        # DALI has no bfloat16 output: emit float16 and convert on the device (one cheap kernel).
        self._cast_to = torch.bfloat16 if dtype == torch.bfloat16 else None
        on_gpu = device.type == "cuda"
        pipe = imagenet_pipeline(
            list(shards.tars), list(shards.indices), device="gpu" if on_gpu else "cpu", train=train,
            image_size=image_size, dtype=types.FLOAT if dtype == torch.float32 else types.FLOAT16, shard_id=rank,
            num_shards=world_size, shuffle_buffer=shuffle_buffer, crop_fraction=crop_fraction, crop_min_area=crop_min_area,
            batch_size=batch_size, num_threads=threads, device_id=device.index if on_gpu else None, seed=seed,
            prefetch_queue_depth=2, enable_checkpointing=True, checkpoint=resume["dali"] if resume else None)
        first, end = rank_range(shards.samples, world_size, rank)
        self._real_rank_samples = end - first
        try:
            self._iterator = DALIGenericIterator(
                [pipe], ["images", "labels"], reader_name="reader", auto_reset=True,
                # val: padded to full batches, the padding is cut off below
                last_batch_policy=LastBatchPolicy.DROP if train else LastBatchPolicy.FILL)
        except RuntimeError as error:
            raise ShardError(_dali_message(error, shards)) from None

    def __len__(self) -> int:
        return self._batches

    def state_dict(self) -> dict:
        """Where this epoch stands: the batches handed out and DALI's reader and RNG state after them."""
        return {"batch": self.position, "dali": self._iterator.checkpoints()[0]}

    def __iter__(self):
        remaining = self._real_rank_samples - self.position * self.batch_size
        while self.position < self._batches:
            try:
                batch = next(self._iterator)[0]
            except StopIteration:  # fewer batches on one rank would leave the others waiting
                raise RuntimeError(f"DALI's epoch is shorter than the {self._batches} batches computed for it") from None
            except RuntimeError as error:
                raise ShardError(_dali_message(error, self.shards)) from None
            self.batches_read += 1
            self.position += 1
            images = batch["images"].permute(0, 3, 1, 2)  # NHWC memory -> NCHW view, channels_last
            labels = batch["labels"].view(-1)
            if self._cast_to is not None:
                images = images.to(self._cast_to, memory_format=torch.channels_last)
            if not self.train:  # drop the reader's padding so each image counts once
                keep = max(0, min(self.batch_size, remaining))
                remaining -= self.batch_size
                images, labels = images[:keep], labels[:keep]
            yield images, labels
        self.position = 0
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
