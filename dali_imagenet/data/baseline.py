"""The baseline loader: what users run without DALI, behind the same interface as `DaliLoader`.

The `webdataset` library reads the shards, `torchvision.io.decode_jpeg` decodes on the CPU
(libjpeg-turbo), `transforms.v2` augments, a `DataLoader` spreads the work over processes. The
benchmarks compare against it. It reads exactly the samples DALI's reader would give the rank
(`partition.rank_pieces`), so both backends count batches by one rule. A mid-epoch
resume replays the epoch's batches up to the stop point (DALI's loader restores its reader instead).
"""
from __future__ import annotations

import itertools
import random

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from dali_imagenet import s3, seeding
from dali_imagenet.data.loader_spec import LoaderSpec
from dali_imagenet.data.partition import EpochPosition, rank_pieces
from dali_imagenet.data.preprocess import train_transform, val_transform
from dali_imagenet.data.shardformat import index_keys, parse_index
from dali_imagenet.data.shards import ShardError


class Transform:
    """Picklable per-sample transform for the DataLoader workers. A sample that does not decode
    is one line naming the shard and the key (`hint`: what to run about it), as in the DALI loader."""

    def __init__(self, train: bool, image_size: int, crop_fraction: float, crop_min_area: float, dtype: torch.dtype,
                 hint: str = "", normalization=None, interpolation: str = "bilinear", crop_mode: str = "center"):
        self.pipeline = (train_transform(image_size, crop_min_area, dtype, normalization) if train
                         else val_transform(image_size, crop_fraction, dtype, normalization, interpolation, crop_mode))
        self.hint = hint

    def __call__(self, sample):
        jpeg, cls, key, shard = sample
        try:
            image = decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ShardError(f"{shard}: sample {key}.jpg is undecodable ({reason}); {self.hint}") from None
        return self.pipeline(image), int(cls)


def _worker_error_line(error: ShardError) -> str:
    """A DataLoader re-raises a worker's error with the worker's traceback in the message: its last line is ours."""
    text = str(error).strip()
    if "Original Traceback" not in text:
        return text
    return text.splitlines()[-1].split(f"{ShardError.__name__}: ", 1)[-1]


class RankSamples(torch.utils.data.IterableDataset):
    """The rank's pieces, split over the DataLoader's workers, each worker batching its own stream."""

    def __init__(self, pieces, indices: dict[str, str], transform, batch_size: int, shuffle_buffer: int, seed: int,
                 train: bool):
        self.pieces = pieces
        self.indices = indices
        self.transform = transform
        self.batch_size = batch_size
        self.shuffle_buffer, self.seed, self.train = shuffle_buffer, seed, train
        self.epoch = -1  # counted in each worker: persistent workers keep their own copy

    def __iter__(self):
        import webdataset as wds

        self.epoch += 1
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # the shard order is the epoch's (`partition.epoch_shards`)
        stages = [_read(self.pieces[worker::workers], self.indices)]
        if self.train:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 256),
                                      rng=random.Random(seeding.derive_seed(self.seed, "loader", self.epoch, worker))))
        stages += [wds.to_tuple("jpg", "cls", "__key__", "__url__"), wds.map(self.transform),
                   wds.batched(self.batch_size, partial=True)]
        yield from wds.DataPipeline(*stages)


def _read(pieces, indices: dict[str, str]):
    """The pieces' samples, as the DALI reader sees them: those its index lists (a repaired
    shard's index leaves out samples that `verify-shards --repair` dropped; the tar keeps them)."""
    import webdataset as wds

    def samples():
        for tar, first, count in pieces:
            listed = set(index_keys(parse_index(open(indices[tar]).read(), indices[tar])))
            shard = wds.DataPipeline(wds.SimpleShardList([tar]), wds.tarfile_to_samples(),
                                     wds.select(lambda sample: sample["__key__"] in listed))
            yield from itertools.islice(shard, first, first + count)
    return samples


class TorchvisionLoader(EpochPosition):
    def __init__(self, spec: LoaderSpec):
        shards = spec.ordered_shards()
        if any(s3.is_s3(t) for t in shards.tars):
            raise ShardError("the torchvision baseline reads local shards only; use the DALI loader for s3://")
        super().__init__(shards, spec.batch_size, spec.batches, spec.train, spec.resume)
        pieces = rank_pieces(shards, spec.world_size, spec.rank)
        # Staged while training: the baseline (a comparison, not the fast path) waits for its whole rank share.
        self.build_wait_s = spec.landing.wait([tar for tar, _, _ in pieces]) if spec.landing else 0.0
        self.device = spec.device
        self._interrupt = spec.interrupt
        self._empty = (torch.empty((0, 3, spec.image_size, spec.image_size), dtype=spec.dtype),
                       torch.empty(0, dtype=torch.int64))
        transform = Transform(
            spec.train, spec.image_size, spec.crop_fraction, spec.crop_min_area, spec.dtype, shards.repair_hint(),
            spec.normalization, spec.interpolation, spec.crop_mode
        )
        dataset = RankSamples(pieces, dict(zip(shards.tars, shards.indices)), transform, spec.batch_size,
                              spec.shuffle_buffer, spec.loader_seed, spec.train)
        self._loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=max(1, min(spec.threads, len(pieces))),
            pin_memory=spec.device.type == "cuda", persistent_workers=True, prefetch_factor=4,
            generator=torch.Generator().manual_seed(spec.loader_seed))  # the workers' augmentation RNGs: reproducible

    def state_dict(self) -> dict:
        return {"batch": self.position}

    def __iter__(self):
        skip, self.position = self.position, 0
        for images, labels in self._exact_batches():
            self.batches_read += 1
            self.position += 1
            if self.position <= skip:  # resuming mid-epoch: replay up to the stop point
                if self._interrupt is not None:
                    self._interrupt(self.position - 1)
                continue
            images = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            yield images, labels.to(self.device, non_blocking=True)
        self.position = 0

    def _exact_batches(self):
        """`len(self)` batches of `batch_size` from the workers' streams, whose last batches are
        partial: those are merged; train drops what is left over, validation yields it, then
        empty batches, so that a rank with fewer samples yields as many batches as the others."""
        handed, held = 0, None
        batches = iter(self._loader)  # the whole epoch, so that persistent workers end it too
        while True:
            try:
                images, labels = next(batches)
            except StopIteration:
                break
            except ShardError as error:
                raise ShardError(_worker_error_line(error)) from None
            if held is not None:
                images, labels = torch.cat([held[0], images]), torch.cat([held[1], labels])
            while len(labels) >= self.batch_size and handed < self._batches:
                yield images[:self.batch_size], labels[:self.batch_size]
                images, labels = images[self.batch_size:], labels[self.batch_size:]
                handed += 1
            held = (images, labels) if len(labels) else None
        if handed < self._batches and self.train:
            raise RuntimeError(f"the baseline's epoch is shorter than the {self._batches} batches computed for it")
        for _ in range(handed, self._batches):
            yield held if held is not None else self._empty
            held = None
