"""A tiny line-chart writer for bench/e2e.py: RGB raster, 5x7 bitmap font, PNG via
zlib. No plotting library is a dependency of the project; this draws just what
the benchmark needs (log-scale y axis, a few series with markers, dashed target
lines, a legend).
"""

from __future__ import annotations

import itertools
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

Color = tuple[int, int, int]

_GLYPHS = {
    "0": ".###.#...##..###.#.###..##...#.###.",
    "1": "..#...##....#....#....#....#...###.",
    "2": ".###.#...#....#...#...#...#...#####",
    "3": "#####...#...#.....#.....##...#.###.",
    "4": "...#...##..#.#.#..#.#####...#....#.",
    "5": "######....####.....#....##...#.###.",
    "6": "..##..#...#....####.#...##...#.###.",
    "7": "#####....#...#...#...#....#....#...",
    "8": ".###.#...##...#.###.#...##...#.###.",
    "9": ".###.#...##...#.####....#...#..##..",
    "A": ".###.#...##...#######...##...##...#",
    "B": "####.#...##...#####.#...##...#####.",
    "C": ".###.#...##....#....#....#...#.###.",
    "D": "###..#..#.#...##...##...##..#.###..",
    "E": "######....#....####.#....#....#####",
    "F": "######....#....####.#....#....#....",
    "G": ".###.#...##....#.####...##...#.####",
    "H": "#...##...##...#######...##...##...#",
    "I": ".###...#....#....#....#....#...###.",
    "J": "..###...#....#....#....#.#..#..##..",
    "K": "#...##..#.#.#..##...#.#..#..#.#...#",
    "L": "#....#....#....#....#....#....#####",
    "M": "#...###.###.#.##.#.##...##...##...#",
    "N": "#...##...###..##.#.##..###...##...#",
    "O": ".###.#...##...##...##...##...#.###.",
    "P": "####.#...##...#####.#....#....#....",
    "Q": ".###.#...##...##...##.#.##..#..##.#",
    "R": "####.#...##...#####.#.#..#..#.#...#",
    "S": ".#####....#.....###.....#....#####.",
    "T": "#####..#....#....#....#....#....#..",
    "U": "#...##...##...##...##...##...#.###.",
    "V": "#...##...##...##...##...#.#.#...#..",
    "W": "#...##...##...##.#.##.#.##.#.#.#.#.",
    "X": "#...##...#.#.#...#...#.#.#...##...#",
    "Y": "#...##...#.#.#...#....#....#....#..",
    "Z": "#####....#...#...#...#...#....#####",
    ".": "..........................##...##..",
    "-": "...............#####...............",
    ",": ".....................##....#...#...",
    "/": ".........#...#...#...#...#.........",
    ":": "......##...##........##...##.......",
    "(": "...#...#...#....#....#.....#.....#.",
    ")": ".#.....#.....#....#....#...#...#...",
    "%": "##...##..#...#...#...#...#..##...##",
    "=": "..........#####.....#####..........",
    "+": ".......#....#..#####..#....#.......",
    ">": ".#.....#.....#.....#...#...#...#...",
    "<": "...#...#...#...#.....#.....#.....#.",
    "_": "..............................#####",
    " ": "",
}


def _glyph(ch: str) -> list[str]:
    bits = _GLYPHS.get(ch.upper(), _GLYPHS["-"]).ljust(35, ".")
    return [bits[i * 5 : i * 5 + 5] for i in range(7)]


class Canvas:
    def __init__(self, width: int, height: int, background: Color = (255, 255, 255)) -> None:
        self.width = width
        self.height = height
        self.pixels = bytearray(bytes(background) * (width * height))

    def set(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = (y * self.width + x) * 3
            self.pixels[i : i + 3] = bytes(color)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        for y in range(max(0, y0), min(self.height, y1 + 1)):
            for x in range(max(0, x0), min(self.width, x1 + 1)):
                self.set(x, y, color)

    def line(
        self, x0: int, y0: int, x1: int, y1: int, color: Color, width: int = 1, dash: int = 0
    ) -> None:
        """Bresenham with a square brush; `dash` > 0 draws dashes of that length."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        step = 0
        r = width // 2
        while True:
            if not dash or (step // dash) % 2 == 0:
                self.rect(x0 - r, y0 - r, x0 - r + width - 1, y0 - r + width - 1, color)
            step += 1
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, s: str, color: Color = (0, 0, 0), scale: int = 2) -> int:
        """Draws `s` with its top-left corner at (x, y); returns the end x."""
        for ch in s:
            for row, bits in enumerate(_glyph(ch)):
                for col, bit in enumerate(bits):
                    if bit == "#":
                        self.rect(
                            x + col * scale,
                            y + row * scale,
                            x + col * scale + scale - 1,
                            y + row * scale + scale - 1,
                            color,
                        )
            x += 6 * scale
        return x

    @staticmethod
    def text_width(s: str, scale: int = 2) -> int:
        return len(s) * 6 * scale

    def png(self) -> bytes:
        raw = b"".join(
            b"\x00" + bytes(self.pixels[y * self.width * 3 : (y + 1) * self.width * 3])
            for y in range(self.height)
        )

        def chunk(kind: bytes, data: bytes) -> bytes:
            return (
                struct.pack(">I", len(data))
                + kind
                + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
            )

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b"")
        )


@dataclass
class Series:
    label: str
    color: Color
    points: list[tuple[float, float]]  # (x, y); y > 0 (log axis)
    dash: int = 0


@dataclass
class HLine:
    label: str
    color: Color
    y: float


def _nice_step(span: float) -> float:
    raw = span / 6
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return float(m * mag)
    return float(10 * mag)


def line_chart(
    path: Path,
    title: str,
    x_label: str,
    y_label: str,
    series: Sequence[Series],
    hlines: Sequence[HLine] = (),
    width: int = 1000,
    height: int = 620,
) -> None:
    """Writes a PNG line chart with a linear x axis and a log10 y axis."""
    c = Canvas(width, height)
    left, right, top, bottom = 90, width - 250, 75, height - 70
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points if y > 0] + [h.y for h in hlines]
    x_max = max(xs) * 1.05 if xs else 1.0
    x_min = 0.0
    y_lo = 10 ** math.floor(math.log10(min(ys))) if ys else 1.0
    y_hi = 10 ** math.ceil(math.log10(max(ys))) if ys else 10.0
    if y_hi <= y_lo:
        y_hi = y_lo * 10

    def px(x: float) -> int:
        return int(left + (x - x_min) / (x_max - x_min) * (right - left))

    def py(y: float) -> int:
        frac = (math.log10(max(y, y_lo)) - math.log10(y_lo)) / (math.log10(y_hi) - math.log10(y_lo))
        return int(bottom - frac * (bottom - top))

    grid, axis = (225, 225, 225), (60, 60, 60)
    decade = y_lo
    while decade <= y_hi * 1.0001:
        for m in range(1, 10):
            v = decade * m
            if v > y_hi * 1.0001:
                break
            c.line(left, py(v), right, py(v), grid if m > 1 else (190, 190, 190))
        label = f"{decade:g}"
        c.text(left - 10 - Canvas.text_width(label), py(decade) - 7, label, axis)
        decade *= 10
    step = _nice_step(x_max - x_min)
    tick = 0.0
    while tick <= x_max:
        c.line(px(tick), top, px(tick), bottom, grid)
        label = f"{tick:g}"
        c.text(px(tick) - Canvas.text_width(label) // 2, bottom + 10, label, axis)
        tick += step
    c.line(left, bottom, right, bottom, axis, 2)
    c.line(left, top, left, bottom, axis, 2)
    c.text(10, 12, title, (0, 0, 0), 2)
    c.text((left + right) // 2 - Canvas.text_width(x_label) // 2, bottom + 40, x_label, axis)
    c.text(10, top - 28, y_label, axis)

    for h in hlines:
        c.line(left, py(h.y), right, py(h.y), h.color, 1, dash=6)
    for s in series:
        pts = sorted((px(x), py(y)) for x, y in s.points if y > 0)
        for (x0, y0), (x1, y1) in itertools.pairwise(pts):
            c.line(x0, y0, x1, y1, s.color, 3, dash=s.dash)
        for x, y in pts:
            c.rect(x - 4, y - 4, x + 4, y + 4, s.color)

    ly = top
    for s in series:
        c.line(right + 20, ly + 7, right + 50, ly + 7, s.color, 3, dash=s.dash)
        c.text(right + 58, ly, s.label, (0, 0, 0))
        ly += 26
    for h in hlines:
        c.line(right + 20, ly + 7, right + 50, ly + 7, h.color, 1, dash=6)
        c.text(right + 58, ly, h.label, (0, 0, 0))
        ly += 26
    path.write_bytes(c.png())
