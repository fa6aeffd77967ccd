"""Where a voxel grid sits in LPS space: numpy only, so the Slicer panel imports it without SimpleITK.

Tuples are in (x, y, z) = (i, j, k) order, the reverse of the array axes (Z, Y, X).
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class Grid:
    """A voxel grid without voxels: its size (z, y, x) and its placement. Resampling onto it needs no image."""

    size_zyx: tuple[int, int, int]
    geometry: Geometry


