import csv
import math
import os

import numpy as np
import pytest
from PIL import Image

from deepranking import plots
from deepranking.cli import UserError


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def png_size(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def no_temp_files(folder):
    return not list(folder.glob(".*"))


def train_record(step, loss, **extra):
    return {"event": "train", "epoch": 1, "step": step, "loss": loss, "lr": 1e-3, "images_per_s": 100.0,
            "train_seconds": step / 10, **extra}


def by_series(rows):
    """{(panel, series): [(step, value), ...]} from training_curves.csv rows."""
    out = {}
    for r in rows:
        out.setdefault((r["panel"], r["series"]), []).append((float(r["step"]), float(r["value"])))
    return out


def legend_clear_of_axes(fig):
    """Every legend's box lies outside its axes' plotting area (so it covers no curve)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + list(fig.legends)
    assert legends
    for leg in legends:
        box = leg.get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), (leg, ax)


# --------------------------------------------------------------------------- training curves

ONE_EPOCH = [
    train_record(20, 1.21, triplet_loss=0.82, class_loss=2.38, d_pos=0.4, d_neg=0.9, active_fraction=0.5),
    train_record(40, 1.19, triplet_loss=0.81, class_loss=2.30),
    {"event": "epoch", "epoch": 1, "step": 45, "loss": 1.2, "triplet_loss": 0.815, "class_loss": 2.33, "lr": 1e-3,
     "val_loss": 0.7, "val_triplet_accuracy": 0.64},
]


def test_training_curves_one_epoch_has_every_panel_and_its_exact_values(tmp_path):
    out = tmp_path / "training_curves.png"
    fig = plots.training_curves(ONE_EPOCH, out)
    w, h = png_size(out)
    assert 800 <= w <= 1400 and 700 <= h <= 1400  # four panels
    series = by_series(read_csv(tmp_path / "training_curves.csv"))
    assert series == {
        ("ranking loss", "train triplet loss (window mean)"): [(20, 0.82), (40, 0.81)],
        ("ranking loss", "train mined objective (window mean)"): [(20, 1.21), (40, 1.19)],
        ("ranking loss", "val loss (per epoch)"): [(45, 0.7)],
        ("class loss", "train class loss (window mean)"): [(20, 2.38), (40, 2.30)],
        ("val triplet accuracy", "val triplet accuracy (per epoch)"): [(45, 0.64)],
        ("learning rate", "learning rate"): [(20, 1e-3), (40, 1e-3)],
    }
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["ranking loss", "class loss", "val triplet accuracy",
                                                             "learning rate"]
    acc_ax = fig.axes[2]
    assert acc_ax.get_ylim()[0] <= 0.0 and acc_ax.get_ylim()[1] >= 1.0
    # Few points: every point has a marker, so the single val point is visible.
    assert all(line.get_marker() == "o" for ax in fig.axes for line in ax.get_lines())
    legend_clear_of_axes(fig)
    assert no_temp_files(tmp_path)


def test_training_curves_draws_only_what_the_records_hold(tmp_path):
    # No class loss (or only zeros), no val, loss == triplet_loss: one ranking line and the lr.
    records = [train_record(s, 0.5 - s / 1000, triplet_loss=0.5 - s / 1000, class_loss=0.0) for s in (10, 20, 30)]
    out = tmp_path / "curves.png"
    fig = plots.training_curves(records, out)
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["ranking loss", "learning rate"]
    series = by_series(read_csv(tmp_path / "curves.csv"))
    assert set(series) == {("ranking loss", "train triplet loss (window mean)"), ("learning rate", "learning rate")}
    w, h = png_size(out)
    assert h < 700  # two panels, not four

    # Without triplet_loss the plain loss is the ranking line; no lr key: no lr panel.
    records = [{"event": "train", "step": s, "loss": 1.0 / s} for s in (1, 2)]
    fig = plots.training_curves(records, out)
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["ranking loss"]
    assert by_series(read_csv(tmp_path / "curves.csv")) == {("ranking loss", "train loss (window mean)"):
                                                            [(1, 1.0), (2, 0.5)]}


def test_training_curves_skip_nan_and_missing_values(tmp_path):
    records = [
        train_record(10, float("nan"), triplet_loss=float("nan")),
        train_record(20, 0.9, triplet_loss=0.8),
        {"event": "train", "loss": 0.7, "triplet_loss": 0.6},  # no step
        {"event": "train", "step": 30, "loss": None, "triplet_loss": "n/a", "lr": float("inf")},
        {"event": "epoch", "epoch": 1, "step": 30, "loss": 0.9, "val_loss": float("nan"),
         "val_triplet_accuracy": 0.5},
        {"event": "something else", "step": 40, "loss": 5.0},
        "not a record",
    ]
    out = tmp_path / "curves.png"
    plots.training_curves(records, out)
    series = by_series(read_csv(tmp_path / "curves.csv"))
    assert series == {
        ("ranking loss", "train triplet loss (window mean)"): [(20, 0.8)],
        ("ranking loss", "train mined objective (window mean)"): [(20, 0.9)],
        ("val triplet accuracy", "val triplet accuracy (per epoch)"): [(30, 0.5)],
        ("learning rate", "learning rate"): [(10, 1e-3), (20, 1e-3)],
    }
    assert all(math.isfinite(v) for pts in series.values() for _, v in pts)


def test_training_curves_fall_back_to_epoch_means_and_survive_no_records(tmp_path):
    epochs = [{"event": "epoch", "epoch": e, "step": 10 * e, "loss": 1.0 / e, "lr": 0.01} for e in (1, 2)]
    plots.training_curves(epochs, tmp_path / "a.png")
    assert set(by_series(read_csv(tmp_path / "a.csv"))) == {("ranking loss", "train loss (epoch mean)"),
                                                            ("learning rate", "learning rate")}
    plots.training_curves([], tmp_path / "empty.png")
    png_size(tmp_path / "empty.png")
    assert read_csv(tmp_path / "empty.csv") == []


def test_training_curves_long_run_renders_lines_without_markers(tmp_path):
    rng = np.random.default_rng(0)
    records = []
    for i in range(3000):
        step = 20 * (i + 1)
        records.append(train_record(step, float(1.5 * np.exp(-i / 500) + rng.normal(0, 0.02)),
                                    triplet_loss=float(np.exp(-i / 500) + rng.normal(0, 0.02)),
                                    class_loss=float(2.3 * np.exp(-i / 800) + 0.1), lr=1e-3 * (1 - i / 3000)))
        if (i + 1) % 30 == 0:
            records.append({"event": "epoch", "epoch": (i + 1) // 30, "step": step, "loss": 0.5, "lr": 1e-4,
                            "val_loss": float(np.exp(-i / 500)), "val_triplet_accuracy": 0.9})
    out = tmp_path / "training_curves.png"
    fig = plots.training_curves(records, out)
    w, h = png_size(out)
    assert 800 <= w <= 1400 and 700 <= h <= 1400
    rows = read_csv(tmp_path / "training_curves.csv")
    series = by_series(rows)
    trained = [r for r in records if r["event"] == "train"]
    assert series[("ranking loss", "train triplet loss (window mean)")] == [(r["step"], r["triplet_loss"])
                                                                             for r in trained]
    assert series[("class loss", "train class loss (window mean)")] == [(r["step"], r["class_loss"]) for r in trained]
    assert len(series[("ranking loss", "val loss (per epoch)")]) == 100
    assert len(rows) == 4 * 3000 + 2 * 100
    dense = [line for ax in fig.axes for line in ax.get_lines() if len(line.get_xdata()) > 60]
    assert len(dense) == 6 and all(line.get_marker() in ("None", "", None) for line in dense)
    legend_clear_of_axes(fig)


# --------------------------------------------------------------------------- line charts

def test_line_chart_draws_each_series_in_its_colour_and_writes_its_points(tmp_path):
    out = tmp_path / "chart.png"
    fig = plots.line_chart(out, {"a": ([1, 2, 3], [0.1, 0.5, 0.9]), "b": ([1, 2, 3], [0.9, 0.5, float("nan")])},
                           "title", "x", "y", hline=(0.25, "target"))
    w, h = png_size(out)
    assert 600 <= w <= 1200 and 400 <= h <= 800
    img = np.asarray(Image.open(out).convert("RGB"))
    for colour in plots.PALETTE[:2]:
        rgb = tuple(int(colour[j:j + 2], 16) for j in (1, 3, 5))
        assert (np.abs(img.astype(int) - rgb).max(axis=2) < 8).sum() > 50, colour
    assert [(r["series"], r["x"], r["y"]) for r in read_csv(tmp_path / "chart.csv")] == [
        ("a", "1", "0.1"), ("a", "2", "0.5"), ("a", "3", "0.9"), ("b", "1", "0.9"), ("b", "2", "0.5"),
        ("target", "", "0.25")]
    legend_clear_of_axes(fig)
    assert no_temp_files(tmp_path)


def test_line_chart_as_bench_time_to_quality_calls_it(tmp_path):
    series = {"ours recipe": ([60, 150], [0.7, 0.82]), "raw pixels": ([0, 600], [0.69, 0.69])}
    fig = plots.line_chart(tmp_path / "time_to_quality.png", series, title="precision@30 vs time",
                           xlabel="training seconds", ylabel="precision@30", y_range=(0.0, 1.0))
    lo, hi = fig.axes[0].get_ylim()
    assert lo <= 0.0 < 1.0 <= hi < 1.1
    assert len(read_csv(tmp_path / "time_to_quality.csv")) == 4


def test_precision_at_k_curves_legend_below_and_csv(tmp_path):
    ks = list(range(1, 31))
    curves = {"test (val queries)": [0.9 - 0.01 * k for k in ks], "train (self excluded)": [1.0] * 30}
    out = tmp_path / "precision_at_k.png"
    fig = plots.precision_at_k(out, ks, curves)
    w, h = png_size(out)
    assert 600 <= w <= 1200 and 400 <= h <= 800
    rows = read_csv(tmp_path / "precision_at_k.csv")
    assert [int(r["k"]) for r in rows] == ks
    for name, ys in curves.items():
        assert [float(r[name]) for r in rows] == ys
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    assert lo <= 0.0 and 1.0 <= hi < 1.1  # curves at 1.0 stay whole
    legend_clear_of_axes(fig)
    legend_box = fig.legends[0].get_window_extent(fig.canvas.get_renderer())
    assert legend_box.y1 <= ax.get_window_extent(fig.canvas.get_renderer()).y0  # below the axes

    plots.precision_at_k(out, [1], {"test": [float("nan")]})  # nothing plottable: still a picture
    assert read_csv(tmp_path / "precision_at_k.csv") == [{"k": "1", "test": ""}]


# --------------------------------------------------------------------------- errors and folders

def test_writers_create_a_missing_folder(tmp_path):
    out = tmp_path / "new" / "deeper" / "chart.png"
    plots.line_chart(out, {"a": ([1], [1.0])}, "t", "x", "y")
    png_size(out)
    assert (out.parent / "chart.csv").is_file()


def test_unwritable_destination_is_a_user_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot write"):
        plots.training_curves(ONE_EPOCH, blocker / "training_curves.png")
    with pytest.raises(UserError, match="cannot write"):
        plots.image_grid(blocker / "grid.png", [[(None, "x", None)]])


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write a read-only folder")
def test_read_only_folder_is_a_user_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(UserError, match="cannot write"):
            plots.precision_at_k(folder / "p.png", [1], {"test": [0.5]})
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


def test_earlier_figure_and_data_are_left_in_place_when_png_fails(tmp_path, monkeypatch):
    out = tmp_path / "chart.png"
    plots.line_chart(out, {"a": ([1, 2], [0.1, 0.2])}, "t", "x", "y")
    before = out.read_bytes(), (tmp_path / "chart.csv").read_bytes()

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    from matplotlib.figure import Figure
    monkeypatch.setattr(Figure, "savefig", fail)
    with pytest.raises(UserError, match="No space left"):
        plots.line_chart(out, {"a": ([1, 2], [0.3, 0.4])}, "t", "x", "y")
    assert (out.read_bytes(), (tmp_path / "chart.csv").read_bytes()) == before  # still a matching pair
    assert no_temp_files(tmp_path)


# --------------------------------------------------------------------------- image grids

def test_image_grid_places_cells_and_borders(tmp_path):
    red = Image.new("RGB", (10, 10), (255, 0, 0))
    src = tmp_path / "blue.png"
    Image.new("RGB", (20, 20), (0, 0, 255)).save(src)
    out = tmp_path / "grid.png"
    plots.image_grid(out, [[(red, "q", None), (src, "d=0.1\nlabel", plots.GREEN), (tmp_path / "gone.png", "x", None)]],
                     ["row"], cell=40)
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    y = 18 + 20  # row title, then the middle of the cells
    assert tuple(img[y, 8 + 20]) == (255, 0, 0)
    assert tuple(img[y, 8 + 48 + 20]) == (0, 0, 255)
    assert tuple(img[y, 8 + 48 - 2]) == (0x1A, 0x96, 0x41)  # green border left of cell 2
    assert abs(img[y + 10, 8 + 96 + 2] - 0xBB).max() < 2  # grey placeholder for the missing file
    assert read_csv(tmp_path / "grid.csv") == [
        {"row": "0", "column": "0", "row_title": "row", "image": "", "caption": "q", "border": ""},
        {"row": "0", "column": "1", "row_title": "row", "image": str(src), "caption": "d=0.1\nlabel",
         "border": plots.GREEN},
        {"row": "0", "column": "2", "row_title": "row", "image": str(tmp_path / "gone.png"), "caption": "x",
         "border": ""},
    ]
    assert no_temp_files(tmp_path)
