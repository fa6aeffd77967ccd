"""From loaded cases to an endless stream of puzzles: padding, foreground crops, seeded randomness."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

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


class CropShape(Protocol):
    """What a pretext task cuts from a case: crops of crop_size, from volumes of at least min_volume_size
    (thinner volumes are padded up to the crop). A PuzzleSpec is one."""

    crop_size: tuple[int, int, int]
    min_volume_size: tuple[int, int, int]


@dataclass(frozen=True)
class Crop:
    crop_size: tuple[int, int, int]
    min_volume_size: tuple[int, int, int]


def prepare(volume: Volume, spec: CropShape, recipe: intensity.IntensityRecipe) -> PreparedCase:
    """Check the size, fit the intensity map, pad thin volumes with background, find the foreground box."""
    shape = np.array(volume.array.shape[1:])
    minimum = np.array(spec.min_volume_size)
    if (shape < minimum).any():
        raise BadInput(
            f"{volume.name}: is {'x'.join(map(str, shape))} voxels (z, y, x) after resampling; the task's crop "
            f"needs at least {'x'.join(map(str, minimum))}; use a smaller --cube-size or a finer --spacing"
        )
    mapping = intensity.fit(volume.array, recipe)
    pad_before = np.maximum(np.array(spec.crop_size) - shape, 0) // 2
    pad_after = np.maximum(np.array(spec.crop_size) - shape, 0) - pad_before
    array, geometry = volume.array, volume.geometry
    if pad_before.any() or pad_after.any():
        padding = [(0, 0)] + list(zip(pad_before, pad_after))
        fill = np.zeros_like(mapping.low) if mapping.identity else mapping.low  # nnU-Net pads its inputs with 0
        array = np.stack([np.pad(c, padding[1:], constant_values=value) for c, value in zip(array, fill)])
        geometry = geometry.shifted(tuple(-pad_before))
    if mapping.identity:  # nnU-Net's preprocessing has cropped the volume to its foreground already
        fg_start, fg_stop = np.zeros(3, dtype=int), np.array(array.shape[1:]) // 2
    else:
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
                train: bool, rotate: bool = True, finish: bool = True) -> puzzle.Puzzle:
    """A puzzle from a random foreground crop; `train` draws random gaps, otherwise gaps are centred. The case's
    intensity window is applied to the cubes only (not to the whole crop). rotate=False: a plain jigsaw.
    finish=False: the cubes are only gathered (unturned, raw values) for devicepuzzle.finish to turn and scale
    with puzzle_window(case); the random draws are the same either way."""
    start = crop_start(case, spec.crop_size, rng)
    if case.mapping.identity or not finish:  # nnU-Net's intensities are the network's: no per-cube rescaling
        return puzzle.scramble(case.array, spec, table, rng, train=train, crop_start=tuple(start), normalise=False,
                               rotate=rotate, turn=finish)
    return puzzle.scramble(case.array, spec, table, rng, train=train, crop_start=tuple(start),
                           window=(case.mapping.low, case.mapping.high), rotate=rotate)


def puzzle_window(case: PreparedCase) -> np.ndarray | None:
    """(2, C) float32 (low, high) per channel that a puzzle's cubes are clipped to before scaling; None for
    nnU-Net-normalised cases, whose cubes are not rescaled."""
    if case.mapping.identity:
        return None
    return np.stack([np.asarray(case.mapping.low), np.asarray(case.mapping.high)]).astype(np.float32).reshape(2, -1)


def crop(case: PreparedCase, size: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """(C, *size) float32 crop around a random foreground point, as the network reads it (IntensityMap.to_network:
    mapped to [0, 1] and scaled to [-1, 1], or nnU-Net's values kept)."""
    start = crop_start(case, size, rng)
    box = (slice(None),) + tuple(slice(int(a), int(a) + s) for a, s in zip(start, size))
    return case.mapping.to_network(case.array[box])


def to_sample(item: puzzle.Puzzle, window: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """The puzzle's cubes and targets as tensors; `window` (2, C), when given, rides along for devicepuzzle.finish."""
    targets = item.targets()
    sample = {
        "cubes": torch.from_numpy(np.ascontiguousarray(item.cubes)),
        "order": torch.as_tensor(targets["order"]),
        "hor": torch.from_numpy(targets["hor"]),
        "ver": torch.from_numpy(targets["ver"]),
        "rotations": torch.from_numpy(item.rotations),
    }
    return sample if window is None else sample | {"window": torch.from_numpy(window)}


Sampler = Callable[[PreparedCase, np.random.Generator, bool], dict[str, torch.Tensor]]


class SampleStream(torch.utils.data.IterableDataset):
    """Endless training samples of a pretext task (`sample(case, rng, train=True)`). Each (rank, worker, start
    step) draws from its own seeded Generator, so a resumed run does not replay the samples it has seen."""

    def __init__(self, cases: list[PreparedCase], sample: Sampler, seed: int, rank: int = 0, start_step: int = 0) -> None:
        super().__init__()
        self.cases, self.sample = cases, sample
        self.seed, self.rank, self.start_step = seed, rank, start_step

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        rng = np.random.default_rng([self.seed, self.rank, worker, self.start_step])
        while True:
            yield self.sample(self.cases[int(rng.integers(len(self.cases)))], rng, True)


def fixed_samples(cases: list[PreparedCase], sample: Sampler, count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """`count` evaluation samples, the same for a seed, drawn from the cases in turn with `train=False`."""
    rng = np.random.default_rng([seed, 7919])
    return [sample(cases[i % len(cases)], rng, False) for i in range(count)]
