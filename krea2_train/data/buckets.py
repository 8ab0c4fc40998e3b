"""Aspect-ratio buckets: one bucket per batch, every image pre-resized into its bucket.

A bucket is an aspect ratio realised at a training resolution R: a (width, height) whose area is
close to R * R pixels and whose sides are multiples of the pixel multiple the autoencoder and
patchifier need (16 for the Qwen-Image VAE with patch 2: 8x downsampling times 2; 4 for the pixel
AE with patch 2). Images go to the bucket whose shape is closest in log aspect ratio, then are
resized to cover it and centre-cropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from PIL import Image, ImageOps

from krea2_train.curate.images import to_rgb

# The aspect ratios Krea's API accepts, landscape first, then their portrait inverses.
DEFAULT_ASPECT_RATIOS: tuple[str, ...] = (
    "1:1", "4:3", "3:2", "16:9", "2.35:1",
    "3:4", "2:3", "9:16", "1:2.35",
)


@dataclass(frozen=True)
class Bucket:
    """One aspect ratio at one resolution: ``name`` is the ratio (``"16:9"``), sides in pixels."""

    name: str
    width: int
    height: int

    @property
    def aspect_ratio(self) -> float:
        return self.width / self.height


def parse_aspect_ratio(text: str) -> float:
    """``"16:9"`` -> 16/9; both parts positive numbers."""
    parts = text.split(":")
    try:
        width, height = (float(part) for part in parts)
    except ValueError:
        raise ValueError(f"aspect ratio {text!r} is not of the form 'W:H' (e.g. '16:9')") from None
    if not (width > 0 and height > 0 and math.isfinite(width) and math.isfinite(height)):
        raise ValueError(f"aspect ratio {text!r} must have two positive finite parts")
    return width / height


def bucket_size(aspect_ratio: float, resolution: int, pixel_multiple: int) -> tuple[int, int]:
    """(width, height) of area close to resolution**2, ratio close to ``aspect_ratio``,
    both sides multiples of ``pixel_multiple`` (at least one multiple)."""
    width = resolution * math.sqrt(aspect_ratio)
    height = resolution / math.sqrt(aspect_ratio)
    return _round_to_multiple(width, pixel_multiple), _round_to_multiple(height, pixel_multiple)


def _round_to_multiple(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def make_buckets(
    resolution: int,
    pixel_multiple: int = 16,
    aspect_ratios: Sequence[str] = DEFAULT_ASPECT_RATIOS,
) -> tuple[Bucket, ...]:
    """The buckets of ``aspect_ratios`` at ``resolution``.

    Ratios that round to the same (width, height) at this resolution collapse into the first
    one listed, so no two buckets share a shape.
    """
    if resolution <= 0 or pixel_multiple <= 0:
        raise ValueError(f"resolution ({resolution}) and pixel_multiple ({pixel_multiple}) must be positive")
    if resolution < pixel_multiple:
        raise ValueError(f"resolution {resolution} is smaller than the pixel multiple {pixel_multiple}")
    if not aspect_ratios:
        raise ValueError("aspect_ratios is empty")
    buckets: dict[tuple[int, int], Bucket] = {}
    for name in aspect_ratios:
        width, height = bucket_size(parse_aspect_ratio(name), resolution, pixel_multiple)
        buckets.setdefault((width, height), Bucket(name, width, height))
    return tuple(buckets.values())


def bucket_by_name(name: str, buckets: Sequence[Bucket]) -> Bucket:
    for bucket in buckets:
        if bucket.name == name:
            return bucket
    raise KeyError(f"no bucket named {name!r} among {[b.name for b in buckets]}")


def assign_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose shape is nearest the image's in log aspect ratio (least cropping).

    Ties go to the bucket listed first.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} must be positive")
    if not buckets:
        raise ValueError("no buckets to assign to")
    log_ratio = math.log(width / height)
    return min(buckets, key=lambda bucket: abs(math.log(bucket.aspect_ratio) - log_ratio))


def resize_to_bucket(image: Image.Image, bucket: Bucket) -> Image.Image:
    """Scale ``image`` to cover the bucket and crop the centre: an RGB image of the bucket's size
    (:func:`~krea2_train.curate.images.to_rgb`: transparency onto white)."""
    return ImageOps.fit(to_rgb(image), (bucket.width, bucket.height), Image.Resampling.LANCZOS, centering=(0.5, 0.5))
