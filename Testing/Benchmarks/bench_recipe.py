"""Fine-tuning recipes from scratch on AdrenalMNIST3D (train -> the 98 val volumes): the old defaults against the
new ones, over label fractions and seeds. Prints a Markdown table (mean ± sd over seeds of the last-3-epoch AUC and
accuracy, and the wall time of one fine-tune). Resumable: finished runs are reused.

    python Testing/Benchmarks/bench_recipe.py --out bench-recipe [--fractions 0.1,0.25] [--seeds 5] [--epochs 12]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from RubikSSLLib import cli, evaluate  # noqa: E402

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "cls" / "adrenalmnist3d_64_trainval.npz"
RECIPES = {
    "old defaults": ["--augment", "none", "--class-balance", "none", "--lr-schedule", "constant", "--warmup-epochs", "0",
                     "--batch-size", "8"],
    "new defaults": [],
    "new, batch 32": ["--batch-size", "32"],
    "new, no balancing": ["--class-balance", "none"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fractions", default="0.1,0.25")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--recipes", default=";".join(RECIPES), help="names separated by ;")
    args = parser.parse_args()
    rows = []
    for fraction in [float(f) for f in args.fractions.split(",")]:
        for name in args.recipes.split(";"):
            auc, acc, seconds = [], [], []
            for seed in range(args.seeds):
                run = args.out / f"{name.replace(' ', '_').replace(',', '')}_f{fraction:g}_s{seed}"
                if not evaluate.finished(run, args.epochs):
                    started = time.monotonic()
                    code = cli.main(["finetune", "--task", "classify", "--train", str(DATA), "--val", str(DATA),
                                     "--out", str(run), "--label-fraction", str(fraction), "--epochs", str(args.epochs),
                                     "--seed", str(seed), "--device", "cpu", "--progress", "none",
                                     *(["--resume"] if run.exists() else []), *RECIPES[name]])
                    assert code == 0, run
                    (run / "wall_s.json").write_text(json.dumps(time.monotonic() - started))
                auc.append(evaluate.score(run, "val_auc", 3))
                acc.append(evaluate.score(run, "val_acc", 3))
                wall = run / "wall_s.json"
                seconds.append(json.loads(wall.read_text()) if wall.exists() else float("nan"))
            rows.append((fraction, name, np.mean(auc), np.std(auc, ddof=1), np.mean(acc), np.std(acc, ddof=1),
                         np.nanmedian(seconds)))
    print(f"AdrenalMNIST3D from scratch, {args.epochs} epochs, {args.seeds} seeds, last-3-epoch mean on the 98 val volumes")
    print("| labels | recipe | AUC | ACC | s per fine-tune |\n|---|---|---|---|---|")
    for fraction, name, auc_m, auc_s, acc_m, acc_s, wall in rows:
        print(f"| {fraction:g} | {name} | {auc_m:.3f} ± {auc_s:.3f} | {acc_m:.3f} ± {acc_s:.3f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
