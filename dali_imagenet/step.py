"""One optimisation step: mix the batch, forward under autocast, backward, SGD, EMA. No host sync.

`train_step` is the step itself; `TrainStep` is what the trainer calls: the step at the LR and
RNG of a given global step, the EMA update after it, and a device-side record of the first
step whose loss was not finite (read only when the caller syncs anyway).
"""
from __future__ import annotations

import torch

from dali_imagenet import seeding
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


class TrainStep:
    def __init__(self, model: torch.nn.Module, train_model: torch.nn.Module, optimizer, scaler, *,
                 precision: Precision, mix: MixConfig, num_classes: int, ema=None, seed: int = 0, rank: int = 0):
        """`model`: the plain module (the EMA follows it); `train_model`: what runs the step
        (the same module, or its DDP / torch.compile wrapper)."""
        self.model, self.train_model, self.optimizer, self.scaler = model, train_model, optimizer, scaler
        self.precision, self.mix, self.num_classes, self.ema = precision, mix, num_classes, ema
        self.seed, self.rank = seed, rank
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=precision.device)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, *, step: int, lr: float) -> torch.Tensor:
        # The mixing RNG depends only on (seed, step, rank): resumable without saving its state.
        generator = torch.Generator(self.precision.device).manual_seed(
            seeding.derive_seed(self.seed, "mixing", step, self.rank))
        loss = train_step(self.train_model, images, labels, self.optimizer, self.scaler, lr=lr,
                          num_classes=self.num_classes, mix=self.mix, generator=generator, precision=self.precision)
        if self.ema is not None:
            self.ema.update(self.model, step)
        self.first_bad_step = torch.where((self.first_bad_step < 0) & ~torch.isfinite(loss), step, self.first_bad_step)
        return loss

    def bad_step(self) -> int | None:
        """The first step whose loss was NaN or inf, or None. A host sync: call it when logging."""
        bad = int(self.first_bad_step.item())
        return bad if bad >= 0 else None
