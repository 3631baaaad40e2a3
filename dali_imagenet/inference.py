"""A trained model for use: loaded from this project's checkpoints or a torchvision state dict,
with the class names and the validation preprocessing it was evaluated with. Used by
evaluate.py, predict.py, app.py and report.py."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from dali_imagenet.checkpoint import CheckpointError, load, weights
from dali_imagenet.config import TrainConfig, from_dict
from dali_imagenet.model import LAYOUTS, build_model

WEIGHT_CHOICES = ("auto", "raw", "ema")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    arch: str
    weights: str  # which weights were loaded: "raw", "ema", or "state dict"
    class_names: list[str] | None  # None: the file had none (a torchvision state dict)
    config: TrainConfig = field(default_factory=TrainConfig)  # the run's, or the defaults
    summary: dict = field(default_factory=dict)  # step, epochs, last val top-1 of the run, when known

    @property
    def num_classes(self) -> int:
        return self.model.fc.out_features


def load_model(path: str | Path, *, arch: str | None = None, which: str = "auto",
               device: str | torch.device = "cpu") -> LoadedModel:
    """`which`: "raw" weights, the "ema" average, or "auto" (the EMA where it scored higher at the
    run's last validation, else raw). Raises CheckpointError with a one-line reason."""
    if which not in WEIGHT_CHOICES:
        raise ValueError(f"which must be one of {', '.join(WEIGHT_CHOICES)}")
    checkpoint = load(path)
    state = weights(checkpoint, which)
    if "fc.weight" not in state:
        raise CheckpointError(f"{path}: neither a dali-imagenet checkpoint nor a ResNet state dict")
    arch = arch or checkpoint.get("arch") or "resnet50"
    if arch not in LAYOUTS:
        raise CheckpointError(f"{path}: unknown arch {arch!r} (choose from {', '.join(LAYOUTS)})")
    config = from_dict(checkpoint["config"]) if isinstance(checkpoint.get("config"), dict) else TrainConfig()
    model = build_model(arch, num_classes=state["fc.weight"].shape[0], blurpool=config.blurpool)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: does not fit {arch} ({str(error).splitlines()[0]}); pass --arch") from None
    model = model.to(device, memory_format=torch.channels_last).eval()
    history = (checkpoint.get("state") or {}).get("history") or []
    summary = {"step": (checkpoint.get("state") or {}).get("step"), "epochs": config.epochs,
               **({"val": history[-1]} if history else {})}
    loaded = "state dict" if "model" not in checkpoint else (
        which if which != "auto" else ("ema" if state is (checkpoint.get("ema") or {}).get("weights") else "raw"))
    return LoadedModel(model, arch, loaded, checkpoint.get("class_names"), config, summary)
