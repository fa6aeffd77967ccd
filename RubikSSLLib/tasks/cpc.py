"""3D contrastive predictive coding (Taleb et al., NeurIPS 2020, after van den Oord et al.): the crop is cut into a
4x4x4 grid of patches, each encoded by the shared encoder to a code; from the codes of the two upper rows (z = 0, 1)
of each (y, x) column a context network predicts the codes of the two lower rows (z = 2, 3). InfoNCE: a prediction
must pick its own patch's code among all target codes of the batch (the other positions and examples are the
negatives). Simplifications against Taleb's code: a per-column MLP context instead of a GRU over a pyramid, and one
softmax over all negatives instead of a sigmoid on one negative.

Patches are flipped at random and keep a random 7/8 of their extent (the rest zeroed), so that matching
edges across patch borders does not solve the task."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from RubikSSLLib import sampling
from RubikSSLLib.networks import Encoder, PretextNet, mlp
from RubikSSLLib.tasks.base import PretextTask

GRID = 4
CONTEXT_ROWS = 2
CODE_SIZE = 64
TEMPERATURE = 0.1


def split_patches(crop: np.ndarray, grid: int = GRID) -> np.ndarray:
    """(C, Z, Y, X) -> (grid, grid, grid, C, Z/grid, Y/grid, X/grid), patch [z, y, x] in its grid place."""
    channels, *size = crop.shape
    patch = [s // grid for s in size]
    blocks = crop.reshape(channels, grid, patch[0], grid, patch[1], grid, patch[2])
    return blocks.transpose(1, 3, 5, 0, 2, 4, 6)


def join_patches(patches: np.ndarray) -> np.ndarray:
    """The inverse of split_patches."""
    grid, _, _, channels, *patch = patches.shape
    return patches.transpose(3, 0, 4, 1, 5, 2, 6).reshape(channels, *(grid * p for p in patch))


def disturb(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random flips per axis, then zero all but a random 7/8 window per axis of a (C, pz, py, px) patch."""
    for axis in (1, 2, 3):
        if rng.random() < 0.5:
            patch = np.flip(patch, axis)
    keep = [s - s // 8 for s in patch.shape[1:]]
    start = [int(rng.integers(0, s - k + 1)) for s, k in zip(patch.shape[1:], keep)]
    out = np.zeros_like(patch)
    window = (slice(None),) + tuple(slice(a, a + k) for a, k in zip(start, keep))
    out[window] = patch[window]
    return out


def info_nce(predicted: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """predicted, target: (N, D). Row i's positive is target i; its negatives are the N - 1 other targets. The score
    is the cosine similarity / TEMPERATURE (unnormalised dot products let the logits run away).
    Returns (mean loss, (N,) bool: the positive scored highest)."""
    predicted = nn.functional.normalize(predicted.float(), dim=1)
    logits = predicted @ nn.functional.normalize(target.float(), dim=1).T / TEMPERATURE
    labels = torch.arange(len(predicted), device=predicted.device)
    return nn.functional.cross_entropy(logits, labels), logits.argmax(1) == labels


class CPCHead(nn.Module):
    """patches (B, GRID^3, C, pz, py, px) -> predicted and target codes of the lower rows, each
    (B, GRID - CONTEXT_ROWS, GRID, GRID, CODE_SIZE)."""

    def __init__(self, features: int, code_size: int = CODE_SIZE) -> None:
        super().__init__()
        self.project = nn.Linear(features, code_size)
        self.context = nn.Sequential(mlp([CONTEXT_ROWS * code_size, 256]), nn.ReLU(inplace=True))
        self.predictors = nn.ModuleList(nn.Linear(256, code_size) for _ in range(GRID - CONTEXT_ROWS))

    def forward(self, encoder: Encoder, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = patches.shape[0]
        codes = self.project(encoder(patches.flatten(0, 1))[-1].mean(dim=(2, 3, 4)).float())
        codes = codes.reshape(batch, GRID, GRID, GRID, -1)  # (B, z, y, x, D)
        context = self.context(codes[:, :CONTEXT_ROWS].permute(0, 2, 3, 1, 4).flatten(3))  # (B, y, x, 256)
        predicted = torch.stack([predictor(context) for predictor in self.predictors], dim=1)
        return {"predicted": predicted, "target": codes[:, CONTEXT_ROWS:]}


class CPCNet(PretextNet):
    """The encoder with a CPCHead."""

    def __init__(self, encoder: Encoder, code_size: int = CODE_SIZE) -> None:
        super().__init__(encoder, CPCHead(encoder.out_channels, code_size))


class CPCTask(PretextTask):
    name = "cpc"
    input_key = "patches"
    primary_metric = "val_cpc_acc"

    @property
    def patch_size(self) -> tuple[int, int, int]:
        """Half a cube per axis, but at least the encoder's downsampling (its last map keeps one voxel)."""
        if self.config.network == "nnunet":
            from RubikSSLLib.tasks.base import nnunet_plan

            stride = nnunet_plan(self.config).total_stride
            return tuple(max(2 * s, c // 2) for s, c in zip(stride, self.config.puzzle.cube_size))
        smallest = 2 ** len(self.config.encoder.widths)
        return tuple(max(smallest, c // 2) for c in self.config.puzzle.cube_size)

    @property
    def shape(self) -> sampling.Crop:
        size = tuple(GRID * p for p in self.patch_size)
        return sampling.Crop(size, size)

    def sample(self, case: sampling.PreparedCase, rng: np.random.Generator, train: bool) -> dict[str, torch.Tensor]:
        crop = sampling.crop(case, self.shape.crop_size, rng)
        patches = split_patches(crop).reshape(GRID**3, crop.shape[0], *self.patch_size)
        patches = np.stack([disturb(p, rng) for p in patches])  # validation too: the same task as in training
        return {"patches": torch.from_numpy(np.ascontiguousarray(patches))}

    def views(self, sample: dict[str, np.ndarray], original: np.ndarray, start: np.ndarray) -> dict[str, np.ndarray]:
        """input: the disturbed patches back in their grid places."""
        patches = sample["patches"].reshape(GRID, GRID, GRID, *sample["patches"].shape[1:])
        return {"input": join_patches(patches), "target": original}

    def build_head(self) -> nn.Module:
        return CPCHead(self.features)

    def _pairs(self, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return outputs["predicted"].flatten(0, 3), outputs["target"].flatten(0, 3)

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return info_nce(*self._pairs(outputs))[0]

    def scores(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Per example: the share of its lower-row patches whose code was picked among the whole batch's."""
        loss, correct = info_nce(*self._pairs(outputs))
        count = len(batch["patches"])
        return {"val_cpc_acc": float(correct.float().mean()) * count, "val_loss": float(loss) * count}

    def chance(self) -> dict[str, float]:
        """1 / candidates, for validation batches of 16 examples."""
        return {"chance_cpc": round(1 / (16 * (GRID - CONTEXT_ROWS) * GRID * GRID), 4)}
