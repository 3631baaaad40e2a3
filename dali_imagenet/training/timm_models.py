"""This project's BlurPool ResNets (FFCV's placement: the input of each strided conv and of its
downsample is blurred) in timm's model registry, as `resnet10_ffcvblur` ... `resnet152_ffcvblur`.

timm has no such network (its `resnetblur*` blur after a stride-1 conv), so a published BlurPool
run names one of these in its config.json: `import dali_imagenet` registers them (the first time
timm is imported, or at once if it already is: `dali_imagenet/__init__.py`), after which
`timm.create_model("hf-hub:USER/NAME", pretrained=True)` builds the very network and loads its
weights through timm's own path (the keys are torchvision's: BlurPool has no weights). Without
the import, timm refuses the name. `width` is our ResNets' first-stage width (`model.WIDTH`).
"""
from __future__ import annotations

import sys

from dali_imagenet.training.model import LAYOUTS, WIDTH, BasicBlock, Bottleneck, ResNet

SUFFIX = "_ffcvblur"
_registered = False


def timm_name(arch: str) -> str:
    """The registered name of our `arch` ("resnet50") with BlurPool."""
    return f"{arch}{SUFFIX}"


class FFCVBlurResNet(ResNet):
    """Our ResNet with BlurPool, taking what timm's factory passes (`in_chans`, `num_classes`)."""

    def __init__(self, arch: str, num_classes: int = 1000, in_chans: int = 3, width: int = WIDTH,
                 drop_path_rate: float = 0.0, **kwargs):
        if in_chans != 3 or kwargs:
            raise ValueError(f"{timm_name(arch)} takes num_classes, width and drop_path_rate (3 input channels); "
                             f"not {', '.join(kwargs) or f'in_chans={in_chans}'}")
        kind, layers = LAYOUTS[arch]
        super().__init__(Bottleneck if kind == "bottleneck" else BasicBlock, layers, num_classes, drop_path_rate,
                         blurpool=True, width=width)
        self.num_classes = num_classes
        self.num_features = self.fc.in_features

    def get_classifier(self):
        return self.fc


def _entrypoint(arch: str):
    def create(pretrained: bool = False, **kwargs):
        from timm.models import build_model_with_cfg

        return build_model_with_cfg(FFCVBlurResNet, timm_name(arch), pretrained, arch=arch, **kwargs)

    create.__name__ = create.__qualname__ = timm_name(arch)
    create.__module__ = __name__
    return create


def register() -> None:
    """Adds the six names to timm's registry (once), with ImageNet's pretrained config (no weights
    of their own: a published folder's config.json brings its own)."""
    global _registered
    if _registered:
        return
    from timm.models import generate_default_cfgs, register_model

    module = sys.modules[__name__]
    module.default_cfgs = generate_default_cfgs({
        timm_name(arch): {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
                          "crop_pct": 0.875, "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406),
                          "std": (0.229, 0.224, 0.225), "first_conv": "conv1", "classifier": "fc"}
        for arch in LAYOUTS})
    for arch in LAYOUTS:
        entrypoint = _entrypoint(arch)
        setattr(module, entrypoint.__name__, entrypoint)
        register_model(entrypoint)
    _registered = True
