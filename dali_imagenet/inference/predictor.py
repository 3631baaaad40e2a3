"""A trained model for use: loaded from this project's checkpoints, a published folder or
`hf://USER/NAME[@REVISION]` (`published.py`: timm's format), or a torchvision state dict, with
the class names and the validation preprocessing it was evaluated with. Used by
evaluate.py, predict.py, app.py and report.py."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from dali_imagenet.config import TrainConfig, from_dict
from dali_imagenet.data.pixels import MAX_PIXELS, TooManyPixels, open_image
from dali_imagenet.errors import DaliImagenetError, UsageError
from dali_imagenet.run import published
from dali_imagenet.run.checkpoint import CheckpointError, load, weights
from dali_imagenet.training import archs
from dali_imagenet.training.model import WIDTH

WEIGHT_CHOICES = ("auto", "raw", "ema")


class ImageError(DaliImagenetError):
    """An image file that cannot be read; the message is the reason."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    arch: str
    weights: str  # which weights were loaded: "raw", "ema", or "state dict"
    class_names: list[str] | None  # None: the file had none (a torchvision state dict)
    config: TrainConfig = field(default_factory=TrainConfig)  # the run's, or the defaults in fp32
    summary: dict = field(default_factory=dict)  # step, epochs, last val top-1 of the run, when known

    @property
    def num_classes(self) -> int:
        return archs.num_classes(self.model)


def load_model(path: str | Path, *, arch: str | None = None, which: str = "auto",
               device: str | torch.device = "cpu") -> LoadedModel:
    """`which`: "raw" weights, the "ema" average, or "auto" (the EMA where it scored higher at the
    run's last validation, else raw). Raises CheckpointError with a one-line reason."""
    if which not in WEIGHT_CHOICES:
        raise ValueError(f"which must be one of {', '.join(WEIGHT_CHOICES)}")
    if published.is_published(path):
        return _load_published(path, device)
    checkpoint = load(path)
    state = weights(checkpoint, which)
    arch = arch or checkpoint.get("arch") or "resnet50"
    if "fc.weight" not in state and not archs.is_timm(arch):
        raise CheckpointError(f"{path}: neither a dali-imagenet checkpoint nor a ResNet state dict (a timm model's: "
                              f"pass --arch timm:NAME)")
    if archs.problem(arch):
        raise CheckpointError(f"{path}: {archs.problem(arch)}")
    # A plain state dict brings no run config: the defaults for its arch, at its own width, in full precision.
    config = (from_dict(checkpoint["config"]) if isinstance(checkpoint.get("config"), dict)
              else TrainConfig(arch=arch, width=_width_in(state, arch), amp_dtype="float32"))
    classes = checkpoint.get("num_classes") or _classes_in(state, arch, path)
    model = archs.build(arch, classes, blurpool=config.blurpool, width=config.width)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: does not fit {arch} ({str(error).splitlines()[0]}); pass --arch") from None
    model = model.to(device, memory_format=torch.channels_last).eval()
    history = (checkpoint.get("state") or {}).get("history") or []
    summary = {"step": (checkpoint.get("state") or {}).get("step"), "epochs": config.epochs,
               "saved_at": checkpoint.get("saved_at"),
               **({"val": history[-1]} if history else {})}
    loaded = "state dict" if "model" not in checkpoint else (
        which if which != "auto" else ("ema" if state is (checkpoint.get("ema") or {}).get("weights") else "raw"))
    return LoadedModel(model, arch, loaded, checkpoint.get("class_names"), config, summary)


def _load_published(source, device) -> LoadedModel:
    """A published model holds one set of weights (the run's best, raw or EMA): `which` has no say."""
    found = published.load(source)
    model = found.model
    if model is None:
        model = archs.build(found.arch, len(found.class_names) if found.class_names else _classes_in(
            found.state, found.arch, source), blurpool=found.blurpool, width=found.config.width)
        try:
            model.load_state_dict(found.state)
        except RuntimeError as error:
            raise CheckpointError(f"{source}: does not fit {found.arch} ({str(error).splitlines()[0]})") from None
    model = model.to(device, memory_format=torch.channels_last).eval()
    return LoadedModel(model, found.arch, found.weights, found.class_names, found.config, found.summary)


def _width_in(state: dict, arch: str) -> int:
    """A plain state dict's ResNet width: its first stage's channels (torchvision's and timm's: the paper's)."""
    first = state.get("layer1.0.conv1.weight")
    return first.shape[0] if first is not None and not archs.is_timm(arch) else WIDTH


def _classes_in(state: dict, arch: str, path) -> int:
    """A plain state dict's class count: its classifier's rows (`fc.weight`, timm's own head)."""
    head = archs.classifier_prefixes(archs.build(arch, 1))[0] + "weight"
    if head not in state:
        raise CheckpointError(f"{path}: no {head} in it: not {arch}'s weights (pass --arch)")
    return state[head].shape[0]


def load_image(path: str | Path, max_pixels: int | None = MAX_PIXELS) -> torch.Tensor:
    """An image file of any mode (RGB, grayscale, CMYK, palette, PNG with alpha) as uint8 RGB CHW.
    Raises ImageError with the reason when the file is not a complete image or has more than
    `max_pixels` pixels (checked before decoding)."""
    from PIL import ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not decode to grey rows
    try:
        with open_image(path, max_pixels) as image:
            return image_tensor(image)
    except TooManyPixels as error:
        raise ImageError(str(error)) from None
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except Exception as error:  # PIL raises many types for bad data
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ImageError(f"not a readable image ({reason})") from None


def image_tensor(image) -> torch.Tensor:
    """A PIL image of any mode as uint8 RGB CHW (what torchvision's decoders give)."""
    import numpy as np

    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


class Predictor:
    """Class probabilities for images, preprocessed exactly as the checkpoint was validated:
    `preprocess.val_transform` at the run's val size, crop fraction, crop mode and interpolation
    (a published timm model's own)."""

    def __init__(self, loaded: LoadedModel, *, image_size: int | None = None, device: str | torch.device = "cpu",
                 class_names: list[str] | None = None):
        from torchvision.transforms import v2

        from dali_imagenet.data.classes import display_names, imagenet1k
        from dali_imagenet.data.preprocess import val_geometry, val_transform
        from dali_imagenet.training.precision import Precision

        self.loaded, self.device = loaded, torch.device(device)
        self.image_size = image_size or loaded.config.val_image_size
        config = loaded.config
        self.transform = val_transform(self.image_size, config.val_crop_fraction, normalization=config.normalization(),
                                       interpolation=config.val_interpolation, crop_mode=config.val_crop_mode)
        self.geometry = v2.Compose(val_geometry(self.image_size, config.val_crop_fraction, config.val_interpolation,
                                                config.val_crop_mode, config.normalization()))
        self.precision = Precision.for_device(loaded.config.amp_dtype, self.device, fallback=True)
        names = class_names or loaded.class_names
        if names is None and loaded.num_classes == len(imagenet1k()):
            names = [n for _, n in imagenet1k()]
        if names is not None and len(names) != loaded.num_classes:
            raise UsageError(f"{len(names)} class names for a model with {loaded.num_classes} classes")
        self.names = display_names(names) if names else [f"class {i}" for i in range(loaded.num_classes)]

    def probabilities(self, images: list[torch.Tensor]) -> torch.Tensor:
        """uint8 CHW images -> (N, classes) probabilities, in one batch."""
        return self.forward(torch.stack([self.transform(image) for image in images]))

    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Images already through `self.transform` (N x 3 x size x size, on any device) -> (N,
        classes) probabilities on the CPU. Each row's softmax is its own: a row depends on the
        other rows only through the shape the kernels were chosen for (serve.py's fixed batch)."""
        with self.precision.autocast():
            logits = self.loaded.model(batch.to(self.device).contiguous(memory_format=torch.channels_last))
        return logits.float().softmax(dim=1).cpu()

    def top(self, probabilities: torch.Tensor, k: int = 5) -> list[list[tuple[int, str, float]]]:
        values, indices = probabilities.topk(min(k, probabilities.shape[1]), dim=1)
        return [[(int(i), self.names[int(i)], float(v)) for v, i in zip(row_v, row_i)]
                for row_v, row_i in zip(values, indices)]

    def heat_map(self, image: torch.Tensor, class_index: int | None = None, display_px: int = 224):
        """Grad-CAM of `image` (uint8 CHW) for `class_index` (default: the top-1), over the crop the
        model saw, in full precision whatever the run trained in: (the class, the crop and the heat
        map as PIL images, at least `display_px` a side: a 32 px crop is drawn at a size one can see)."""
        from PIL import Image

        from dali_imagenet.inference.gradcam import grad_cam, overlay

        batch = self.transform(image)[None].to(self.device).contiguous(memory_format=torch.channels_last)
        if class_index is None:
            with torch.no_grad():
                class_index = int(self.loaded.model(batch).argmax(dim=1))
        crop = self.geometry(image)
        heat = overlay(crop, grad_cam(self.loaded.model, batch, class_index))
        side = max(display_px, crop.shape[-1])
        pictures = (Image.fromarray(crop.permute(1, 2, 0).numpy()), heat)
        return (class_index, *(picture.resize((side, side), Image.BILINEAR) for picture in pictures))


def top_json(top: list[tuple[int, str, float]]) -> list[dict]:
    """One image's top-k as `predict.py --json` and serve.py write it."""
    return [{"index": i, "name": n, "probability": p} for i, n, p in top]
