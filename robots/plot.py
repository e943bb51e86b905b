"""Small PNG charts drawn with Pillow alone: line plots on shared axes, for people who would
rather look than read (the training loss curve, the evaluation's trajectories and timelines)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (23, 190, 207))


@dataclasses.dataclass
class Series:
    label: str
    x: np.ndarray
    y: np.ndarray
    colour: tuple[int, int, int] | None = None


def line_chart(
    series: Sequence[Series],
    title: str,
    size: tuple[int, int] = (640, 360),
    log_y: bool = False,
    y_range: tuple[float, float] | None = None,
    y_labels: Sequence[tuple[float, str]] = (),
) -> Image.Image:
    """One panel: the series as polylines on common axes (y from the data unless `y_range` is given),
    min and max of each axis written at its ends; with `y_labels` ((y, name) pairs: a categorical
    axis, such as the task's phases) the y axis names those values instead, each on a faint line."""
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 56, w - 12, 24, h - 28
    draw.text((left, 6), title, fill="black")
    draw.rectangle((left, top, right, bottom), outline=(160, 160, 160))
    ys = [np.log10(np.maximum(s.y, 1e-12)) if log_y else np.asarray(s.y, float) for s in series]
    finite = [v[np.isfinite(v)] for v in ys if len(v)]
    if not any(len(v) for v in finite):
        return img
    x_lo = min(float(np.min(s.x)) for s in series if len(s.x))
    x_hi = max(float(np.max(s.x)) for s in series if len(s.x))
    y_lo = min(float(v.min()) for v in finite if len(v)) if y_range is None else y_range[0]
    y_hi = max(float(v.max()) for v in finite if len(v)) if y_range is None else y_range[1]
    x_hi, y_hi = max(x_hi, x_lo + 1e-9), max(y_hi, y_lo + 1e-9)

    def px(x, y):
        u, v = (x - x_lo) / (x_hi - x_lo), (y - y_lo) / (y_hi - y_lo)
        return left + u * (right - left), bottom - v * (bottom - top)

    fmt = (lambda v: f"{10**v:.3g}") if log_y else (lambda v: f"{v:.3g}")
    if y_labels:
        for value, name in y_labels:
            _, y = px(x_lo, value)
            draw.line((left + 1, y, right - 1, y), fill=(232, 232, 232))
            draw.text((4, y - 5), name, fill="black")
    else:
        draw.text((4, top), fmt(y_hi), fill="black")
        draw.text((4, bottom - 10), fmt(y_lo), fill="black")
    draw.text((left, bottom + 6), f"{x_lo:.4g}", fill="black")
    draw.text((right - 40, bottom + 6), f"{x_hi:.4g}", fill="black")
    for i, (s, y) in enumerate(zip(series, ys, strict=True)):
        colour = s.colour or PALETTE[i % len(PALETTE)]
        # A gap (NaN) breaks the line: no segment across a stretch without data.
        segments: list[list[tuple[float, float]]] = [[]]
        for a, b in zip(s.x, y, strict=True):
            if np.isfinite(b):
                segments[-1].append(px(a, b))
            elif segments[-1]:
                segments.append([])
        for points in segments:
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            elif points:
                x, y0 = points[0]
                draw.ellipse((x - 2, y0 - 2, x + 2, y0 + 2), fill=colour)
        draw.text((right - 150, top + 6 + 12 * i), s.label, fill=colour)
    return img


def stack(panels: Sequence[Image.Image], columns: int = 1) -> Image.Image:
    """Panels in a grid, row by row; each column as wide as its widest panel, each row as tall as its
    tallest."""
    rows = -(-len(panels) // columns)
    widths = [max(p.width for p in panels[c::columns]) for c in range(columns)]
    heights = [max(p.height for p in panels[r * columns : (r + 1) * columns]) for r in range(rows)]
    out = Image.new("RGB", (sum(widths), sum(heights)), "white")
    for i, p in enumerate(panels):
        r, c = divmod(i, columns)
        out.paste(p, (sum(widths[:c]), sum(heights[:r])))
    return out


def save(img: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
