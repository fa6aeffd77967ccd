"""From loaded cases to an endless stream of puzzles: padding, foreground crops, seeded randomness."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from RubikSSLLib import intensity, puzzle
from RubikSSLLib.errors import BadInput
from RubikSSLLib.volumes import Geometry, Volume


@dataclass
class PreparedCase:
    """A case ready for cropping.

    array: (C, Z, Y, X) raw values (any dtype), padded to at least the crop size.
    geometry: the geometry of `array` (padding included).
    mapping: per-channel intensity map applied to each crop.
    fg_start, fg_stop: (z, y, x) foreground bounding box in `array`.
    """

    name: str
    array: np.ndarray
    geometry: Geometry
    mapping: intensity.IntensityMap
    fg_start: np.ndarray
    fg_stop: np.ndarray


def prepare(volume: Volume, spec: puzzle.PuzzleSpec, recipe: intensity.IntensityRecipe) -> PreparedCase:
    """Check the size, fit the intensity map, pad thin volumes with background, find the foreground box."""
    shape = np.array(volume.array.shape[1:])
    minimum = np.array(spec.min_volume_size)
    if (shape < minimum).any():
        raise BadInput(
            f"{volume.name}: is {'x'.join(map(str, shape))} voxels (z, y, x) after resampling; the puzzle needs at least "
            f"{'x'.join(map(str, minimum))}; use a smaller --cube-size or a finer --spacing"
        )
    mapping = intensity.fit(volume.array, recipe)
    pad_before = np.maximum(np.array(spec.crop_size) - shape, 0) // 2
    pad_after = np.maximum(np.array(spec.crop_size) - shape, 0) - pad_before
    array, geometry = volume.array, volume.geometry
    if pad_before.any() or pad_after.any():
        padding = [(0, 0)] + list(zip(pad_before, pad_after))
        array = np.stack([np.pad(c, padding[1:], constant_values=low) for c, low in zip(array, mapping.low)])
        geometry = geometry.shifted(tuple(-pad_before))
    fg_start, fg_stop = intensity.foreground_box(mapping.apply(array[:, ::2, ::2, ::2]))
    return PreparedCase(volume.name, array, geometry, mapping, fg_start * 2, np.minimum(fg_stop * 2, array.shape[1:]))


def crop_start(case: PreparedCase, crop_size: tuple[int, int, int], rng: np.random.Generator | None) -> np.ndarray:
    """(z, y, x) corner of a crop whose centre is uniform in the foreground box (its middle without `rng`),
    kept inside the volume."""
    size = np.array(crop_size)
    if rng is None:
        centre = (case.fg_start + case.fg_stop) // 2
    else:
        centre = rng.integers(case.fg_start, np.maximum(case.fg_stop, case.fg_start + 1))
    return np.clip(centre - size // 2, 0, np.array(case.array.shape[1:]) - size)


def make_puzzle(case: PreparedCase, spec: puzzle.PuzzleSpec, table: np.ndarray, rng: np.random.Generator,
                train: bool) -> puzzle.Puzzle:
    """A puzzle from a random foreground crop; `train` draws random gaps, otherwise gaps are centred. The case's
    intensity window is applied to the cubes only (not to the whole crop)."""
    start = crop_start(case, spec.crop_size, rng)
    return puzzle.scramble(case.array, spec, table, rng, train=train, crop_start=tuple(start),
                           window=(case.mapping.low, case.mapping.high))


def to_sample(item: puzzle.Puzzle) -> dict[str, torch.Tensor]:
    targets = item.targets()
    return {
        "cubes": torch.from_numpy(np.ascontiguousarray(item.cubes)),
        "order": torch.as_tensor(targets["order"]),
        "hor": torch.from_numpy(targets["hor"]),
        "ver": torch.from_numpy(targets["ver"]),
        "rotations": torch.from_numpy(item.rotations),
    }


class PuzzleStream(torch.utils.data.IterableDataset):
    """Endless training puzzles. Each (rank, worker, start step) draws from its own seeded Generator."""

    def __init__(self, cases: list[PreparedCase], spec: puzzle.PuzzleSpec, table: np.ndarray, seed: int,
                 rank: int = 0, start_step: int = 0) -> None:
        super().__init__()
        self.cases, self.spec, self.table = cases, spec, table
        self.seed, self.rank, self.start_step = seed, rank, start_step

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        rng = np.random.default_rng([self.seed, self.rank, worker, self.start_step])
        while True:
            case = self.cases[int(rng.integers(len(self.cases)))]
            yield to_sample(make_puzzle(case, self.spec, self.table, rng, train=True))


def fixed_puzzles(cases: list[PreparedCase], spec: puzzle.PuzzleSpec, table: np.ndarray, count: int,
                  seed: int) -> list[dict[str, torch.Tensor]]:
    """`count` evaluation puzzles, the same for a seed: centred gaps, crops drawn from each case's foreground."""
    rng = np.random.default_rng([seed, 7919])
    return [to_sample(make_puzzle(cases[i % len(cases)], spec, table, rng, train=False)) for i in range(count)]
