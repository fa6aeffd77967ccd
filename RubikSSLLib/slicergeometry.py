"""Between Slicer's volume nodes and our files: KJI arrays with an IJKToRAS matrix <-> LPS geometry.

Slicer hands a volume over as `arrayFromVolume(node)`, a (K, J, I) = (z, y, x) NumPy view, and
`node.GetIJKToRASMatrix()`, a 4x4 matrix mapping voxel indices (i, j, k) to RAS millimetres. Files (NRRD, NIfTI
through ITK) and this library use LPS: RAS and LPS differ by the sign of the first two world axes. These pure
functions carry the geometry across without Slicer, so they are tested here; the module only calls them.
"""

from __future__ import annotations

import numpy as np

from RubikSSLLib.errors import BadInput
from RubikSSLLib.geometry import Geometry

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray) -> Geometry:
    """The LPS Geometry of a grid whose 4x4 IJKToRAS matrix (i, j, k, 1) -> (R, A, S, 1) is given."""
    ijk_to_lps = RAS_FROM_LPS @ np.asarray(ijk_to_ras, dtype=float)
    axes = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise BadInput("volume geometry has a zero-length axis; fix the volume's spacing")
    direction = axes / spacing
    return Geometry(tuple(float(s) for s in spacing), tuple(float(v) for v in ijk_to_lps[:3, 3]),
                    tuple(float(v) for v in direction.ravel()))


def ijk_to_ras_from_geometry(geometry: Geometry) -> np.ndarray:
    """The 4x4 IJKToRAS matrix of an LPS Geometry (what `node.SetIJKToRASMatrix` takes)."""
    return RAS_FROM_LPS @ geometry.ijk_to_lps()


def crop_to_ras_box(array_kji: np.ndarray, ijk_to_ras: np.ndarray, ras_bounds: tuple[float, ...],
                    margin_voxels: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The part of a volume inside an axis-aligned RAS box, and its own IJKToRAS.

    array_kji: (K, J, I) voxels as Slicer gives them. ras_bounds: (R_min, R_max, A_min, A_max, S_min, S_max) mm,
    e.g. a markups ROI's `GetRASBounds`. The crop is the smallest index box holding all 8 box corners, grown by
    `margin_voxels` and clipped to the volume; an oblique volume is cropped to the box's bounding index range.
    """
    low, high = np.asarray(ras_bounds[0::2], float), np.asarray(ras_bounds[1::2], float)
    corners = np.array([[x, y, z, 1.0] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])
    ijk = (np.linalg.inv(ijk_to_ras) @ corners.T)[:3].T
    shape_ijk = np.array(array_kji.shape[:3][::-1])
    start = np.clip(np.floor(ijk.min(axis=0)).astype(int) - margin_voxels, 0, shape_ijk)
    stop = np.clip(np.ceil(ijk.max(axis=0)).astype(int) + 1 + margin_voxels, 0, shape_ijk)
    if np.any(stop - start < 1):
        raise BadInput("the ROI does not overlap the volume; place the ROI over the volume")
    cropped = array_kji[start[2]:stop[2], start[1]:stop[1], start[0]:stop[0]]
    moved = np.array(ijk_to_ras, dtype=float)
    moved[:3, 3] = (ijk_to_ras @ np.append(start, 1.0))[:3]
    return cropped, moved
