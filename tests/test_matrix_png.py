"""The per-trial accuracy-matrix PNG: a real PNG whose cells carry R's values in viridis."""

import io

from PIL import Image

from clgrid.tracking import matrix_png


def test_cells_are_coloured_by_their_accuracy():
    R = [[0.0, 0.25], [0.5, 1.0]]
    img = Image.open(io.BytesIO(matrix_png.render(R))).convert("RGB")
    assert img.size == (matrix_png.LEFT + 2 * matrix_png.CELL + 24 + matrix_png.BAR + 34,
                        matrix_png.TOP + 2 * matrix_png.CELL + matrix_png.BOTTOM)
    for i in range(2):
        for j in range(2):  # a cell's corner pixel, away from its annotation
            corner = (matrix_png.LEFT + j * matrix_png.CELL + 2, matrix_png.TOP + i * matrix_png.CELL + 2)
            assert img.getpixel(corner) == matrix_png.viridis(R[i][j])


def test_viridis_matches_matplotlib_at_its_ends_and_between_anchors():
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    for value in (0.0, 0.05, 0.33, 0.5, 0.77, 1.0):
        expected = [c * 255 for c in cmap(value)[:3]]
        assert all(abs(a - b) <= 6 for a, b in zip(matrix_png.viridis(value), expected)), value
    assert matrix_png.viridis(-1) == matrix_png.viridis(0) and matrix_png.viridis(2) == matrix_png.viridis(1)
