"""A new run that starts from trained weights (`train.py --init SOURCE`) instead of random ones.

SOURCE is a checkpoint of this project's (`best.pt`, `last.pt`: the weights the run scored best
with, raw or EMA), its run folder (its `best.pt`), a published folder or `hf://USER/NAME[@REVISION]`
(`publish.py`'s, or anyone's timm model), a plain state dict (`final_weights.pt`, torchvision's),
or `timm` (timm's own pretrained weights for a `timm:` arch, where they can be fetched). The
architecture must be the run's; the classes need not be: where they differ, the classifier is new
(said in one line, with the counts) and everything else is loaded strictly.
A run extended by more epochs is a new run initialised from the old one, with its own schedule.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dali_imagenet.config import from_dict
from dali_imagenet.run import published
from dali_imagenet.run.checkpoint import CheckpointError, load, weights
from dali_imagenet.run.run_folder import BEST, FINAL, LAST
from dali_imagenet.training import archs
from dali_imagenet.training.archs import network_name
from dali_imagenet.training.model import WIDTH

TIMM_PRETRAINED = "timm"


@dataclass(frozen=True)
class Initialised:
    source: str  # where the weights came from (a file, or "timm:NAME pretrained")
    tensors: int  # loaded from it
    new_head: bool  # the classes differ: the classifier is this run's own, fresh
    source_classes: int | None

    def line(self, classes: int) -> str:
        there = f"{self.source_classes} there" if self.source_classes is not None else "unnamed classes there"
        head = (f"a new classifier for {classes} classes ({there}), the rest loaded"
                if self.new_head else "every weight loaded (the same classes)")
        return f"initialised from {self.source}: {head} ({self.tensors} tensors)"

    def record(self) -> dict:
        return {"source": self.source, "tensors": self.tensors, "new_head": self.new_head,
                "source_classes": self.source_classes}


def initialise(source: str, model: torch.nn.Module, arch: str, class_names, width: int = WIDTH) -> Initialised:
    """Loads `source`'s weights into `model` (the run's, freshly built: `arch` at `width`); raises
    CheckpointError in one line when they are not this architecture's."""
    if source == TIMM_PRETRAINED:
        return _from_timm(model, arch, class_names)
    if published.is_published(source):
        found = published.load(source)
        where, state, theirs = str(source), found.state, found.class_names
        saved = network_name(found.arch, found.config.width)
    else:
        path = Path(source)
        if path.is_dir():
            path = next((path / name for name in (BEST, LAST, FINAL) if (path / name).is_file()), path / BEST)
        checkpoint = load(path)
        where, state, theirs = str(path), weights(checkpoint, "auto"), checkpoint.get("class_names")
        config = checkpoint.get("config")  # a plain state dict has none: the strict load below checks its shapes
        saved = checkpoint.get("arch") and network_name(checkpoint["arch"], from_dict(config).width
                                                        if isinstance(config, dict) else width)
    if saved and saved != network_name(arch, width):
        raise CheckpointError(f"{where}: holds {saved}'s weights; this run trains {network_name(arch, width)} "
                              f"(--init takes weights of the same architecture)")
    same = theirs is not None and list(theirs) == list(class_names)
    head = [v for k, v in state.items() if k.startswith(archs.classifier_prefixes(model)) and k.endswith("weight")]
    count = len(theirs) if theirs is not None else (int(head[0].shape[0]) if head else None)  # unnamed: its head's
    return _load(model, state, where, arch, same, count)


def _load(model: torch.nn.Module, state: dict, source: str, arch: str, same_classes: bool,
          source_classes: int | None) -> Initialised:
    heads = archs.classifier_prefixes(model)
    if not same_classes:
        state = {k: v for k, v in state.items() if not k.startswith(heads)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=same_classes)
    except RuntimeError as error:
        raise CheckpointError(f"{source}: its weights do not fit {arch} ({str(error).splitlines()[1:2] or error}); "
                              f"--init takes weights of the same architecture") from None
    stray = [k for k in missing if not k.startswith(heads)] + list(unexpected)
    if stray:
        raise CheckpointError(f"{source}: its weights do not fit {arch} ({len(stray)} tensors do not match, e.g. "
                              f"{stray[0]}); --init takes weights of the same architecture")
    return Initialised(source, len(state), not same_classes, source_classes)


def _from_timm(model: torch.nn.Module, arch: str, class_names) -> Initialised:
    if not archs.is_timm(arch):
        raise CheckpointError(f"--init timm: {arch} is this project's ResNet; timm's weights are for timm:NAME archs")
    import timm

    name = arch[len(archs.TIMM):]
    try:
        pretrained = timm.create_model(name, pretrained=True)
    except Exception as error:  # noqa: BLE001 - a download or a missing tag: timm's reason, on one line
        reason = " ".join(str(error).split())[:200]
        raise CheckpointError(f"--init timm: timm could not fetch {name}'s pretrained weights ({reason})") from None
    from dali_imagenet.data.classes import imagenet1k

    pretrained_classes = archs.num_classes(pretrained)  # timm's ImageNet-1K tags: its 1000 classes, in synset order
    imagenet = pretrained_classes == 1000 and list(class_names) == [names for _, names in imagenet1k()]
    return _load(model, pretrained.state_dict(), f"{arch} pretrained", arch, imagenet, pretrained_classes)
