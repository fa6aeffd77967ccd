"""Where a voxel grid sits in LPS space: numpy only, so the Slicer panel imports it without SimpleITK.

Tuples are in (x, y, z) = (i, j, k) order, the reverse of the array axes (Z, Y, X).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Geometry:
    """Placement of a voxel grid in LPS space.

    spacing_xyz: voxel size in mm along i, j, k.
    origin_xyz: LPS position (mm) of the centre of voxel (0, 0, 0).
    direction: 3x3 row-major matrix whose columns are the i, j, k axis directions in LPS.
    """

    spacing_xyz: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin_xyz: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def shifted(self, start_zyx: tuple[int, int, int]) -> Geometry:
        """Geometry of a sub-grid whose first voxel is array index `start_zyx` of this grid."""
        index_xyz = np.array(start_zyx[::-1], dtype=float)
        offset = np.reshape(self.direction, (3, 3)) @ (index_xyz * np.array(self.spacing_xyz))
        return Geometry(self.spacing_xyz, tuple(float(v) for v in np.add(self.origin_xyz, offset)), self.direction)

    def matches(self, other: Geometry, tolerance: float = 1e-3) -> bool:
        """Same grid up to `tolerance` (relative for spacing, mm for origin, absolute for direction)."""
        return (
            np.allclose(self.spacing_xyz, other.spacing_xyz, rtol=tolerance)
            and np.allclose(self.origin_xyz, other.origin_xyz, atol=tolerance * max(1.0, *self.spacing_xyz))
            and np.allclose(self.direction, other.direction, atol=tolerance)
        )

    def to_json(self) -> dict:
        return {"spacing_xyz": list(self.spacing_xyz), "origin_xyz": list(self.origin_xyz), "direction": list(self.direction)}

    def ijk_to_lps(self) -> np.ndarray:
        """The 4x4 matrix mapping voxel indices (i, j, k, 1) to LPS mm: the one place LPS <-> IJK is defined."""
        matrix = np.eye(4)
        matrix[:3, :3] = np.reshape(self.direction, (3, 3)) * np.asarray(self.spacing_xyz)
        matrix[:3, 3] = self.origin_xyz
        return matrix


TIE_MARGIN = 1e-6  # voxels: a point half-way between two voxel centres goes to the higher index, by this margin


def nearest_index(continuous: np.ndarray) -> np.ndarray:
    """The index of the nearest voxel centre for continuous voxel indices: the one rounding rule of labels and
    clicks. Half-way goes up (as ITK's nearest neighbour does) by a margin that floating-point noise cannot cross,
    so a header rotation that leaves the voxels alone cannot flip a tie."""
    return np.floor(np.asarray(continuous, dtype=float) + 0.5 + TIE_MARGIN).astype(np.int64)


def aligned_grid(size_xyz: tuple[int, ...], geometry: Geometry, spacing_mm: float) -> tuple[tuple[int, ...], Geometry]:
    """The grid at isotropic `spacing_mm` over an image's extent (size (x, y, z), `geometry`): its voxel faces
    start where the image's do, and it has as many voxels as fit, the last one if its centre lies inside.

    Face-aligned, every image voxel centre lies inside one grid voxel and never half-way between two when the
    spacings are whole multiples of each other (1 mm -> 2 mm: each 2 mm voxel holds 2x2x2 whole 1 mm voxels),
    so labels come back to the image's voxels without a shift. Returns (size (x, y, z), geometry)."""
    old = np.asarray(geometry.spacing_xyz, dtype=float)
    extent = np.asarray(size_xyz, dtype=float) * old
    size = tuple(max(1, int(math.floor(e / spacing_mm + 0.5))) for e in extent)
    offset = np.reshape(geometry.direction, (3, 3)) @ ((spacing_mm - old) / 2)
    origin = tuple(float(v) for v in np.asarray(geometry.origin_xyz) + offset)
    return size, Geometry((float(spacing_mm),) * 3, origin, tuple(geometry.direction))


def index_mapping(source: Geometry, source_size_zyx: tuple[int, ...], target: Grid) -> list[np.ndarray] | None:
    """For grids that differ only by axis order, flips, spacing and shift (a network grid and the file's own):
    for each target array axis, the nearest source index of each target index (nearest_index, clipped to the
    source: the edge voxels extend outward), in source array axis order, and the axis order. None if the grids
    are oblique to each other."""
    mapping = np.linalg.inv(source.ijk_to_lps()) @ target.geometry.ijk_to_lps()
    linear = mapping[:3, :3]
    source_axis = np.argmax(np.abs(linear), axis=0)  # target ijk axis t -> source ijk axis
    if sorted(source_axis.tolist()) != [0, 1, 2]:
        return None
    rest = linear.copy()
    rest[source_axis, [0, 1, 2]] = 0
    if np.abs(rest).max() > 1e-6 * np.abs(linear).max():
        return None
    target_size_ijk, source_size_ijk = target.size_zyx[::-1], source_size_zyx[::-1]
    vectors: dict[int, tuple[int, np.ndarray]] = {}
    for t in range(3):
        s = int(source_axis[t])
        continuous = linear[s, t] * np.arange(target_size_ijk[t]) + mapping[s, 3]
        vectors[s] = (t, np.clip(nearest_index(continuous), 0, source_size_ijk[s] - 1))
    return [vectors[s] for s in (2, 1, 0)]  # source array axes z, y, x: (target ijk axis, indices)


def nearest_onto(array_zyx: np.ndarray, source: Geometry, target: Grid) -> np.ndarray | None:
    """`array_zyx` on grid `source` resampled onto `target` by nearest_index (None if oblique to each other)."""
    vectors = index_mapping(source, array_zyx.shape, target)
    if vectors is None:
        return None
    gathered = array_zyx[np.ix_(*(indices for _, indices in vectors))]
    target_axes = [2 - t for t, _ in vectors]  # target array axis of each gathered axis
    return np.ascontiguousarray(np.transpose(gathered, np.argsort(target_axes)))


@dataclass(frozen=True)
class Grid:
    """A voxel grid without voxels: its size (z, y, x) and its placement. Resampling onto it needs no image."""

    size_zyx: tuple[int, int, int]
    geometry: Geometry


