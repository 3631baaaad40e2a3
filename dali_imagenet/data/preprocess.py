"""What an image goes through before the model, written once for every path that needs it: the
DALI graphs, the torchvision baseline, evaluation and `predict.py`. Imports no DALI.

Train: random-resized crop (area 8-100 % by default, aspect 3/4-4/3), resize, random flip, normalise.
Val, as timm's eval transform does it for each crop mode, with the model's interpolation
(bilinear or bicubic; antialiased): the scale is floor(image_size / crop_fraction) (256
for 224 at 0.875); "center" resizes the shorter side to it and centre-crops, "squash" resizes both
sides to it (the aspect is lost) and centre-crops, "border" resizes the longer side to it and pads
with the mean colour up to the crop. Normalise: ImageNet's mean and std, or a model's own
(`normalization`: (mean, std) on 0-1 pixel values, e.g. a timm model's 0.5s).
"""
from __future__ import annotations

import math

IMAGENET_MEAN_01 = (0.485, 0.456, 0.406)  # on 0-1 pixel values (timm's and torchvision's way of writing them)
IMAGENET_STD_01 = (0.229, 0.224, 0.225)
IMAGENET_MEAN = tuple(m * 255 for m in IMAGENET_MEAN_01)  # on 0-255 pixel values (DALI's)
IMAGENET_STD = tuple(s * 255 for s in IMAGENET_STD_01)
CROP_FRACTION = 0.875  # val: the centre crop's share of the resized shorter side
INTERPOLATIONS = ("bilinear", "bicubic")  # the val resize's filter, timm's names (where DALI and torchvision agree)
CROP_MODES = ("center", "squash", "border")  # timm's val crop modes
TRAIN_CROP_MIN_AREA = 0.08  # a random-resized crop takes this to 100 % of the image's area
TRAIN_CROP_ASPECT = (3 / 4, 4 / 3)
# Decoding on a GPU: the share of the JPEGs sent to the hardware JPEG decoder (A100, H100; NVIDIA's
# docs do not name the L4); the rest take nvJPEG's hybrid path (Huffman decoding on the CPU
# threads, the rest in CUDA). A card without one falls back to the hybrid path; 0 forces it.
HW_DECODER_LOAD = 0.7
# nvJPEG's hybrid path: JPEGs of more pixels than this take its GPU-assisted Huffman decoder,
# smaller ones the host Huffman decoder on the loader's CPU threads. DALI's default (1 Mpx) gives
# every ImageNet image (~0.1-0.2 Mpx) to the host decoder; 0 gives every one to the GPU-assisted
# one, which DALI's docs say "still largely uses the CPU": whether it frees a 4-vCPU host is measured
# (benchmarks.gpu_check's "L4 host" rows), not assumed.
HYBRID_HUFFMAN_THRESHOLD = 1_000_000  # px


def pixel_mean_std(normalization=None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) on 0-255 pixel values, from (mean, std) on 0-1 values (None: ImageNet's)."""
    if normalization is None:
        return IMAGENET_MEAN, IMAGENET_STD
    mean, std = normalization
    return tuple(m * 255 for m in mean), tuple(s * 255 for s in std)


def val_resize_size(image_size: int, crop_fraction: float = CROP_FRACTION) -> int:
    """The side the val resize scales to (the shorter one in "center" mode): 256 for 224 at 0.875;
    rounded down, as timm does (235 for 224 at 0.95)."""
    return math.floor(image_size / crop_fraction)


def train_transform(image_size: int, min_area: float = TRAIN_CROP_MIN_AREA, dtype=None, normalization=None):
    """torchvision v2 transform of a uint8 CHW tensor for training (the baseline loader's)."""
    from torchvision.transforms import v2

    return _normalised([v2.RandomResizedCrop(image_size, scale=(min_area, 1.0), ratio=TRAIN_CROP_ASPECT,
                                             antialias=True), v2.RandomHorizontalFlip()], dtype, normalization)


def val_geometry(image_size: int, crop_fraction: float = CROP_FRACTION, interpolation: str = "bilinear",
                 crop_mode: str = "center", normalization=None) -> list:
    """The val resize and crop of `crop_mode` (the module's docstring), on uint8 CHW tensors: the
    geometry DALI's val graph reproduces with torchvision's rounding (`pipelines`). `normalization`:
    its mean is "border"'s padding colour."""
    from torchvision.transforms import InterpolationMode, v2

    if interpolation not in INTERPOLATIONS or crop_mode not in CROP_MODES:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS} and crop_mode one of {CROP_MODES}")
    mode = getattr(InterpolationMode, interpolation.upper())
    scale = val_resize_size(image_size, crop_fraction)
    if crop_mode == "center":
        return [v2.Resize(scale, interpolation=mode, antialias=True), v2.CenterCrop(image_size)]
    if crop_mode == "squash":
        return [v2.Resize((scale, scale), interpolation=mode, antialias=True), v2.CenterCrop(image_size)]
    mean = pixel_mean_std(normalization)[0]
    return [_LongerSide(scale, mode), _CropOrPad(image_size, tuple(round(m) for m in mean))]


class _LongerSide:
    """timm's ResizeKeepRatio(longest=1): the longer side to `size`, the other in proportion (rounded)."""

    def __init__(self, size: int, mode):
        self.size, self.mode = size, mode

    def __call__(self, image):
        from torchvision.transforms import v2

        height, width = image.shape[-2:]
        ratio = max(height, width) / self.size
        return v2.functional.resize(image, [round(height / ratio), round(width / ratio)], interpolation=self.mode,
                                    antialias=True)


class _CropOrPad:
    """timm's CenterCropOrPad: padded with `fill` (0-255 per channel) to at least `size`, centre-cropped."""

    def __init__(self, size: int, fill: tuple[int, ...]):
        self.size, self.fill = size, fill

    def __call__(self, image):
        import torch
        from torchvision.transforms import v2

        height, width = image.shape[-2:]
        pad_w, pad_h = max(0, self.size - width), max(0, self.size - height)
        if pad_w or pad_h:
            canvas = torch.tensor(self.fill, dtype=image.dtype).view(-1, 1, 1).expand(
                image.shape[0], height + pad_h, width + pad_w).clone()
            canvas[:, pad_h // 2:pad_h // 2 + height, pad_w // 2:pad_w // 2 + width] = image
            image = canvas
        return v2.functional.center_crop(image, [self.size, self.size])


def val_transform(image_size: int, crop_fraction: float = CROP_FRACTION, dtype=None, normalization=None,
                  interpolation: str = "bilinear", crop_mode: str = "center"):
    """torchvision v2 transform of a uint8 CHW tensor for evaluation: `val_geometry`, normalised."""
    return _normalised(val_geometry(image_size, crop_fraction, interpolation, crop_mode, normalization), dtype,
                       normalization)


def _normalised(geometry: list, dtype, normalization):
    """`dtype`: of the output tensor (default float32)."""
    import torch
    from torchvision.transforms import v2

    mean, std = pixel_mean_std(normalization)
    return v2.Compose([*geometry, v2.ToDtype(torch.float32, scale=False),
                       v2.Normalize(list(mean), list(std)), v2.ToDtype(dtype or torch.float32)])
