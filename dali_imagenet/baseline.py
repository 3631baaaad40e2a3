"""The baseline loader: what users run without DALI, behind the same interface as `DaliLoader`.

The `webdataset` library reads the shards, `torchvision.io.decode_jpeg` decodes on the CPU
(libjpeg-turbo), `transforms.v2` augments, a `DataLoader` spreads the work over processes.
The benchmarks compare against it.
"""
from __future__ import annotations

import itertools

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from dali_imagenet import s3
from dali_imagenet.pipelines import IMAGENET_MEAN, IMAGENET_STD, val_resize_size
from dali_imagenet.shards import ShardError, SplitShards


def _samples_in(index_path: str) -> int:
    with open(index_path) as f:
        return int(f.readline().split()[1])


class Transform:
    """Picklable per-sample transform for the DataLoader workers."""

    def __init__(self, train: bool, image_size: int, dtype: torch.dtype):
        if train:
            geometry = [v2.RandomResizedCrop(image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
                        v2.RandomHorizontalFlip()]
        else:
            geometry = [v2.Resize(val_resize_size(image_size), antialias=True), v2.CenterCrop(image_size)]
        self.pipeline = v2.Compose([
            *geometry,
            v2.ToDtype(torch.float32, scale=False),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            v2.ToDtype(dtype),
        ])

    def __call__(self, sample):
        jpeg, cls = sample
        image = decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return self.pipeline(image), int(cls)


class TorchvisionLoader:
    def __init__(self, shards: SplitShards, batch_size: int, *, device: torch.device, image_size: int, rank: int,
                 world_size: int, seed: int, dtype: torch.dtype, train: bool, workers: int, shuffle_buffer: int):
        import webdataset as wds

        if any(s3.is_s3(t) for t in shards.tars):
            raise ShardError("the torchvision baseline reads local shards only; use the DALI loader for s3://")
        if len(shards.tars) < world_size:
            raise ShardError(f"{len(shards.tars)} shard(s) cannot be split over {world_size} ranks")
        self.device, self.train, self.batch_size = device, train, batch_size
        self.num_samples, self.num_classes = shards.samples, shards.num_classes
        tars, indices = shards.tars[rank::world_size], shards.indices[rank::world_size]
        self._workers = max(1, min(workers, len(tars)))
        transform = Transform(train, image_size, dtype)
        if train:
            # Shards drawn with replacement and a sample buffer: the standard webdataset recipe.
            # One endless stream; each epoch takes its share of batches from it.
            dataset = (wds.WebDataset(tars, resampled=True, shardshuffle=True, seed=seed * 1009 + rank,
                                      nodesplitter=None, empty_check=False)
                       .shuffle(shuffle_buffer).to_tuple("jpg", "cls").map(transform)
                       .batched(batch_size, partial=False))
            self._batches = sum(map(_samples_in, indices)) // batch_size
        else:
            dataset = (wds.WebDataset(tars, shardshuffle=False, nodesplitter=None, empty_check=False)
                       .to_tuple("jpg", "cls").map(transform).batched(batch_size, partial=True))
            # split_by_worker gives worker w the shards w, w+W, ...; each ends on a partial batch.
            per_worker = [sum(map(_samples_in, indices[w::self._workers])) for w in range(self._workers)]
            self._batches = sum(-(-n // batch_size) for n in per_worker)
        self._loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=self._workers, pin_memory=device.type == "cuda",
            persistent_workers=True, prefetch_factor=4)
        self._stream = None

    def __len__(self) -> int:
        return self._batches

    def __iter__(self):
        if self.train:
            if self._stream is None:
                self._stream = iter(self._loader)
            batches = itertools.islice(self._stream, self._batches)
        else:
            batches = iter(self._loader)
        for images, labels in batches:
            images = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            yield images, labels.to(self.device, non_blocking=True)
