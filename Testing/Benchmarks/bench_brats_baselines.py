"""RubikSSL's scratch U-Net against a standard baseline of the field, MONAI's SegResNet, on the four BraTS cases
(4 folds: 3 train, 1 validation): the same data, recipe (augmentation, foreground-oversampled patches, warm-up +
cosine), epochs and patches, one thread; only the network differs. Prints a Markdown table of BraTS region Dice
(whole tumour, tumour core, enhancing tumour) and the mean label Dice, mean ± sd over folds, and the wall time of
one fine-tune. Resumable. Not a test: about an hour on a CPU.

    python Testing/Benchmarks/bench_brats_baselines.py --out bench-brats [--epochs 20] [--spacing 2] [--patch-size 64]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from torch import nn

from adrenal_runs import sd  # noqa: F401 - also puts the repository on sys.path
from bench_segmentation_transfer import CASES, REGIONS, datalist

from RubikSSLLib import cli, evaluate, finetune, models

NETWORKS = ("rubikssl", "monai-segresnet")


class MonaiSegResNet(nn.Module):
    """MONAI's SegResNet as a drop-in for the fine-tuning loop (which freezes and groups `.encoder`)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        from monai.networks.nets import SegResNet

        self.encoder = SegResNet(spatial_dims=3, in_channels=in_channels, out_channels=num_classes, init_filters=16)

    def forward(self, x):
        return self.encoder(x)


def use_network(name: str) -> None:
    original = models.build.__wrapped__ if hasattr(models.build, "__wrapped__") else models.build

    def build(task, decoder, encoder_config, num_classes, guidance_channels=0):
        if name == "monai-segresnet" and task == "segment":
            return MonaiSegResNet(encoder_config.in_channels, num_classes)
        return original(task, decoder, encoder_config, num_classes, guidance_channels)

    build.__wrapped__ = original
    finetune.models.build = build


def run(network: str, fold: int, args: argparse.Namespace) -> dict:
    out = args.out / f"{network}_fold{fold}"
    if not evaluate.finished(out, args.epochs):
        use_network(network)
        data = str(datalist(fold, args.out))
        started = time.monotonic()
        code = cli.main(["finetune", "--task", "segment", "--train", data, "--val", data, "--out", str(out),
                         "--epochs", str(args.epochs), "--iterations-per-epoch", str(args.iterations),
                         "--patch-size", str(args.patch_size), "--spacing", str(args.spacing), "--batch-size", "2",
                         "--device", "cpu", "--progress", "none", *(["--resume"] if out.exists() else [])])
        assert code == 0, out
        (out / "wall_s.json").write_text(json.dumps(time.monotonic() - started))
    scores = {region: evaluate.score(out, f"dice_{region}", args.last_epochs) for region in REGIONS}
    scores["mean label Dice"] = evaluate.score(out, "val_mean_dice", args.last_epochs)
    wall = out / "wall_s.json"
    scores["seconds"] = json.loads(wall.read_text()) if wall.exists() else float("nan")
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=20, help="batches of 2 patches per epoch")
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--spacing", type=float, default=2.0)
    parser.add_argument("--last-epochs", type=int, default=3)
    parser.add_argument("--networks", default=",".join(NETWORKS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    columns = [*REGIONS, "mean label Dice"]
    print(f"BraTS 2015, 4 folds, {args.epochs} epochs x {args.iterations} batches of 2 x {args.patch_size}^3 at "
          f"{args.spacing:g} mm, default recipe, from scratch; mean of the last {args.last_epochs} epochs, mean ± sd over folds")
    print("| network | " + " | ".join(columns) + " | s per fine-tune |\n" + "|---" * (len(columns) + 2) + "|")
    for network in args.networks.split(","):
        folds = [run(network, fold, args) for fold in range(len(CASES))]
        cells = [f"{np.nanmean([f[c] for f in folds]):.3f} ± {np.nanstd([f[c] for f in folds], ddof=1):.3f}" for c in columns]
        print(f"| {network} | " + " | ".join(cells) + f" | {np.nanmedian([f['seconds'] for f in folds]):.0f} |", flush=True)


if __name__ == "__main__":
    main()
