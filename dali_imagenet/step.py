"""One optimisation step: mix the batch, forward under autocast, backward, SGD. No host sync."""
from __future__ import annotations

from contextlib import nullcontext

import torch

from dali_imagenet.mixing import MixConfig, mix_batch, soft_target_cross_entropy

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}  # None: no autocast


def input_dtype(amp_dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    """The loader's output dtype for a model running under `amp_dtype` on `device`.

    On the GPU, half-size batches halve the loader's memory traffic (autocast casts fp16 input
    to bf16 inside the first conv anyway); on the CPU, DALI's fp16 conversion costs ~20 % of its
    throughput, more than autocast's cast of an fp32 input.
    """
    return torch.float16 if (amp_dtype is not None and device.type == "cuda") else torch.float32


def train_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, *, lr: float, num_classes: int,
               mix: MixConfig, generator: torch.Generator | None, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """Returns the loss as a device tensor; reading it (`.item()`) is the caller's sync, when it wants one."""
    for group in optimizer.param_groups:
        group["lr"] = lr  # a Python float: setting it launches nothing
    images, targets = mix_batch(images, labels, num_classes, mix, generator)
    autocast = torch.autocast(images.device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    with autocast:
        loss = soft_target_cross_entropy(model(images), targets)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)  # fused SGD on GPU: the fp16 inf check stays on the device
    scaler.update()
    return loss.detach()
