"""Which samples each rank reads, in what order, and in how many batches: the arithmetic both
loaders (DALI's and the torchvision baseline) share, so that they count alike.

Each rank reads a contiguous `1/world_size` of the split's samples in reading order
(`rank_range`, DALI's `shard_id` split), so every sample is read once per epoch. Train takes the
full batches of the smallest rank's share; validation pads every rank to the largest share and
keeps the last partial batch, so every rank runs the same number of steps.
"""
from __future__ import annotations

from dali_imagenet import seeding
from dali_imagenet.data.shards import SplitShards

SHUFFLE_BUFFER = 4096  # samples; shards are shuffled when written and reordered each epoch, so a few thousand do


def batches_per_epoch(samples: int, world_size: int, batch_size: int, train: bool) -> int:
    """The one batch-count rule (DALI's reader and iterator count so): train takes the full
    batches of the smallest rank's share, floor(samples / world_size); validation pads every
    rank to the largest share, ceil(samples / world_size), and keeps the last partial batch."""
    if train:
        return samples // world_size // batch_size
    largest_share = -(-samples // world_size)
    return -(-largest_share // batch_size)


def rank_range(samples: int, world_size: int, rank: int) -> tuple[int, int]:
    """The rank's samples [first, end) of the split in reading order (DALI's `shard_id` split)."""
    return rank * samples // world_size, (rank + 1) * samples // world_size


def rank_pieces(shards: SplitShards, world_size: int, rank: int) -> list[tuple[str, int, int]]:
    """(tar, first sample, count) runs of the shards that make up the rank's `rank_range`."""
    first, end = rank_range(shards.samples, world_size, rank)
    pieces = []
    start = 0
    for tar, count in zip(shards.tars, shards.counts):
        lo, hi = max(first, start), min(end, start + count)
        if lo < hi:
            pieces.append((tar, lo - start, hi - lo))
        start += count
    return pieces


def tars_within_reach(shards: SplitShards, world_size: int, rank: int, samples: int, train: bool) -> list[str]:
    """The tars holding the rank's first `samples` samples in reading order, and one more (a
    margin). A train reader goes on into the next rank's share at its epoch's end (DALI's
    `stick_to_shard=False`: the iterator's reset prefetches the next epoch there), so the walk does too."""
    pieces = rank_pieces(shards, world_size, rank)
    if train and world_size > 1:
        pieces += rank_pieces(shards, world_size, (rank + 1) % world_size)
    tars, read = [], 0
    for tar, _, count in pieces:
        if read >= samples:
            tars.append(tar)  # the margin
            break
        tars.append(tar)
        read += count
    return list(dict.fromkeys(tars))


class EpochPosition:
    """What both loaders keep of the epoch under way: the `loader.Loader` fields and `len`."""

    def __init__(self, shards: SplitShards, batch_size: int, batches: int, train: bool, resume: dict | None):
        self.num_samples = shards.samples
        self.num_classes = shards.num_classes
        self.batch_size = batch_size
        self.train = train
        self._batches = batches
        self.position = min(resume["batch"], batches) if resume else 0  # batches of this epoch already handed out
        self.batches_read = 0  # batches this process decoded: a resume that restores must not replay

    def __len__(self) -> int:
        return self._batches


def epoch_shards(shards: SplitShards, seed: int, epoch: int) -> SplitShards:
    """The shards in a new order for every (seed, epoch), the same on every rank: DALI's shuffle
    buffer only mixes a few thousand neighbours, so without this, epochs would see the samples
    in nearly the same order."""
    return shards.reordered(seeding.permutation(seed, "shard order", len(shards.tars), epoch))
