"""Loading a pretrained encoder into a downstream network, with a report of what was loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from RubikSSLLib import checkpoint, rundir
from RubikSSLLib.errors import BadInput

ENCODER_PREFIX = "encoder."


@dataclass
class LoadReport:
    """Which encoder tensors were loaded, which the network has that the checkpoint lacks, and the reverse."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    decoder: list[str] = field(default_factory=list)  # decoder tensors loaded too (restoration pretraining)

    def summary(self) -> str:
        text = f"loaded {len(self.loaded)} encoder tensors, missing {len(self.missing)}, unexpected {len(self.unexpected)}"
        text += f"; and {len(self.decoder)} decoder tensors" if self.decoder else ""
        return text + (f"; input channels adapted in {', '.join(self.adapted)}" if self.adapted else "")


def pretrained_model_file(run_or_file: str | Path) -> Path:
    path = Path(run_or_file)
    return path / rundir.BEST_MODEL if path.is_dir() else path


def adapt_input_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """Stem weights (out, c, k, k, k) pretrained on c = 1 channel for `channels` inputs: repeat and divide by the
    count (as nnssl does), so that the first layer's response to identical channels is unchanged."""
    return weight.repeat(1, channels, 1, 1, 1) / channels


def load_encoder(network: nn.Module, run_or_file: str | Path) -> tuple[LoadReport, dict]:
    """Copy the pretrained encoder of a RubikSSL run into `network.encoder`. A shape mismatch is refused.

    Returns the report and the pretraining model card."""
    path = pretrained_model_file(run_or_file)
    state, card = checkpoint.load_model(path)
    pretrained = {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    if not pretrained:
        raise BadInput(f"{path}: holds no encoder weights; point --init to a run of `rubikssl pretrain`")
    target = network.encoder.state_dict()
    report = LoadReport()
    for name, tensor in pretrained.items():
        if name not in target:
            report.unexpected.append(name)
            continue
        wanted = target[name].shape
        if tensor.shape != wanted and tensor.ndim == 5 and tensor.shape[1] == 1 and tensor.shape[0] == wanted[0]:
            tensor = adapt_input_channels(tensor, wanted[1])
            report.adapted.append(name)
        if tensor.shape != wanted:
            raise BadInput(
                f"{path}: encoder tensor {name} has shape {tuple(tensor.shape)} but the network needs {tuple(wanted)}; "
                "fine-tune with the encoder settings of the pretraining run (its config.json)"
            )
        target[name] = tensor
        report.loaded.append(name)
    report.missing = [name for name in target if name not in pretrained]
    network.encoder.load_state_dict(target, strict=True)
    if card.get("pretrains_decoder"):
        prefix = card.get("decoder_prefix", "")  # a combined task keeps its restoration U-Net under heads.<task>.
        report.decoder = load_decoder(network, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return report, card


def load_decoder(network: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Copy a restoration task's U-Net decoder into the same-named layers of `network` (a U-Net); the output
    head is left random (its classes differ), and so is every layer the network does not share (a DUC decoder)."""
    own = network.state_dict()
    shared = {name: tensor for name, tensor in state.items()
              if not name.startswith((ENCODER_PREFIX, "head.")) and name in own and own[name].shape == tensor.shape}
    own.update(shared)
    network.load_state_dict(own, strict=True)
    return sorted(shared)
