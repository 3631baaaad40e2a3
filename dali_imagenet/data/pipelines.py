"""The DALI graphs: one decode/augment function for train and val, the device a parameter.

With a GPU the JPEGs are decoded by `mixed` decoders (nvJPEG, hardware decoder where the card
has one, ROI decoding of the random crop) and every later op runs on the GPU. Without one the
very same graph runs with `cpu` ops, which is how it is developed and tested.
"""
from __future__ import annotations

import numpy as np
import nvidia.dali.math as dmath
from nvidia.dali import fn, pipeline_def, types

from dali_imagenet.data.preprocess import (
    CROP_FRACTION,
    HW_DECODER_LOAD,
    HYBRID_HUFFMAN_THRESHOLD,
    TRAIN_CROP_ASPECT,
    TRAIN_CROP_MIN_AREA,
    pixel_mean_std,
    val_resize_size,
)

MAX_LABEL_DIGITS = 6

# nvJPEG hints for ImageNet's largest images (NVIDIA's ResNet-50 reference values): buffers are
# allocated once up front instead of growing (and synchronising) mid-epoch.
GPU_DECODER_HINTS = dict(
    device_memory_padding=211_025_920,
    host_memory_padding=140_544_512,
    preallocate_width_hint=5980,
    preallocate_height_hint=6430,
)


# timm's interpolation names -> DALI's filters
DALI_INTERPOLATION = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}


def decode_and_augment(jpegs, *, device: str, train: bool, image_size: int, dtype,
                       crop_fraction: float = CROP_FRACTION, crop_min_area: float = TRAIN_CROP_MIN_AREA,
                       hw_decoder_load: float = HW_DECODER_LOAD, normalization=None, interpolation: str = "bilinear",
                       crop_mode: str = "center", hybrid_huffman_threshold: int = HYBRID_HUFFMAN_THRESHOLD):
    """JPEG bytes -> normalised `image_size`² HWC images of `dtype`, on `device` ("cpu" | "gpu").

    `preprocess`'s recipe: train crops are decoded as a ROI (only the crop's region), val images
    are resized (`interpolation`; "center" or "squash" `crop_mode`: "border" is the torchvision
    loader's only) and centre-cropped with torchvision's rounding. HWC out: the batch arrives in
    PyTorch as NHWC memory, which *is* an NCHW tensor in channels_last format, with no transpose copy.
    """
    decoder_device = "mixed" if device == "gpu" else "cpu"
    hints = ({**GPU_DECODER_HINTS, "hw_decoder_load": hw_decoder_load,
              "hybrid_huffman_threshold": hybrid_huffman_threshold} if device == "gpu" else {})
    if train:
        images = fn.decoders.image_random_crop(
            jpegs, device=decoder_device, output_type=types.RGB,
            random_area=[crop_min_area, 1.0], random_aspect_ratio=list(TRAIN_CROP_ASPECT), num_attempts=10, **hints)
        images = fn.resize(images, size=[image_size, image_size], interp_type=types.INTERP_LINEAR, antialias=True)
        mirror, crop = fn.random.coin_flip(probability=0.5), None
        crop_args = {}
    else:
        images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB, **hints)
        images, crop_args = _resize_and_center_like_torchvision(images, image_size, crop_fraction,
                                                                DALI_INTERPOLATION[interpolation], crop_mode)
        mirror, crop = 0, (image_size, image_size)
    mean, std = pixel_mean_std(normalization)
    return fn.crop_mirror_normalize(images, dtype=dtype, output_layout="HWC", crop=crop, mirror=mirror,
                                    mean=list(mean), std=list(std), **crop_args)


def _resize_and_center_like_torchvision(images, image_size: int, crop_fraction: float, interp_type,
                                        crop_mode: str = "center"):
    """`Resize(R)` (or `Resize((R, R))`: "squash") + `CenterCrop(image_size)` with torchvision's
    exact rounding.

    DALI's `resize_shorter` rounds the long side where torchvision truncates it, and DALI
    rounds a centre crop's half-pixel offset up where torchvision rounds half to even: each
    costs a one-pixel shift, which is most of the difference between the two on real images.
    """
    shape = fn.cast(images.shape(), dtype=types.FLOAT64)  # H, W, C; a CPU tensor even for GPU images
    height, width = shape[0], shape[1]
    short = dmath.min(height, width)
    resize = val_resize_size(image_size, crop_fraction)
    if crop_mode == "squash":
        new_height, new_width = height * 0 + resize, width * 0 + resize
    elif crop_mode == "center":
        # Multiply before dividing: the short side then comes out as exactly `resize`.
        new_height, new_width = dmath.floor(height * resize / short), dmath.floor(width * resize / short)
    else:
        raise ValueError(f"crop_mode {crop_mode!r}: DALI's val graph does center and squash; border is the "
                         f"torchvision loader's (evaluate.py without --dali)")
    images = fn.resize(images, size=fn.cast(fn.stack(new_height, new_width), dtype=types.FLOAT),
                       interp_type=interp_type, antialias=True)
    return images, dict(crop_pos_y=_centre_crop_pos(new_height, image_size),
                        crop_pos_x=_centre_crop_pos(new_width, image_size))


def _centre_crop_pos(length, crop: int):
    """torchvision's offset int(round((length - crop) / 2)), rounding half to even, as DALI's
    normalised crop position offset / (length - crop)."""
    extra = length - crop
    half = dmath.floor(extra / 2)
    odd = extra - 2 * half
    offset = half + odd * (half - 2 * dmath.floor(half / 2))  # x.5 goes up only when half is odd
    return fn.cast(offset / dmath.max(extra, 1.0), dtype=types.FLOAT)


def label_from_ascii(cls):
    """ASCII class index (the `.cls` bytes, e.g. b"417") -> int64 scalar, inside the graph.

    Variable-length byte outputs break the PyTorch iterator, so the digits are parsed here:
    pad with '0' to MAX_LABEL_DIGITS ("417" -> "417000"), weigh the digits, then divide by
    10^(MAX_LABEL_DIGITS - length).
    """
    digits = fn.cast(fn.pad(cls, fill_value=ord("0"), shape=[MAX_LABEL_DIGITS]), dtype=types.INT64) - ord("0")
    weights = types.Constant(np.array([10 ** (MAX_LABEL_DIGITS - 1 - i) for i in range(MAX_LABEL_DIGITS)], np.int64))
    padded_number = fn.reductions.sum(digits * weights, axes=0)
    length = fn.cast(cls.shape(), dtype=types.INT64)
    return fn.reshape(padded_number // dmath.pow(10, MAX_LABEL_DIGITS - length), shape=[])


@pipeline_def
def imagenet_pipeline(tars, indices, *, device, train, image_size, dtype, shard_id, num_shards, shuffle_buffer,
                      crop_fraction=CROP_FRACTION, crop_min_area=TRAIN_CROP_MIN_AREA, hw_decoder_load=HW_DECODER_LOAD,
                      normalization=None, interpolation="bilinear", crop_mode="center",
                      hybrid_huffman_threshold=HYBRID_HUFFMAN_THRESHOLD):
    jpegs, cls = fn.readers.webdataset(
        paths=tars, index_paths=indices, ext=["jpg", "cls"], missing_component_behavior="error",
        random_shuffle=train, initial_fill=shuffle_buffer, shard_id=shard_id, num_shards=num_shards,
        # Every rank reads the same number of samples (the short shards repeat their last one),
        # so every rank runs the same number of steps: no rank waits forever in an all-reduce.
        pad_last_batch=True, stick_to_shard=not train, name="reader")
    images = decode_and_augment(jpegs, device=device, train=train, image_size=image_size, dtype=dtype,
                                crop_fraction=crop_fraction, crop_min_area=crop_min_area,
                                hw_decoder_load=hw_decoder_load, normalization=normalization,
                                interpolation=interpolation, crop_mode=crop_mode,
                                hybrid_huffman_threshold=hybrid_huffman_threshold)
    labels = label_from_ascii(cls)
    return images, (labels.gpu() if device == "gpu" else labels)
