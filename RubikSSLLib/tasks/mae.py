"""Masked autoencoding for 3D CNNs (in the spirit of Wald et al., 2024): 75% of the 16^3 blocks of the crop are
zeroed; the U-Net restores them; the loss counts the masked voxels only."""

from __future__ import annotations

import numpy as np

from RubikSSLLib.tasks.restoration import RestorationTask

MASK_RATIO = 0.75
BLOCK = 16


def block_mask(shape: tuple[int, int, int], block: tuple[int, int, int], ratio: float, rng: np.random.Generator) -> np.ndarray:
    """(Z, Y, X) bool, True on exactly round(ratio x blocks) blocks of the grid of `block`-sized blocks."""
    grid = tuple(s // b for s, b in zip(shape, block))
    count = int(np.prod(grid))
    chosen = np.zeros(count, dtype=bool)
    chosen[rng.choice(count, size=round(ratio * count), replace=False)] = True
    mask = chosen.reshape(grid)
    for axis, size in enumerate(block):
        mask = np.repeat(mask, size, axis=axis)
    return np.pad(mask, [(0, s - m) for s, m in zip(shape, mask.shape)])


class MAETask(RestorationTask):
    name = "mae"

    def block_size(self) -> tuple[int, int, int]:
        return tuple(min(BLOCK, s // 4) for s in self.shape.crop_size)  # at least a 4x4x4 grid on small crops

    def corrupt(self, crop: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        mask = block_mask(crop.shape[1:], self.block_size(), MASK_RATIO, rng)
        return np.where(mask, np.float32(0), crop), mask[None]

    def card(self) -> dict:
        return {"restoration": {"mask_ratio": MASK_RATIO, "block_size": list(self.block_size())}}
