"""Restoration in the style of Models Genesis (Zhou et al., MICCAI 2019): a nonlinear intensity remap, local voxel
shuffling and in-/out-painting corrupt the crop; the U-Net restores all of it."""

from __future__ import annotations

import numpy as np

from RubikSSLLib.tasks.restoration import RestorationTask

# probabilities of the Models Genesis recipe
NONLINEAR, LOCAL_SHUFFLE, PAINTING, INPAINTING_SHARE = 0.9, 0.5, 0.9, 0.2


def nonlinear_remap(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """x in [0, 1] through a random monotone cubic Bezier curve from (0, 0) to (1, 1) (flipped half the time)."""
    p1, p2 = rng.random(2), rng.random(2)
    t = np.linspace(0, 1, 1000)
    curve = [(1 - t) ** 3 * 0 + 3 * (1 - t) ** 2 * t * a + 3 * (1 - t) * t**2 * b + t**3 for a, b in zip(p1, p2)]
    xs, ys = np.sort(curve[0]), np.sort(curve[1])
    if rng.random() < 0.5:
        ys = ys[::-1]
    return np.interp(x, xs, ys).astype(np.float32)


# Ours, not MONAI's RandCoarseShuffle / RandCoarseDropout: measured with MONAI 1.6.1 on a (1, 32, 32, 32) crop,
# RandCoarseShuffle(holes=100) changed 0 voxels and in-painting RandCoarseDropout(fill_value=(0, 1)) changed 0 voxels
# in 6 of 6 seeds (only its out-painting mode worked), which would silently turn most of this task into copying.


def local_shuffle(x: np.ndarray, rng: np.random.Generator, blocks: int = 100) -> np.ndarray:
    """Shuffle the voxels inside `blocks` small random boxes (edges up to 1/8 of the crop)."""
    out = x.copy()
    shape = np.array(x.shape[1:])
    for _ in range(blocks):
        size = rng.integers(1, np.maximum(shape // 8, 2) + 1)
        start = rng.integers(0, shape - size + 1)
        box = (slice(None),) + tuple(slice(int(a), int(a + s)) for a, s in zip(start, size))
        patch = out[box].reshape(x.shape[0], -1)
        out[box] = patch[:, rng.permutation(patch.shape[1])].reshape(out[box].shape)
    return out


def paint(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """In-painting (up to 5 boxes filled with noise) or out-painting (noise everywhere but one box)."""
    shape = np.array(x.shape[1:])
    noise = rng.random(x.shape, dtype=np.float32)
    if rng.random() < INPAINTING_SHARE:
        out = x.copy()
        for _ in range(int(rng.integers(1, 6))):
            size = rng.integers(shape // 6 + 1, shape // 3 + 2)
            start = rng.integers(3, np.maximum(shape - size - 2, 4))
            box = (slice(None),) + tuple(slice(int(a), int(a + s)) for a, s in zip(start, size))
            out[box] = noise[box]
        return out
    size = rng.integers(shape * 3 // 8, shape * 7 // 8 + 1)
    start = rng.integers(0, shape - size + 1)
    box = (slice(None),) + tuple(slice(int(a), int(a + s)) for a, s in zip(start, size))
    out = noise
    out[box] = x[box]
    return out


class GenesisTask(RestorationTask):
    name = "genesis"

    def corrupt(self, crop: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        x = (crop + 1) / 2  # the recipe works on [0, 1]
        if rng.random() < NONLINEAR:
            x = nonlinear_remap(x, rng)
        if rng.random() < LOCAL_SHUFFLE:
            x = local_shuffle(x, rng)
        if rng.random() < PAINTING:
            x = paint(x, rng)
        return (x * 2 - 1).astype(np.float32), np.ones((1,) + crop.shape[1:], dtype=np.float32)

    def card(self) -> dict:
        return {"restoration": {"nonlinear": NONLINEAR, "local_shuffle": LOCAL_SHUFFLE, "painting": PAINTING,
                                "inpainting_share": INPAINTING_SHARE}}
