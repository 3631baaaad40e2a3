"""One optimisation step: mix the batch, forward under autocast, backward, SGD, EMA. No host sync."""
from __future__ import annotations

import torch

from dali_imagenet.mixing import MixConfig, mix_batch, soft_target_cross_entropy
from dali_imagenet.precision import Precision


def train_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, *, lr: float, num_classes: int,
               mix: MixConfig, generator: torch.Generator | None, precision: Precision) -> torch.Tensor:
    """Returns the loss as a device tensor; reading it (`.item()`) is the caller's sync, when it wants one."""
    for group in optimizer.param_groups:
        group["lr"] = lr  # a Python float: setting it launches nothing
    images, targets = mix_batch(images, labels, num_classes, mix, generator)
    with precision.autocast():
        loss = soft_target_cross_entropy(model(images), targets)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)  # fused SGD on GPU: the fp16 inf check stays on the device
    scaler.update()
    return loss.detach()
