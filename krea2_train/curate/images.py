"""Reading images by URI: local paths and file:// URIs."""

from __future__ import annotations

import io
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

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
    """Fully decoded RGB image; raises on corrupt, truncated or oversized data."""
    try:
        opened = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:  # above 2 x MAX_IMAGE_PIXELS
        raise ValueError(f"{error}; the limit is {MAX_IMAGE_PIXELS} pixels") from None
    with opened as image:
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"{image.width}x{image.height} exceeds {MAX_IMAGE_PIXELS} pixels")
        image.load()
        return image.convert("RGB")


def open_rgb(uri: str) -> Image.Image:
    return decode_bytes(read_uri(uri))
