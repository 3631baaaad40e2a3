"""A trained model as timm publishes one: a folder (or a Hugging Face Hub repo) holding
`config.json` (architecture, num_classes, label_names, pretrained_cfg: the validation size, crop,
mean/std and interpolation) and `model.safetensors`. What timm builds as it is (our ResNets without
BlurPool, `timm:NAME` archs) is written with timm's own `save_for_hf`, so that
`timm.create_model("local-dir:FOLDER", pretrained=True)` (or `hf-hub:USER/NAME`) gives the same
network and logits. A ResNet with BlurPool has no timm equivalent (timm's `resnetblur50` blurs
after a stride-1 conv; ours, FFCV's placement, before the strided conv): its `config.json` names an
architecture timm does not have, so timm refuses it in one line instead of building a different
network; this project loads it exactly.

Both carry a `dali_imagenet` section (the arch, BlurPool, the run's config, which weights, the
run's numbers): what `load` reads back. A folder without it (anyone's timm model) loads through
timm itself.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dali_imagenet.config import TrainConfig, from_dict
from dali_imagenet.errors import DaliImagenetError
from dali_imagenet.training import archs
from dali_imagenet.training.model import LAYOUTS, WIDTH

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
SECTION = "dali_imagenet"
HF = "hf://"
FORMAT = 1
# timm's builders whose `layers` argument gives any of our ResNets (same keys, same network)
TIMM_RESNETS = {"basic": "resnet18", "bottleneck": "resnet50"}
# What timm's save_for_hf copies from its default pretrained config that would claim timm's
# own weights (a tag, a paper, a URL): a published run's weights are the run's.
NOT_OURS = ("tag", "origin_url", "paper_ids", "hf_hub_id", "url", "license")


class PublishedError(DaliImagenetError):
    """A published folder or Hub repo that cannot be read; the message is one line."""


@dataclass
class Published:
    state: dict  # the weights, as the network's state dict
    arch: str  # ours ("resnet50") or "timm:NAME"
    config: TrainConfig  # the run's (its validation preprocessing); the defaults for a foreign folder
    class_names: list[str] | None
    weights: str  # "raw" or "ema" (a foreign folder: "published")
    summary: dict = field(default_factory=dict)  # the run's numbers, as written
    folder: Path | None = None
    model: torch.nn.Module | None = None  # a foreign folder: timm built it already

    @property
    def blurpool(self) -> bool:
        return self.config.blurpool


def timm_equivalent(arch: str, blurpool: bool, width: int = WIDTH) -> tuple[str, dict] | None:
    """(timm's model name, its builder's arguments) that build exactly this network, or None."""
    if archs.is_timm(arch):
        return arch[len(archs.TIMM):], {}
    if blurpool or arch not in LAYOUTS:
        return None
    kind, layers = LAYOUTS[arch]
    channels = {"channels": [width * 2**i for i in range(4)]} if width != WIDTH else {}  # timm's stem stays WIDTH too
    return TIMM_RESNETS[kind], {"layers": list(layers), **channels}


def is_published(source: str | Path) -> bool:
    """`hf://USER/NAME[@REVISION]`, or a folder holding a config.json."""
    return str(source).startswith(HF) or (Path(source).is_dir() and (Path(source) / CONFIG).is_file())


def write(folder: str | Path, state: dict, *, arch: str, num_classes: int, config: TrainConfig,
          class_names: list[str] | None, weights: str, summary: dict, license: str = "apache-2.0") -> bool:
    """`config.json` + `model.safetensors` in `folder` (which exists). Returns whether timm
    builds it as it is."""
    folder = Path(folder)
    mean, std = config.normalization()
    preprocessing = {"input_size": (3, config.val_image_size, config.val_image_size),
                     "crop_pct": config.val_crop_fraction, "crop_mode": "center", "interpolation": "bilinear",
                     "mean": tuple(mean), "std": tuple(std)}
    ours = {"format": FORMAT, "arch": arch, "blurpool": config.blurpool, "weights": weights,
            "config": dataclasses.asdict(config), "run": summary}
    equivalent = timm_equivalent(arch, config.blurpool, config.width)
    if equivalent is not None:
        import timm
        from timm.models import save_for_hf

        name, model_args = equivalent
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **model_args)
        model.load_state_dict(state, strict=True)  # the very tensors: timm's network has our keys
        save_for_hf(model, str(folder), model_config={"label_names": class_names} if class_names else None,
                    data_config=preprocessing, safe_serialization=True)
        written = json.loads((folder / CONFIG).read_text())
        for key in NOT_OURS:
            written["pretrained_cfg"].pop(key, None)
        written["pretrained_cfg"]["license"] = license
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WEIGHTS), metadata={"format": "pt"})
        written = {"architecture": f"dali_imagenet.{arch}_blurpool", "num_classes": num_classes,
                   **({"label_names": class_names} if class_names else {}),
                   "pretrained_cfg": {**preprocessing, "num_classes": num_classes, "first_conv": "conv1",
                                      "classifier": "fc", "license": license,
                                      "notes": "FFCV-placed BlurPool: not a timm architecture; load it with "
                                               "dali-imagenet"}}
    written[SECTION] = ours
    (folder / CONFIG).write_text(json.dumps(written, indent=2) + "\n")
    return equivalent is not None


def fetch(source: str, files: tuple[str, ...] = (CONFIG, WEIGHTS)) -> Path:
    """A local folder for `source`: itself, or `hf://USER/NAME[@REVISION]` downloaded (`files`
    only) through huggingface_hub's cache (HF_TOKEN or the login for a private repo)."""
    if not str(source).startswith(HF):
        return Path(source)
    repo_id, _, revision = str(source)[len(HF):].partition("@")
    if repo_id.count("/") != 1:
        raise PublishedError(f"{source}: a model on the Hub is hf://USER/NAME[@REVISION]")
    import os

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:  # HF_ENDPOINT as it is now (huggingface_hub reads it once, at import)
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=list(files),
                                      endpoint=os.environ.get("HF_ENDPOINT")))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as error:
        reason = " ".join(str(error).split())[:200]
        raise PublishedError(f"{source}: cannot download it from the Hub ({reason})") from None


def load(source: str | Path) -> Published:
    """The weights and what they need, from a published folder or `hf://USER/NAME[@REVISION]`."""
    folder = fetch(str(source))
    try:
        written = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise PublishedError(f"{folder / CONFIG}: not a model's config ({error})") from None
    ours = written.get(SECTION)
    if ours is None:
        return _foreign(folder, written, source)
    from safetensors.torch import load_file

    if not (folder / WEIGHTS).is_file():
        raise PublishedError(f"{folder}: no {WEIGHTS} beside its {CONFIG}")
    config = from_dict(ours["config"])
    return Published(load_file(str(folder / WEIGHTS)), ours["arch"], config, written.get("label_names"),
                     ours.get("weights", "raw"), ours.get("run", {}), folder)


def _foreign(folder: Path, written: dict, source) -> Published:
    """Anyone's timm model (no dali_imagenet section): timm builds and loads it; the validation
    preprocessing is its pretrained config's."""
    import timm

    try:
        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    except Exception as error:  # noqa: BLE001 - timm's many types (an unknown architecture, missing weights)
        reason = " ".join(str(error).split())[:200]
        raise PublishedError(f"{source}: timm cannot build it ({reason})") from None
    cfg = model.pretrained_cfg
    config = TrainConfig(arch=f"timm:{written['architecture']}", amp_dtype="float32", blurpool=False,
                         val_image_size=int(cfg["input_size"][-1]), val_crop_fraction=float(cfg.get("crop_pct", 0.875)),
                         image_mean=",".join(map(str, cfg["mean"])), image_std=",".join(map(str, cfg["std"])))
    return Published(model.state_dict(), config.arch, config, cfg.get("label_names"), "published", {}, folder, model)

