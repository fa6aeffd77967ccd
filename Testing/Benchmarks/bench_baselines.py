"""RubikSSL's scratch classifier against the field's standard baseline, MONAI's 3D ResNet-18, on AdrenalMNIST3D
(train -> the 98 val volumes): the same data, epochs, augmentation, sampling, schedule and planning, only the
network differs. Prints a Markdown table (mean ± sd over seeds of the last-3-epoch AUC and accuracy, wall time of
one fine-tune). Resumable.

    python Testing/Benchmarks/bench_baselines.py --out bench-baselines [--fractions 0.1,1.0] [--seeds 3] [--epochs 12]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from adrenal_runs import print_table, run_seeds
from torch import nn

from RubikSSLLib import finetune, models


class MonaiResNet18(nn.Module):
    """MONAI's ResNet-18 as a drop-in for the fine-tuning loop (which freezes and groups `.encoder`)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        from monai.networks.nets import resnet18

        self.encoder = resnet18(spatial_dims=3, n_input_channels=in_channels, num_classes=num_classes)

    def forward(self, x):
        return self.encoder(x)


def build_network(name: str):
    original = models.build

    def build(task, decoder, encoder_config, num_classes, guidance_channels=0):
        if name == "monai-resnet18" and task == "classify":
            return MonaiResNet18(encoder_config.in_channels, num_classes)
        return original(task, decoder, encoder_config, num_classes, guidance_channels)

    return build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fractions", default="0.1,1.0")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--networks", default="rubikssl,monai-resnet18")
    args = parser.parse_args()
    rows = []
    for fraction in args.fractions.split(","):
        for network in args.networks.split(","):
            finetune.models.build = build_network(network)
            rows.append(run_seeds(args.out, network, float(fraction), args.seeds, args.epochs, []))
    print_table(f"AdrenalMNIST3D from scratch, {args.epochs} epochs, {args.seeds} seeds, default recipe, last-3-epoch "
                "mean on the 98 val volumes", "network", rows)

if __name__ == "__main__":
    main()
