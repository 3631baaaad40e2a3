"""Run logging (a local metrics.jsonl, always; Weights & Biases, optionally) and evaluation."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F


class RunLogger:
    """Rank 0 only: every record goes to `metrics.jsonl` (flushed per line) and, if on, to W&B."""

    def __init__(self, run_dir: str | Path, config: dict, use_wandb: bool, project: str, resume_id: str | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = open(self.path, "a")
        self._wandb = None
        if use_wandb:
            import wandb

            # Only the config dataclass goes to W&B: no environment, so no AWS or W&B key.
            self._wandb = wandb.init(project=project, config=config, dir=str(run_dir), id=resume_id,
                                     resume="allow" if resume_id else None, name=Path(run_dir).name)

    @property
    def wandb_id(self) -> str | None:
        return self._wandb.id if self._wandb is not None else None

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def wandb_wanted(flag: bool | None) -> bool:
    """--wandb / --no-wandb decide; without either, W&B is on only where it is set up."""
    if flag is not None:
        return flag
    return bool(os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"))


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, amp_dtype: torch.dtype | None,
             channels_last: bool = True) -> dict:
    """Top-1, top-5 and mean cross-entropy over the loader, summed over all ranks (each image once)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, images
    for images, labels in loader:
        if images.shape[0] == 0:  # a rank's padding-only batch
            continue
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels.view(-1, 1)
        totals += torch.stack([hits[:, 0].sum(), hits.any(1).sum(),
                               F.cross_entropy(logits.float(), labels, reduction="sum"),
                               torch.ones_like(labels).sum()]).to(torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    model.train(was_training)
    correct1, correct5, loss, count = totals.tolist()
    count = max(count, 1.0)
    return {"top1": 100.0 * correct1 / count, "top5": 100.0 * correct5 / count, "loss": loss / count,
            "images": int(totals[3].item())}
