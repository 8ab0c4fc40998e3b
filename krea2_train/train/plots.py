"""Loss curves as PNG images (Pillow only, no plotting library)."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curve(
    steps: list[int], values: list[float], path: str | Path, *, title: str, size: tuple[int, int] = (640, 360), log_y: bool = True
) -> Path:
    """Draw ``values`` against ``steps`` (raw in grey, smoothed in blue) and save a PNG. ``log_y``
    applies when every finite value is positive (a loss that reaches 0 or below, such as a policy
    loss, is drawn on a linear axis)."""
    points = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    log_y = log_y and all(v > 0 for _, v in points)
    width, height = size
    left, right, top, bottom = 64, 16, 28, 36
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), title + (" (log scale)" if log_y else ""), fill="black")
    if len(points) < 2:
        draw.text((left, height // 2), f"{len(points)} finite value(s): nothing to draw yet", fill="black")
    else:
        xs = [s for s, _ in points]
        transform = math.log10 if log_y else (lambda v: v)
        ys = [transform(v) for _, v in points]
        x0, x1 = min(xs), max(xs)
        y0, y1 = min(ys), max(ys)
        y1 = y1 if y1 > y0 else y0 + 1e-9

        def to_pixel(x: float, y: float) -> tuple[float, float]:
            px = left + (x - x0) / max(x1 - x0, 1) * (width - left - right)
            py = top + (y1 - y) / (y1 - y0) * (height - top - bottom)
            return px, py

        draw.rectangle([left, top, width - right, height - bottom], outline="black")
        draw.line([to_pixel(x, y) for x, y in zip(xs, ys)], fill=(170, 170, 170), width=1)
        smooth = moving_average(ys, max(1, len(ys) // 20))
        draw.line([to_pixel(x, y) for x, y in zip(xs, smooth)], fill=(30, 80, 200), width=2)
        label = (lambda v: f"{10 ** v:.3g}") if log_y else (lambda v: f"{v:.3g}")
        draw.text((4, top), label(y1), fill="black")
        draw.text((4, height - bottom - 10), label(y0), fill="black")
        draw.text((left, height - bottom + 6), f"step {x0}", fill="black")
        last = f"step {x1}"
        draw.text((width - right - draw.textlength(last), height - bottom + 6), last, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
