"""The one place a run's loaders are described from its config: the train loader (each epoch's by
`LoaderSpec.for_epoch`, at that epoch's size) and the val loader, shared by the budget's
measurements, the start-up check of the val split and every epoch and validation."""
from __future__ import annotations

from dataclasses import dataclass

from dali_imagenet import distributed
from dali_imagenet.config import TrainConfig
from dali_imagenet.data.loader_spec import LoaderSpec
from dali_imagenet.data.shards import SplitShards
from dali_imagenet.training.precision import Precision


@dataclass(frozen=True)
class RunLoaders:
    train: LoaderSpec  # epoch 0's at the recipe's first size; an epoch's own: `train.for_epoch(epoch, size, ...)`
    val: LoaderSpec


def run_loaders(cfg: TrainConfig, procs: distributed.Processes, precision: Precision, backend: str, landing,
                shards: SplitShards, val_shards: SplitShards) -> RunLoaders:
    """The run's loaders on this rank (`landing`: the tars being staged, or None), each checked once here.
    A budget's schedule (`budget.Schedule`) may change the sizes' ramp after this: the train spec's
    own size is only a start, and every epoch's loader takes its size from `for_epoch`."""
    common = dict(batch_size=cfg.batch_size, device=procs.device, rank=procs.rank, world_size=procs.world,
                  dtype=precision.loader_dtype, backend=backend, threads=cfg.loader_threads,
                  hw_decoder_load=cfg.hw_decoder_load, hybrid_huffman_threshold=cfg.hybrid_huffman_threshold,
                  normalization=cfg.normalization(), landing=landing)
    return RunLoaders(
        train=LoaderSpec(shards, train=True, image_size=cfg.train_image_size(0), shuffle_buffer=cfg.shuffle_buffer,
                         crop_min_area=cfg.crop_min_area, seed=cfg.seed, **common),
        val=LoaderSpec(val_shards, train=False,  # no random op, no shuffle: no seed
                       image_size=cfg.val_image_size, crop_fraction=cfg.val_crop_fraction,
                       interpolation=cfg.val_interpolation, crop_mode=cfg.val_crop_mode, **common))
