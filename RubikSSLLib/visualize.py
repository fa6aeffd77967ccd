"""PNG montages: three orthogonal slices (rows) of a few volumes (columns), each column titled.

For a puzzle: original | scrambled (what the network sees) | the network's solution (or, without a model, the
true unscrambling), each cube outlined in the colour the Slicer panel gives it (green: placed and turned right,
orange: placed but turned wrong, red: put in the wrong place), with a legend, so a newcomer can read it alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from RubikSSLLib.files import atomic_path

# The cube colours of the montage and of the panel's cube segments (RubikSSL/RubikSSLModuleLib/results.py), 0..1.
CUBE_COLOURS = {"correct": (0.2, 0.8, 0.2), "placed only": (1.0, 0.6, 0.0), "wrong": (0.9, 0.1, 0.1)}
LEGEND = {"correct": "placed and turned right", "placed only": "placed, turned wrong", "wrong": "wrong place"}
ROWS = ("axial", "coronal", "sagittal")
TITLE_HEIGHT, LABEL_WIDTH, LEGEND_HEIGHT = 20, 64, 20  # pixels (after zoom)
FONT_SIZE = 13


@dataclass(frozen=True)
class Box:
    """A cube to outline: its corner and size (z, y, x) in the volume, and a status key of CUBE_COLOURS."""

    start_zyx: tuple[int, int, int]
    size_zyx: tuple[int, int, int]
    status: str


def _orthogonal_slices(volume: np.ndarray, at_zyx: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial, coronal, sagittal slices through `at_zyx` of a canonical LPS (Z, Y, X) volume, radiological display:
    patient right on the image left, anterior / superior up."""
    z, y, x = at_zyx
    return [volume[z], volume[::-1, y, :], volume[::-1, :, x]]


def _box_rectangles(box: Box, at_zyx: tuple[int, int, int], depth: int) -> list[tuple[int, int, int, int] | None]:
    """(top, left, bottom, right) of a box's outline in each of the three slices, None where the slice misses it."""
    (z0, y0, x0), (dz, dy, dx) = box.start_zyx, box.size_zyx
    z, y, x = at_zyx
    flipped = (depth - z0 - dz, depth - 1 - z0)  # rows of the coronal and sagittal slices run superior first
    return [(y0, x0, y0 + dy - 1, x0 + dx - 1) if z0 <= z < z0 + dz else None,
            (flipped[0], x0, flipped[1], x0 + dx - 1) if y0 <= y < y0 + dy else None,
            (flipped[0], y0, flipped[1], y0 + dy - 1) if x0 <= x < x0 + dx else None]


def _to_rgb(image: np.ndarray, low: float, high: float) -> np.ndarray:
    grey = (np.clip((image - low) / max(high - low, 1e-6), 0, 1) * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def _outline(tile: np.ndarray, rectangle: tuple[int, int, int, int], colour: tuple[float, float, float]) -> None:
    top, left, bottom, right = rectangle
    rgb = (np.array(colour) * 255).astype(np.uint8)
    tile[top, left:right + 1] = tile[bottom, left:right + 1] = rgb
    tile[top:bottom + 1, left] = tile[top:bottom + 1, right] = rgb


def montage(columns: list[np.ndarray], at_zyx: tuple[int, int, int], titles: list[str] | None = None,
            boxes: list[list[Box]] | None = None, zoom: int | None = None, separator: int = 2) -> np.ndarray:
    """(H, W, 3) uint8: one column per (Z, Y, X) volume, one row per orientation (slices through `at_zyx`, e.g.
    the middle of the first cube layer: mid-slices of a puzzle fall in the gap), each column under its title and
    with its own 1-99 % window (scrambled cubes are rescaled to [-1, 1], the original keeps its intensities).
    boxes[c]: the cubes to outline in column c; a legend of the colours used is added below. zoom: pixels per
    voxel (default: enough for a column to be about 180 pixels wide, room for its title)."""
    zoom = zoom or max(2, -(-180 // max(v.shape[2] for v in columns)))
    windows = [np.percentile(v, [1, 99]) for v in columns]
    rows = []
    for orientation, row in enumerate(zip(*(_orthogonal_slices(v, at_zyx) for v in columns))):
        height = max(s.shape[0] for s in row)
        tiles = []
        for index, (tile, (low, high)) in enumerate(zip(row, windows)):
            tile = _to_rgb(tile, low, high)
            for box in (boxes[index] if boxes else []):
                rectangle = _box_rectangles(box, at_zyx, columns[index].shape[0])[orientation]
                if rectangle is not None:
                    _outline(tile, rectangle, CUBE_COLOURS[box.status])
            tiles.append(np.pad(tile, ((0, height - tile.shape[0]), (0, separator), (0, 0)), constant_values=255))
        rows.append(np.pad(np.concatenate(tiles, axis=1), ((0, separator), (0, 0), (0, 0)), constant_values=255))
    width = max(r.shape[1] for r in rows)
    grid = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])
    grid = np.repeat(np.repeat(grid, zoom, axis=0), zoom, axis=1)
    used = sorted({box.status for column in (boxes or []) for box in column}, key=list(CUBE_COLOURS).index)
    return _annotate(grid, [c.shape[2] * zoom + separator * zoom for c in columns],
                     [s.shape[0] * zoom + separator * zoom for s in _orthogonal_slices(columns[0], at_zyx)],
                     titles or [], used)


def _annotate(grid: np.ndarray, column_widths: list[int], row_heights: list[int], titles: list[str],
              statuses: list[str]) -> np.ndarray:
    """The grid with the column titles above, the orientations to the left and the colour legend below."""
    from PIL import Image, ImageDraw

    height = TITLE_HEIGHT + grid.shape[0] + (LEGEND_HEIGHT if statuses else 0)
    canvas = Image.new("RGB", (LABEL_WIDTH + grid.shape[1], height), "white")
    canvas.paste(Image.fromarray(grid), (LABEL_WIDTH, TITLE_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    draw.font = _font()
    left = LABEL_WIDTH
    for title, width in zip(titles, column_widths):
        draw.text((left + 2, 3), title, fill="black")
        left += width
    top = TITLE_HEIGHT
    for name, row_height in zip(ROWS, row_heights):
        draw.text((4, top + row_height // 2 - 7), name, fill="black")
        top += row_height
    left, top = LABEL_WIDTH, TITLE_HEIGHT + grid.shape[0] + 2
    for status in statuses:
        colour = tuple(int(c * 255) for c in CUBE_COLOURS[status])
        draw.rectangle((left, top + 3, left + 11, top + 14), outline=colour, width=3)
        draw.text((left + 16, top + 1), LEGEND[status], fill="black")
        left += 16 + int(draw.textlength(LEGEND[status])) + 18
    return np.asarray(canvas)


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=FONT_SIZE)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def cube_statuses(placed: list[bool], oriented: list[bool]) -> list[str]:
    """Per scrambled slot: "correct", "placed only" or "wrong" (the panel's three colours)."""
    return ["correct" if p and o else "placed only" if p else "wrong" for p, o in zip(placed, oriented)]


def write_png(path: str | Path, image: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
