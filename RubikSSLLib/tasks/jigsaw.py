"""3D jigsaw (Taleb et al., NeurIPS 2020): order the shuffled cubes of a 2x2x2 or 3x3x3 grid (--grid), choosing
among K Hamming-selected permutations; no rotations."""

from __future__ import annotations

import torch
from torch import nn

from RubikSSLLib.tasks.rubik import RubikTask


class JigsawTask(RubikTask):
    name = "jigsaw"
    rotate = False

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs["order"].float(), batch["order"])
