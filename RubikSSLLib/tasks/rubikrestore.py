"""Rubik's cube++ in the spirit of Tao et al. (MICCAI 2020): the Rubik's cube as restoration. The crop is cut into a
2x2x2 grid of touching cubes, shuffled by a Hamming-selected permutation and turned 180 degrees per cube, then put
back together; the U-Net restores the original crop (every voxel counts), so its decoder is pretrained too."""

from __future__ import annotations

import numpy as np

from RubikSSLLib import puzzle
from RubikSSLLib.tasks.restoration import RestorationTask


class RubikRestorationTask(RestorationTask):
    name = "rubik++"

    def __init__(self, config) -> None:
        super().__init__(config)
        spec = config.puzzle
        self.table = puzzle.permutation_table(8, spec.num_permutations, spec.permutation_seed)

    def scramble(self, crop: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int, np.ndarray]:
        """crop (C, Z, Y, X), even sizes -> (scrambled crop, permutation row, (8,) rotation classes)."""
        cube = tuple(s // 2 for s in crop.shape[1:])
        corners = np.stack(np.unravel_index(np.arange(8), (2, 2, 2)), axis=1) * np.array(cube)
        index = int(rng.integers(0, len(self.table)))
        rotations = rng.integers(0, 3, size=8)
        cubes = puzzle.gather_cubes(crop, corners, cube, self.table[index], rotations)
        return puzzle.assemble(cubes, corners, crop.shape[1:]), index, rotations

    def corrupt(self, crop: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        scrambled, _, _ = self.scramble(crop, rng)
        return scrambled, np.ones((1, *crop.shape[1:]), dtype=np.float32)

    def card(self) -> dict:
        # not under "permutations": that key marks a model that solves puzzles (rubik, jigsaw)
        return {"restoration": {"grid": 2, "rotations": "180 deg about z or y", "permutation_table": self.table.tolist()}}
