"""`LoaderSpec`: one loader described once, checked once, and taken whole by both loaders
(`dali_loader.DaliLoader`, `baseline.TorchvisionLoader`; `loader.build_loader` picks one).

A train loader is rebuilt every epoch (`for_epoch`): its shard order and augmentations then
depend only on (seed, epoch), so each epoch can be rebuilt on its own for an exact resume."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dali_imagenet import seeding
from dali_imagenet.data import preprocess
from dali_imagenet.data.partition import SHUFFLE_BUFFER, batches_per_epoch, epoch_shards
from dali_imagenet.data.shards import SplitShards
from dali_imagenet.errors import UsageError

BACKENDS = ("dali", "torchvision")
MAX_DEFAULT_THREADS = 8  # a spec without `threads`: the CPUs, up to this many


@dataclass(frozen=True)
class LoaderSpec:
    """What a loader reads and how it decodes, augments and batches. Made from the arguments as
    given; `__post_init__` checks them (one line each) and settles the defaults: `device` gets its
    CUDA index, `dtype` float16 on a GPU and float32 on a CPU (the fastest there), `threads` the
    CPUs (at most MAX_DEFAULT_THREADS), `shuffle_buffer` at most the rank's share (DALI's first
    fill would read past it, re-reading samples)."""
    shards: SplitShards  # the split in its written order (a train epoch reads `ordered_shards()`)
    batch_size: int
    train: bool  # random crops, flips, shuffling, the last partial batch dropped; else the val resize and crop
    device: torch.device | str = "cuda"
    rank: int = 0
    world_size: int = 1
    dtype: torch.dtype | None = None
    backend: str = "dali"  # one of BACKENDS
    threads: int | None = None  # DALI's CPU threads / the baseline's DataLoader workers
    hw_decoder_load: float = preprocess.HW_DECODER_LOAD  # DALI on a GPU: the JPEGs' share for the hardware decoder
    hybrid_huffman_threshold: int = preprocess.HYBRID_HUFFMAN_THRESHOLD  # DALI on a GPU: px, GPU Huffman above
    normalization: tuple | None = None  # (mean, std) on 0-1 pixel values, the model's (None: ImageNet's)
    image_size: int = 224  # px of the images handed out
    crop_fraction: float = preprocess.CROP_FRACTION  # val: the crop's share of the resized shorter side
    crop_min_area: float = preprocess.TRAIN_CROP_MIN_AREA  # train: a crop covers this to 100 % of the image
    interpolation: str = "bilinear"  # val: the resize's filter (`preprocess.INTERPOLATIONS`)
    crop_mode: str = "center"  # val: the crop (`preprocess.CROP_MODES`; border: the baseline's only)
    shuffle_buffer: int = SHUFFLE_BUFFER  # samples the train reader mixes
    seed: int = 0  # the run's: the shard order and the augmentations derive from (seed, epoch, rank)
    landing: object = None  # while the tars are staged (`staging.Landing`): what the loader waits on
    epoch: int = 0
    resume: dict | None = None  # a `state_dict()` taken mid-epoch from a loader of the same spec
    interrupt: Callable[[int], None] | None = None  # called before each replayed batch (it may raise to stop)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise UsageError(f"backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        interpolations, crop_modes = preprocess.INTERPOLATIONS, preprocess.CROP_MODES
        if (self.interpolation not in interpolations or self.crop_mode not in crop_modes
                or (self.backend, self.crop_mode) == ("dali", "border")):
            raise UsageError(f"val interpolation {self.interpolation!r}, crop mode {self.crop_mode!r}: the loaders "
                             f"take {', '.join(interpolations)} and {', '.join(crop_modes)} (border: the torchvision "
                             f"one only)")
        device = torch.device(self.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        dtype = self.dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise UsageError(f"dtype must be float16, bfloat16 or float32, not {dtype}")
        share = self.shards.samples // self.world_size
        if self.batches == 0:
            raise UsageError(f"batch size {self.batch_size} is larger than the {share} {self.shards.split} samples "
                             f"each of {self.world_size} rank(s) reads (train.py: lower it with --set batch_size=N)")
        threads = self.threads or max(1, min(os.cpu_count() or 1, MAX_DEFAULT_THREADS))
        shuffle_buffer = max(1, min(self.shuffle_buffer, share))
        for name, value in dict(device=device, dtype=dtype, threads=threads, shuffle_buffer=shuffle_buffer).items():
            object.__setattr__(self, name, value)  # frozen: settled once, here

    def for_epoch(self, epoch: int, image_size: int, *, resume: dict | None = None,
                  interrupt: Callable[[int], None] | None = None) -> LoaderSpec:
        """This train loader's epoch `epoch` at `image_size` px, continued from `resume` if given."""
        return dataclasses.replace(self, epoch=epoch, image_size=image_size, resume=resume, interrupt=interrupt)

    @property
    def batches(self) -> int:
        """Batches per epoch on every rank (`partition.batches_per_epoch`)."""
        return batches_per_epoch(self.shards.samples, self.world_size, self.batch_size, self.train)

    @property
    def loader_seed(self) -> int:
        """This rank's and epoch's seed for the reader's shuffling and the augmentations."""
        return seeding.derive_seed(self.seed, "loader", self.epoch, self.rank)

    def ordered_shards(self) -> SplitShards:
        """The shards in the order this loader reads them: a train epoch's own (`partition.epoch_shards`)."""
        return epoch_shards(self.shards, self.seed, self.epoch) if self.train else self.shards
