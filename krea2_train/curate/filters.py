"""Cheap image-quality scores: Laplacian variance, RGB entropy, white and black pixel ratios.

They catch extreme textures and noise (very high Laplacian variance), flat or blurred images
(very low), flat backgrounds and borders (low entropy, high white/black ratio). Scores are
computed on a copy whose longer side is at most ``SCORE_SIDE`` pixels so that thresholds do not
depend on the file's resolution.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SCORE_SIDE = 512
WHITE_LEVEL = 250   # a pixel is white when all channels are >= this
BLACK_LEVEL = 5     # and black when all channels are <= this


def score_view(image: Image.Image) -> np.ndarray:
    """RGB uint8 array (H, W, 3), longer side at most SCORE_SIDE."""
    rgb = image.convert("RGB")
    scale = SCORE_SIDE / max(rgb.size)
    if scale < 1:
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.Resampling.BOX)
    return np.asarray(rgb)


def laplacian_variance(rgb: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of the luminance (H, W, 3) -> float; 0 for flat images."""
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    if min(luma.shape) < 3:
        return 0.0
    laplacian = (
        luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:] - 4.0 * luma[1:-1, 1:-1]
    )
    return float(laplacian.var())


def rgb_entropy(rgb: np.ndarray) -> float:
    """Mean over R, G, B of the Shannon entropy (bits, 0..8) of the channel's 256-bin histogram."""
    entropies = []
    for channel in range(3):
        counts = np.bincount(rgb[..., channel].ravel(), minlength=256).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        entropies.append(float(-(p * np.log2(p)).sum()))
    return float(np.mean(entropies))


def white_black_ratios(rgb: np.ndarray) -> tuple[float, float]:
    """(fraction of white pixels, fraction of black pixels)."""
    white = (rgb >= WHITE_LEVEL).all(axis=-1).mean()
    black = (rgb <= BLACK_LEVEL).all(axis=-1).mean()
    return float(white), float(black)


def quality_scores(image: Image.Image) -> dict[str, float]:
    """The four scores, keyed by their ``images`` column names."""
    rgb = score_view(image)
    white, black = white_black_ratios(rgb)
    return {
        "laplacian_var": laplacian_variance(rgb),
        "rgb_entropy": rgb_entropy(rgb),
        "white_ratio": white,
        "black_ratio": black,
    }
