"""Click guidance for interactive segmentation: the maps the network reads, and where a simulated user clicks.

Guidance maps: two channels (include, exclude) on the network's grid, a Gaussian of `SIGMA_VOXELS` around each
click, combined by maximum so every click peaks at exactly 1 however many there are (DeepGrow normalises the
whole map instead, which dims old clicks when a new one lands; nnInteractive also keeps peaks at 1), and exactly 0
beyond 3 sigma. Simulated clicks follow DeepEdit / SAM-Med3D's "ritm" clicker: the first one inside the object,
each further one in the largest error component (a missed part -> include, a false part -> exclude), at the point
farthest from that component's border, or with an `rng` anywhere deeper than half that distance.
Arrays are (Z, Y, X); points are voxel indices (z, y, x). No torch.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SIGMA_VOXELS = 3.0  # DeepEdit's default (DeepGrow: 2)
CHANNELS = ("include", "exclude")
VoxelClick = tuple[tuple[int, int, int], bool]  # (z, y, x), include


def _kernel(sigma: float) -> np.ndarray:
    radius = int(np.ceil(3 * sigma))
    axis = np.arange(-radius, radius + 1, dtype=np.float32)
    squared = axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2
    kernel = np.exp(-squared / (2 * sigma**2)).astype(np.float32)
    kernel[squared > (3 * sigma) ** 2] = 0.0
    return kernel


def guidance_maps(shape_zyx: tuple[int, int, int], clicks: list[VoxelClick], sigma: float = SIGMA_VOXELS) -> np.ndarray:
    """(2, Z, Y, X) float32: channel 0 include, channel 1 exclude; 1 at each click, 0 where no click is near.
    Clicks outside the array are left out (a crop that does not hold them)."""
    maps = np.zeros((2, *shape_zyx), dtype=np.float32)
    kernel = _kernel(sigma)
    radius = kernel.shape[0] // 2
    for point, include in clicks:
        centre = np.asarray(point, dtype=int)
        if np.any(centre < 0) or np.any(centre >= shape_zyx):
            continue
        low, high = np.maximum(centre - radius, 0), np.minimum(centre + radius + 1, shape_zyx)
        target = maps[(0 if include else 1, *(slice(a, b) for a, b in zip(low, high)))]
        piece = kernel[tuple(slice(a - c + radius, b - c + radius) for a, b, c in zip(low, high, centre))]
        np.maximum(target, piece, out=target)
    return maps


def interior_point(mask: np.ndarray, rng: np.random.Generator | None = None) -> tuple[int, int, int] | None:
    """A voxel of `mask` (Z, Y, X bool) far from its border: the farthest (ties: the first), or, with `rng`, one
    drawn uniformly among those deeper than half the largest distance. None for an empty mask."""
    found = ndimage.find_objects(mask.astype(np.uint8))
    if not found or found[0] is None:
        return None
    box = found[0]
    part = np.pad(mask[box], 1)  # the array's edge counts as a border too
    distance = ndimage.distance_transform_edt(part)[1:-1, 1:-1, 1:-1]
    if rng is None:
        local = np.unravel_index(int(np.argmax(distance)), distance.shape)
    else:
        candidates = np.argwhere(distance > distance.max() / 2) if distance.max() > 1 else np.argwhere(distance > 0)
        local = candidates[int(rng.integers(len(candidates)))]
    return tuple(int(s.start + v) for s, v in zip(box, local))


def largest_error(prediction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, bool] | None:
    """The largest connected error component (Z, Y, X bool) and whether it is missed object (True: include click)
    or false object (False: exclude). None when the prediction is right everywhere."""
    best: tuple[int, np.ndarray, bool] | None = None
    for errors, include in ((truth & ~prediction, True), (prediction & ~truth, False)):
        if not errors.any():
            continue
        components, count = ndimage.label(errors)
        sizes = np.bincount(components.ravel())[1:]
        largest = int(np.argmax(sizes))
        if best is None or sizes[largest] > best[0]:
            best = (int(sizes[largest]), components == largest + 1, include)
    return None if best is None else (best[1], best[2])


def first_click(truth: np.ndarray, rng: np.random.Generator | None = None) -> VoxelClick | None:
    """An include click inside the object (`truth`, Z, Y, X bool), or None when the object is absent."""
    point = interior_point(truth, rng)
    return None if point is None else (point, True)


def corrective_click(prediction: np.ndarray, truth: np.ndarray, rng: np.random.Generator | None = None) -> VoxelClick | None:
    """The click a careful user makes next: inside the largest error, with its sign. None when nothing is wrong."""
    error = largest_error(prediction.astype(bool), truth.astype(bool))
    if error is None:
        return None
    component, include = error
    return interior_point(component, rng), include
