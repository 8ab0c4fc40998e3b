"""Image hashes for deduplication: md5 of the bytes, a 12x12 DCT perceptual hash, a colour hash.

An 8x8 perceptual hash ignores colour and collides often; the 144-bit hash plus a colour hash
separates images that share a layout but not a palette. Hashes are bit strings ('0'/'1'), the
text form of PostgreSQL ``bit(n)``.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
from PIL import Image

PHASH_SIDE = 12                 # 12x12 = 144 low-frequency DCT coefficients
PHASH_SAMPLE = 4 * PHASH_SIDE   # the grayscale thumbnail the DCT runs on (48x48)
COLOR_GRID = 2                  # 2x2 cells x RGB = 12 mean colours
COLOR_LEVELS = 8                # each quantised to 8 levels, thermometer-coded in 7 bits
PHASH_BITS = PHASH_SIDE * PHASH_SIDE
COLORHASH_BITS = COLOR_GRID * COLOR_GRID * 3 * (COLOR_LEVELS - 1)


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@lru_cache(maxsize=4)
def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix C (n, n): coefficients = C @ x."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    matrix[0] /= np.sqrt(2.0)
    return matrix


def perceptual_hash(image: Image.Image) -> str:
    """144-bit hash: bit (u, v) says whether DCT coefficient (u, v) of the 48x48 luminance
    thumbnail exceeds the median of the 12x12 low-frequency block (DC left out of the median)."""
    gray = np.asarray(image.convert("L").resize((PHASH_SAMPLE, PHASH_SAMPLE), Image.Resampling.BILINEAR), np.float64)
    matrix = dct_matrix(PHASH_SAMPLE)
    low = (matrix @ gray @ matrix.T)[:PHASH_SIDE, :PHASH_SIDE].ravel()
    threshold = np.median(low[1:])
    return "".join("1" if value > threshold else "0" for value in low)


def color_hash(image: Image.Image) -> str:
    """84-bit hash of the mean colour of each 2x2 cell: each of the 12 channel means is quantised
    to 8 levels and thermometer-coded, so Hamming distance = summed level differences."""
    cells = np.asarray(image.convert("RGB").resize((COLOR_GRID, COLOR_GRID), Image.Resampling.BOX), np.int64)
    levels = (cells.ravel() * COLOR_LEVELS) // 256
    width = COLOR_LEVELS - 1
    return "".join("1" * int(level) + "0" * (width - int(level)) for level in levels)


PHASH_BANDS = 12
BAND_BITS = PHASH_BITS // PHASH_BANDS  # 12


def phash_bands(phash: str) -> list[int]:
    """The 12 12-bit bands of a perceptual hash, each tagged with its index (band << 12 | bits).

    Two hashes within Hamming distance 11 agree on at least one band (pigeonhole), so an index on
    the bands finds every such pair by exact match.
    """
    if len(phash) != PHASH_BITS:
        raise ValueError(f"perceptual hash must have {PHASH_BITS} bits, got {len(phash)}")
    return [
        (band << BAND_BITS) | int(phash[band * BAND_BITS : (band + 1) * BAND_BITS], 2) for band in range(PHASH_BANDS)
    ]


def hamming(a: str, b: str) -> int:
    if len(a) != len(b):
        raise ValueError(f"hashes of different lengths: {len(a)} and {len(b)}")
    return sum(x != y for x, y in zip(a, b))
