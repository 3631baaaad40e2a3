"""An image someone uploaded, read without letting it hurt the process that reads it: formats from
a short list, the size checked from the header before a pixel is decoded (a decompression bomb is
a few KB of PNG or GIF that decodes to gigabytes), a truncated file refused rather than padded
with grey. Every refusal is an `UploadError` carrying the HTTP status it deserves and one line."""
from __future__ import annotations

import io

import torch

from dali_imagenet.errors import DaliImagenetError
from dali_imagenet.inference.predictor import image_tensor

# What an upload may be: the web's photo formats. PIL reads dozens more (TIFF, PSD, EPS through
# Ghostscript...), each a decoder an attacker could reach.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
MAX_BYTES = 20_000_000  # bytes: an upload's largest body (a 40 MP JPEG straight from a camera is ~10-20 MB)
MAX_PIXELS = 40_000_000  # px: width x height an upload may decode to (RGB: 120 MB; a decoding thread holds one)
# long side / short side: the preprocessing resizes the short side to ~256 px, so a 40 MP image of
# 40,000,000 x 1 px would become 256 x 10^10 px; 50:1 keeps the resized image under 3.3 MP at 256 px.
MAX_ASPECT = 50


class UploadError(DaliImagenetError):
    """An upload refused: `status` is the HTTP status (4xx), the message one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_pixels(width: int, height: int, max_pixels: int = MAX_PIXELS, max_aspect: float = MAX_ASPECT) -> None:
    """Raises UploadError (413) when an image of `width` x `height` px is over the pixel limit or
    so elongated that its resized copy would be (read from the header, before decoding)."""
    if width * height > max_pixels:
        raise UploadError(413, f"the image is {width} x {height} px = {width * height:,} px, over the limit of "
                               f"{max_pixels:,} px")
    if max(width, height) > max_aspect * max(1, min(width, height)):
        raise UploadError(413, f"the image is {width} x {height} px: its sides' ratio is over {max_aspect:g}:1")


def decode_upload(data: bytes, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """`data` (a whole file's bytes) as uint8 RGB CHW, or UploadError: 400 for what is not a
    complete image in one of IMAGE_FORMATS, 413 for one over the pixel limit."""
    from PIL import Image, ImageFile, UnidentifiedImageError

    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not decode to grey rows
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            check_pixels(*image.size, max_pixels)
            return image_tensor(image)
    except UploadError:
        raise
    except Image.DecompressionBombError as error:  # PIL's own limit, at twice its MAX_IMAGE_PIXELS: above ours
        raise UploadError(413, f"{str(error).splitlines()[0]} (the limit here: {max_pixels:,} px)") from None
    except UnidentifiedImageError:
        raise UploadError(400, f"not an image in a format served here ({', '.join(IMAGE_FORMATS)})") from None
    except Exception as error:  # noqa: BLE001 - PIL raises many types for bad data
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UploadError(400, f"not a readable image ({reason})") from None
