"""A minimal line-chart PNG writer (zlib only), used when matplotlib is not installed.

It draws axes, a 10% grid, the attainment target as a grey line and one coloured polyline with
square markers per series; no text (the legend and the axis ranges go to the caller's console
and plan.json). matplotlib, where installed, draws the labelled figure instead.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40))
Pixel = tuple[int, int, int]


class Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.rows = [bytearray(b"\xff" * (3 * width)) for _ in range(height)]

    def dot(self, x: int, y: int, colour: Pixel) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            self.rows[y][3 * x : 3 * x + 3] = bytes(colour)

    def line(self, x0: int, y0: int, x1: int, y1: int, colour: Pixel) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(steps + 1):
            self.dot(round(x0 + (x1 - x0) * i / steps), round(y0 + (y1 - y0) * i / steps), colour)

    def save(self, path: Path) -> None:
        raw = b"".join(b"\x00" + bytes(row) for row in self.rows)

        def chunk(kind: bytes, data: bytes) -> bytes:
            body = kind + data
            return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        path.write_bytes(
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b"")
        )


def line_chart(
    series: Sequence[Sequence[tuple[float, float]]],
    target: float,
    path: Path,
    size: tuple[int, int] = (640, 400),
) -> Path:
    """Plot (x, y in [0, 1]) series with x from 0 to the largest x; `target` as a grey line."""
    w, h = size
    canvas, margin = Canvas(w, h), 40
    x_max = max((x for s in series for x, _ in s), default=1.0) or 1.0

    def at(x: float, y: float) -> tuple[int, int]:
        return margin + round((w - 2 * margin) * x / x_max), h - margin - round(
            (h - 2 * margin) * y
        )

    for i in range(11):
        y = at(0, i / 10)[1]
        canvas.line(margin, y, w - margin, y, (235, 235, 235))
    canvas.line(margin, h - margin, w - margin, h - margin, (0, 0, 0))
    canvas.line(margin, margin, margin, h - margin, (0, 0, 0))
    ty = at(0, target)[1]
    canvas.line(margin, ty, w - margin, ty, (128, 128, 128))
    for colour, points in zip(COLOURS, series):
        pixels = [at(x, y) for x, y in points]
        for (x0, y0), (x1, y1) in zip(pixels, pixels[1:]):
            canvas.line(x0, y0, x1, y1, colour)
        for x, y in pixels:
            for dx in range(-2, 3):
                for dy in range(-2, 3):
                    canvas.dot(x + dx, y + dy, colour)
    canvas.save(path)
    return path
