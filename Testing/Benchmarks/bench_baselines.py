"""RubikSSL's scratch classifier against the field's standard baseline, MONAI's 3D ResNet-18, on AdrenalMNIST3D
(train -> the 98 val volumes): the same data, epochs, augmentation, sampling, schedule and planning, only the
network differs. Prints a Markdown table (mean ± sd over seeds of the last-3-epoch AUC and accuracy, wall time of
one fine-tune). Resumable.

    python Testing/Benchmarks/bench_baselines.py --out bench-baselines [--fractions 0.1,1.0] [--seeds 3] [--epochs 12]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from RubikSSLLib import cli, evaluate, finetune, models  # noqa: E402

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "cls" / "adrenalmnist3d_64_trainval.npz"


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

    def build(task, decoder, encoder_config, num_classes):
        if name == "monai-resnet18" and task == "classify":
            return MonaiResNet18(encoder_config.in_channels, num_classes)
        return original(task, decoder, encoder_config, num_classes)

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
    for fraction in [float(f) for f in args.fractions.split(",")]:
        for network in args.networks.split(","):
            finetune.models.build = build_network(network)
            auc, acc, seconds = [], [], []
            for seed in range(args.seeds):
                run = args.out / f"{network}_f{fraction:g}_s{seed}"
                if not evaluate.finished(run, args.epochs):
                    started = time.monotonic()
                    code = cli.main(["finetune", "--task", "classify", "--train", str(DATA), "--val", str(DATA),
                                     "--out", str(run), "--label-fraction", str(fraction), "--epochs", str(args.epochs),
                                     "--seed", str(seed), "--device", "cpu", "--progress", "none",
                                     *(["--resume"] if run.exists() else [])])
                    assert code == 0, run
                    (run / "wall_s.json").write_text(json.dumps(time.monotonic() - started))
                auc.append(evaluate.score(run, "val_auc", 3))
                acc.append(evaluate.score(run, "val_acc", 3))
                wall = run / "wall_s.json"
                seconds.append(json.loads(wall.read_text()) if wall.exists() else float("nan"))
            rows.append((fraction, network, np.mean(auc), np.std(auc, ddof=1) if len(auc) > 1 else 0.0, np.mean(acc),
                         np.std(acc, ddof=1) if len(acc) > 1 else 0.0, np.nanmedian(seconds)))
    print(f"AdrenalMNIST3D from scratch, {args.epochs} epochs, {args.seeds} seeds, default recipe, last-3-epoch mean "
          "on the 98 val volumes")
    print("| labels | network | AUC | ACC | s per fine-tune |\n|---|---|---|---|---|")
    for fraction, network, auc_m, auc_s, acc_m, acc_s, wall in rows:
        print(f"| {fraction:g} | {network} | {auc_m:.3f} ± {auc_s:.3f} | {acc_m:.3f} ± {acc_s:.3f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
