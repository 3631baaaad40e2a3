"""What an image goes through before the model, written once for every path that needs it: the
DALI graphs, the torchvision baseline, evaluation and `predict.py`. Imports no DALI.

Train: random-resized crop (area 8-100 % by default, aspect 3/4-4/3), resize, random flip, normalise.
Val: resize the shorter side to `image_size / crop_fraction` (256 for 224 at 0.875), centre crop.
Normalise: ImageNet's mean and std, or a model's own (`normalization`: (mean, std) on 0-1 pixel
values, e.g. a timm model's 0.5s).
"""
from __future__ import annotations

IMAGENET_MEAN_01 = (0.485, 0.456, 0.406)  # on 0-1 pixel values (timm's and torchvision's way of writing them)
IMAGENET_STD_01 = (0.229, 0.224, 0.225)
IMAGENET_MEAN = tuple(m * 255 for m in IMAGENET_MEAN_01)  # on 0-255 pixel values (DALI's)
IMAGENET_STD = tuple(s * 255 for s in IMAGENET_STD_01)
CROP_FRACTION = 0.875  # val: the centre crop's share of the resized shorter side
TRAIN_CROP_MIN_AREA = 0.08  # a random-resized crop takes this to 100 % of the image's area
TRAIN_CROP_ASPECT = (3 / 4, 4 / 3)
# Decoding on a GPU: the share of the JPEGs sent to the hardware JPEG decoder (A100, H100; NVIDIA's
# docs do not name the L4); the rest take nvJPEG's hybrid path (Huffman decoding on the CPU
# threads, the rest in CUDA). A card without one falls back to the hybrid path; 0 forces it.
HW_DECODER_LOAD = 0.7


def pixel_mean_std(normalization=None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) on 0-255 pixel values, from (mean, std) on 0-1 values (None: ImageNet's)."""
    if normalization is None:
        return IMAGENET_MEAN, IMAGENET_STD
    mean, std = normalization
    return tuple(m * 255 for m in mean), tuple(s * 255 for s in std)


def val_resize_size(image_size: int, crop_fraction: float = CROP_FRACTION) -> int:
    """The shorter side before the centre crop: 256 for 224 at 0.875."""
    return round(image_size / crop_fraction)


def train_transform(image_size: int, min_area: float = TRAIN_CROP_MIN_AREA, dtype=None, normalization=None):
    """torchvision v2 transform of a uint8 CHW tensor for training (the baseline loader's)."""
    from torchvision.transforms import v2

    return _normalised([v2.RandomResizedCrop(image_size, scale=(min_area, 1.0), ratio=TRAIN_CROP_ASPECT,
                                             antialias=True), v2.RandomHorizontalFlip()], dtype, normalization)


def val_geometry(image_size: int, crop_fraction: float = CROP_FRACTION) -> list:
    """Resize the shorter side, centre crop: the geometry DALI's val graph reproduces with
    torchvision's rounding (see `pipelines._resize_and_center_like_torchvision`)."""
    from torchvision.transforms import v2

    return [v2.Resize(val_resize_size(image_size, crop_fraction), antialias=True), v2.CenterCrop(image_size)]


def val_transform(image_size: int, crop_fraction: float = CROP_FRACTION, dtype=None, normalization=None):
    """torchvision v2 transform of a uint8 CHW tensor for evaluation: `val_geometry`, normalised."""
    return _normalised(val_geometry(image_size, crop_fraction), dtype, normalization)


def _normalised(geometry: list, dtype, normalization):
    """`dtype`: of the output tensor (default float32)."""
    import torch
    from torchvision.transforms import v2

    mean, std = pixel_mean_std(normalization)
    return v2.Compose([*geometry, v2.ToDtype(torch.float32, scale=False),
                       v2.Normalize(list(mean), list(std)), v2.ToDtype(dtype or torch.float32)])
