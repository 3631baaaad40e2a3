"""Which networks a run can train: this project's ResNets (`model.py`: BlurPool, the tested budget
recipes) by name, and any model timm builds as `timm:NAME` (`timm:efficientnet_b0`,
`timm:convnext_tiny`, `timm:resnet101`). Everything around the network (the loader, mixing, EMA,
compile, checkpoints, the reports) takes either.

What differs is asked here: how to build it, its input defaults (size, mean/std, the validation
crop: ours are ImageNet's 224 px at 0.875; a timm model's come from its pretrained config), the
classifier's parameter names (a new head when the classes change) and the last feature stage
(Grad-CAM's).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch

from dali_imagenet.data.preprocess import CROP_FRACTION, CROP_MODES, IMAGENET_MEAN_01, IMAGENET_STD_01, INTERPOLATIONS
from dali_imagenet.errors import DaliImagenetError
from dali_imagenet.training.model import LAYOUTS, WIDTH, build_model

TIMM = "timm:"


class ArchError(DaliImagenetError):
    """An arch that cannot be built; the message is one line."""


@dataclass(frozen=True)
class InputDefaults:
    image_size: int  # px, the side the model was designed for
    mean: tuple[float, float, float]  # on 0-1 pixel values
    std: tuple[float, float, float]
    crop_fraction: float  # validation: the centre crop's share of the resized shorter side
    interpolation: str = "bilinear"  # validation: the resize's filter
    crop_mode: str = "center"  # validation: preprocess.CROP_MODES


def is_timm(arch: str) -> bool:
    return arch.startswith(TIMM)


def network_name(arch: str, width: int = WIDTH) -> str:
    """The arch as a person reads it: "resnet10", or "resnet10 (width 16)" for a narrow one."""
    return arch if width == WIDTH else f"{arch} (width {width})"


def problem(arch: str, width: int = WIDTH) -> str | None:
    """Why `arch` (at `width`) cannot be built, in one line (close names for a typo), or None."""
    if width <= 0:
        return f"width must be > 0, not {width}"
    if not is_timm(arch):
        return None if arch in LAYOUTS else f"arch must be one of {', '.join(LAYOUTS)} or timm:NAME, not {arch!r}"
    import timm

    name = arch[len(TIMM):]
    if timm.is_model(name):
        return None if width == WIDTH else f"width is our ResNets'; {arch} has its own: leave width at {WIDTH}"
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    return (f"arch {arch}: timm {timm.__version__} has no model {name!r}"
            + (f" (close: {', '.join(TIMM + c for c in close)})" if close else " (timm.list_models() lists them)"))


def build(arch: str, num_classes: int, *, drop_path_rate: float = 0.0, zero_init_last_bn: bool = True,
          blurpool: bool = False, width: int = WIDTH) -> torch.nn.Module:
    """The network, with fresh weights."""
    why = problem(arch, width)
    if why:
        raise ArchError(why)
    if not is_timm(arch):
        return build_model(arch, num_classes, drop_path_rate, zero_init_last_bn, blurpool, width)
    if blurpool:
        raise ArchError(f"blurpool is this project's ResNets' (FFCV's placement); {arch} has none: set blurpool: false")
    import timm

    extra = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
    return timm.create_model(arch[len(TIMM):], pretrained=False, num_classes=num_classes, **extra)


def input_defaults(arch: str) -> InputDefaults:
    imagenet = InputDefaults(224, IMAGENET_MEAN_01, IMAGENET_STD_01, CROP_FRACTION)
    if not is_timm(arch):
        return imagenet
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch[len(TIMM):])
    if cfg is None:  # a model without a pretrained config: ImageNet's
        return imagenet
    interpolation = cfg.interpolation if cfg.interpolation in INTERPOLATIONS else "bicubic"  # lanczos, random: close
    return InputDefaults(int(cfg.input_size[-1]), tuple(cfg.mean), tuple(cfg.std), float(cfg.crop_pct), interpolation,
                         cfg.crop_mode if cfg.crop_mode in CROP_MODES else "center")


def classifier_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    """The state-dict prefixes of the classifier (what a new head replaces): `fc.` for our
    ResNets, timm's `pretrained_cfg["classifier"]` (`classifier.`, `head.fc.`, ...) for its models."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier", "fc")
    return tuple(f"{name}." for name in ((names,) if isinstance(names, str) else names))


def num_classes(model: torch.nn.Module) -> int:
    head = model.get_classifier() if hasattr(model, "get_classifier") else model.fc
    return head.out_features


def last_stage(model: torch.nn.Module) -> torch.nn.Module:
    """Grad-CAM's layer: the last feature stage (`layer4` of a ResNet; timm's last `feature_info`)."""
    if hasattr(model, "layer4"):
        return model.layer4
    info = getattr(model, "feature_info", None)
    if not info:
        raise ArchError(f"{type(model).__name__} names no feature stages: no Grad-CAM for it")
    return model.get_submodule(info[-1]["module"])
