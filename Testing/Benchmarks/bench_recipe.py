"""Fine-tuning recipes from scratch on AdrenalMNIST3D (train -> the 98 val volumes): the old defaults against the
new ones, over label fractions and seeds. Prints a Markdown table (mean ± sd over seeds of the last-3-epoch AUC and
accuracy, and the wall time of one fine-tune). Resumable: finished runs are reused.

    python Testing/Benchmarks/bench_recipe.py --out bench-recipe [--fractions 0.1,0.25] [--seeds 5] [--epochs 12]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from adrenal_runs import print_table, run_seeds
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
    rows = [run_seeds(args.out, name, float(fraction), args.seeds, args.epochs, RECIPES[name])
            for fraction in args.fractions.split(",") for name in args.recipes.split(";")]
    print_table(f"AdrenalMNIST3D from scratch, {args.epochs} epochs, {args.seeds} seeds, last-3-epoch mean on the 98 "
                "val volumes", "recipe", rows)

if __name__ == "__main__":
    main()
