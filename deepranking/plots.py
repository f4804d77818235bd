"""Pictures a person opens: line charts and captioned image grids, drawn with Pillow.

Pillow is already a dependency; matplotlib would add ~40 MB for two chart types.
Both writers are atomic (temp file, then rename).
"""

from __future__ import annotations

import math
import os
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from deepranking.cli import atomic_path

# Colour-blind-friendly palette (Okabe-Ito) for up to 8 series.
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
GREEN = "#1a9641"
RED = "#d7191c"


def font(size: int = 12) -> ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` px (falls back to the fixed bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no scalable default font
        return ImageFont.load_default()


def _save_png(image: Image.Image, path: str | os.PathLike) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG")


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    start = math.floor(lo / step) * step
    ticks = []
    t = start
    while t <= hi + 1e-9 * step:
        if t >= lo - 1e-9 * step:
            ticks.append(round(t, 10))
        t += step
    return ticks


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def line_chart(
    path: str | os.PathLike,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    size: tuple[int, int] = (720, 440),
    y_range: tuple[float, float] | None = None,
) -> None:
    """Write a PNG line chart: one coloured line (with point markers) per series.

    ``series`` maps a legend name to (xs, ys); NaN points are skipped.
    """
    width, height = size
    left, right, top, bottom = 70, 20, 40, 60
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    f_small, f_title = font(12), font(16)
    points = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if not _isnan(y)]
    if points:
        x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
        y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
    else:
        x_lo, x_hi, y_lo, y_hi = 0.0, 1.0, 0.0, 1.0
    if y_range is not None:
        y_lo, y_hi = y_range
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    pad = 0.05 * (y_hi - y_lo)
    if y_range is None:
        y_lo, y_hi = y_lo - pad, y_hi + pad
    plot_w, plot_h = width - left - right, height - top - bottom

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_lo) / (x_hi - x_lo) * plot_w, top + (1 - (y - y_lo) / (y_hi - y_lo)) * plot_h)

    # Grid, ticks and labels.
    for ty in _nice_ticks(y_lo, y_hi):
        _, py = to_px(x_lo, ty)
        draw.line([(left, py), (width - right, py)], fill="#e5e5e5")
        draw.text((left - 6, py), _fmt(ty), fill="black", font=f_small, anchor="rm")
    for tx in _nice_ticks(x_lo, x_hi, 6):
        px, _ = to_px(tx, y_lo)
        draw.line([(px, top), (px, top + plot_h)], fill="#f0f0f0")
        draw.text((px, top + plot_h + 6), _fmt(tx), fill="black", font=f_small, anchor="mt")
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    draw.text((width / 2, 12), title, fill="black", font=f_title, anchor="mt")
    draw.text((left + plot_w / 2, height - 14), xlabel, fill="black", font=f_small, anchor="mb")
    ylabel_img = Image.new("RGB", (plot_h, 18), "white")
    ImageDraw.Draw(ylabel_img).text((plot_h / 2, 9), ylabel, fill="black", font=f_small, anchor="mm")
    img.paste(ylabel_img.rotate(90, expand=True), (4, top))

    # Lines and a legend in the top-right corner.
    for i, (name, (xs, ys)) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        pts = [to_px(x, y) for x, y in zip(xs, ys) if not _isnan(y)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        if len(pts) <= 60:
            for px, py in pts:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        ly = top + 8 + 16 * i
        lx = left + plot_w - 170
        draw.line([(lx, ly + 6), (lx + 20, ly + 6)], fill=colour, width=3)
        draw.text((lx + 26, ly), name, fill="black", font=f_small)
    _save_png(img, path)


def _isnan(v: float) -> bool:
    return isinstance(v, float) and math.isnan(v)


Cell = tuple["str | os.PathLike | Image.Image | None", str, "str | None"]


def image_grid(
    path: str | os.PathLike,
    rows: Sequence[Sequence[Cell]],
    row_titles: Sequence[str] | None = None,
    cell: int = 96,
    title: str | None = None,
) -> None:
    """Write a PNG grid of captioned images.

    Each cell is ``(image, caption, border_colour)``: ``image`` a path, a PIL
    image or None (grey placeholder, e.g. a file that is gone); ``border_colour``
    None for no border (e.g. green/red for same/different class).
    """
    from deepranking.image_data import UnreadableImageError, load_rgb

    f_small, f_title = font(11), font(14)
    n_cols = max((len(r) for r in rows), default=1)
    title_h = 26 if title else 0
    row_title_h = 18 if row_titles else 0
    caption_h = 30
    row_h = row_title_h + cell + caption_h + 8
    width = n_cols * (cell + 8) + 8
    img = Image.new("RGB", (width, title_h + len(rows) * row_h + 4), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((width / 2, 6), title, fill="black", font=f_title, anchor="mt")
    for r, row in enumerate(rows):
        y0 = title_h + r * row_h
        if row_titles:
            draw.text((8, y0 + 2), row_titles[r], fill="black", font=f_small)
        for c, (image, caption, border) in enumerate(row):
            x = 8 + c * (cell + 8)
            y = y0 + row_title_h
            thumb = None
            if isinstance(image, Image.Image):
                thumb = image.convert("RGB")
            elif image is not None:
                try:
                    thumb = load_rgb(image)
                except UnreadableImageError:
                    thumb = None
            if thumb is None:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill="#bbbbbb")
                draw.text((x + cell / 2, y + cell / 2), "missing", fill="black", font=f_small, anchor="mm")
            else:
                img.paste(thumb.resize((cell, cell), Image.Resampling.BICUBIC), (x, y))
            if border:
                draw.rectangle([x - 3, y - 3, x + cell + 2, y + cell + 2], outline=border, width=3)
            for i, line in enumerate(str(caption).split("\n")[:2]):
                draw.text((x + cell / 2, y + cell + 5 + 12 * i), _clip(line, cell, f_small), fill="black",
                          font=f_small, anchor="mt")
    _save_png(img, path)


def _clip(text: str, width: int, fnt) -> str:
    """Shorten ``text`` with an ellipsis so it fits ``width`` pixels."""
    if fnt.getlength(text) <= width:
        return text
    while text and fnt.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"
