"""`make_loader`: batches of (images, labels) as PyTorch tensors, from DALI or the baseline.

images: N×3×H×W, ImageNet-normalised, channels_last memory, on the requested device.
labels: int64, same device. `len(loader)` is batches per epoch, from the shard metadata alone and
by one rule for both backends (`partition.batches_per_epoch`), so every rank runs the same number
of steps. Iterating yields the rest of the current epoch; iterating again starts the next epoch.
Which samples a rank reads is `partition`'s rule, the same for both backends.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import torch

from dali_imagenet.data.loader_spec import LoaderSpec
from dali_imagenet.data.partition import SHUFFLE_BUFFER
from dali_imagenet.data.preprocess import CROP_FRACTION, HW_DECODER_LOAD, HYBRID_HUFFMAN_THRESHOLD, TRAIN_CROP_MIN_AREA
from dali_imagenet.data.shards import SplitShards, find_shards


class Loader(Protocol):
    """What both backends offer (`dali_loader.DaliLoader`, `baseline.TorchvisionLoader`)."""
    num_samples: int  # in the split, over all ranks
    num_classes: int
    batches_read: int  # batches this process decoded (a resume that restores must not replay)
    build_wait_s: float  # seconds waited for staged tars before the first batch could be read

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The rest of the epoch: (images, labels) batches."""

    def state_dict(self) -> dict:
        """Where the epoch stands, for `make_loader(resume=...)`: {"batch": batches handed out, ...}."""


def make_loader(data, split: str, batch_size: int, *, device: str | torch.device = "cuda", image_size: int = 224,
                rank: int = 0, world_size: int = 1, seed: int = 0, epoch: int = 0, dtype: torch.dtype | None = None,
                backend: str = "dali", train: bool | None = None, num_threads: int | None = None,
                shuffle_buffer: int = SHUFFLE_BUFFER, crop_fraction: float = CROP_FRACTION,
                crop_min_area: float = TRAIN_CROP_MIN_AREA, cache_dir=None, resume: dict | None = None,
                hw_decoder_load: float = HW_DECODER_LOAD, normalization=None,
                interrupt: Callable[[int], None] | None = None, interpolation: str = "bilinear",
                crop_mode: str = "center", hybrid_huffman_threshold: int = HYBRID_HUFFMAN_THRESHOLD,
                landing=None) -> Loader:
    """A loader from keywords (a `LoaderSpec` of them, built with `build_loader`).
    `data`: a shard folder, `s3://` prefix or timm-layout folder, or the `SplitShards` of one.
    `train` defaults to `split == "train"` (random crops, flips, shuffling, dropped last batch).

    A trainer builds one loader per epoch: the shard order and the augmentations then depend
    only on (seed, epoch), so each epoch can be rebuilt on its own for an exact resume.
    `resume`: a `state_dict()` taken mid-epoch from a loader built with the same arguments; the
    DALI loader restores its reader there without decoding the batches before it, the baseline
    replays them, calling `interrupt(batch)` before each replayed batch (it may raise to stop: a
    replay decodes without training). `dtype` defaults to float16 on a GPU and float32 on a CPU (the fastest there).
    `hw_decoder_load`: DALI on a GPU, the share of JPEGs for the hardware decoder (0: nvJPEG's hybrid path).
    `hybrid_huffman_threshold`: DALI on a GPU, px above which nvJPEG's GPU-assisted Huffman decoder is used.
    `normalization`: (mean, std) on 0-1 pixel values, the model's (default ImageNet's).
    `interpolation`, `crop_mode`: the val resize's filter and crop (`preprocess`), the model's.
    `landing`: while the tars are being staged (`staging.Landing`), what the loader waits on before
    reading one (the seconds before the first batch: `build_wait_s`).
    """
    shards = data if isinstance(data, SplitShards) else find_shards(data, split, cache_dir)
    return build_loader(LoaderSpec(
        shards, batch_size, split == "train" if train is None else train, device=device, rank=rank,
        world_size=world_size, dtype=dtype, backend=backend, threads=num_threads, hw_decoder_load=hw_decoder_load,
        hybrid_huffman_threshold=hybrid_huffman_threshold, normalization=normalization, image_size=image_size,
        crop_fraction=crop_fraction, crop_min_area=crop_min_area, interpolation=interpolation, crop_mode=crop_mode,
        shuffle_buffer=shuffle_buffer, seed=seed, landing=landing, epoch=epoch, resume=resume, interrupt=interrupt))


def build_loader(spec: LoaderSpec) -> Loader:
    """The loader `spec` describes, from its backend."""
    if spec.backend == "torchvision":
        from dali_imagenet.data.baseline import TorchvisionLoader  # torchvision and webdataset: only when asked for

        return TorchvisionLoader(spec)
    from dali_imagenet.data.dali_loader import DaliLoader

    return DaliLoader(spec)
