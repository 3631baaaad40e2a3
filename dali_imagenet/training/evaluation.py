"""The evaluation loop, for train.py's validations and evaluate.py alike: top-1, top-5 and loss of
one or more models (the raw weights and their EMA) in one pass over the loader, so each image is
decoded once; optionally with flip test-time augmentation."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dali_imagenet.training.precision import Precision


def predict_logits(model: torch.nn.Module, images: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """Logits of a batch; with `flip`, the mean of the image's and its mirror's (width is dim 3)."""
    logits = model(images)
    if flip:
        logits = (logits + model(images.flip(3))) / 2
    return logits


def better_weights(scores: dict, prefix: str = "") -> tuple[str, float]:
    """Which weights scored higher in one validation, "raw" or "ema" (the EMA only when strictly
    higher), and their top-1 %: what best.pt, the page and --weights auto go by. `scores`:
    `evaluate`'s metrics (`prefix` ""), or a metrics.jsonl record (`prefix` "val_"); a run without
    EMA has no `ema_top1`, and a record without scores counts -1 for both."""
    raw, ema = scores.get(f"{prefix}top1", -1.0), scores.get(f"{prefix}ema_top1", -1.0)
    return ("ema", ema) if ema > raw else ("raw", raw)


@torch.no_grad()
def evaluate(models: dict[str, torch.nn.Module], loader, precision: Precision, *, flip: bool = False,
             channels_last: bool = True, interrupt: Callable[[int], None] | None = None) -> dict:
    """{"top1", "top5", "loss", "images"} for the model named "" and `{name}_top1`... for the
    others, summed over all ranks (each image once). Accuracies in %, loss per image.
    `interrupt(batch)` is called before each batch and may raise to cut the pass short (a spot
    notice must not wait for four passes over 50,000 images)."""
    return _evaluate(models, loader, precision, flip, channels_last, interrupt, keep=False)[0]


@torch.no_grad()
def evaluate_with_top5(models: dict[str, torch.nn.Module], loader, precision: Precision, *, flip: bool = False,
                       channels_last: bool = True, interrupt: Callable[[int], None] | None = None,
                       keep: bool = True) -> tuple[dict, dict[str, tuple]]:
    """`evaluate`'s metrics, and per model its (labels, top-5 classes, their probabilities) per
    image as numpy arrays, in the loader's order over all ranks (rank 0's images, then rank 1's...):
    what a final validation saves for the run's page ({} unless `keep`). The same single host sync
    at the end."""
    return _evaluate(models, loader, precision, flip, channels_last, interrupt, keep=keep)


def _evaluate(models, loader, precision: Precision, flip: bool, channels_last: bool, interrupt, keep: bool):
    was_training = {name: model.training for name, model in models.items()}
    for model in models.values():
        model.eval()
    # per model: correct@1, correct@5, loss sum; then images: device sums, read once at the end
    totals = torch.zeros(3 * len(models) + 1, dtype=torch.float64, device=precision.device)
    kept: dict[str, list] = {name: [] for name in models}  # device tensors, moved to the host once
    kept_labels = []
    for batch, (images, labels) in enumerate(loader):
        if interrupt is not None:
            interrupt(batch)
        if images.shape[0] == 0:  # a rank's padding-only batch
            continue
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        sums = []
        for name, model in models.items():
            with precision.autocast():
                logits = predict_logits(model, images, flip)
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top5 == labels.view(-1, 1)
            sums += [hits[:, 0].sum(), hits.any(1).sum(), F.cross_entropy(logits.float(), labels, reduction="sum")]
            if keep:
                kept[name].append((top5, logits.float().softmax(dim=1).gather(1, top5)))
        if keep:
            kept_labels.append(labels)
        totals += torch.stack([*sums, torch.ones_like(labels).sum()]).to(torch.float64)
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
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
    if not keep:
        return metrics, {}
    labels = torch.cat(kept_labels).cpu().numpy() if kept_labels else np.zeros(0, np.int64)
    top5s = {name: (labels, *(torch.cat([part[j] for part in parts]).cpu().numpy() if parts else np.zeros((0, 5))
                              for j in (0, 1))) for name, parts in kept.items()}
    if distributed:  # every rank's rows, in rank order: the shards' reading order
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, top5s)
        top5s = {name: tuple(np.concatenate([rank[name][j] for rank in gathered]) for j in range(3))
                 for name in models}
    return metrics, top5s
