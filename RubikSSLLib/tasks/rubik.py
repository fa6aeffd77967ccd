"""Rubik's cube recovery (Zhuang et al., MICCAI 2019): order the 8 shuffled cubes (K-way) and tell which cubes were
turned 180 degrees about which axis (two multi-label heads)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from RubikSSLLib import devicepuzzle, puzzle, sampling
from RubikSSLLib.networks import RubikHead, rubik_loss
from RubikSSLLib.tasks.base import PretextTask


class RubikTask(PretextTask):
    name = "rubik"
    input_key = "cubes"
    primary_metric = "val_ordering_acc"
    rotate = True

    def __init__(self, config) -> None:
        super().__init__(config)
        spec = config.puzzle
        self.table = puzzle.permutation_table(spec.num_cubes, spec.num_permutations, spec.permutation_seed)

    # Where the cubes are turned and scaled: in the sampler (numpy, the flips fused into the gather: fastest where
    # sampling and the step share a CPU), or in network_input on the batch's device (devicepuzzle), so that a GPU's
    # sampler workers only copy cubes. Training chooses by its device (place_finishing).
    finish_on_device = False
    can_finish_on_device: ClassVar[bool] = True

    def place_finishing(self, device: torch.device) -> None:
        self.finish_on_device = self.can_finish_on_device and device.type != "cpu"

    def sample(self, case: sampling.PreparedCase, rng: np.random.Generator, train: bool) -> dict[str, torch.Tensor]:
        item = sampling.make_puzzle(case, self.config.puzzle, self.table, rng, train, rotate=self.rotate,
                                    finish=not self.finish_on_device)
        return sampling.to_sample(item, sampling.puzzle_window(case) if self.finish_on_device else None)

    def network_input(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, M, C, cz, cy, cx) cubes turned and scaled to [-1, 1], on the batch's device."""
        if not self.finish_on_device:
            return batch["cubes"]
        return devicepuzzle.finish(batch["cubes"], batch["rotations"], batch.get("window"))

    def build_head(self) -> nn.Module:
        return RubikHead(self.features, self.config.puzzle.num_cubes, self.config.puzzle.num_permutations,
                         rotation_heads=self.rotate)

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return rubik_loss(outputs, batch)

    def scores(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, float]:
        count = len(batch["order"])
        scores = {"val_ordering_acc": float((outputs["order"].argmax(1) == batch["order"]).sum()),
                  "val_loss": float(self.loss(outputs, batch)) * count}
        if self.rotate:
            predicted = puzzle.rotation_classes(torch.sigmoid(outputs["hor"]).cpu().numpy(),
                                                torch.sigmoid(outputs["ver"]).cpu().numpy())
            scores["val_orientation_acc"] = float((predicted == batch["rotations"].cpu().numpy()).mean(axis=1).sum())
        return scores

    def chance(self) -> dict[str, float]:
        chance = {"chance_ordering": round(1 / self.config.puzzle.num_permutations, 4)}
        return chance | ({"chance_orientation": 0.3333} if self.rotate else {})

    def card(self) -> dict:
        return {"permutations": self.table.tolist()}
