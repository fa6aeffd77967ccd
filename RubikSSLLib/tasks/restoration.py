"""Shared by the restoration tasks (mae, genesis): a U-Net (the fine-tuning U-Net, so its decoder transfers too)
restores the untouched crop from a corrupted one; the loss is the squared error on the voxels the task weighs."""

from __future__ import annotations

from abc import abstractmethod

import numpy as np
import torch
from torch import nn

from RubikSSLLib import sampling
from RubikSSLLib.models import RestorationHead
from RubikSSLLib.tasks.base import PretextTask, single_crop_shape


class RestorationTask(PretextTask):
    primary_metric = "val_restoration_gain"
    has_decoder = True

    @property
    def shape(self) -> sampling.Crop:
        return single_crop_shape(self.config)

    @abstractmethod
    def corrupt(self, crop: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """crop: (C, Z, Y, X) in [-1, 1] -> (corrupted input, weight) with weight (1, Z, Y, X) in {0, 1}: the voxels
        the loss counts. Must not modify `crop` (it is the target)."""

    def sample(self, case: sampling.PreparedCase, rng: np.random.Generator, train: bool) -> dict[str, torch.Tensor]:
        target = sampling.crop(case, self.shape.crop_size, rng)
        corrupted, weight = self.corrupt(target, rng)
        return {"input": torch.from_numpy(np.ascontiguousarray(corrupted, dtype=np.float32)),
                "target": torch.from_numpy(target), "weight": torch.from_numpy(weight.astype(np.float32))}

    def build_head(self) -> nn.Module:
        if self.config.network == "nnunet":  # the plan's own decoder: the whole U-Net is pretrained
            from RubikSSLLib import nnunet
            from RubikSSLLib.tasks.base import nnunet_plan

            return nnunet.RestorationHead(nnunet_plan(self.config))
        encoder = self.config.encoder
        return RestorationHead(encoder.widths, encoder.in_channels, encoder.norm)

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return weighted_mse(outputs.float(), batch["target"], batch["weight"]).mean()

    def scores(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """MSE on the weighted voxels and the MSE of answering with the input itself."""
        mse = weighted_mse(outputs.float(), batch["target"], batch["weight"])
        baseline = weighted_mse(batch["input"], batch["target"], batch["weight"])
        return {"val_mse": float(mse.sum()), "val_baseline_mse": float(baseline.sum())}

    def summarise(self, averages: dict[str, float]) -> dict[str, float]:
        """Adds the gain over copying the input: 1 - mse / baseline (0: no better than the input, 1: perfect)."""
        return averages | {"val_restoration_gain": 1 - averages["val_mse"] / max(averages["val_baseline_mse"], 1e-8)}

    def chance(self) -> dict[str, float]:
        return {"chance_restoration_gain": 0.0}


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared error over the voxels with weight 1 (all channels)."""
    error = (prediction - target) ** 2 * weight
    return error.flatten(1).sum(1) / (weight.flatten(1).sum(1) * prediction.shape[1]).clamp_min(1)
