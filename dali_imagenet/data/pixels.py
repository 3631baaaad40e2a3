"""How large an image may be before it is decoded: a limit on width x height, checked from the
header alone. PIL warns above `Image.MAX_IMAGE_PIXELS` (~89.5 megapixels) and refuses above twice
that; in between it decodes, and a 144-megapixel image takes ~0.8 GB as RGB and far more in a
resize. The converter (`shard-imagenet --max-pixels`) and predict.py (`open_image`) reject one
above the limit in one line, and PIL's own warning is not printed. serve.py's uploads have their
own, lower limit and HTTP statuses (`inference/uploads.py`: a 4xx per refusal, the sides' ratio too)."""
from __future__ import annotations

import re
import warnings

from dali_imagenet.errors import DaliImagenetError

MAX_PIXELS = 89_478_485  # PIL's warning limit (Image.MAX_IMAGE_PIXELS); ImageNet's largest is ~32 megapixels


class TooManyPixels(DaliImagenetError):
    """An image over the pixel limit; the message says its size and the limit."""


def check_pixels(width: int, height: int, limit: int | None = MAX_PIXELS) -> None:
    """Raises `TooManyPixels` when width x height is over `limit` (None: no limit)."""
    if limit is not None and width * height > limit:
        raise TooManyPixels(f"{width}x{height} = {width * height:,} pixels, over the limit of {limit:,} (--max-pixels)")


def open_image(source, limit: int | None = MAX_PIXELS):
    """`PIL.Image.open(source)` with its size checked against `limit` before any pixel is decoded
    (PIL's own warning silenced; its error, above twice its limit, said as ours, naming PIL's limit
    where a higher `limit` or none was asked for: PIL's applies first)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(source)
        except Image.DecompressionBombError as error:
            sizes = [int(n) for n in re.findall(r"\((\d+) pixels\)", str(error))]
            pil_limit = 2 * Image.MAX_IMAGE_PIXELS
            over = (f"the limit of {limit:,} (--max-pixels)" if limit and limit < pil_limit
                    else f"PIL's limit of {pil_limit:,} (a higher --max-pixels cannot lift it)")
            raise TooManyPixels((f"{sizes[0]:,} pixels" if sizes else "too many pixels") + f", over {over}") from None
    try:
        check_pixels(*image.size, limit)
    except TooManyPixels:
        image.close()
        raise
    return image


def without_buffer_names(text: str) -> str:
    """PIL's message with the in-memory buffer it names (`<_io.BytesIO object at 0x...>`) left out:
    the caller names the file."""
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", text)
