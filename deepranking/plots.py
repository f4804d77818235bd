"""Pictures a person opens: matplotlib charts and captioned image grids.

Charts are matplotlib figures (``matplotlib.figure.Figure`` drawn by the Agg canvas:
no display and no pyplot global state); each writer returns its Figure, so a caller
can restyle it and save it again (matplotlib is imported only when a chart is drawn).
The retrieval grids stay Pillow mosaics: they paste thumbnails at exact pixel
positions, which needs no axes and no resampling by imshow.

Every figure's plotted values are also written beside it as CSV (same stem:
``training_curves.png`` + ``training_curves.csv``), and every file is written
atomically (temp file, then rename). A file that cannot be written raises
:class:`~deepranking.cli.UserError`.
"""

from __future__ import annotations

import contextlib
import csv
import math
import numbers
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

from deepranking.cli import UserError
from deepranking.file_io import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Colour-blind-friendly palette (Okabe-Ito) for up to 8 series.
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
GREEN = "#1a9641"
RED = "#d7191c"

VAL = dict(zorder=3, linewidth=1.6)  # per-epoch val series: drawn over the dense train lines
MARKER_LIMIT = 60  # series with at most this many points get a marker on every point
DPI = 100


# --------------------------------------------------------------------------- files

@contextlib.contextmanager
def _writing(path: str | os.PathLike, suffix: str) -> Iterator[Path]:
    """``atomic_path``, with an unwritable destination reported as a UserError."""
    try:
        with atomic_path(path, suffix=suffix) as tmp:
            yield tmp
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from exc


def data_path(path: str | os.PathLike) -> Path:
    """Where the values of the figure at ``path`` are written: same folder and stem, ``.csv``."""
    p = Path(path)
    return p.with_suffix(".csv") if p.suffix.lower() != ".csv" else p.with_name(p.name + ".csv")


def _cell(v) -> str:
    """A CSV field: integers as integers, floats in their shortest exact (round-trip) form."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, numbers.Integral):
        return str(int(v))
    if isinstance(v, numbers.Real):
        return repr(float(v))
    return str(v)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows([[_cell(v) for v in row] for row in rows])


def _write(path: str | os.PathLike, save_png: Callable[[Path], None], header: Sequence[str],
           rows: Sequence[Sequence]) -> None:
    """Write the PNG (``save_png(tmp)``) and its CSV; both are renamed into place only once both are written."""
    with _writing(data_path(path), ".csv") as tmp_csv, _writing(path, ".png") as tmp_png:
        _write_csv(tmp_csv, header, rows)
        save_png(tmp_png)


def _figure_saver(fig: "Figure") -> Callable[[Path], None]:
    return lambda tmp: fig.savefig(tmp, format="png", dpi=DPI)


# --------------------------------------------------------------------------- charts

def _finite(v) -> bool:
    """A real number that is not NaN/inf (None, strings and bools are not)."""
    if isinstance(v, bool) or v is None:
        return False
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _new_figure(width: float, height: float) -> "Figure":
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself: fig.savefig renders with Agg
    return fig


def _plot(ax: "Axes", xs: Sequence, ys: Sequence, label: str, colour: str, markers: bool | None = None,
          **kw) -> None:
    """One series; markers on every point when there are few (so a 1-point series is visible)."""
    if markers is None:
        markers = len(xs) <= MARKER_LIMIT
    style = dict(marker="o", markersize=4) if markers else dict(marker="None")
    style["linewidth"] = kw.pop("linewidth", 1.6 if len(xs) <= MARKER_LIMIT else 1.0)
    if len(xs) > MARKER_LIMIT:
        kw.setdefault("alpha", 0.85)  # a dense noisy line lets the one beneath show through
    ax.plot(xs, ys, label=label, color=colour, **style, **kw)


def _legend_right(ax: "Axes") -> None:
    """Legend outside the axes, to their right: it never covers a curve."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False, fontsize=9)


def _points(records: Sequence[Mapping], key: str) -> tuple[list, list[float]]:
    """(steps, values) of the records whose ``step`` and ``key`` are finite numbers."""
    xs, ys = [], []
    for r in records:
        step, v = r.get("step"), r.get(key)
        if _finite(step) and _finite(v):
            xs.append(step)
            ys.append(float(v))
    return xs, ys


def training_curves(records: Iterable[Mapping], path: str | os.PathLike,
                    title: str = "Deep Ranking training") -> "Figure":
    """Write the training curves of a run (the records of its ``metrics.jsonl``) and their CSV.

    Panels, one above the other on a shared step axis, each drawn only when its data exist:

    * ranking loss: the train windowed mean (``triplet_loss``, else ``loss``; the mean
      of the steps since the previous train record), the mined training objective
      ``loss`` as a second line when it differs from ``triplet_loss``, and ``val_loss``
      per epoch;
    * class loss: the train ``class_loss`` when any record has one > 0;
    * val triplet accuracy per epoch, y in [0, 1];
    * learning rate.

    When no ``train`` record holds a value, the ``epoch`` records' means stand in.
    Missing keys and NaN/inf values are skipped. The CSV beside the PNG
    (:func:`data_path`) has one row per plotted point: ``panel,series,step,value``.
    Returns the Figure.
    """
    panels = _training_panels(records)
    fig = _new_figure(10.0, 1.0 + 2.1 * max(len(panels), 1))
    fig.suptitle(title)
    _draw_panels(fig, panels)
    rows = [(name, label, x, y) for name, _, _, series in panels for label, (xs, ys), _, _ in series
            for x, y in zip(xs, ys)]
    _write(path, _figure_saver(fig), ["panel", "series", "step", "value"], rows)
    return fig


def _training_panels(records: Iterable[Mapping]) -> list[tuple[str, str, tuple | None, list]]:
    """The panels training_curves draws: (name, y label, y range, [(series, (xs, ys), colour, keywords)])."""
    records = [r for r in records if isinstance(r, Mapping)]
    train = [r for r in records if r.get("event") == "train"]
    epochs = [r for r in records if r.get("event") == "epoch"]

    def windowed(key: str, what: str) -> tuple[str, tuple[list, list]] | None:
        pts = _points(train, key)
        if pts[0]:
            return f"train {what} (window mean)", pts
        pts = _points(epochs, key)
        if pts[0]:
            return f"train {what} (epoch mean)", pts
        return None

    # (panel name, y label, y range, [(series name, (xs, ys), colour, plot keywords)])
    panels: list[tuple[str, str, tuple | None, list]] = []

    ranking = []
    has_triplet = bool(_points(train, "triplet_loss")[0] or _points(epochs, "triplet_loss")[0])
    main = windowed("triplet_loss", "triplet loss") if has_triplet else windowed("loss", "loss")
    if main is not None:
        ranking.append((main[0], main[1], PALETTE[0], None))
        if has_triplet:
            mined = windowed("loss", "mined objective")
            if mined is not None and _differs(main[1], mined[1]):
                ranking.append((mined[0], mined[1], PALETTE[5], None))
    val = _points(epochs, "val_loss")
    if val[0]:
        ranking.append(("val loss (per epoch)", val, PALETTE[1], VAL))
    if ranking:
        panels.append(("ranking loss", "loss", None, ranking))

    if any(_finite(r.get("class_loss")) and float(r["class_loss"]) > 0 for r in train + epochs):
        cls = windowed("class_loss", "class loss")
        if cls is not None:
            panels.append(("class loss", "cross-entropy", None, [(cls[0], cls[1], PALETTE[2], None)]))

    acc = _points(epochs, "val_triplet_accuracy")
    if acc[0]:
        panels.append(("val triplet accuracy", "accuracy", (-0.02, 1.02),
                       [("val triplet accuracy (per epoch)", acc, PALETTE[1], VAL)]))

    lr = windowed("lr", "learning rate")
    if lr is not None:
        panels.append(("learning rate", "learning rate", None, [("learning rate", lr[1], PALETTE[4], None)]))
    return panels


def _draw_panels(fig: "Figure", panels: list) -> None:
    """One axis per panel on a shared step axis (a note when there is nothing to draw)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    if not panels:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no training records to plot", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("step")
        ax.set_yticks([])
    else:
        axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
        for ax, (name, ylabel, y_range, series) in zip(axes, panels):
            for label, (xs, ys), colour, kw in series:
                _plot(ax, xs, ys, label, colour, **(kw or {}))
            ax.set_title(name, loc="left", fontsize=10)
            ax.set_ylabel(ylabel)
            if y_range is not None:
                ax.set_ylim(*y_range)
            if name == "learning rate":  # from 0: warm-up and decay read at a glance
                ax.set_ylim(0.0, 1.08 * max(max(ys) for _, (_, ys), _, _ in series) or 1.0)
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))  # no "1e-3" offset text
            else:
                ax.ticklabel_format(axis="y", useOffset=False)
            ax.grid(True, alpha=0.3)
            _legend_right(ax)
        axes[-1].set_xlabel("step")
        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))


def _differs(a: tuple[list, list], b: tuple[list, list]) -> bool:
    """Whether two (steps, values) series differ anywhere (tolerating float rounding)."""
    if len(a[0]) != len(b[0]) or list(a[0]) != list(b[0]):
        return True
    return any(not math.isclose(u, v, rel_tol=1e-9, abs_tol=1e-12) for u, v in zip(a[1], b[1]))


def _line_figure(series: Mapping[str, tuple[Sequence, Sequence]], title: str, xlabel: str, ylabel: str,
                 y_range: tuple[float, float] | None, hline: tuple[float, str | None] | None,
                 integer_x: bool = False) -> tuple["Figure", list[tuple[str, object, float]]]:
    """A one-axes line chart with its legend below the axes; returns it and its plotted points."""
    from matplotlib.ticker import MaxNLocator

    fig = _new_figure(8.0, 5.0)
    ax = fig.add_subplot()
    plotted = []
    for i, (name, (xs, ys)) in enumerate(series.items()):
        pts = [(x, float(y)) for x, y in zip(xs, ys) if _finite(x) and _finite(y)]
        plotted += [(name, x, y) for x, y in pts]
        _plot(ax, [p[0] for p in pts], [p[1] for p in pts], name, PALETTE[i % len(PALETTE)])
    if hline is not None:
        value, label = hline
        ax.axhline(value, color="#666666", linestyle="--", linewidth=1.2, label=label)
        plotted.append((label or "hline", None, float(value)))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if y_range is not None:
        lo, hi = y_range
        pad = 0.02 * (hi - lo)  # points on the bounds stay whole
        ax.set_ylim(lo - pad, hi + pad)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(handles), 3), frameon=False)
    return fig, plotted


def _hline(hline: float | tuple[float, str] | None) -> tuple[float, str | None] | None:
    if hline is None:
        return None
    if isinstance(hline, (tuple, list)):
        return float(hline[0]), str(hline[1])
    return float(hline), None


def line_chart(
    path: str | os.PathLike,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    y_range: tuple[float, float] | None = None,
    hline: float | tuple[float, str] | None = None,
) -> "Figure":
    """Write a PNG line chart (one coloured line per series, legend below the axes) and its CSV.

    ``series`` maps a legend name to (xs, ys); points with a NaN/missing x or y are
    skipped, and series of up to 60 points get point markers. ``y_range`` fixes the
    y axis; ``hline`` draws a dashed horizontal reference line (a value, or
    (value, legend name)). The CSV beside the PNG (:func:`data_path`) has one row per
    plotted point, ``series,x,y`` (the hline as one row with an empty x).
    Returns the Figure.
    """
    fig, plotted = _line_figure(series, title, xlabel, ylabel, y_range, _hline(hline))
    _write(path, _figure_saver(fig), ["series", "x", "y"], plotted)
    return fig


def precision_at_k(path: str | os.PathLike, ks: Sequence[int], curves: Mapping[str, Sequence[float]],
                   title: str = "precision@k") -> "Figure":
    """Write precision@k against k (one line per curve, e.g. test and train; y in [0, 1]) and its CSV.

    ``curves`` maps a legend name to one precision per k (NaN: not plotted). The
    legend sits below the axes, clear of the curves. The CSV beside the PNG
    (:func:`data_path`) is ``k,<curve name>...``, one row per k.
    """
    fig, _ = _line_figure({name: (ks, ys) for name, ys in curves.items()}, title, "k", "precision",
                          (0.0, 1.0), None, integer_x=True)
    rows = [[k] + [ys[i] if i < len(ys) and _finite(ys[i]) else None for ys in curves.values()]
            for i, k in enumerate(ks)]
    _write(path, _figure_saver(fig), ["k", *curves], rows)
    return fig


# --------------------------------------------------------------------------- image grids

def font(size: int = 12) -> ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` px (falls back to the fixed bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no scalable default font
        return ImageFont.load_default()


Cell = tuple["str | os.PathLike | Image.Image | None", str, "str | None"]


def image_grid(
    path: str | os.PathLike,
    rows: Sequence[Sequence[Cell]],
    row_titles: Sequence[str] | None = None,
    cell: int = 96,
    title: str | None = None,
) -> None:
    """Write a PNG grid of captioned images, and a CSV of its cells beside it.

    Each cell is ``(image, caption, border_colour)``: ``image`` a path, a PIL
    image or None (grey placeholder, e.g. a file that is gone); ``border_colour``
    None for no border (e.g. green/red for same/different class). The CSV
    (:func:`data_path`) has one row per cell: ``row,column,row_title,image,caption,border``
    (``image`` empty for an in-memory image or None).
    """
    from deepranking.preprocessing import UnreadableImageError, load_rgb

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
    data = []
    for r, row in enumerate(rows):
        y0 = title_h + r * row_h
        if row_titles:
            draw.text((8, y0 + 2), row_titles[r], fill="black", font=f_small)
        for c, (image, caption, border) in enumerate(row):
            data.append((r, c, row_titles[r] if row_titles else "",
                         "" if image is None or isinstance(image, Image.Image) else os.fspath(image),
                         str(caption), border or ""))
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
    _write(path, lambda tmp: img.save(tmp, format="PNG"), ["row", "column", "row_title", "image", "caption", "border"],
           data)


def _clip(text: str, width: int, fnt) -> str:
    """Shorten ``text`` with an ellipsis so it fits ``width`` pixels."""
    if fnt.getlength(text) <= width:
        return text
    while text and fnt.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"
