"""The evaluation loop, for train.py's validations and evaluate.py alike: top-1, top-5 and loss of
one or more models (the raw weights and their EMA) in one pass over the loader, so each image is
decoded once; optionally with flip test-time augmentation."""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dali_imagenet.precision import Precision


def predict_logits(model: torch.nn.Module, images: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """Logits of a batch; with `flip`, the mean of the image's and its mirror's (width is dim 3)."""
    logits = model(images)
    if flip:
        logits = (logits + model(images.flip(3))) / 2
    return logits


@torch.no_grad()
def evaluate(models: dict[str, torch.nn.Module], loader, precision: Precision, *, flip: bool = False,
             channels_last: bool = True, interrupt: Callable[[int], None] | None = None) -> dict:
    """{"top1", "top5", "loss", "images"} for the model named "" and `{name}_top1`... for the
    others, summed over all ranks (each image once). Accuracies in %, loss per image.
    `interrupt(batch)` is called before each batch and may raise to cut the pass short (a spot
    notice must not wait for four passes over 50,000 images)."""
    was_training = {name: model.training for name, model in models.items()}
    for model in models.values():
        model.eval()
    # per model: correct@1, correct@5, loss sum; then images: device sums, read once at the end
    totals = torch.zeros(3 * len(models) + 1, dtype=torch.float64, device=precision.device)
    for batch, (images, labels) in enumerate(loader):
        if interrupt is not None:
            interrupt(batch)
        if images.shape[0] == 0:  # a rank's padding-only batch
            continue
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        sums = []
        for model in models.values():
            with precision.autocast():
                logits = predict_logits(model, images, flip)
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top5 == labels.view(-1, 1)
            sums += [hits[:, 0].sum(), hits.any(1).sum(), F.cross_entropy(logits.float(), labels, reduction="sum")]
        totals += torch.stack([*sums, torch.ones_like(labels).sum()]).to(torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    for name, model in models.items():
        model.train(was_training[name])
    values = totals.tolist()  # the one host sync
    count = max(values[-1], 1.0)
    metrics = {"images": int(values[-1])}
    for i, name in enumerate(models):
        prefix = f"{name}_" if name else ""
        correct1, correct5, loss = values[3 * i: 3 * i + 3]
        metrics.update({f"{prefix}top1": 100.0 * correct1 / count, f"{prefix}top5": 100.0 * correct5 / count,
                        f"{prefix}loss": loss / count})
    return metrics
