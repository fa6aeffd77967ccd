"""The Rubik's cube puzzle (Zhuang et al., MICCAI 2019) as array operations.

A crop of shape (C, Z, Y, X) = spec.crop_size is cut into a grid x grid x grid set of cells; one cube of
spec.cube_size sits in each cell at an offset in [0, jitter] per axis (random in training, centred in evaluation),
so neighbouring cubes are separated by a gap of 0..2*jitter voxels (mean = jitter). Cubes are numbered in C order
of their cell index (z, then y, then x).

Scrambling shuffles the cubes by row `k` of a permutation table (slot p receives original cube table[k][p]) and
rotates the cube in each slot by 180 degrees: rotation 1 ("hor") about the z axis (flips y and x), rotation 2
("ver") about the y axis (flips z and x), rotation 0 none. A 180-degree rotation flips two axes; flipping one
axis would be a mirror image, which no rotation produces.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from RubikSSLLib.errors import BadInput
from RubikSSLLib.options import option, voxel_triple

MAX_CROP_VOXELS = 256**3  # one puzzle's crop (64 MiB per channel as float32); the panel's largest cube is 128

ROTATION_NAMES = ("none", "hor: 180 deg about z", "ver: 180 deg about y")
# Array axes of one cube (C, Z, Y, X) that each rotation flips.
ROTATION_FLIP_AXES = {1: (-2, -1), 2: (-3, -1)}


@dataclass(frozen=True)
class PuzzleSpec:
    """Shape of the puzzle. Sizes are (z, y, x) in voxels."""

    grid: int = field(default=2, metadata=option("cubes per axis: 2 (2x2x2) or 3 (3x3x3)", choices=(2, 3)))
    cube_size: tuple[int, int, int] = field(default=(32, 32, 32), metadata=option(
        "voxels per cube, N or z,y,x (rpl and 3x3x3 grids: 24)", parse=voxel_triple))
    jitter: tuple[int, int, int] = field(default=(6, 6, 6), metadata=option(
        "max cube offset in its cell; gaps 0..2x", parse=voxel_triple))
    num_permutations: int = field(default=100, metadata=option(
        "K, size of the Hamming permutation table", flag="--permutations"))
    permutation_seed: int = 0

    def __post_init__(self) -> None:
        if self.grid not in (2, 3):
            raise BadInput(f"grid {self.grid} is not supported; use 2 (2x2x2, Rubik's cube) or 3 (3x3x3, jigsaw)")
        if min(self.cube_size) < 4 or min(self.jitter) < 0:
            raise BadInput(f"cube size {self.cube_size} / jitter {self.jitter}: cubes need >= 4 voxels and jitter >= 0")
        crop = self.crop_size
        if math.prod(crop) > MAX_CROP_VOXELS:
            raise BadInput(f"cube size {'x'.join(map(str, self.cube_size))} with jitter {'x'.join(map(str, self.jitter))}: "
                           f"each puzzle would be cut from a {'x'.join(map(str, crop))} crop ({math.prod(crop) / 1e6:.0f} M "
                           f"voxels, {math.prod(crop) * 4 / 2**30:.1f} GiB per channel); a crop holds at most "
                           f"{MAX_CROP_VOXELS / 1e6:.0f} M voxels (256^3): use a smaller --cube-size or --jitter")
        if not 2 <= self.num_permutations <= math.factorial(self.num_cubes):
            raise BadInput(f"{self.num_permutations} permutations: choose 2 .. {math.factorial(min(self.num_cubes, 12))}")

    @property
    def num_cubes(self) -> int:
        return self.grid**3

    @property
    def cell_size(self) -> tuple[int, int, int]:
        return tuple(c + j for c, j in zip(self.cube_size, self.jitter))

    @property
    def crop_size(self) -> tuple[int, int, int]:
        """Voxels (z, y, x) of the crop a puzzle is cut from."""
        return tuple(self.grid * s for s in self.cell_size)

    @property
    def min_volume_size(self) -> tuple[int, int, int]:
        """The smallest volume (z, y, x) the puzzle can be cut from: cubes touching, no gaps (padded up to the crop)."""
        return tuple(self.grid * c for c in self.cube_size)


@dataclass
class Puzzle:
    """One scrambled crop.

    cubes: (M, C, cz, cy, cx) float32; slot p holds original cube permutation[p], rotated by rotations[p].
    starts: (M, 3) int, (z, y, x) corner of each slot's cube inside the crop.
    """

    cubes: np.ndarray
    permutation_index: int
    permutation: np.ndarray
    rotations: np.ndarray
    starts: np.ndarray
    crop_size: tuple[int, int, int] = field(default=(0, 0, 0))

    def targets(self) -> dict[str, np.ndarray]:
        """Training targets: order class, and the two multi-hot rotation vectors (M,) of float32."""
        return {
            "order": np.int64(self.permutation_index),
            "hor": (self.rotations == 1).astype(np.float32),
            "ver": (self.rotations == 2).astype(np.float32),
        }


def _all_or_sampled_permutations(num_cubes: int, rng: np.random.Generator, pool: int = 40320) -> np.ndarray:
    if math.factorial(num_cubes) <= 400_000:
        return np.array(list(itertools.permutations(range(num_cubes))), dtype=np.int16)
    return np.array([rng.permutation(num_cubes) for _ in range(pool)], dtype=np.int16)


def permutation_table(num_cubes: int = 8, count: int = 100, seed: int = 0) -> np.ndarray:
    """`count` permutations of `num_cubes`, chosen greedily to maximise the minimum Hamming distance.

    Starts from the identity; each step adds the candidate farthest (in minimum Hamming distance) from all chosen
    ones, ties broken by a Generator seeded with `seed`, so the table is a pure function of its arguments.
    Returns (count, num_cubes) int64.
    """
    rng = np.random.default_rng(seed)
    candidates = _all_or_sampled_permutations(num_cubes, rng)
    identity = np.arange(num_cubes)
    chosen = [identity]
    distance = np.count_nonzero(candidates != identity, axis=1)
    for _ in range(count - 1):
        best = np.flatnonzero(distance == distance.max())
        pick = candidates[rng.choice(best)]
        chosen.append(pick)
        distance = np.minimum(distance, np.count_nonzero(candidates != pick, axis=1))
    return np.array(chosen, dtype=np.int64)


def min_pairwise_hamming(table: np.ndarray) -> int:
    """Smallest Hamming distance between two different rows of `table` (K, M)."""
    distances = np.count_nonzero(table[:, None, :] != table[None, :, :], axis=2)
    return int(distances[~np.eye(len(table), dtype=bool)].min())


def cube_starts(spec: PuzzleSpec, rng: np.random.Generator | None) -> np.ndarray:
    """(M, 3) (z, y, x) corner of every cube in the crop: random offsets with `rng`, centred offsets without."""
    cells = np.stack(np.unravel_index(np.arange(spec.num_cubes), (spec.grid,) * 3), axis=1)
    jitter = np.array(spec.jitter)
    offsets = jitter // 2 if rng is None else rng.integers(0, jitter + 1, size=(spec.num_cubes, 3))
    return cells * np.array(spec.cell_size) + offsets


def extract_cubes(crop: np.ndarray, starts: np.ndarray, cube_size: tuple[int, int, int]) -> np.ndarray:
    """Gather (M, C, cz, cy, cx) cubes from a (C, Z, Y, X) crop in one vectorised indexing operation."""
    windows = np.lib.stride_tricks.sliding_window_view(crop, cube_size, axis=(1, 2, 3))
    return np.moveaxis(windows[:, starts[:, 0], starts[:, 1], starts[:, 2]], 1, 0)


def rotate(cubes: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """Apply rotation class rotations[p] to cubes[p] of (M, C, cz, cy, cx); the classes are their own inverse."""
    out = np.array(cubes, copy=True)
    for label, axes in ROTATION_FLIP_AXES.items():
        chosen = rotations == label
        if chosen.any():
            out[chosen] = np.flip(cubes[chosen], axis=axes)
    return out


def normalise_cubes(cubes: np.ndarray, low: np.ndarray | None = None, high: np.ndarray | None = None,
                    eps: float = 1e-6) -> np.ndarray:
    """Scale each cube and channel of (M, C, ...) to [-1, 1] (the paper's recipe); a constant cube becomes 0.

    With per-channel `low`/`high` (C,) the values are first clipped to [low, high]: the same result as mapping
    the volume to [0, 1] with that window and then scaling, since the map is monotone, in fewer passes.
    Works in place on float32 input."""
    cubes = cubes.astype(np.float32, copy=False)
    axes = tuple(range(2, cubes.ndim))
    shape = (1, -1) + (1,) * (cubes.ndim - 2)
    cube_low = cubes.min(axis=axes, keepdims=True)
    cube_high = cubes.max(axis=axes, keepdims=True)
    tolerance = eps
    if low is not None and high is not None:
        low, high = np.reshape(low, shape).astype(np.float32), np.reshape(high, shape).astype(np.float32)
        cube_low, cube_high = np.clip(cube_low, low, high), np.clip(cube_high, low, high)
        np.clip(cubes, cube_low, cube_high, out=cubes)
        tolerance = eps * np.maximum(high - low, eps)
    span = cube_high - cube_low
    flat = span < tolerance
    scale = np.where(flat, 0.0, 2.0 / np.where(flat, 1.0, span)).astype(np.float32)
    cubes -= cube_low
    cubes *= scale
    cubes -= np.where(flat, 0.0, 1.0).astype(np.float32)
    return cubes


def gather_cubes(volume: np.ndarray, corners: np.ndarray, cube_size: tuple[int, int, int], order: np.ndarray,
                 rotations: np.ndarray) -> np.ndarray:
    """(M, C, cz, cy, cx) float32 with slot p = cube order[p] of `volume` (C, Z, Y, X), rotated by rotations[p].

    corners: (M, 3) (z, y, x) first voxel of each cube in `volume`. One copy per cube, flips taken as views."""
    out = np.empty((len(order), volume.shape[0], *cube_size), dtype=np.float32)
    for slot, (source, rotation) in enumerate(zip(order, rotations)):
        z, y, x = corners[source]
        cube = volume[:, z : z + cube_size[0], y : y + cube_size[1], x : x + cube_size[2]]
        out[slot] = np.flip(cube, ROTATION_FLIP_AXES[rotation]) if rotation in ROTATION_FLIP_AXES else cube
    return out


def scramble(
    volume: np.ndarray, spec: PuzzleSpec, table: np.ndarray, rng: np.random.Generator, train: bool = True,
    normalise: bool = True, crop_start: tuple[int, int, int] = (0, 0, 0),
    window: tuple[np.ndarray, np.ndarray] | None = None, rotate: bool = True, turn: bool = True,
) -> Puzzle:
    """Cut the crop of spec.crop_size at `crop_start` of `volume` (C, Z, Y, X) into cubes, shuffle them by a
    uniformly drawn table row and rotate them. normalise: scale each cube to [-1, 1], after clipping to the
    per-channel `window` (low, high) if given. rotate=False leaves every cube unrotated (a plain jigsaw).
    turn=False draws the rotations but leaves the cubes unturned, for a caller that turns them itself
    (devicepuzzle.finish, on the device): the returned `rotations` are still what the cubes must be turned by."""
    start = np.asarray(crop_start)
    if (start < 0).any() or (start + spec.crop_size > np.array(volume.shape[1:])).any():
        raise ValueError(f"crop at {tuple(start)} of size {spec.crop_size} exceeds the volume {volume.shape[1:]}")
    starts = cube_starts(spec, rng if train else None)
    index = int(rng.integers(0, len(table)))  # high is exclusive: every row, the last included
    permutation = table[index]
    rotations = rng.integers(0, 3, size=spec.num_cubes).astype(np.int64) * int(rotate)  # drawn either way: same stream
    cubes = gather_cubes(volume, starts + start, spec.cube_size, permutation, rotations if turn else np.zeros_like(rotations))
    if normalise:
        cubes = normalise_cubes(cubes, *(window or (None, None)))
    return Puzzle(cubes, index, permutation, rotations, starts, spec.crop_size)


def recover(cubes: np.ndarray, permutation: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """Undo a scramble: un-rotate each slot, then put slot p back at original position permutation[p]."""
    unrotated = rotate(cubes, rotations)
    original = np.empty_like(unrotated)
    original[permutation] = unrotated
    return original


def assemble(cubes: np.ndarray, starts: np.ndarray, crop_size: tuple[int, int, int], fill: float = 0.0) -> np.ndarray:
    """Place cubes (M, C, cz, cy, cx) at `starts` in a (C, *crop_size) volume; gaps get `fill`."""
    volume = np.full((cubes.shape[1], *crop_size), fill, dtype=cubes.dtype)
    size = cubes.shape[2:]
    for cube, (z, y, x) in zip(cubes, starts):
        volume[:, z : z + size[0], y : y + size[1], x : x + size[2]] = cube
    return volume


def cube_labelmap(starts: np.ndarray, cube_size: tuple[int, int, int], crop_size: tuple[int, int, int],
                  labels: np.ndarray) -> np.ndarray:
    """(Z, Y, X) uint8 map: labels[p] on the voxels of the cube in slot p, 0 in the gaps."""
    labelmap = np.zeros(crop_size, dtype=np.uint8)
    for label, (z, y, x) in zip(labels, starts):
        labelmap[z : z + cube_size[0], y : y + cube_size[1], x : x + cube_size[2]] = label
    return labelmap


def rotation_classes(hor_prob: np.ndarray, ver_prob: np.ndarray) -> np.ndarray:
    """Per-cube rotation class from the two sigmoid outputs: the more confident one above 0.5, else none."""
    hor_prob, ver_prob = np.asarray(hor_prob), np.asarray(ver_prob)
    return np.where((hor_prob > 0.5) & (hor_prob >= ver_prob), 1, np.where(ver_prob > 0.5, 2, 0))
