"""3D exemplar (Taleb et al., NeurIPS 2020): a crop and an augmented view of it must embed closer together than the
crop and another example, by a margin (triplet loss, margin 1). The negatives are the other examples' views in the
batch (crops of other, randomly drawn volumes), so no extra forward pass is spent on them."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from RubikSSLLib import sampling
from RubikSSLLib.networks import Encoder, mlp
from RubikSSLLib.tasks.base import PretextTask, single_crop_shape

MARGIN = 1.0
CODE_SIZE = 128


def augment(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A view of a (C, Z, Y, X) crop in [-1, 1]: flips (p = 0.5 per axis), a 90-degree turn in a random plane of equal
    sides (p = 0.5), brightness +-0.125 and contrast 0.5..1.5 (p = 0.5 each), clipped back to [-1, 1]."""
    view = crop
    for axis in (1, 2, 3):
        if rng.random() < 0.5:
            view = np.flip(view, axis)
    planes = [p for p in ((1, 2), (1, 3), (2, 3)) if crop.shape[p[0]] == crop.shape[p[1]]]
    if planes and rng.random() < 0.5:
        view = np.rot90(view, int(rng.integers(1, 4)), axes=planes[int(rng.integers(len(planes)))])
    view = np.array(view, dtype=np.float32)
    if rng.random() < 0.5:
        view = view * np.float32(rng.uniform(0.5, 1.5))
    if rng.random() < 0.5:
        view = view + np.float32(rng.uniform(-0.125, 0.125))
    return np.clip(view, -1, 1)


class EmbedderHead(nn.Module):
    """Global average pooling of the encoder's last map + MLP -> L2-normalised code (B, CODE_SIZE)."""

    def __init__(self, features: int, code_size: int = CODE_SIZE) -> None:
        super().__init__()
        self.head = mlp([features, 256, code_size])

    def forward(self, encoder: Encoder, x: torch.Tensor) -> torch.Tensor:
        code = self.head(encoder(x)[-1].mean(dim=(2, 3, 4)).float())
        return nn.functional.normalize(code, dim=1)


def triplet_terms(anchor: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances (B,) anchor-positive and anchor-negative, the negative of example i being the positive of i + 1."""
    negative = positive.roll(1, dims=0)
    return (anchor - positive).norm(dim=1), (anchor - negative).norm(dim=1)


class ExemplarTask(PretextTask):
    name = "exemplar"
    primary_metric = "val_triplet_acc"

    @property
    def shape(self) -> sampling.Crop:
        return single_crop_shape(self.config)

    def sample(self, case: sampling.PreparedCase, rng: np.random.Generator, train: bool) -> dict[str, torch.Tensor]:
        crop = sampling.crop(case, self.shape.crop_size, rng)
        return {"input": torch.from_numpy(crop), "positive": torch.from_numpy(augment(crop, rng))}

    def views(self, sample: dict[str, np.ndarray], original: np.ndarray, start: np.ndarray) -> dict[str, np.ndarray]:
        """target: the augmented view the crop must embed close to."""
        return {"input": sample["input"], "target": sample["positive"]}

    def build_head(self) -> nn.Module:
        return EmbedderHead(self.features)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        codes = model(torch.cat([batch["input"], batch["positive"]]))
        return codes[: len(batch["input"])], codes[len(batch["input"]):]

    def loss(self, outputs: tuple[torch.Tensor, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        anchor, positive = outputs
        return nn.functional.triplet_margin_loss(anchor, positive, positive.roll(1, dims=0), margin=MARGIN)

    def scores(self, outputs: tuple[torch.Tensor, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, float]:
        if len(batch["input"]) < 2:  # no other example to be the negative
            return {"val_triplet_acc": 0.5, "val_loss": MARGIN}
        positive, negative = triplet_terms(*outputs)
        return {"val_triplet_acc": float((positive < negative).sum()),
                "val_loss": float(self.loss(outputs, batch)) * len(positive)}

    def chance(self) -> dict[str, float]:
        return {"chance_triplet": 0.5}
