"""The accuracy-matrix PNG every trial logs, drawn with Pillow.

Each trial writes one after its last experience. Matplotlib took 80 ms per image and a 0.3 s
pyplot import in every Ray worker, the largest part of a short trial's instrumentation cost; this
takes a few milliseconds. The report's multi-panel heatmaps stay in matplotlib (``clgrid.report.plots``).
"""

from __future__ import annotations

import functools
import io
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

# matplotlib's viridis sampled at 0, 0.1, ..., 1; colours in between are interpolated linearly
VIRIDIS = ["#440154", "#482475", "#414487", "#355f8d", "#2a788e", "#21918c",
           "#22a884", "#44bf70", "#7ad151", "#bddf26", "#fde725"]
_ANCHORS = [tuple(int(h[i:i + 2], 16) for i in (1, 3, 5)) for h in VIRIDIS]
CELL, LEFT, TOP, BOTTOM, BAR = 44, 64, 34, 52, 14


def viridis(value: float) -> tuple[int, int, int]:
    x = min(max(value, 0.0), 1.0) * (len(_ANCHORS) - 1)
    i = min(int(x), len(_ANCHORS) - 2)
    f = x - i
    return tuple(round(a + (b - a) * f) for a, b in zip(_ANCHORS[i], _ANCHORS[i + 1]))  # type: ignore[return-value]


@functools.lru_cache(maxsize=16)
def _frame(T: int, title: str) -> Image.Image:
    """Everything but the cells: title, axis labels and ticks, colour bar. The same for every
    matrix of a sweep, so drawn once per process (the bar alone is a line per pixel)."""
    font, small = ImageFont.load_default(size=12), ImageFont.load_default(size=10)
    width, height = LEFT + T * CELL + 24 + BAR + 34, TOP + T * CELL + BOTTOM
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    for i in range(T):
        draw.text((LEFT - 6, TOP + i * CELL + CELL / 2), str(i), anchor="rm", font=small, fill="black")
        draw.text((LEFT + i * CELL + CELL / 2, TOP + T * CELL + 6), str(i), anchor="mt", font=small, fill="black")
    grid_mid = LEFT + T * CELL / 2
    draw.text((grid_mid, TOP / 2), title, anchor="mm", font=font, fill="black")
    draw.text((grid_mid, TOP + T * CELL + 30), "evaluated on experience j", anchor="mm", font=font, fill="black")
    label = Image.new("RGB", (T * CELL, 16), "white")
    ImageDraw.Draw(label).text((T * CELL / 2, 8), "after training experience i", anchor="mm", font=font, fill="black")
    img.paste(label.rotate(90, expand=True), (8, TOP))
    bar_x, bar_h = LEFT + T * CELL + 24, T * CELL
    for k in range(bar_h):  # top is 1.0
        draw.line((bar_x, TOP + k, bar_x + BAR - 1, TOP + k), fill=viridis(1 - k / (bar_h - 1)))
    for tick in (0.0, 0.5, 1.0):
        draw.text((bar_x + BAR + 4, TOP + (1 - tick) * (bar_h - 1)), f"{tick:.1f}", anchor="lm", font=small, fill="black")
    return img


def render(R: Sequence[Sequence[float]], title: str = "accuracy matrix") -> bytes:
    """PNG bytes: R[i][j] as a T x T grid of annotated viridis cells (0 to 1) with a colour bar."""
    T = len(R)
    small = ImageFont.load_default(size=10)
    img = _frame(T, title).copy()
    draw = ImageDraw.Draw(img)
    for i in range(T):
        for j in range(T):
            x, y = LEFT + j * CELL, TOP + i * CELL
            draw.rectangle((x, y, x + CELL - 1, y + CELL - 1), fill=viridis(R[i][j]))
            draw.text((x + CELL / 2, y + CELL / 2), f"{R[i][j]:.2f}", anchor="mm", font=small,
                      fill="white" if R[i][j] < 0.6 else "black")
    out = io.BytesIO()
    img.save(out, format="PNG", compress_level=1)  # zlib's default level 6: 2.3 ms of the 4.6 a picture took
    return out.getvalue()
