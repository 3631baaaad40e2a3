"""Checks one source image and makes it something every decoder reads: a baseline RGB JPEG.

Pass-through is the default: an RGB baseline JPEG that decodes completely keeps its exact bytes.
`reencode` (FFCV-like, all JPEG) re-encodes every image at one quality instead, downscaled to
`max_side` where larger: less to Huffman-decode per image on a host with few cores.
The real ImageNet train split also holds CMYK and grayscale JPEGs and a PNG behind a `.JPEG`
name; those (and any other non-baseline-RGB image) are re-encoded as RGB JPEG. Images that do not
decode (empty, truncated, not an image) are rejected with a reason.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageFile

from dali_imagenet.data.pixels import MAX_PIXELS, TooManyPixels, open_image, without_buffer_names
from dali_imagenet.errors import DaliImagenetError

# A truncated JPEG must fail, not decode to grey bottom rows.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class Rejected(DaliImagenetError):
    """The image cannot be used; the message is the reason recorded in the manifest."""


@dataclass(frozen=True)
class Prepared:
    data: bytes
    width: int
    height: int
    converted: str | None  # why the bytes differ from the source; None when passed through


def prepare_image(data: bytes | None, max_side: int | None = None, quality: int = 90,
                  reencode: bool = False, max_pixels: int | None = MAX_PIXELS) -> Prepared:
    """`converted` says why an image's bytes changed; under `reencode` only a reason besides it (a
    CMYK or PNG source): every image is re-encoded, and downscaled past `max_side`, as the
    manifest's options say (ImageNet would otherwise list ~10 % of its images there)."""
    if not data:
        raise Rejected("empty image")
    try:
        image = open_image(io.BytesIO(data), max_pixels)
        width, height = image.size
        reason = _why_convert(image)
        too_large = max_side is not None and max(width, height) > max_side
        if reason is None and not too_large and not reencode:
            # Decoding at 1/8 scale still walks the whole entropy-coded stream, so truncation
            # is caught at a fraction of a full decode's cost.
            image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            image.load()
            return Prepared(data, width, height, None)
        if too_large:
            # Decode at the smallest DCT scale still >= 2x the target, then LANCZOS: the quality
            # of a full-size LANCZOS at a fraction of the decode cost (PIL's reducing_gap idea).
            image.draft(None, (2 * max_side, 2 * max_side))
        image.load()
    except Rejected:
        raise
    except TooManyPixels as error:
        raise Rejected(str(error)) from None
    except Exception as error:  # PIL raises many types for bad data; all mean "undecodable"
        raise Rejected(without_buffer_names(f"undecodable: {error}".strip())) from None

    rgb = image.convert("RGB")
    if too_large:
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    if too_large and not reencode:
        reason = f"{reason}; " if reason else ""
        reason += f"downscaled from {width}x{height}"
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=quality, optimize=False, progressive=False)
    return Prepared(out.getvalue(), rgb.width, rgb.height, reason)


def _why_convert(image: Image.Image) -> str | None:
    if image.format != "JPEG":
        return f"{image.format} bytes converted to JPEG"
    if image.mode != "RGB":
        return f"{image.mode} JPEG converted to RGB"
    if image.info.get("progressive") or image.info.get("progression"):
        return "progressive JPEG re-encoded as baseline"
    return None
