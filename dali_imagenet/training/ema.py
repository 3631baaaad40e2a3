"""An exponential moving average (EMA) of the model's weights, updated on the device.

After each optimizer step, every floating-point parameter and buffer (BatchNorm statistics too)
moves towards the model's: ema = decay * ema + (1 - decay) * model, with `ema_decay_at` giving
the decay for the step (timm's warm-up: early averages forget fast, so the EMA is not stuck
with the random initial weights). The update is a few fused multi-tensor kernels. Eager steps
pass the weight as a Python float computed from the step; a CUDA graph passes a 0-dim device
tensor, which no host code may read: torch has no `_foreach_lerp_` for a tensor weight (its
`.Scalar` overload would call `.item()`, a host sync that breaks graph capture), so that path is
written as `ema += weight * (model - ema)` with `_foreach_mul_`'s tensor overload.
"""
from __future__ import annotations

import copy

import torch


def ema_decay_at(step: int, decay: float, warmup_power: float = 0.75) -> float:
    """The decay for the update after optimizer step `step` (0-based): 0 at step 0 (the EMA
    starts as a copy), then 1 - (1 + step)^-power, capped at `decay` (timm's warm-up with
    gamma 1; power 3/4 reaches 0.999 after ~10k steps, 2/3 after ~32k)."""
    if step <= 0:
        return 0.0
    return min(decay, 1.0 - (1.0 + step) ** -warmup_power)


class WeightEMA:
    def __init__(self, model: torch.nn.Module, decay: float, warmup_power: float = 0.75):
        self.decay, self.warmup_power = decay, warmup_power
        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self._pairs = None

    def _tensors(self, model: torch.nn.Module):
        if self._pairs is None or self._pairs[0] is not model:
            ours = list(self.module.state_dict(keep_vars=True).values())
            theirs = list(model.state_dict(keep_vars=True).values())
            averaged = [(a.data, b.data) for a, b in zip(ours, theirs) if a.is_floating_point()]
            copied = [(a.data, b.data) for a, b in zip(ours, theirs) if not a.is_floating_point()]
            self._pairs = (model, averaged, copied)
        return self._pairs[1], self._pairs[2]

    def weight_at(self, step: int) -> float:
        """How far the average moves towards the model after optimizer step `step`."""
        return 1.0 - ema_decay_at(step, self.decay, self.warmup_power)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Call after optimizer step `step` with the plain (unwrapped) model."""
        self.lerp(model, self.weight_at(step))

    @torch.no_grad()
    def lerp(self, model: torch.nn.Module, weight: float | torch.Tensor) -> None:
        """ema += weight * (model - ema); `weight` may be a 0-dim device tensor (inside a CUDA graph)."""
        averaged, copied = self._tensors(model)
        ours = [a for a, _ in averaged]
        theirs = [b for _, b in averaged]
        if isinstance(weight, torch.Tensor):
            steps = torch._foreach_sub(theirs, ours)
            torch._foreach_mul_(steps, weight)  # a 0-dim tensor: read on the device
            torch._foreach_add_(ours, steps)
        else:
            torch._foreach_lerp_(ours, theirs, weight)
        for ours, theirs in copied:  # BatchNorm's num_batches_tracked: a counter, not averaged
            ours.copy_(theirs)

    def state_dict(self) -> dict:
        return {"weights": self.module.state_dict(), "decay": self.decay, "warmup_power": self.warmup_power}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["weights"])
