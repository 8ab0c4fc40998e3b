"""The shapes world: a procedural text-to-image dataset whose facts can be checked from pixels.

A :class:`Scene` holds one to four non-overlapping coloured shapes on a background. From a scene
come an image (:func:`render`), captions at three levels of detail (:func:`captions`) and the
structured facts behind them (:func:`facts`). :func:`check_image` recovers those facts from an
image (a clean render or a generated one) and :func:`score_facts` judges, requirement by
requirement, whether an image satisfies a prompt's facts: the ground truth of a rubric reward.

Coordinates. A shape's centre ``(x, y)`` is normalised to the image: ``x`` in ``[0, 1]`` of the
width (0 is the left edge), ``y`` in ``[0, 1]`` of the height (0 is the top edge). A shape's extent
(the side of its square bounding box) is a fraction of the image's short side, so shapes keep
their proportions at every aspect ratio. Scenes are laid out in the unit square; rendering at a
wider or taller aspect only stretches the distances between shapes, so shapes never overlap and
never leave the frame at any resolution.

Numpy and Pillow only; no torch.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from krea2_train.data.buckets import bucket_size, parse_aspect_ratio

SHAPE_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 38, 45),
    "orange": (245, 135, 25),
    "yellow": (240, 210, 30),
    "green": (45, 160, 65),
    "cyan": (35, 190, 210),
    "blue": (40, 85, 215),
    "purple": (130, 55, 180),
    "pink": (240, 120, 185),
}
"""Shape colours: well separated from each other and from every background colour."""

BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "white": (238, 238, 238),
    "cream": (242, 230, 190),
    "light gray": (185, 185, 185),
    "pale blue": (195, 215, 240),
    "dark gray": (70, 70, 70),
    "navy": (25, 35, 75),
    "black": (20, 20, 20),
}
"""Background base colours (kept 16+ levels inside [0, 255] so gradients never clip)."""

BACKGROUND_STYLES: tuple[str, ...] = ("plain", "gradient", "grain")
"""plain: one colour; gradient: a linear ramp of +-16 levels around the base colour at a random
angle; grain: the base colour plus mild grey noise (standard deviation 4 levels)."""

SIZE_EXTENTS: dict[str, float] = {"small": 0.16, "medium": 0.24, "large": 0.32}
"""Side of a shape's bounding box as a fraction of the image's short side (10 px at 64 px)."""

KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

MAX_SHAPES = 4
EDGE_PADDING = 0.04
"""Minimum gap between a shape's bounding box and the image edge (normalised)."""
SHAPE_MARGIN = 0.05
"""Minimum gap between the bounding boxes of two shapes (normalised, along x or along y)."""
RELATION_THRESHOLD = 0.1
"""A scene states "A left of B" (or "A above B") only when the centres differ by this much."""
RELATION_CHECK_MARGIN = 0.05
"""A detected image satisfies "A left of B" when B's centre is this much right of A's."""

_GRADIENT_AMPLITUDE = 16.0
_GRAIN_STD = 4.0
_SUPERSAMPLE = 4
_BUCKET_PIXEL_MULTIPLE = 16
_STAR_INNER_RATIO = 0.5
_CROSS_ARM_WIDTH = 0.36
_COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
_BACKGROUND_STYLE_WORDS = {
    "plain": "{} background", "gradient": "{} gradient background", "grain": "grainy {} background",
}


@dataclass(frozen=True)
class ShapeFact:
    """One shape: ``kind`` in KINDS, ``color`` in SHAPE_COLORS, ``size`` in SIZE_EXTENTS, centre
    ``(x, y)`` normalised to the image (see the module docstring)."""

    kind: str
    color: str
    size: str
    x: float
    y: float

    def __post_init__(self) -> None:
        _require_member("shape kind", self.kind, KINDS)
        _require_member("shape color", self.color, SHAPE_COLORS)
        _require_member("shape size", self.size, SIZE_EXTENTS)
        if not (0.0 <= self.x <= 1.0 and 0.0 <= self.y <= 1.0):
            raise ValueError(f"shape centre ({self.x}, {self.y}) lies outside the unit square")


@dataclass(frozen=True)
class Scene:
    """A background and its shapes. ``background_seed`` fixes the gradient angle or the grain."""

    background: str
    shapes: tuple[ShapeFact, ...]
    background_style: str = "plain"
    background_seed: int = 0

    def __post_init__(self) -> None:
        _require_member("background", self.background, BACKGROUND_COLORS)
        _require_member("background style", self.background_style, BACKGROUND_STYLES)
        object.__setattr__(self, "shapes", tuple(self.shapes))


def _require_member(what: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {sorted(allowed)}")


# --------------------------------------------------------------------------------------------
# Sampling


def sample_scene(rng: np.random.Generator, background_styles: Sequence[str] = BACKGROUND_STYLES) -> Scene:
    """Draw a random scene: 1 to 4 shapes, no two bounding boxes closer than SHAPE_MARGIN.

    Deterministic given the generator's state. Centres are rounded to 3 decimals so that facts
    written to JSON describe the scene exactly. ``background_styles`` restricts the styles drawn
    (e.g. ``("plain",)`` for the easiest dataset).
    """
    for style in background_styles:
        _require_member("background style", style, BACKGROUND_STYLES)
    if not background_styles:
        raise ValueError("background_styles is empty")
    count = int(rng.integers(1, MAX_SHAPES + 1))
    attributes = [
        (KINDS[rng.integers(len(KINDS))], list(SHAPE_COLORS)[rng.integers(len(SHAPE_COLORS))],
         list(SIZE_EXTENTS)[rng.integers(len(SIZE_EXTENTS))])
        for _ in range(count)
    ]
    background = list(BACKGROUND_COLORS)[rng.integers(len(BACKGROUND_COLORS))]
    style = background_styles[rng.integers(len(background_styles))]
    background_seed = int(rng.integers(2**31))
    shapes = _place_shapes(rng, attributes)
    return Scene(background, shapes, style, background_seed)


def _place_shapes(rng: np.random.Generator, attributes: list[tuple[str, str, str]]) -> tuple[ShapeFact, ...]:
    """Rejection-sample centres, largest shapes first; restart the layout when a shape finds no room."""
    order = sorted(range(len(attributes)), key=lambda i: -SIZE_EXTENTS[attributes[i][2]])
    while True:
        placed: dict[int, ShapeFact] = {}
        for index in order:
            kind, color, size = attributes[index]
            half = SIZE_EXTENTS[size] / 2 + EDGE_PADDING
            for _ in range(100):
                x, y = (round(float(v), 3) for v in rng.uniform(half, 1 - half, size=2))
                candidate = ShapeFact(kind, color, size, x, y)
                if all(_separated(candidate, other) for other in placed.values()):
                    placed[index] = candidate
                    break
            else:
                break
        if len(placed) == len(attributes):
            return tuple(sorted(placed.values(), key=lambda s: (s.x, s.y)))


def _separated(a: ShapeFact, b: ShapeFact) -> bool:
    gap = (SIZE_EXTENTS[a.size] + SIZE_EXTENTS[b.size]) / 2 + SHAPE_MARGIN
    return abs(a.x - b.x) >= gap or abs(a.y - b.y) >= gap


# --------------------------------------------------------------------------------------------
# Geometry and rendering


@functools.cache
def _unit_polygon(kind: str) -> np.ndarray:
    """Vertices ``[V, 2]`` (x right, y down) of a polygonal kind in its bounding box ``[-0.5, 0.5]^2``."""
    if kind == "square":
        return np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    if kind == "triangle":
        return np.array([[0.0, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    if kind == "cross":
        w = _CROSS_ARM_WIDTH / 2
        return np.array([[-w, -0.5], [w, -0.5], [w, -w], [0.5, -w], [0.5, w], [w, w], [w, 0.5], [-w, 0.5],
                         [-w, w], [-0.5, w], [-0.5, -w], [-w, -w]])
    if kind == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, _STAR_INNER_RATIO)
        points = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
        low, high = points.min(axis=0), points.max(axis=0)
        return (points - (low + high) / 2) / (high - low).max()
    raise ValueError(f"{kind!r} is not a polygonal shape kind")


@functools.cache
def _unit_area_and_centroid(kind: str) -> tuple[float, float, float]:
    """(area, centroid x, centroid y) of a kind with extent 1 centred on its bounding box."""
    if kind == "circle":
        return math.pi / 4, 0.0, 0.0
    x, y = _unit_polygon(kind).T
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    area = cross.sum() / 2
    return float(abs(area)), float(((x + xn) * cross).sum() / (6 * area)), float(((y + yn) * cross).sum() / (6 * area))


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, centre: tuple[float, float], extent: float, fill) -> None:
    """Draw a filled shape with its bounding box centred at ``centre`` (pixels) and side ``extent``."""
    cx, cy = centre
    if kind == "circle":
        half = extent / 2
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
    else:
        points = _unit_polygon(kind) * extent + np.array([cx, cy])
        draw.polygon([tuple(p) for p in points.tolist()], fill=fill)


def _rasterise_coverage(
    kind: str, centre: tuple[float, float], extent: float, box: tuple[int, int, int, int]
) -> np.ndarray:
    """Coverage ``[y1 - y0, x1 - x0]`` in [0, 1] of one shape (centre and extent in image pixels)
    over the pixel window ``box = (x0, y0, x1, y1)``: drawn at 4x supersampling, box-filtered."""
    x0, y0, x1, y1 = box
    canvas = Image.new("L", ((x1 - x0) * _SUPERSAMPLE, (y1 - y0) * _SUPERSAMPLE), 0)
    local = ((centre[0] - x0) * _SUPERSAMPLE, (centre[1] - y0) * _SUPERSAMPLE)
    _draw_shape(ImageDraw.Draw(canvas), kind, local, extent * _SUPERSAMPLE, 255)
    return np.asarray(canvas.reduce(_SUPERSAMPLE), dtype=np.float32) / 255.0


def _parse_resolution(resolution: int | tuple[int, int]) -> tuple[int, int]:
    size = (resolution, resolution) if isinstance(resolution, (int, np.integer)) else tuple(resolution)
    if len(size) != 2 or not all(isinstance(v, (int, np.integer)) and v >= 16 for v in size):
        raise ValueError(f"resolution must be an int or a (width, height) pair of ints >= 16, got {resolution!r}")
    return int(size[0]), int(size[1])


def _render_background(scene: Scene, width: int, height: int) -> np.ndarray:
    """The background alone: float32 ``[height, width, 3]`` in [0, 255]."""
    base = np.array(BACKGROUND_COLORS[scene.background], dtype=np.float32)
    canvas = np.broadcast_to(base, (height, width, 3)).copy()
    rng = np.random.default_rng(scene.background_seed)
    if scene.background_style == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        ramp = (np.cos(angle) * (xs + 0.5) / width + np.sin(angle) * (ys + 0.5) / height)
        ramp = ramp - (np.cos(angle) + np.sin(angle)) / 2  # 0 at the image centre
        canvas += (2 * _GRADIENT_AMPLITUDE / max(abs(np.cos(angle)) + abs(np.sin(angle)), 1e-6)) * ramp[..., None]
    elif scene.background_style == "grain":
        canvas += rng.normal(0.0, _GRAIN_STD, size=(height, width, 1)).astype(np.float32)
    return np.clip(canvas, 0, 255)


def render(scene: Scene, resolution: int | tuple[int, int]) -> Image.Image:
    """Render a scene to an RGB image of ``resolution`` (an int for a square, or ``(width, height)``).

    Shapes are drawn at 4x supersampling and box-filtered, so edges are antialiased.
    """
    width, height = _parse_resolution(resolution)
    image = _render_background(scene, width, height)
    for shape in scene.shapes:
        extent = SIZE_EXTENTS[shape.size] * min(width, height)
        centre = (shape.x * width, shape.y * height)
        x0, y0 = max(int(centre[0] - extent / 2) - 1, 0), max(int(centre[1] - extent / 2) - 1, 0)
        x1, y1 = min(int(centre[0] + extent / 2) + 2, width), min(int(centre[1] + extent / 2) + 2, height)
        coverage = _rasterise_coverage(shape.kind, centre, extent, (x0, y0, x1, y1))[..., None]
        window = image[y0:y1, x0:x1]
        window += (np.array(SHAPE_COLORS[shape.color], dtype=np.float32) - window) * coverage
    return Image.fromarray(np.rint(image).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------------------------
# Captions and facts


def _reading_order(scene: Scene) -> list[int]:
    return sorted(range(len(scene.shapes)), key=lambda i: (scene.shapes[i].x, scene.shapes[i].y))


def _stated_relations(scene: Scene) -> list[tuple[str, int, int]]:
    """Relations between consecutive shapes in left-to-right order: ``(relation, subject, object)``
    with relation ``left_of`` or ``above``, stated only when the centres differ by RELATION_THRESHOLD."""
    relations = []
    order = _reading_order(scene)
    for a, b in zip(order, order[1:]):
        first, second = scene.shapes[a], scene.shapes[b]
        if second.x - first.x >= RELATION_THRESHOLD:
            relations.append(("left_of", a, b))
        if second.y - first.y >= RELATION_THRESHOLD:
            relations.append(("above", a, b))
        elif first.y - second.y >= RELATION_THRESHOLD:
            relations.append(("above", b, a))
    return relations


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _grouped(scene: Scene, with_article: bool) -> list[str]:
    """"a red circle", "three green squares", ... in left-to-right order of first appearance."""
    counts: dict[tuple[str, str], int] = {}
    for index in _reading_order(scene):
        key = (scene.shapes[index].color, scene.shapes[index].kind)
        counts[key] = counts.get(key, 0) + 1
    items = []
    for (color, kind), count in counts.items():
        if count > 1:
            items.append(f"{_COUNT_WORDS[count]} {color} {_PLURALS[kind]}")
        else:
            items.append(f"{_article(color)} {color} {kind}" if with_article else f"{color} {kind}")
    return items


def _relation_phrase(relations: set[tuple[str, int, int]], a: int, b: int) -> str:
    """How shape ``a`` (left in reading order) stands relative to shape ``b``."""
    vertical = "above" if ("above", a, b) in relations else "below" if ("above", b, a) in relations else ""
    horizontal = "to the left of" if ("left_of", a, b) in relations else ""
    if vertical and horizontal:
        return f"{vertical} and {horizontal}"
    return vertical or horizontal


def captions(scene: Scene) -> dict[str, str]:
    """Captions at three levels of detail.

    long: every shape with size, colour and kind, left to right, each placed relative to the
    previous one, then the background ("a large red circle to the left of a small blue triangle,
    which is above a medium green square, on a white background").
    medium: shapes grouped by colour and kind, with counts in words, and the background colour
    ("three green squares and a red circle on a white background").
    short: the total count and the groups ("two shapes: red circle and blue triangle").
    """
    if not scene.shapes:
        raise ValueError("cannot caption a scene without shapes")
    relations = set(_stated_relations(scene))
    order = _reading_order(scene)
    phrases = [f"a {s.size} {s.color} {s.kind}" for s in (scene.shapes[i] for i in order)]
    long = phrases[0]
    for position in range(1, len(order)):
        link = " " if position == 1 else ", which is "
        long += link + _relation_phrase(relations, order[position - 1], order[position]) + " " + phrases[position]
    style = _BACKGROUND_STYLE_WORDS[scene.background_style].format(scene.background)
    long += f", on {_article(style)} {style}"
    background = f"{_article(scene.background)} {scene.background} background"
    medium = f"{_join(_grouped(scene, with_article=True))} on {background}"
    count = len(scene.shapes)
    short = f"{_COUNT_WORDS[count]} shape{'s' if count > 1 else ''}: {_join(_grouped(scene, with_article=False))}"
    return {"long": long, "medium": medium, "short": short}


def facts(scene: Scene) -> dict:
    """JSON-serialisable facts: count, background, every shape, and the relations the long caption states.

    ``relations`` entries read ``{"relation": "left_of", "subject": i, "object": j}``: shape ``i``
    is left of (or, for ``above``, above) shape ``j``; indices refer to ``shapes``.
    """
    return {
        "count": len(scene.shapes),
        "background": scene.background,
        "background_style": scene.background_style,
        "shapes": [asdict(shape) for shape in scene.shapes],
        "relations": [{"relation": r, "subject": a, "object": b} for r, a, b in _stated_relations(scene)],
    }


# --------------------------------------------------------------------------------------------
# Checker: recover facts from pixels


def _as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """float64 ``[H, W, 3]`` in [0, 255] from a PIL image, a uint8 array or a float array in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an image array of shape [H, W, 3], got {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float64)
    if np.issubdtype(array.dtype, np.floating):
        if array.min() < -1e-3 or array.max() > 1 + 1e-3:
            raise ValueError("a float image array must hold values in [0, 1]")
        return np.clip(array.astype(np.float64), 0, 1) * 255.0
    raise ValueError(f"unsupported image array dtype {array.dtype}; use uint8 or float in [0, 1]")


def _fit_background(pixels: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Fit a plane per channel to the border pixels, dropping outliers (shapes touching the edge).

    Returns the background model ``[H, W, 3]``, the residual noise standard deviation per channel
    and the plane coefficients ``[3, 3]`` (rows: value at the image centre, x slope, y slope).
    """
    height, width, _ = pixels.shape
    border = np.zeros((height, width), dtype=bool)
    border[:2], border[-2:], border[:, :2], border[:, -2:] = True, True, True, True
    u, v = np.arange(width) / width - 0.5, np.arange(height) / height - 0.5
    ys, xs = np.nonzero(border)
    rows, values = np.stack([np.ones(len(xs)), u[xs], v[ys]], axis=1), pixels[border]
    keep = np.ones(len(rows), dtype=bool)
    for _ in range(3):
        coefficients, *_ = np.linalg.lstsq(rows[keep], values[keep], rcond=None)
        residual = np.linalg.norm(values - rows @ coefficients, axis=1)
        scale = max(3.0 * float(np.median(residual)), 12.0)
        keep = residual <= scale
    noise = float(np.sqrt(np.mean(residual[keep] ** 2) / 3))
    model = coefficients[0] + u[None, :, None] * coefficients[1] + v[:, None, None] * coefficients[2]
    return model, noise, coefficients


def _connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask as arrays of flat pixel indices (union-find on row runs)."""
    height, width = mask.shape
    padded = np.zeros((height, width + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    steps = np.diff(padded, axis=1)
    run_rows, run_starts = np.nonzero(steps == 1)
    _, run_ends = np.nonzero(steps == -1)
    parent = list(range(len(run_rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_first = np.searchsorted(run_rows, np.arange(height + 1)).tolist()
    starts, ends = run_starts.tolist(), run_ends.tolist()
    for row in range(1, height):
        above, above_end = row_first[row - 1], row_first[row]
        for current in range(row_first[row], row_first[row + 1]):
            while above < above_end and ends[above] < starts[current]:  # ends before this run (and the next)
                above += 1
            other = above
            while other < above_end and starts[other] <= ends[current]:  # touches, diagonals included
                parent[root(current)] = root(other)
                other += 1
    groups: dict[int, list[np.ndarray]] = {}
    for run in range(len(run_rows)):
        start = int(run_rows[run]) * width + starts[run]
        groups.setdefault(root(run), []).append(np.arange(start, start + ends[run] - starts[run]))
    return [np.concatenate(runs) for runs in groups.values()]


def _dilate(mask: np.ndarray) -> np.ndarray:
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= grown[:, :-1].copy()
    grown[:, :-1] |= grown[:, 1:].copy()
    return grown


def _erode(mask: np.ndarray) -> np.ndarray:
    return ~_dilate(~mask)


def _nearest_name(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = np.linalg.norm(np.array([palette[n] for n in names], dtype=np.float64) - rgb, axis=1)
    return names[int(np.argmin(distances))]


def _nearest_size(extent: float) -> str:
    return min(SIZE_EXTENTS, key=lambda name: abs(math.log(extent / SIZE_EXTENTS[name])))


def _describe_component(pixels: np.ndarray, background: np.ndarray, indices: np.ndarray) -> ShapeFact | None:
    """Describe one component (flat pixel ``indices``) of an image ``pixels`` ``[H, W, 3]`` whose
    background model is ``background`` ``[H, W, 3]``; None when it holds no coverage.

    Colour: the median of the component's interior. Coverage: each pixel's share of that colour
    against the background. Kind, by analysis by synthesis: for each kind, place it where the
    coverage mass (extent) and centroid (centre) say, rasterise it as render() does, and keep the
    kind whose coverage matches best.
    """
    height, width, _ = pixels.shape
    rows, cols = np.divmod(indices, width)
    box = (max(cols.min() - 3, 0), max(rows.min() - 3, 0), min(cols.max() + 4, width), min(rows.max() + 4, height))
    x0, y0, x1, y1 = box
    window_pixels, window_background = pixels[y0:y1, x0:x1], background[y0:y1, x0:x1]
    component = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    component[rows - y0, cols - x0] = True
    interior = _erode(component)
    color_rgb = np.median(window_pixels[interior] if interior.any() else window_pixels[component], axis=0)

    observed = window_pixels - window_background
    contrast = color_rgb - window_background
    region = _dilate(component)
    coverage = np.clip((observed * contrast).sum(-1) / np.maximum((contrast**2).sum(-1), 1e-6), 0, 1) * region
    mass = coverage.sum()
    if mass < 1.0:
        return None
    centroid = ((coverage.sum(0) * (np.arange(x0, x1) + 0.5)).sum() / mass,
                (coverage.sum(1) * (np.arange(y0, y1) + 0.5)).sum() / mass)

    best = None
    for kind in KINDS:
        unit_area, offset_x, offset_y = _unit_area_and_centroid(kind)
        extent = math.sqrt(mass / unit_area)
        centre = (centroid[0] - offset_x * extent, centroid[1] - offset_y * extent)
        mismatch = np.abs(_rasterise_coverage(kind, centre, extent, box) - coverage).sum() / mass
        if best is None or mismatch < best[0]:
            best = (mismatch, kind, extent, centre)
    _, kind, extent, centre = best
    return ShapeFact(
        kind=kind,
        color=_nearest_name(color_rgb, SHAPE_COLORS),
        size=_nearest_size(extent / min(width, height)),
        x=round(float(np.clip(centre[0] / width, 0, 1)), 3),
        y=round(float(np.clip(centre[1] / height, 0, 1)), 3),
    )


def detect_scene(image: Image.Image | np.ndarray, foreground_threshold: float = 40.0, max_shapes: int = 8) -> Scene:
    """Recover a :class:`Scene` from an image.

    Steps: fit the background (a plane per channel through the border pixels); mark pixels
    farther than ``foreground_threshold`` (RGB distance) from it; split them into 8-connected
    components; drop specks smaller than a tenth of the smallest shape's bounding box; keep the
    ``max_shapes`` largest; describe each (colour, kind, size, centre). Shapes are reported left
    to right. ``image``: PIL image, uint8 ``[H, W, 3]`` or float ``[H, W, 3]`` in [0, 1].
    """
    pixels = _as_rgb_array(image)
    height, width, _ = pixels.shape
    if min(width, height) < 16:
        raise ValueError(f"image {width}x{height} is too small to check (short side < 16)")
    background, noise, coefficients = _fit_background(pixels)
    foreground = ((pixels - background) ** 2).sum(axis=-1) > foreground_threshold**2
    min_area = 0.1 * (SIZE_EXTENTS["small"] * min(width, height)) ** 2
    components = sorted((c for c in _connected_components(foreground) if len(c) >= min_area), key=len, reverse=True)
    described = (_describe_component(pixels, background, c) for c in components[:max_shapes])
    shapes = [shape for shape in described if shape is not None]
    slope = float(np.abs(coefficients[1:]).max())
    style = "gradient" if slope > _GRADIENT_AMPLITUDE / 2 else "grain" if noise > _GRAIN_STD / 2 else "plain"
    return Scene(
        background=_nearest_name(coefficients[0], BACKGROUND_COLORS),
        shapes=tuple(sorted(shapes, key=lambda s: (s.x, s.y))),
        background_style=style,
    )


def check_image(image: Image.Image | np.ndarray) -> dict:
    """Facts detected in an image, in the format of :func:`facts` (see :func:`detect_scene`)."""
    return facts(detect_scene(image))


def _relation_holds(relation: str, subject: dict, object_: dict) -> bool:
    if relation == "left_of":
        return object_["x"] - subject["x"] >= RELATION_CHECK_MARGIN
    if relation == "above":
        return object_["y"] - subject["y"] >= RELATION_CHECK_MARGIN
    raise ValueError(f"unknown relation {relation!r}; expected 'left_of' or 'above'")


def _assignments(n_expected: int, n_detected: int, used: frozenset = frozenset()) -> Iterator[tuple]:
    """Every one-to-one partial map from expected shapes to detected ones (None: unmatched)."""
    if n_expected == 0:
        yield ()
        return
    for choice in [None, *(d for d in range(n_detected) if d not in used)]:
        taken = used if choice is None else used | {choice}
        for rest in _assignments(n_expected - 1, n_detected, taken):
            yield (choice, *rest)


def _judge(expected: dict, detected_shapes: list[dict], assignment: tuple) -> dict:
    """Per-requirement booleans for one assignment of expected shapes to detected ones (or None)."""
    matched = [None if d is None else detected_shapes[d] for d in assignment]
    colors = [m is not None and m["color"] == e["color"] for e, m in zip(expected["shapes"], matched)]
    kinds = [m is not None and m["kind"] == e["kind"] for e, m in zip(expected["shapes"], matched)]
    present = [c and k for c, k in zip(colors, kinds)]
    sizes = [p and m["size"] == e["size"] for p, e, m in zip(present, expected["shapes"], matched)]
    relations = [
        present[r["subject"]] and present[r["object"]]
        and _relation_holds(r["relation"], matched[r["subject"]], matched[r["object"]])
        for r in expected["relations"]
    ]
    return {"colors": colors, "kinds": kinds, "present": present, "sizes": sizes, "relations": relations}


def score_facts(expected_facts: dict, detected: dict) -> dict:
    """Judge detected facts (from :func:`check_image`) against a prompt's facts (from :func:`facts`).

    Expected shapes are matched one-to-one to detected shapes by the assignment that satisfies the
    most requirements (ties: most colour and kind agreements, then nearest centres). Returns:

    - ``count``: the number of shapes is right; ``background``: the background colour is right;
    - per expected shape: ``colors``, ``kinds`` (its match has that colour / kind), ``present``
      (both: "a red circle" is there), ``sizes`` (present and of that size);
    - ``relations``: per expected relation, both shapes are present and their centres are ordered
      by at least RELATION_CHECK_MARGIN (a relation about an absent shape fails);
    - ``score``: the fraction satisfied of the requirements count, background, present, sizes and
      relations; ``all``: every one of them is satisfied.
    """
    for key in ("count", "background", "shapes", "relations"):
        if key not in expected_facts or key not in detected:
            raise ValueError(f"facts are missing the key {key!r}")
    expected_shapes, detected_shapes = expected_facts["shapes"], detected["shapes"]
    best_key, best = None, None
    for assignment in _assignments(len(expected_shapes), len(detected_shapes)):
        judged = _judge(expected_facts, detected_shapes, assignment)
        satisfied = sum(judged["present"]) + sum(judged["sizes"]) + sum(judged["relations"])
        agreements = sum(judged["colors"]) + sum(judged["kinds"])
        distance = sum(
            math.hypot(e["x"] - detected_shapes[d]["x"], e["y"] - detected_shapes[d]["y"]) if d is not None else 2.0
            for e, d in zip(expected_shapes, assignment)
        )
        key = (satisfied, agreements, -distance)
        if best_key is None or key > best_key:
            best_key, best = key, judged
    result = {"count": detected["count"] == expected_facts["count"],
              "background": detected["background"] == expected_facts["background"], **best}
    requirements = [result["count"], result["background"], *best["present"], *best["sizes"], *best["relations"]]
    result["score"] = sum(requirements) / len(requirements)
    result["all"] = all(requirements)
    return result


# --------------------------------------------------------------------------------------------
# Datasets


def _parse_aspect_ratio(ratio: float | str) -> float:
    """Width over height from a number, a numeric string ("1.5") or "W:H" ("16:9")."""
    if isinstance(ratio, str) and ":" in ratio:
        return parse_aspect_ratio(ratio)
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise ValueError(f"aspect ratio {ratio!r} must be a positive number or read 'W:H' (e.g. '16:9')") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"aspect ratio must be a positive number, got {ratio!r}")
    return value


def _image_sizes(resolution: int, aspect_ratios: Sequence[float | str] | None) -> list[tuple[int, int]]:
    """The distinct (width, height) to draw from: the training buckets of ``aspect_ratios`` at
    ``resolution`` (sides multiples of 16, as :mod:`krea2_train.data.buckets` makes them), or the
    square ``resolution x resolution`` when no ratios are given."""
    if not aspect_ratios:
        return [(resolution, resolution)]
    sizes = (bucket_size(_parse_aspect_ratio(r), resolution, _BUCKET_PIXEL_MULTIPLE) for r in aspect_ratios)
    return list(dict.fromkeys(sizes))


def _scene_and_size(index: int, resolution: int, seed: int, aspect_ratios: Sequence[float | str] | None) -> tuple[Scene, tuple[int, int]]:
    """Sample ``index``'s scene, from ``default_rng([seed, index])``, and its image size: with
    ``aspect_ratios`` one of their distinct buckets, drawn uniformly by ``default_rng([seed, index, 1])``."""
    scene = sample_scene(np.random.default_rng([seed, index]))
    sizes = _image_sizes(resolution, aspect_ratios)
    size = sizes[np.random.default_rng([seed, index, 1]).integers(len(sizes))] if len(sizes) > 1 else sizes[0]
    return scene, size


def make_sample(index: int, resolution: int, seed: int = 0,
                aspect_ratios: Sequence[float | str] | None = None) -> tuple[Image.Image, dict, dict]:
    """Sample ``index`` of dataset ``seed`` as ``(image, captions, facts)``; a pure function of its
    arguments (see :func:`_scene_and_size`)."""
    scene, size = _scene_and_size(index, resolution, seed, aspect_ratios)
    return render(scene, size), captions(scene), facts(scene)


def make_pair(index: int, resolution: int, seed: int = 0,
              aspect_ratios: Sequence[float | str] | None = None) -> tuple[Image.Image, Image.Image, dict, dict]:
    """Preference pair ``index`` of dataset ``seed`` as ``(winner, loser, captions, facts)``.

    The winner is :func:`make_sample`'s image of the prompt (``captions``, ``facts``); the loser the
    same scene with one shape in another colour, drawn by ``default_rng([seed, index, 2])``: an
    image that does not follow its prompt, the choice a person makes between two such images.
    """
    scene, size = _scene_and_size(index, resolution, seed, aspect_ratios)
    rng = np.random.default_rng([seed, index, 2])
    changed = int(rng.integers(len(scene.shapes)))
    shape = scene.shapes[changed]
    others = [color for color in SHAPE_COLORS if color != shape.color]
    shapes = list(scene.shapes)
    shapes[changed] = ShapeFact(shape.kind, others[rng.integers(len(others))], shape.size, shape.x, shape.y)
    wrong = Scene(scene.background, tuple(shapes), scene.background_style, scene.background_seed)
    return render(scene, size), render(wrong, size), captions(scene), facts(scene)


def iter_shapes_samples(n: int, resolution: int, seed: int = 0,
                        aspect_ratios: Sequence[float | str] | None = None) -> Iterator[tuple[Image.Image, dict, dict]]:
    """Yield ``(image, captions, facts)`` for samples ``0 .. n-1`` (see :func:`make_sample`)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    for index in range(n):
        yield make_sample(index, resolution, seed, aspect_ratios)


def write_shapes_dataset(out_dir: str | Path, n: int, resolution: int, seed: int = 0,
                         aspect_ratios: Sequence[float | str] | None = None) -> Path:
    """Write ``n`` samples to ``out_dir`` in the ingest format and return the folder.

    Per sample ``NNNNNN`` (zero-padded index): ``NNNNNN.png`` (RGB image), ``NNNNNN.txt`` (the long
    caption) and ``NNNNNN.json`` (``captions``, ``facts``, ``width``, ``height``). Same arguments,
    same bytes. ``aspect_ratios`` (e.g. ``["1:1", "4:3", "16:9"]``) draws one bucket per sample.
    """
    _image_sizes(resolution, aspect_ratios)  # bad ratios fail before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for index, (image, caption, fact) in enumerate(iter_shapes_samples(n, resolution, seed, aspect_ratios)):
        stem = out / f"{index:06d}"
        image.save(stem.with_suffix(".png"), format="PNG", compress_level=1)
        stem.with_suffix(".txt").write_text(caption["long"] + "\n", encoding="utf-8")
        metadata = {"captions": caption, "facts": fact, "width": image.width, "height": image.height}
        stem.with_suffix(".json").write_text(json.dumps(metadata, sort_keys=True) + "\n", encoding="utf-8")
    return out


def write_shapes_pairs(out_dir: str | Path, n: int, resolution: int, seed: int = 0,
                       aspect_ratios: Sequence[float | str] | None = None) -> Path:
    """Write ``n`` preference pairs (:func:`make_pair`) to ``out_dir`` in the pair-file format
    (:mod:`krea2_train.data.pairs`) and return the pair file: ``NNNNNN_winner.png``,
    ``NNNNNN_loser.png`` and one ``pairs.jsonl`` line per pair (prompt: the long caption)."""
    _image_sizes(resolution, aspect_ratios)  # bad ratios fail before anything is written
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(n):
        winner, loser, caption, _ = make_pair(index, resolution, seed, aspect_ratios)
        names = {"winner": f"{index:06d}_winner.png", "loser": f"{index:06d}_loser.png"}
        winner.save(out / names["winner"], format="PNG", compress_level=1)
        loser.save(out / names["loser"], format="PNG", compress_level=1)
        lines.append(json.dumps({"prompt": caption["long"], **names}, sort_keys=True))
    pair_file = out / "pairs.jsonl"
    pair_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return pair_file
