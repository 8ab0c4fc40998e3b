"""Reading images by URI: local paths and file:// URIs."""

from __future__ import annotations

import io
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image, ImageOps

MAX_IMAGE_PIXELS = 1 << 28  # larger files are refused (decompression bombs)
# Pillow's own check (error above 2 x its limit, about 179 M pixels by default) runs inside
# Image.open, before ours: set its limit to ours so ours is the one that applies.
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def uri_path(uri: str) -> Path:
    """The local path of a plain path or file:// URI; other schemes are an error naming the URI."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path) if parsed.scheme else uri)
    raise ValueError(f"unsupported URI scheme {parsed.scheme!r} in {uri}")


def read_uri(uri: str) -> bytes:
    return uri_path(uri).read_bytes()


def decode_bytes(data: bytes) -> Image.Image:
    """Fully decoded RGB image, upright as its EXIF orientation says (a phone photo is not hashed,
    bucketed or trained sideways); raises on corrupt, truncated or oversized data."""
    try:
        opened = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:  # above 2 x MAX_IMAGE_PIXELS
        raise ValueError(f"{error}; the limit is {MAX_IMAGE_PIXELS} pixels") from None
    with opened as image:
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"{image.width}x{image.height} exceeds {MAX_IMAGE_PIXELS} pixels")
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # Pillow opens 16-bit grey as one of these


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` in RGB (itself when it is already): transparent pixels composited onto white,
    16-bit grey scaled to 8 bits (Pillow's own conversion clips every value above 255 to white)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(image).astype(np.float32) / 257.0
        return Image.fromarray(grey.round().clip(0, 255).astype(np.uint8), mode="L").convert("RGB")
    return image.convert("RGB")


def open_rgb(uri: str) -> Image.Image:
    return decode_bytes(read_uri(uri))
