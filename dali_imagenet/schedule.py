"""The learning rate as a pure function of the step, and the SGD parameter groups."""
from __future__ import annotations

import math

from torch import nn


def scaled_lr(lr: float, global_batch: int, reference_batch: int) -> float:
    """Linear scaling rule (Goyal et al.): the recipe's LR is for `reference_batch` images a step."""
    return lr * global_batch / reference_batch


def lr_at(step: int, *, peak_lr: float, total_steps: int, warmup_steps: int, min_lr: float) -> float:
    """Linear warmup to `peak_lr` over `warmup_steps`, then cosine decay to `min_lr` at `total_steps`.

    Step 0 already trains (peak/warmup_steps, not 0); from `total_steps` on the LR stays at `min_lr`.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv and linear weights only: decaying BatchNorm scales and biases hurts accuracy."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
