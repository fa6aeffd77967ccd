"""Downstream networks built around the pretraining Encoder, which they hold as `self.encoder` unchanged, so a
pretrained encoder loads by its own parameter names (no renaming, nothing skipped).

Tensors are (B, C, Z, Y, X). Encoder stage s has widths[s] channels at 1 / 2 ** (s + 1) of the input size, so
segmentation inputs need sizes divisible by 2 ** len(widths) (16 by default).
"""

from __future__ import annotations

import dataclasses

import torch
from monai.networks.utils import pixelshuffle
from torch import nn

from RubikSSLLib.networks import Encoder, EncoderConfig, conv_block


class UNetDecoder(nn.Module):
    """Upsamples with transposed convolutions reading every encoder stage as a skip, then a last upsampling undoes
    the stride-2 stem and meets the input itself. forward(skips, x) -> (B, widths[0], Z, Y, X) features."""

    def __init__(self, widths: tuple[int, ...], in_channels: int, norm: str) -> None:
        super().__init__()
        self.up = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for deeper, skip in zip(widths[:0:-1], widths[-2::-1]):
            self.up.append(nn.ConvTranspose3d(deeper, skip, 2, stride=2))
            self.blocks.append(nn.Sequential(conv_block(2 * skip, skip, norm), conv_block(skip, skip, norm)))
        self.stem_up = nn.ConvTranspose3d(widths[0], widths[0], 2, stride=2)
        self.stem_block = conv_block(widths[0] + in_channels, widths[0], norm)

    def forward(self, skips: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        y = skips[-1]
        for up, block, skip in zip(self.up, self.blocks, skips[-2::-1]):
            y = block(torch.cat([up(y), skip], dim=1))
        return self.stem_block(torch.cat([self.stem_up(y), x], dim=1))


DECODER_PARTS = ("up.", "blocks.", "stem_up.", "stem_block.")


def upgrade_unet_names(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Model files before 0.2 kept the U-Net's decoder layers loose (`up.0.weight`); they now sit under
    `decoder.` (`decoder.up.0.weight`). Renames the old names below `prefix`, leaves everything else."""
    renamed = {}
    for name, tensor in state.items():
        rest = name[len(prefix):] if name.startswith(prefix) else None
        if rest is not None and rest.startswith(DECODER_PARTS):
            name = f"{prefix}decoder.{rest}"
        renamed[name] = tensor
    return renamed


def _upgrade_unet_state(state: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook of the modules holding a UNetDecoder: old loose decoder names load too."""
    upgraded = upgrade_unet_names({k: v for k, v in state.items() if k.startswith(prefix)}, prefix)
    for name in [k for k in state if k.startswith(prefix)]:
        del state[name]
    state.update(upgraded)


class UNet(nn.Module):
    """U-Net whose encoder IS the pretraining encoder, with a UNetDecoder and a 1x1x1 head."""

    def __init__(self, encoder: Encoder, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = UNetDecoder(encoder.config.widths, encoder.config.in_channels, encoder.config.norm)
        self.head = nn.Conv3d(encoder.config.widths[0], num_classes, 1)
        self._register_load_state_dict_pre_hook(_upgrade_unet_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, Z, Y, X) -> logits (B, num_classes, Z, Y, X)."""
        return self.head(self.decoder(self.encoder(x), x))


class RestorationHead(nn.Module):
    """The restoration tasks' head: the U-Net's decoder and a 1x1x1 convolution back to the input's channels, on
    an encoder it is handed (networks.PretextNet). Its `decoder.*` is what a fine-tuning U-Net loads."""

    def __init__(self, widths: tuple[int, ...], in_channels: int, norm: str) -> None:
        super().__init__()
        self.decoder = UNetDecoder(widths, in_channels, norm)
        self.head = nn.Conv3d(widths[0], in_channels, 1)
        self._register_load_state_dict_pre_hook(_upgrade_unet_state)

    def forward(self, encoder: Encoder, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, Z, Y, X) corrupted -> (B, C, Z, Y, X) restored."""
        return self.head(self.decoder(encoder(x), x))


class DUCNet(nn.Module):
    """Light dense-upsampling decoder (the Rubik's cube paper's choice, so that few parameters start random):
    a 3x3x3 convolution on the deepest encoder map, a 1x1x1 convolution to num_classes * r^3 channels, and a voxel
    shuffle by r = the encoder's downsampling factor."""

    def __init__(self, encoder: Encoder, num_classes: int, hidden: int = 32) -> None:
        super().__init__()
        self.encoder = encoder
        self.factor = encoder.downsampling
        self.decode = nn.Sequential(conv_block(encoder.out_channels, hidden, encoder.config.norm),
                                    nn.Conv3d(hidden, num_classes * self.factor**3, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixelshuffle(self.decode(self.encoder(x)[-1]), spatial_dims=3, scale_factor=self.factor)


class Classifier(nn.Module):
    """Encoder + global average pooling + dropout + linear head."""

    def __init__(self, encoder: Encoder, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(encoder.out_channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, Z, Y, X) -> logits (B, num_classes)."""
        return self.head(self.encoder(x)[-1].mean(dim=(2, 3, 4)))


def build_for(config, num_classes: int) -> nn.Module:
    """The network of a FinetuneConfig (or of one read back from a model card)."""
    from RubikSSLLib.interactive import GUIDANCE_CHANNELS

    return build(config.task, config.decoder, config.encoder, num_classes, GUIDANCE_CHANNELS if config.interactive else 0)


def build(task: str, decoder: str, encoder_config: EncoderConfig, num_classes: int,
          guidance_channels: int = 0) -> nn.Module:
    """The downstream network. guidance_channels: extra input channels after the image's (interactive
    segmentation's click maps); the network records them as `guidance_channels` for the encoder transfer."""
    if guidance_channels:
        encoder_config = dataclasses.replace(encoder_config, in_channels=encoder_config.in_channels + guidance_channels)
    encoder = Encoder(encoder_config)
    if task == "classify":
        network: nn.Module = Classifier(encoder, num_classes)
    else:
        network = UNet(encoder, num_classes) if decoder == "unet" else DUCNet(encoder, num_classes)
    network.guidance_channels = guidance_channels
    return network
