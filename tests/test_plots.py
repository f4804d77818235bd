import numpy as np
from PIL import Image

from deepranking import plots


def test_line_chart_draws_each_series_in_its_colour(tmp_path):
    out = tmp_path / "chart.png"
    plots.line_chart(out, {"a": ([1, 2, 3], [0.1, 0.5, 0.9]), "b": ([1, 2, 3], [0.9, 0.5, float("nan")])},
                     "title", "x", "y", size=(400, 300))
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (300, 400, 3)
    colours = {tuple(int(plots.PALETTE[i][j:j + 2], 16) for j in (1, 3, 5)) for i in range(2)}
    for colour in colours:
        assert (img == colour).all(axis=2).sum() > 50, colour
    assert not list(tmp_path.glob(".*"))  # no temp file left behind


def test_image_grid_places_cells_and_borders(tmp_path):
    red = Image.new("RGB", (10, 10), (255, 0, 0))
    src = tmp_path / "blue.png"
    Image.new("RGB", (20, 20), (0, 0, 255)).save(src)
    out = tmp_path / "grid.png"
    plots.image_grid(out, [[(red, "q", None), (src, "d=0.1", plots.GREEN), (tmp_path / "gone.png", "x", None)]],
                     ["row"], cell=40)
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    y = 18 + 20  # row title, then the middle of the cells
    assert tuple(img[y, 8 + 20]) == (255, 0, 0)
    assert tuple(img[y, 8 + 48 + 20]) == (0, 0, 255)
    assert tuple(img[y, 8 + 48 - 2]) == (0x1A, 0x96, 0x41)  # green border left of cell 2
    assert abs(img[y + 10, 8 + 96 + 2] - 0xBB).max() < 2  # grey placeholder for the missing file
