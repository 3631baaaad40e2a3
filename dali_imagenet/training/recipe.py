"""What a `TrainConfig` builds for training: the model (channels-last, on its device), SGD with
its parameter groups and the linearly scaled peak LR, the loss scaler, the EMA, the DDP and
torch.compile wrappers, and the train step. train.py and the benchmarks build it the same way,
so what a benchmark measures is what a run trains."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dali_imagenet.config import TrainConfig
from dali_imagenet.distributed import Processes
from dali_imagenet.errors import UsageError
from dali_imagenet.training import archs, memory
from dali_imagenet.training.ema import WeightEMA
from dali_imagenet.training.mixing import MixConfig
from dali_imagenet.training.precision import Precision
from dali_imagenet.training.schedule import parameter_groups, scaled_lr
from dali_imagenet.training.step import GraphedTrainStep, TrainStep


@dataclass
class Training:
    model: torch.nn.Module  # the plain module: what is saved, validated and averaged
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: WeightEMA | None
    peak_lr: float  # after the linear scaling rule, for the global batch

    def restart_ema(self, cfg: TrainConfig) -> None:
        """The EMA started again from the model's weights as they are now (loaded by --init)."""
        if self.ema is not None:
            self.ema = WeightEMA(self.model, cfg.ema_decay, cfg.ema_warmup_power)

    def step(self, cfg: TrainConfig, processes: Processes, precision: Precision, num_classes: int) -> TrainStep:
        """The train step, on the DDP (several processes) and torch.compile (`compile`) wrappers of
        the model. Build it after a checkpoint was restored into the model: DDP broadcasts rank 0's
        weights when it wraps them."""
        train_model = self.model
        if processes.world > 1:
            device_ids = [processes.local_rank] if processes.device.type == "cuda" else None
            train_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids,
                                                                    gradient_as_bucket_view=True)
        if cfg.compile:
            train_model = torch.compile(train_model, dynamic=False)  # one graph per image size of the ramp
        step_class = GraphedTrainStep if cfg.cuda_graph else TrainStep
        return step_class(self.model, train_model, self.optimizer, self.scaler, precision=precision,
                          mix=MixConfig.from_config(cfg), num_classes=num_classes, ema=self.ema, seed=cfg.seed,
                          rank=processes.rank, world_size=processes.world)


def build(cfg: TrainConfig, num_classes: int, processes: Processes, precision: Precision) -> Training:
    """Model, optimizer, scaler and EMA for `cfg` (the step comes after a resume: `Training.step`).
    A cuda_graph that cannot run here is refused now, before anything is built."""
    if cfg.cuda_graph:
        refusal = GraphedTrainStep.refusal(processes.device, precision.name, processes.world)
        if refusal:
            raise UsageError(refusal)
    found = memory.estimate(cfg.arch, cfg.width, num_classes, image_size=cfg.image_size, batch_size=cfg.batch_size,
                            amp_dtype=precision.name, ema=bool(cfg.ema_decay), drop_path=cfg.drop_path,
                            blurpool=cfg.blurpool, other_sizes=(cfg.val_image_size,))
    memory.check_fits(found, processes.device, network=cfg.network, batch_size=cfg.batch_size,
                      image_size=cfg.image_size)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = archs.build(cfg.arch, num_classes, drop_path_rate=cfg.drop_path, zero_init_last_bn=cfg.zero_init_last_bn,
                        blurpool=cfg.blurpool, width=cfg.width)
    model = model.to(processes.device, memory_format=memory_format)
    peak_lr = scaled_lr(cfg.lr, cfg.batch_size * processes.world, cfg.lr_reference_batch)
    optimizer = torch.optim.SGD(parameter_groups(model, cfg.weight_decay), lr=peak_lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov, fused=processes.device.type == "cuda")
    ema = WeightEMA(model, cfg.ema_decay, cfg.ema_warmup_power) if cfg.ema_decay else None
    return Training(model, optimizer, precision.scaler(), ema, peak_lr)
