"""PNG charts drawn with PIL only (no matplotlib dependency): the benchmarks' plots and the library map."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (148, 103, 189),
    (127, 127, 127),
    (214, 39, 40),
    (23, 190, 207),
]


def load_font(size: int = 13):
    for name in ("DejaVuSans.ttf", "Arial.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def bar_chart(
    path,
    title: str,
    groups: Sequence[str],
    series: Sequence[str],
    values: Callable[[str, str, int], float | None],
    sizes: Sequence[int] = (1,),
    chance: dict | None = None,
    y_max: float = 1.0,
    y_label: str = "top-1",
) -> Path:
    """Grouped bars: one group per family, one bar per (series, size); sizes after the first are hatched."""
    path = Path(path)
    bar_w = 9
    group_w = len(series) * len(sizes) * bar_w + 24
    left, top, bottom, right = 56, 44, 70, 170
    width = max(640, left + right + group_w * len(groups))
    height = 420
    img, draw, small = _canvas(width, height, left, title, 11)
    plot_h = height - top - bottom
    y0 = top + plot_h
    for tick in range(0, 11, 2):
        v = y_max * tick / 10
        y = y0 - plot_h * tick / 10
        draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        draw.text((8, y - 7), f"{v:.1f}", fill="black", font=small)
    draw.text((8, top - 24), y_label, fill="black", font=small)
    for gi, group in enumerate(groups):
        gx = left + 12 + gi * group_w
        for si, name in enumerate(series):
            for ni, n in enumerate(sizes):
                v = values(group, name, n)
                x = gx + (si * len(sizes) + ni) * bar_w
                if v is None:
                    continue
                h = plot_h * max(0.0, min(1.0, v / y_max))
                colour = COLOURS[si % len(COLOURS)]
                draw.rectangle([x, y0 - h, x + bar_w - 2, y0], fill=colour)
                if ni:
                    for yy in range(int(y0 - h), int(y0), 4):
                        draw.line([(x, yy), (x + bar_w - 2, yy)], fill="white")
        if chance and group in chance:
            y = y0 - plot_h * min(1.0, chance[group] / y_max)
            draw.line([(gx - 4, y), (gx + group_w - 20, y)], fill="black", width=1)
        draw.text((gx, y0 + 6), group.replace("_", " ")[:22], fill="black", font=small)
    for si, name in enumerate(series):
        y = top + si * 18
        draw.rectangle([width - right + 14, y, width - right + 26, y + 12], fill=COLOURS[si % len(COLOURS)])
        draw.text((width - right + 32, y - 1), name, fill="black", font=small)
    if chance:
        y = top + len(series) * 18 + 4
        draw.line([(width - right + 14, y + 6), (width - right + 26, y + 6)], fill="black")
        draw.text((width - right + 32, y), "chance", fill="black", font=small)
    draw.line([(left, y0), (width - right, y0)], fill="black")
    return _save(img, path)


def line_chart(
    path,
    title: str,
    xs: Sequence[float],
    lines: dict[str, Sequence[float | None]],
    x_label: str,
    y_label: str,
    log_x=True,
    log_y=True,
) -> Path:
    """Lines over a (log) x axis; None values are skipped."""
    path = Path(path)
    width, height = 720, 420
    left, top, bottom, right = 70, 44, 56, 190
    img, draw, small = _canvas(width, height, left, title, 11)
    vals = [v for series in lines.values() for v in series if v is not None and v > 0]
    if not vals:
        vals = [1.0]
    fx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    fy = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    x_lo, x_hi = fx(min(xs)), fx(max(xs))
    y_lo, y_hi = fy(min(vals)), fy(max(vals))
    if log_y:
        y_lo, y_hi = math.floor(y_lo), math.ceil(y_hi)
    if y_hi == y_lo:
        y_hi = y_lo + 1
    if x_hi == x_lo:
        x_hi = x_lo + 1
    pw, ph = width - left - right, height - top - bottom

    def px(x, y):
        return left + pw * (fx(x) - x_lo) / (x_hi - x_lo), top + ph * (1 - (fy(y) - y_lo) / (y_hi - y_lo))

    ticks = range(int(y_lo), int(y_hi) + 1) if log_y else [y_lo + (y_hi - y_lo) * i / 5 for i in range(6)]
    for t in ticks:
        v = 10**t if log_y else t
        _, y = px(xs[0], v)
        draw.line([(left, y), (left + pw, y)], fill=(225, 225, 225))
        draw.text((6, y - 7), f"{v:g}", fill="black", font=small)
    for x in xs:
        X, _ = px(x, 10**y_lo if log_y else y_lo)
        draw.text((X - 14, top + ph + 6), f"{x:,}", fill="black", font=small)
    draw.text((left + pw // 2 - 40, height - 22), x_label, fill="black", font=small)
    draw.text((6, top - 26), y_label, fill="black", font=small)
    for li, (name, series) in enumerate(lines.items()):
        colour = COLOURS[li % len(COLOURS)]
        pts = [px(x, v) for x, v in zip(xs, series) if v is not None and v > 0]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for X, Y in pts:
            draw.ellipse([X - 3, Y - 3, X + 3, Y + 3], fill=colour)
        _line_legend(draw, width - right, top + li * 18, colour, name, small)
    draw.rectangle([left, top, left + pw, top + ph], outline="black")
    return _save(img, path)


def scatter_chart(
    path, title: str, series: dict[str, Sequence[tuple[float, float, str]]], x_label: str, y_label: str
) -> Path:
    """Each series' (x, y, label) points joined in order of x, every point labelled (linear axes)."""
    path = Path(path)
    width, height = 820, 480
    left, top, bottom, right = 64, 44, 56, 220
    img, draw, small = _canvas(width, height, left, title, 10)
    points = [p for pts in series.values() for p in pts] or [(0.0, 0.0, "")]
    x_lo, x_hi = 0.0, max(1.0, max(p[0] for p in points))
    y_lo = math.floor(min(p[1] for p in points) * 10) / 10
    y_hi = max(y_lo + 0.1, math.ceil(max(p[1] for p in points) * 10) / 10)
    pw, ph = width - left - right, height - top - bottom

    def px(x, y):
        return left + pw * (x - x_lo) / (x_hi - x_lo), top + ph * (1 - (y - y_lo) / (y_hi - y_lo))

    for i in range(6):
        v = y_lo + (y_hi - y_lo) * i / 5
        _, y = px(x_lo, v)
        draw.line([(left, y), (left + pw, y)], fill=(225, 225, 225))
        draw.text((6, y - 7), f"{v:.2f}", fill="black", font=small)
        xv = x_lo + (x_hi - x_lo) * i / 5
        X, _ = px(xv, y_lo)
        draw.text((X - 12, top + ph + 6), f"{xv:,.0f}", fill="black", font=small)
    draw.text((left + pw // 2 - 60, height - 22), x_label, fill="black", font=small)
    draw.text((6, top - 26), y_label, fill="black", font=small)
    for si, (name, pts) in enumerate(series.items()):
        colour = COLOURS[si % len(COLOURS)]
        xy = [px(x, y) for x, y, _ in sorted(pts)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for (X, Y), (_, _, label) in zip(xy, sorted(pts)):
            draw.ellipse([X - 3, Y - 3, X + 3, Y + 3], fill=colour)
            draw.text((X + 4, Y - 12), label, fill=colour, font=small)
        _line_legend(draw, width - right, top + si * 18, colour, name, small)
    draw.rectangle([left, top, left + pw, top + ph], outline="black")
    return _save(img, path)


def _canvas(width: int, height: int, left: int, title: str, small_size: int):
    """(image, draw, small font): a white chart with its title, the start every chart here shares."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 12), title, fill="black", font=load_font(14))
    return img, draw, load_font(small_size)


def _line_legend(draw, x: int, y: int, colour, name: str, font) -> None:
    """One legend row of a line chart: a short stroke in the series' colour and its name, right of the plot."""
    draw.line([(x + 12, y + 6), (x + 28, y + 6)], fill=colour, width=3)
    draw.text((x + 34, y), name, fill="black", font=font)


def _save(img, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
