"""3D relative patch location (Taleb et al., NeurIPS 2020): a 3x3x3 grid of patches with random gaps; given the centre
patch and one of its 26 neighbours, name the neighbour's position (26-way). The pair goes through the shared encoder
as a two-cube Siamese network (the Rubik's cube network with M = 2 and K = 26)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from RubikSSLLib import puzzle, sampling
from RubikSSLLib.networks import RubikHead
from RubikSSLLib.tasks.base import PretextTask

CENTRE = 13  # cell (1, 1, 1) of the 3x3x3 grid in C order
NUM_POSITIONS = 26


def neighbour_cell(label: int) -> int:
    """Class 0..25 -> cell index 0..26 of the 3x3x3 grid (C order), skipping the centre."""
    return label if label < CENTRE else label + 1


def neighbour_offset(label: int) -> tuple[int, int, int]:
    """Class -> (dz, dy, dx) of the neighbour from the centre, each in {-1, 0, 1}."""
    return tuple(int(i) - 1 for i in np.unravel_index(neighbour_cell(label), (3, 3, 3)))


class RPLTask(PretextTask):
    name = "rpl"
    input_key = "cubes"
    primary_metric = "val_position_acc"

    @property
    def shape(self) -> puzzle.PuzzleSpec:
        """The grid of the puzzle settings, but always 3x3x3 (the volume must hold 3 touching patches per axis)."""
        spec = self.config.puzzle
        return puzzle.PuzzleSpec(grid=3, cube_size=spec.cube_size, jitter=spec.jitter, num_permutations=2)

    def sample(self, case: sampling.PreparedCase, rng: np.random.Generator, train: bool) -> dict[str, torch.Tensor]:
        spec = self.shape
        start = sampling.crop_start(case, spec.crop_size, rng)
        corners = puzzle.cube_starts(spec, rng if train else None) + start
        label = int(rng.integers(NUM_POSITIONS))
        cubes = puzzle.gather_cubes(case.array, corners, spec.cube_size, np.array([CENTRE, neighbour_cell(label)]),
                                    np.zeros(2, dtype=np.int64))
        if not case.mapping.identity:  # nnU-Net's intensities stay as its network reads them
            cubes = puzzle.normalise_cubes(cubes, case.mapping.low, case.mapping.high)
        chosen = corners[[CENTRE, neighbour_cell(label)]]
        return {"cubes": torch.from_numpy(cubes), "label": torch.tensor(label), "corners": torch.from_numpy(chosen)}

    def build_head(self) -> nn.Module:
        return RubikHead(self.features, num_cubes=2, num_permutations=NUM_POSITIONS, rotation_heads=False)

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs["order"].float(), batch["label"])

    def scores(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"val_position_acc": float((outputs["order"].argmax(1) == batch["label"]).sum()),
                "val_loss": float(self.loss(outputs, batch)) * len(batch["label"])}

    def views(self, sample: dict[str, np.ndarray], original: np.ndarray, start: np.ndarray) -> dict[str, np.ndarray]:
        """input: the centre patch and the neighbour in their places, the rest of the grid empty."""
        placed = puzzle.assemble(sample["cubes"], sample["corners"] - start, original.shape[1:], fill=-1.0)
        return {"input": placed, "target": original}

    def describe(self, sample: dict[str, np.ndarray]) -> dict:
        return {"position_class": int(sample["label"]), "neighbour_offset_zyx": list(neighbour_offset(int(sample["label"])))}

    def chance(self) -> dict[str, float]:
        return {"chance_position": round(1 / NUM_POSITIONS, 4)}
