"""A trained model as timm publishes one: a folder (or a Hugging Face Hub repo) holding
`config.json` (architecture, num_classes, model_args, label_names and label_descriptions,
pretrained_cfg: the validation size, crop fraction and mode, interpolation, mean/std) and
`model.safetensors`, written with timm's own `save_for_hf` (its `model_args` passed explicitly),
so that `timm.create_model("local-dir:FOLDER", pretrained=True)` (or `hf-hub:USER/NAME`) gives the
same network and logits. The architecture is timm's own name wherever timm has the network
(resnet18/34/50/101/152; our ResNet-10 is timm's resnet18 builder with `layers` [1, 1, 1, 1]; a
narrow one adds `channels`). A ResNet with BlurPool has no timm equivalent (timm's `resnetblur50`
blurs after a stride-1 conv; ours, FFCV's placement, before the strided conv): it is named
`resnet50_ffcvblur` etc., which timm knows once `dali_imagenet` is imported
(`training/timm_models.py`) and refuses by name otherwise, instead of building a different network.
Class names: `label_names` are unique (ImageNet's synsets for ImageNet's classes, else short
names), the full names in `label_descriptions`, as timm's convention has it.

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
# timm's builders whose `layers` argument gives any of our ResNets (same keys, same network), for
# an arch timm has no name for (our ResNet-10)
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


@dataclass(frozen=True)
class Written:
    stock: bool  # timm builds it as it is, without importing dali_imagenet
    architecture: str  # the name config.json gives it


def timm_equivalent(arch: str, blurpool: bool, width: int = WIDTH) -> tuple[str, dict]:
    """(the timm model name, its builder's arguments) that build exactly this network: timm's own
    network, or (BlurPool) the name `dali_imagenet` registers in timm."""
    import timm

    from dali_imagenet.training import timm_models

    if archs.is_timm(arch):
        return arch[len(archs.TIMM):], {}
    if blurpool:
        timm_models.register()
        return timm_models.timm_name(arch), ({"width": width} if width != WIDTH else {})
    kind, layers = LAYOUTS[arch]
    channels = {"channels": [width * 2**i for i in range(4)]} if width != WIDTH else {}  # timm's stem stays WIDTH too
    if timm.is_model(arch):  # resnet18 ... resnet152: timm's own name, the same layers
        return arch, channels
    return TIMM_RESNETS[kind], {"layers": list(layers), **channels}


def label_config(class_names: list[str] | None) -> dict:
    """timm's `label_names` (unique: ImageNet's synsets for its 1000 classes, else `display_names`)
    and `label_descriptions` (name -> the full class name)."""
    from dali_imagenet.data.classes import display_names, imagenet1k

    if not class_names:
        return {}
    imagenet = imagenet1k()
    unique = ([synset for synset, _ in imagenet] if list(class_names) == [names for _, names in imagenet]
              else display_names(list(class_names)))
    return {"label_names": unique, "label_descriptions": dict(zip(unique, class_names))}


def class_names_of(written: dict) -> list[str] | None:
    """The full class names a config.json gives (its descriptions, where it has them)."""
    names = written.get("label_names") or (written.get("pretrained_cfg") or {}).get("label_names")
    descriptions = written.get("label_descriptions") or (written.get("pretrained_cfg") or {}).get("label_descriptions")
    if isinstance(names, dict):  # timm allows {index: name} where there are gaps; none here
        names = [names[key] for key in sorted(names, key=int)]
    return [descriptions.get(n, n) for n in names] if names and descriptions else names


def is_published(source: str | Path) -> bool:
    """`hf://USER/NAME[@REVISION]`, or a folder holding a config.json."""
    return str(source).startswith(HF) or (Path(source).is_dir() and (Path(source) / CONFIG).is_file())


def write(folder: str | Path, state: dict, *, arch: str, num_classes: int, config: TrainConfig,
          class_names: list[str] | None, weights: str, summary: dict, license: str = "apache-2.0") -> Written:
    """`config.json` + `model.safetensors` in `folder` (which exists), through timm's `save_for_hf`."""
    import timm
    from timm.models import save_for_hf

    folder = Path(folder)
    mean, std = config.normalization()
    preprocessing = {"input_size": (3, config.val_image_size, config.val_image_size),
                     "crop_pct": config.val_crop_fraction, "crop_mode": config.val_crop_mode,
                     "interpolation": config.val_interpolation, "mean": tuple(mean), "std": tuple(std)}
    ours = {"format": FORMAT, "arch": arch, "blurpool": config.blurpool, "weights": weights,
            "config": dataclasses.asdict(config), "run": summary}
    name, model_args = timm_equivalent(arch, config.blurpool, config.width)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **model_args)
    model.load_state_dict(state, strict=True)  # the very tensors: timm's network has our keys
    save_for_hf(model, str(folder), model_config=label_config(class_names), model_args=model_args,
                data_config=preprocessing, safe_serialization=True)
    written = json.loads((folder / CONFIG).read_text())
    for key in NOT_OURS:
        written["pretrained_cfg"].pop(key, None)
    written["pretrained_cfg"]["license"] = license
    written[SECTION] = ours
    (folder / CONFIG).write_text(json.dumps(written, indent=2) + "\n")
    return Written(not config.blurpool, name)


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

    from dali_imagenet.run.hub_errors import describe

    try:  # HF_ENDPOINT as it is now (huggingface_hub reads it once, at import)
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=list(files),
                                      endpoint=os.environ.get("HF_ENDPOINT")))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as error:
        raise PublishedError(f"cannot download it from the Hub: {describe(error, source)}") from None


def load(source: str | Path) -> Published:
    """The weights and what they need, from a published folder or `hf://USER/NAME[@REVISION]`."""
    folder = fetch(str(source))
    try:
        written = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise PublishedError(f"{folder / CONFIG}: not a model's config ({error})") from None
    if not isinstance(written, dict):
        raise PublishedError(f"{folder / CONFIG}: not a model's config (a JSON {type(written).__name__}, not an "
                             f"object)")
    ours = written.get(SECTION)
    if ours is None:
        return _foreign(folder, written, source)
    from safetensors.torch import load_file

    if not (folder / WEIGHTS).is_file():
        raise PublishedError(f"{folder}: no {WEIGHTS} beside its {CONFIG}")
    try:
        config = from_dict(ours["config"])
        arch = ours["arch"]
    except (KeyError, TypeError, AttributeError, DaliImagenetError) as error:
        raise PublishedError(f"{folder / CONFIG}: its {SECTION} section is incomplete ({error})") from None
    try:
        state = load_file(str(folder / WEIGHTS))
    except Exception as error:  # noqa: BLE001 - safetensors' own error type: a truncated or foreign file
        raise PublishedError(f"{folder / WEIGHTS}: not readable safetensors ({' '.join(str(error).split())}): "
                             f"truncated? download or publish it again") from None
    names = class_names_of(written)
    head = [state[k] for k in ("fc.weight", "classifier.weight", "head.fc.weight", "head.weight") if k in state]
    declared = written.get("num_classes")
    if head and isinstance(declared, int) and declared != head[-1].shape[0]:
        raise PublishedError(f"{folder / CONFIG}: num_classes {declared}, but {WEIGHTS}'s classifier has "
                             f"{head[-1].shape[0]} outputs")
    if head and names is not None and len(names) != head[-1].shape[0]:
        raise PublishedError(f"{folder / CONFIG}: {len(names)} label_names, but {WEIGHTS}'s classifier has "
                             f"{head[-1].shape[0]} outputs")
    return Published(state, arch, config, names, ours.get("weights", "raw"), ours.get("run", {}), folder)


def _foreign(folder: Path, written: dict, source) -> Published:
    """Anyone's timm model (no dali_imagenet section): timm builds and loads it; the validation
    preprocessing is its pretrained config's, whole (size, crop fraction and mode, interpolation,
    mean/std)."""
    import timm

    from dali_imagenet.data.preprocess import CROP_MODES, INTERPOLATIONS

    try:
        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    except Exception as error:  # noqa: BLE001 - timm's many types (an unknown architecture, missing weights)
        raise PublishedError(f"{source}: timm cannot build it ({' '.join(str(error).split())})") from None
    cfg = model.pretrained_cfg
    interpolation, crop_mode = cfg.get("interpolation") or "bilinear", cfg.get("crop_mode") or "center"
    if interpolation not in INTERPOLATIONS or crop_mode not in CROP_MODES:
        raise PublishedError(f"{source}: its preprocessing ({interpolation} interpolation, {crop_mode} crop) is not "
                             f"one this project reproduces ({', '.join(INTERPOLATIONS)}; {', '.join(CROP_MODES)})")
    config = TrainConfig(arch=f"timm:{written['architecture']}", amp_dtype="float32", blurpool=False,
                         val_image_size=int(cfg["input_size"][-1]), val_crop_fraction=float(cfg.get("crop_pct", 0.875)),
                         val_interpolation=interpolation, val_crop_mode=crop_mode,
                         image_mean=",".join(map(str, cfg["mean"])), image_std=",".join(map(str, cfg["std"])))
    return Published(model.state_dict(), config.arch, config, class_names_of({"pretrained_cfg": cfg}), "published",
                     {}, folder, model)

