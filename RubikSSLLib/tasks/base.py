"""What every pretext task provides, so that one training loop, one checkpoint format and one fine-tuning path
serve them all. Every task trains the same `Encoder` module under the attribute `encoder` of its model."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import nn

from RubikSSLLib.errors import BadInput
from RubikSSLLib.networks import Encoder, PretextNet
from RubikSSLLib.sampling import Crop, CropShape, PreparedCase

if TYPE_CHECKING:
    from RubikSSLLib.config import PretrainConfig


class PretextTask(ABC):
    """One self-supervised task.

    sample(case, rng, train) -> dict of tensors for one example (train=False: the deterministic variant used for
    the fixed validation set); build_head() -> the head that reads the encoder; build_model() -> encoder + head; loss(outputs, batch) -> scalar;
    scores(outputs, batch) -> per-batch SUMS of per-example validation scores (the evaluator divides by the count).
    """

    name: ClassVar[str]
    input_key: ClassVar[str] = "input"  # the batch entry the model reads (and BatchNorm re-estimation feeds)
    primary_metric: ClassVar[str]  # picks the best checkpoint
    higher_is_better: ClassVar[bool] = True
    has_decoder: ClassVar[bool] = False  # a U-Net decoder is pretrained too (fine-tuning with --decoder unet loads it)

    def __init__(self, config: PretrainConfig) -> None:
        self.config = config

    @property
    def shape(self) -> CropShape:
        return self.config.puzzle

    @abstractmethod
    def sample(self, case: PreparedCase, rng: np.random.Generator, train: bool) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def build_head(self) -> nn.Module:
        """The task's head: forward(encoder, input) -> outputs. It owns no encoder (see networks.PretextNet)."""

    def build_model(self) -> nn.Module:
        """The encoder and the head: parameters `encoder.*` and `head.*`."""
        return PretextNet(self.encoder(), self.build_head())

    @property
    def features(self) -> int:
        """Channels of the encoder's last feature map (what a head reads)."""
        if self.config.network == "nnunet":
            return int(nnunet_plan(self.config).settings.network_arch_init_kwargs["features_per_stage"][-1])
        return self.config.encoder.widths[-1]

    def decoder_prefix(self) -> str:
        """Where a restoration task's U-Net decoder sits in the model's parameters (for fine-tuning to find it)."""
        return "head."

    def place_finishing(self, device: torch.device) -> None:
        """Told the training device before sampling starts (a puzzle task finishes its cubes there on a GPU)."""

    def network_input(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the network reads of a batch (a puzzle task finishes its cubes here, on the batch's device)."""
        return batch[self.input_key]

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        return model(self.network_input(batch))

    @abstractmethod
    def loss(self, outputs, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    @abstractmethod
    def scores(self, outputs, batch: dict[str, torch.Tensor]) -> dict[str, float]: ...

    def summarise(self, averages: dict[str, float]) -> dict[str, float]:
        """Validation metrics from the per-example averages of `scores` (a ratio of averages, say)."""
        return averages

    def chance(self) -> dict[str, float]:
        """Scores of a trivial predictor, reported beside the validation scores."""
        return {}

    def card(self) -> dict:
        """Extra model-card fields (a puzzle's permutation table, a restoration's recipe)."""
        return {}

    def views(self, sample: dict[str, np.ndarray], original: np.ndarray, start: np.ndarray) -> dict[str, np.ndarray]:
        """For the viewer (`rubikssl puzzle --task`): (C, *crop_size) volumes in the crop's place, at least "input"
        (what the network reads) and "target" (what it must give back, or the untouched crop `original`).
        start: (z, y, x) corner of the crop in the case, for samples that carry case coordinates."""
        views = {"input": sample["input"], "target": sample.get("target", original)}
        return views | ({"weight": sample["weight"]} if "weight" in sample else {})

    def describe(self, sample: dict[str, np.ndarray]) -> dict:
        """The sample's label in words and numbers for sample.json (a rotation class, a neighbour position)."""
        return {}

    def encoder(self) -> nn.Module:
        """RubikSSL's encoder, or with --network nnunet the plan's own (nnU-Net's modules and names)."""
        if self.config.network == "nnunet":
            from RubikSSLLib import nnunet

            return nnunet.encoder(nnunet_plan(self.config))
        return Encoder(self.config.encoder)


def nnunet_plan(config: PretrainConfig):
    """The nnU-Net plan a --network nnunet run keeps in its config."""
    from RubikSSLLib import nnunet

    if config.nnunet is None:
        raise BadInput("--network nnunet: the run's config holds no plan; start it with --plans")
    return nnunet.plan_of(config.nnunet)


def single_crop_shape(config: PretrainConfig) -> Crop:
    """Crop of the tasks that work on one block (rotation, restoration): the 2x2x2 cube grid without gaps,
    i.e. 2 x cube size per axis, rounded down to a multiple of the encoder's downsampling (a U-Net needs it). On
    nnU-Net's network: the plan's patch size, the input it was designed for, from volumes of any size (nnU-Net
    pads a case smaller than its patch, and so do we)."""
    if config.network == "nnunet":
        return Crop(nnunet_plan(config).patch_size, (1, 1, 1))
    factor = 2 ** len(config.encoder.widths)
    size = tuple(max(factor, (2 * c) // factor * factor) for c in config.puzzle.cube_size)
    return Crop(size, size)


def check_cubic(size: tuple[int, int, int], task: str) -> None:
    if len(set(size)) != 1:
        raise BadInput(f"--task {task} needs a cubic crop (90-degree turns change the shape otherwise); give --cube-size N")
