"""PNG montage of a puzzle: three orthogonal mid-slices (rows) of original | scrambled | recovered (columns)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from RubikSSLLib.files import atomic_path


def _orthogonal_slices(volume: np.ndarray, at_zyx: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial, coronal, sagittal slices through `at_zyx` of a canonical LPS (Z, Y, X) volume, radiological display:
    patient right on the image left, anterior / superior up."""
    z, y, x = at_zyx
    return [volume[z], volume[::-1, y, :], volume[::-1, :, x]]


def _to_uint8(image: np.ndarray, low: float, high: float) -> np.ndarray:
    return (np.clip((image - low) / max(high - low, 1e-6), 0, 1) * 255).astype(np.uint8)


def montage(columns: list[np.ndarray], at_zyx: tuple[int, int, int], zoom: int = 2, separator: int = 2) -> np.ndarray:
    """(H, W) uint8 grid: one column per (Z, Y, X) volume, one row per orientation (slices through `at_zyx`, e.g.
    the middle of the first cube layer: mid-slices of a puzzle fall in the gap); each column gets its own 1-99%
    window, because the scrambled cubes are rescaled to [-1, 1] while the original keeps its intensities."""
    windows = [np.percentile(v, [1, 99]) for v in columns]
    rows = []
    for row in zip(*(_orthogonal_slices(v, at_zyx) for v in columns)):
        height = max(s.shape[0] for s in row)
        tiles = []
        for tile, (low, high) in zip(row, windows):
            tile = _to_uint8(tile, low, high)
            tile = np.pad(tile, ((0, height - tile.shape[0]), (0, separator)), constant_values=255)
            tiles.append(tile)
        rows.append(np.pad(np.concatenate(tiles, axis=1), ((0, separator), (0, 0)), constant_values=255))
    width = max(r.shape[1] for r in rows)
    grid = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1])), constant_values=255) for r in rows])
    return np.kron(grid, np.ones((zoom, zoom), dtype=np.uint8))


def write_png(path: str | Path, image: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
