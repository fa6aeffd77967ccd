"""Several pretext tasks at once on one shared encoder (`--task rubik,mae` or with loss weights `rubik=1,mae=0.5`).

Every step draws each task's own sample from the same case, runs each task's model on the shared encoder and sums
the weighted losses. Metrics are prefixed with their task (`rubik/val_ordering_acc`); the first task's primary
metric picks the best checkpoint. The encoder must not use BatchNorm (`--norm group`): one set of running
statistics cannot serve inputs as different as normalised cubes and masked crops. The checkpoint holds the encoder once, as `encoder.*` like every other task's,
so fine-tuning loads it unchanged; a restoration task's decoder transfers too (the card names its prefix)."""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from RubikSSLLib import sampling
from RubikSSLLib.errors import BadInput
from RubikSSLLib.networks import Encoder
from RubikSSLLib.tasks.base import PretextTask


def sub_batch(batch: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    prefix = f"{name}/"
    return {key[len(prefix):]: value for key, value in batch.items() if key.startswith(prefix)}


class CombinedNet(nn.Module):
    """One encoder and each task's head under `heads.<task>`; the heads read the shared encoder (registered once,
    so it is saved once), none owns it."""

    def __init__(self, encoder: Encoder, parts: list[PretextTask]) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict({part.name: part.build_head() for part in parts})
        self.parts = parts  # plain list of task objects: not modules

    def forward(self, batch: dict[str, torch.Tensor]) -> dict:
        return {part.name: part.forward(functools.partial(self.heads[part.name], self.encoder), sub_batch(batch, part.name))
                for part in self.parts}


class CombinedTask(PretextTask):
    name = "combined"
    input_key = ""  # the model reads the whole batch

    def __init__(self, config, parts: list[tuple[PretextTask, float]]) -> None:
        """parts: each task (built by tasks.create for its own name) with its loss weight."""
        super().__init__(config)
        if config.encoder.norm == "batch":
            # measured: jigsaw+mae on AdrenalMNIST3D ordered 0.52 of held-out puzzles with batch statistics but 0.14
            # with the running ones, which mixed the cubes' and the masked crops' statistics
            raise BadInput(f"--task {config.task}: tasks combined on one encoder would share BatchNorm statistics "
                           "between their different inputs; add --norm group")
        self.parts = [part for part, _ in parts]
        self.weights = {part.name: weight for part, weight in parts}
        first = self.parts[0]
        self.primary_metric = f"{first.name}/{first.primary_metric}"
        self.higher_is_better = first.higher_is_better
        self.decoder_part = next((p for p in self.parts if p.has_decoder), None)
        self.has_decoder = self.decoder_part is not None

    @property
    def shape(self) -> sampling.Crop:
        """Large enough for every task's crop."""
        crop = tuple(max(sizes) for sizes in zip(*(p.shape.crop_size for p in self.parts)))
        smallest = tuple(max(sizes) for sizes in zip(*(p.shape.min_volume_size for p in self.parts)))
        return sampling.Crop(crop, smallest)

    def sample(self, case: sampling.PreparedCase, rng: np.random.Generator, train: bool) -> dict[str, torch.Tensor]:
        return {f"{p.name}/{key}": value for p in self.parts for key, value in p.sample(case, rng, train).items()}

    def place_finishing(self, device: torch.device) -> None:
        for part in self.parts:
            part.place_finishing(device)

    def build_head(self) -> nn.Module:
        raise NotImplementedError("a combined task has one head per part: build_model")

    def build_model(self) -> nn.Module:
        return CombinedNet(self.encoder(), self.parts)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict:
        return model(batch)

    def loss(self, outputs: dict, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights[p.name] * p.loss(outputs[p.name], sub_batch(batch, p.name)) for p in self.parts)

    def scores(self, outputs: dict, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        return {f"{p.name}/{key}": value for p in self.parts
                for key, value in p.scores(outputs[p.name], sub_batch(batch, p.name)).items()}

    def summarise(self, averages: dict[str, float]) -> dict[str, float]:
        return {f"{p.name}/{key}": value for p in self.parts for key, value in p.summarise(sub_batch(averages, p.name)).items()}

    def chance(self) -> dict[str, float]:
        return {f"{p.name}/{key}": value for p in self.parts for key, value in p.chance().items()}

    def card(self) -> dict:
        return {"parts": {p.name: {"weight": self.weights[p.name], **p.card()} for p in self.parts}}

    def decoder_prefix(self) -> str:
        return f"heads.{self.decoder_part.name}." if self.decoder_part else ""

    def views(self, sample: dict[str, np.ndarray], original: np.ndarray, start: np.ndarray) -> dict[str, np.ndarray]:
        """The first task's views (its crop may be smaller than the combined one: it sits at the same corner)."""
        first = self.parts[0]
        return first.views(sub_batch(sample, first.name), original, start)
