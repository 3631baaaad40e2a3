"""Schedules as pure functions of the step or the epoch (the caller passes it in): the learning
rate, the train image size; and the SGD parameter groups."""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn


def scaled_lr(lr: float, global_batch: int, reference_batch: int) -> float:
    """Linear scaling rule (Goyal et al.): the recipe's LR is for `reference_batch` images a step."""
    return lr * global_batch / reference_batch


def lr_at(step: int, *, peak_lr: float, total_steps: int, warmup_steps: int, min_lr: float,
          shape: str = "cosine") -> float:
    """Linear warmup to `peak_lr` over `warmup_steps`, then down to `min_lr` at `total_steps`:
    along a half cosine, or a straight line ("linear": with warmup, the triangle of short
    recipes such as FFCV's).

    Step 0 already trains (peak/warmup_steps, not 0); from `total_steps` on the LR stays at `min_lr`.
    """
    if shape not in ("cosine", "linear"):
        raise ValueError(f"unknown LR schedule {shape!r}")
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if shape == "linear":
        return peak_lr + (min_lr - peak_lr) * progress
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class LRSchedule:
    """`lr_at` with a run's numbers fixed: `schedule.at(step)`."""
    peak_lr: float
    total_steps: int
    warmup_steps: int
    min_lr: float
    shape: str = "cosine"

    def at(self, step: int) -> float:
        return lr_at(step, peak_lr=self.peak_lr, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                     min_lr=self.min_lr, shape=self.shape)


def image_size_at(epoch: int, *, image_size: int, min_image_size: int = 0, ramp_start_epoch: int = 0,
                  ramp_end_epoch: int = 0, step: int = 32) -> int:
    """Train crop side for `epoch` (0-based): `min_image_size` up to `ramp_start_epoch`, rising
    linearly to `image_size` at `ramp_end_epoch`, rounded to a multiple of `step` px (few distinct
    sizes: each costs one compile and one cuDNN autotune). Without a ramp: `image_size`."""
    if not min_image_size:
        return image_size
    if epoch <= ramp_start_epoch:
        return min_image_size
    if epoch >= ramp_end_epoch:
        return image_size
    fraction = (epoch - ramp_start_epoch) / (ramp_end_epoch - ramp_start_epoch)
    size = min_image_size + fraction * (image_size - min_image_size)
    return min(image_size, max(min_image_size, int(round(size / step)) * step))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv and linear weights only: decaying BatchNorm scales and biases hurts accuracy."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
