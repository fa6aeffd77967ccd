"""3D rotation prediction (Taleb et al., NeurIPS 2020): which of 10 rotations turned the crop: identity, or 90, 180,
270 degrees about the z, y or x axis."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from RubikSSLLib import sampling
from RubikSSLLib.networks import PoolHead
from RubikSSLLib.tasks.base import PretextTask, check_cubic, single_crop_shape

NUM_ROTATIONS = 10


def rotated_views(volume: np.ndarray) -> list[np.ndarray]:
    """The 10 rotation classes of a (C, Z, Y, X) cube: identity, then 90, 180, 270 degrees about z, y and x."""
    views = [volume]
    for axes in ((2, 3), (1, 3), (1, 2)):  # about z the (y, x) plane turns; about y (z, x); about x (z, y)
        views += [np.rot90(volume, turns, axes=axes) for turns in (1, 2, 3)]
    return views


class RotationTask(PretextTask):
    name = "rotation"
    primary_metric = "val_rotation_acc"

    def __init__(self, config) -> None:
        super().__init__(config)
        check_cubic(self.shape.crop_size, self.name)

    @property
    def shape(self) -> sampling.Crop:
        crop = single_crop_shape(self.config)
        if self.config.network == "nnunet":  # the plan's patch, made cubic: its shortest side, whole strides
            from RubikSSLLib.tasks.base import nnunet_plan

            stride = max(nnunet_plan(self.config).total_stride)
            edge = max(stride, min(crop.crop_size) // stride * stride)
            return sampling.Crop((edge,) * 3, (edge,) * 3)
        return crop

    def sample(self, case: sampling.PreparedCase, rng: np.random.Generator, train: bool) -> dict[str, torch.Tensor]:
        block = sampling.crop(case, self.shape.crop_size, rng)
        label = int(rng.integers(NUM_ROTATIONS))
        return {"input": torch.from_numpy(np.ascontiguousarray(rotated_views(block)[label])), "label": torch.tensor(label)}

    def build_head(self) -> nn.Module:
        return PoolHead(self.features, NUM_ROTATIONS, dropout=0.0)

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs.float(), batch["label"])

    def scores(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"val_rotation_acc": float((outputs.argmax(1) == batch["label"]).sum()),
                "val_loss": float(self.loss(outputs, batch)) * len(batch["label"])}

    def describe(self, sample: dict[str, np.ndarray]) -> dict:
        return {"rotation_class": int(sample["label"])}

    def chance(self) -> dict[str, float]:
        return {"chance_rotation": round(1 / NUM_ROTATIONS, 4)}
