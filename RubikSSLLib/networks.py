"""Networks. One 3D encoder module serves every task: the pretext heads here, and later the U-Net and classifier.

Tensors are (B, C, Z, Y, X). The encoder returns one feature map per stage (the U-Net's skips); stage s has
`widths[s]` channels at 1 / (2 ** (s + 1)) of the input resolution.
"""

from __future__ import annotations

import math
import torch
from torch import nn

from RubikSSLLib.config import EncoderConfig  # noqa: F401 - re-exported: the encoder's settings
from RubikSSLLib.errors import BadInput


def channels_last(model: nn.Module) -> nn.Module:
    """Store 5D weights channels-last: oneDNN (CPU) and cuDNN pick their faster 3D convolutions for it.
    Measured on CPU, one thread: U-Net inference 25%, U-Net training step 30%, Rubik training step 10% faster."""
    return model.to(memory_format=torch.channels_last_3d)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"unknown norm {kind!r}; use batch, instance or group")


def conv_block(in_channels: int, out_channels: int, norm: str, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        _norm(norm, out_channels),
        nn.ReLU(inplace=True),
    )


class Encoder(nn.Module):
    """Shared 3D encoder. forward(x: (B, C, Z, Y, X)) -> list of stage feature maps, finest first."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        stages = []
        channels = config.in_channels
        for index, (width, depth) in enumerate(zip(config.widths, config.depths)):
            blocks: list[nn.Module] = [] if index == 0 else [nn.MaxPool3d(2)]
            blocks.append(conv_block(channels, width, config.norm, stride=2 if index == 0 else 1))
            blocks += [conv_block(width, width, config.norm) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = width
        self.stages = nn.ModuleList(stages)

    @property
    def out_channels(self) -> int:
        return self.config.widths[-1]

    @property
    def downsampling(self) -> int:
        """Total resolution factor between the input and the last stage."""
        return 2 ** len(self.config.widths)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.config.norm == "instance" and math.prod(s // self.downsampling for s in x.shape[2:]) <= 1:
            raise BadInput(f"--norm instance: an input of {tuple(x.shape[2:])} voxels shrinks to one voxel in the deepest "
                           "stage, where instance norm has nothing to normalise; use a larger --cube-size or --norm group")
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for index, (size_in, size_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(size_in, size_out))
        if index < len(sizes) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class PretextNet(nn.Module):
    """A pretext task's network: the encoder and the task's head. A head owns no encoder: it is handed the encoder on
    every call, head(encoder, x), so several heads can share one encoder (combined tasks) without any of them
    registering it again. Parameters: `encoder.*` (what fine-tuning loads) and `head.*`."""

    def __init__(self, encoder: Encoder, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self._register_load_state_dict_pre_hook(self._upgrade_names)

    def _upgrade_names(self, state: dict, prefix: str, *args) -> None:
        """Model files before 0.2 kept the head's layers beside the encoder (`order_head.0.weight`): put every
        non-encoder tensor under `head.` when that is what makes the names match this network."""
        own = set(self.state_dict())
        names = [k for k in state if k.startswith(prefix)]
        if {k[len(prefix):] for k in names} == own:
            return
        renamed = {}
        for name in names:
            rest = name[len(prefix):]
            renamed[name if rest.startswith("encoder.") else f"{prefix}head.{rest}"] = state.pop(name)
        state.update(renamed)

    def forward(self, x: torch.Tensor):
        return self.head(self.encoder, x)


class RubikHead(nn.Module):
    """Siamese-Octad: the encoder runs on every cube with shared weights; per cube GAP -> FC64 + ReLU + BN;
    the M codes are concatenated; order head FC1024-FC1024-FC K; rotation heads FC1024-FC M (kept shallow:
    deeper rotation heads collapsed in the Medical-SSL ablation)."""

    def __init__(self, features: int, num_cubes: int, num_permutations: int, code_size: int = 64,
                 rotation_heads: bool = True, mask_head: bool = False) -> None:
        super().__init__()
        self.num_cubes = num_cubes
        self.project = nn.Sequential(nn.Linear(features, code_size), nn.ReLU(inplace=True), nn.BatchNorm1d(code_size))
        joint = num_cubes * code_size
        self.order_head = mlp([joint, 1024, 1024, num_permutations])
        if rotation_heads:  # a plain jigsaw has none (unused parameters would stall DistributedDataParallel)
            self.hor_head = mlp([joint, 1024, num_cubes])
            self.ver_head = mlp([joint, 1024, num_cubes])
        if mask_head:  # Rubik's cube+: which cubes were masked
            self.mask_head = mlp([joint, 1024, num_cubes])

    def forward(self, encoder: Encoder, cubes: torch.Tensor) -> dict[str, torch.Tensor]:
        """cubes: (B, M, C, cz, cy, cx) -> logits: order (B, K), hor (B, M), ver (B, M), mask (B, M) if built."""
        batch, cubes_per_puzzle = cubes.shape[:2]
        features = encoder(cubes.flatten(0, 1))[-1]
        codes = self.project(features.mean(dim=(2, 3, 4)).float())
        joint = codes.reshape(batch, cubes_per_puzzle * codes.shape[1])
        logits = {"order": self.order_head(joint)}
        if hasattr(self, "hor_head"):
            logits.update(hor=self.hor_head(joint), ver=self.ver_head(joint))
        if hasattr(self, "mask_head"):
            logits["mask"] = self.mask_head(joint)
        return logits


class RubikNet(PretextNet):
    """The encoder with a RubikHead."""

    def __init__(self, encoder: Encoder, num_cubes: int, num_permutations: int, code_size: int = 64,
                 rotation_heads: bool = True, mask_head: bool = False) -> None:
        super().__init__(encoder, RubikHead(encoder.out_channels, num_cubes, num_permutations, code_size,
                                            rotation_heads, mask_head))


class PoolHead(nn.Module):
    """Global average pooling of the encoder's last map + dropout + linear: (B, C, Z, Y, X) -> (B, classes)."""

    def __init__(self, features: int, classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(features, classes))

    def forward(self, encoder: Encoder, x: torch.Tensor) -> torch.Tensor:
        return self.head(encoder(x)[-1].mean(dim=(2, 3, 4)))


def rubik_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """0.5 * CE(order) + 0.5 * (BCE_hor + BCE_ver): the paper's equal weighting."""
    order = nn.functional.cross_entropy(logits["order"].float(), targets["order"])
    hor = nn.functional.binary_cross_entropy_with_logits(logits["hor"].float(), targets["hor"])
    ver = nn.functional.binary_cross_entropy_with_logits(logits["ver"].float(), targets["ver"])
    return 0.5 * order + 0.5 * (hor + ver)
