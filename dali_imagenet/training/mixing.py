"""Mixup / CutMix on a batch that already lives on the GPU, and the soft-target loss they need.

Pure functions of (batch, random generator): no state, and no device-to-host synchronisation.
The per-batch choice between mixup and cutmix, λ, and the cutmix box are all device tensors, and
both methods go through one masked blend, so the host never waits for the GPU to decide.
Semantics follow timm's `Mixup` (batch mode): each sample is paired with its mirror in the batch
(`flip(0)`), cutmix's λ is the area actually kept after the box is clipped to the image, and the
soft targets carry label smoothing.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MixConfig:
    """The mixing part of a `TrainConfig` (same field names; the defaults live there)."""
    mixup_alpha: float  # Beta(α, α) for mixup's λ; 0 turns mixup off
    cutmix_alpha: float  # Beta(α, α) for cutmix's box area; 0 turns cutmix off
    mix_switch_prob: float  # with both on: chance that a batch uses cutmix instead of mixup
    label_smoothing: float

    @classmethod
    def from_config(cls, config) -> MixConfig:
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})

    @property
    def active(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float, dtype=torch.float32) -> torch.Tensor:
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, dtype=dtype, device=labels.device)
    return targets.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


def _beta(alpha: float, generator, device) -> torch.Tensor:
    # Beta(α, α) from two Gamma(α) draws: stays on the device, unlike numpy's or Python's beta.
    concentration = torch.full((2,), alpha, device=device)
    gammas = torch._standard_gamma(concentration, generator=generator)
    return gammas[0] / gammas.sum()


def cutmix_box(lam: torch.Tensor, height: int, width: int, centre: torch.Tensor):
    """Box of area ~(1-λ)·H·W centred at `centre` (fractions of H and W), clipped to the image:
    (y0, y1, x0, x1)."""
    cut_ratio = torch.sqrt(1.0 - lam)
    half_h = torch.floor(cut_ratio * height) // 2
    half_w = torch.floor(cut_ratio * width) // 2
    cy, cx = torch.floor(centre[0] * height), torch.floor(centre[1] * width)
    return ((cy - half_h).clamp(0, height), (cy + half_h).clamp(0, height),
            (cx - half_w).clamp(0, width), (cx + half_w).clamp(0, width))


def draw_mix(config: MixConfig, generator: torch.Generator | None, device) -> torch.Tensor:
    """A batch's random draws as one device tensor: [mixup λ, cutmix λ, use cutmix (0/1), box
    centre y, box centre x (fractions)]. Drawn apart from the mixing itself, so that a captured
    CUDA graph can take them as an input."""
    one = torch.ones((), device=device)
    mix_lam = _beta(config.mixup_alpha, generator, device) if config.mixup_alpha > 0 else one
    cut_lam = _beta(config.cutmix_alpha, generator, device) if config.cutmix_alpha > 0 else one
    if config.mixup_alpha > 0 and config.cutmix_alpha > 0:
        use_cutmix = (torch.rand((), generator=generator, device=device) < config.mix_switch_prob).float()
    else:
        # A fill kernel, not torch.tensor(bool): that would be a synchronous host-to-device copy.
        use_cutmix = torch.full((), float(config.cutmix_alpha > 0), device=device)
    centre = torch.rand(2, generator=generator, device=device)
    return torch.cat([torch.stack([mix_lam, cut_lam, use_cutmix]), centre])


def mix_batch(images: torch.Tensor, labels: torch.Tensor, num_classes: int, config: MixConfig,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,C,H,W) images, (N,) int labels -> mixed images (same dtype and layout), (N, classes) targets."""
    if not config.active:
        return images, smooth_one_hot(labels, num_classes, config.label_smoothing)
    return mix_with_draws(images, labels, num_classes, config, draw_mix(config, generator, images.device))


def mix_with_draws(images: torch.Tensor, labels: torch.Tensor, num_classes: int, config: MixConfig,
                   draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`mix_batch` with the draws of `draw_mix` given."""
    targets = smooth_one_hot(labels, num_classes, config.label_smoothing)
    if not config.active:
        return images, targets
    box = cutmix_box(draws[1], images.shape[-2], images.shape[-1], draws[3:5])
    return apply_mix(images, targets, draws[0], draws[2] > 0.5, box)


def apply_mix(images: torch.Tensor, targets: torch.Tensor, mix_lam: torch.Tensor, use_cutmix: torch.Tensor,
              box) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixes each sample with its mirror `flip(0)`: mixup with weight `mix_lam` on the sample's own
    pixels, or (when `use_cutmix`) the partner's pixels pasted into `box`. Returns images, targets."""
    height, width = images.shape[-2:]
    y0, y1, x0, x1 = box
    rows = torch.arange(height, device=images.device).view(-1, 1)
    cols = torch.arange(width, device=images.device).view(1, -1)
    in_box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1) & use_cutmix  # (H, W)
    kept_area = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    lam = torch.where(use_cutmix, kept_area, mix_lam)

    partner = images.flip(0)
    blend = torch.where(use_cutmix, torch.ones_like(mix_lam), mix_lam).to(images.dtype)
    mixed = torch.where(in_box, partner, images * blend + partner * (1 - blend))
    return mixed, targets * lam + targets.flip(0) * (1.0 - lam)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
