"""Verifiable rewards in the shapes world (``krea2_train.data.shapes``), on decoded images.

Both take one image as uint8 ``[H, W, 3]`` and the prompt's facts (``shapes.facts``) and return a
score in [0, 1].

**rubric** (prompt following). The prompt's facts are the rubric: its requirements are the shape
count, the background colour, each shape present (colour and kind), each shape's size and each
stated relation. :func:`~krea2_train.data.shapes.check_image` reads the facts back from the pixels
and :func:`~krea2_train.data.shapes.score_facts` judges every requirement (best one-to-one matching
of prompted to detected shapes; a relation about an absent shape fails)::

    r_rubric = (#requirements satisfied) / (#requirements)

A clean render of the prompt's scene scores 1.

**artifact** (structure, against reward hacking). What a generator that games the rubric
produces in this world: speckle and broken-off fragments, shapes that no clean shape explains
(blobs, merged or chopped shapes), more shapes than asked for (to "hit" a requirement by
spraying candidates), and high-frequency noise on what should be flat background. Each is
measured with the detector's own pieces (background plane fit, foreground mask at the detector's
threshold, 8-connected components, analysis by synthesis)::

    background  B = the detector's plane fit to the border;  F = |x - B| > 40 (RGB distance)
    components  of F; "specks" are those below the detector's minimum area (it ignores them)
    p_speck   = 1 - exp(-n_specks / SPECK_SCALE)
    p_shape   = clip((mismatch - SHAPE_TOLERANCE) / SHAPE_RANGE, 0, 1), mismatch = |F_kept xor F_R| / |F_kept or F_R|
                where R re-renders the detected scene (kinds, colours, sizes, centres) cleanly
                and F_kept is F restricted to the components the detector keeps
    p_extra   = clip((n_kept - n_prompted) / n_prompted, 0, 1)     (0 without facts)
    p_noise   = clip((rms_hf - NOISE_TOLERANCE) / NOISE_RANGE, 0, 1), rms_hf = RMS of x - box3x3(x)
                over flat background (2 px away from any foreground)
    r_artifact = (1 - p_speck)(1 - p_shape)(1 - p_extra)(1 - p_noise)

The tolerances leave clean renders at 1: their re-render mismatch is a few percent at most
(antialiased edges, centres rounded to 3 decimals) and the "grain" background style has an
``rms_hf`` of about 3.8 levels.
"""

from __future__ import annotations

import math

import numpy as np

from krea2_train.data import shapes

FOREGROUND_THRESHOLD = 40.0  # detect_scene's default
SPECK_SCALE = 4.0
SHAPE_TOLERANCE, SHAPE_RANGE = 0.05, 0.25
NOISE_TOLERANCE, NOISE_RANGE = 6.0, 12.0


def rubric_reward(image: np.ndarray, facts: dict) -> float:
    """Fraction of the prompt's requirements the image satisfies (0 when the prompt has no facts)."""
    if not facts:
        return 0.0
    return float(shapes.score_facts(facts, shapes.check_image(image))["score"])


def _box_blur3(pixels: np.ndarray) -> np.ndarray:
    height, width = pixels.shape[:2]
    padded = np.pad(pixels, ((1, 1), (1, 1), (0, 0)), mode="edge")
    return sum(padded[i : i + height, j : j + width] for i in range(3) for j in range(3)) / 9.0


def artifact_terms(image: np.ndarray, facts: dict | None = None) -> dict[str, float]:
    """The penalties ``p_speck, p_shape, p_extra, p_noise`` (each in [0, 1]) and their raw
    measurements (see the module docstring). ``image``: uint8 ``[H, W, 3]``."""
    pixels = np.asarray(image, dtype=np.float64)
    height, width, _ = pixels.shape
    background, _, _ = shapes._fit_background(pixels)
    foreground = ((pixels - background) ** 2).sum(-1) > FOREGROUND_THRESHOLD**2
    min_area = 0.1 * (shapes.SIZE_EXTENTS["small"] * min(width, height)) ** 2
    components = shapes._connected_components(foreground)
    kept = [c for c in components if len(c) >= min_area]
    n_specks = len(components) - len(kept)

    kept_mask = np.zeros(height * width, dtype=bool)
    for component in kept:
        kept_mask[component] = True
    kept_mask = kept_mask.reshape(height, width)
    scene = shapes.detect_scene(image, foreground_threshold=FOREGROUND_THRESHOLD)
    clean = np.asarray(shapes.render(shapes.Scene(scene.background, scene.shapes), (width, height)), dtype=np.float64)
    clean_background = np.array(shapes.BACKGROUND_COLORS[scene.background], dtype=np.float64)
    clean_mask = ((clean - clean_background) ** 2).sum(-1) > FOREGROUND_THRESHOLD**2
    union = int((kept_mask | clean_mask).sum())
    mismatch = float((kept_mask ^ clean_mask).sum() / union) if union else 0.0

    flat = ~shapes._dilate(shapes._dilate(foreground))
    high_frequency = pixels - _box_blur3(pixels)
    rms_hf = float(np.sqrt((high_frequency[flat] ** 2).mean())) if flat.any() else 0.0

    prompted = int(facts["count"]) if facts else 0
    extra = max(len(kept) - prompted, 0) / prompted if prompted else 0.0
    return {
        "p_speck": 1.0 - math.exp(-n_specks / SPECK_SCALE),
        "p_shape": float(np.clip((mismatch - SHAPE_TOLERANCE) / SHAPE_RANGE, 0.0, 1.0)),
        "p_extra": float(min(extra, 1.0)),
        "p_noise": float(np.clip((rms_hf - NOISE_TOLERANCE) / NOISE_RANGE, 0.0, 1.0)),
        "n_specks": float(n_specks),
        "mismatch": mismatch,
        "n_kept": float(len(kept)),
        "rms_hf": rms_hf,
    }


def artifact_reward(image: np.ndarray, facts: dict | None = None) -> float:
    """``(1 - p_speck)(1 - p_shape)(1 - p_extra)(1 - p_noise)`` in [0, 1]; 1 for a clean render."""
    terms = artifact_terms(image, facts)
    return float(np.prod([1.0 - terms[name] for name in ("p_speck", "p_shape", "p_extra", "p_noise")]))
