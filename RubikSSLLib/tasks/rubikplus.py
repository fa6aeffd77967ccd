"""Rubik's cube+ (Zhu et al., MedIA 2020): the Rubik's cube plus masking identification. Each cube is masked with
probability 0.5 by a voxelwise Bernoulli(0.5) mask (masked voxels set to 0, the middle of [-1, 1]); a third
multi-label head tells which cubes were masked (BCE)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from RubikSSLLib import sampling
from RubikSSLLib.networks import RubikHead, rubik_loss
from RubikSSLLib.tasks.rubik import RubikTask

MASK_PROBABILITY = 0.5  # per cube
VOXEL_PROBABILITY = 0.5  # per voxel of a masked cube


def mask_cubes(cubes: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """cubes (M, C, cz, cy, cx) -> (masked copy, (M,) float32 multi-hot of the masked cubes).
    One voxel mask per cube, shared by its channels."""
    masked = rng.random(len(cubes)) < MASK_PROBABILITY
    out = np.array(cubes, copy=True)
    for slot in np.flatnonzero(masked):
        out[slot][:, rng.random(cubes.shape[2:]) < VOXEL_PROBABILITY] = 0
    return out, masked.astype(np.float32)


class RubikPlusTask(RubikTask):
    name = "rubik+"
    can_finish_on_device = False  # its sample masks voxels of the finished (scaled) cubes

    def sample(self, case: sampling.PreparedCase, rng: np.random.Generator, train: bool) -> dict[str, torch.Tensor]:
        sample = super().sample(case, rng, train)
        cubes, masked = mask_cubes(sample["cubes"].numpy(), rng)
        return sample | {"cubes": torch.from_numpy(cubes), "masked": torch.from_numpy(masked)}

    def build_head(self) -> nn.Module:
        return RubikHead(self.features, self.config.puzzle.num_cubes, self.config.puzzle.num_permutations, mask_head=True)

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        masking = nn.functional.binary_cross_entropy_with_logits(outputs["mask"].float(), batch["masked"])
        return rubik_loss(outputs, batch) + 0.5 * masking

    def scores(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, float]:
        correct = (outputs["mask"] > 0).float() == batch["masked"]
        return super().scores(outputs, batch) | {"val_masking_acc": float(correct.float().mean(dim=1).sum())}

    def chance(self) -> dict[str, float]:
        return super().chance() | {"chance_masking": 0.5}
