"""Which pretext task transfers? Prints a Markdown table. Not a test: it takes hours on a CPU.

    python Testing/Benchmarks/bench_pretext_transfer.py --out bench-pretext [--tasks rubik,mae] [--seeds 5]
        [--recipes default,keep-bn,head-warmup,lr-warmup,encoder-lr,cosine]

Every task pretrains the same encoder with the same budget (steps x batch) on the AdrenalMNIST3D training images
without their labels (no extra data, as in the paper), then each pretrained encoder and a random one are fine-tuned
on the same seeded 10% label subset per seed (paired seeds). A fine-tune's score is the mean of its last epochs.
Runs go through the `rubikssl` command line, one thread each; finished runs are reused, so it resumes.

Fine-tuning recipes (`--recipes`) are compared against the default recipe's scratch runs: the default re-estimates
BatchNorm statistics on the target data and fine-tunes everything at one learning rate. Recipes that make sense
for a random encoder too (the warm-ups, the lower encoder rate, the cosine decay) are also run from scratch, to tell a recipe that
helps pretraining from one that helps any init.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from RubikSSLLib import evaluate, rundir  # noqa: E402

NPZ = REPO.parent / "shared/data/cls/adrenalmnist3d_64_trainval.npz"
RECIPES = {  # extra `rubikssl finetune` flags
    "default": [],
    "keep-bn": ["--no-bn-recalibration"],  # the pretext's BatchNorm statistics instead of the target data's
    "head-warmup": ["--freeze-epochs", "3"],  # the new head fitted on a frozen encoder first
    "lr-warmup": ["--warmup-epochs", "2"],
    "encoder-lr": ["--encoder-lr-factor", "0.1"],
    "cosine": ["--warmup-epochs", "1", "--lr-schedule", "cosine"],
}
FOR_SCRATCH_TOO = ("default", "lr-warmup", "encoder-lr", "cosine")


def thread_environment(threads: int = 1) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def rubikssl(*arguments: str, threads: int = 1) -> None:
    subprocess.run([sys.executable, "-m", "RubikSSLLib", *arguments, "--progress", "none"], check=True,
                   env=thread_environment(threads), cwd=REPO)


def last_step(run: Path) -> int:
    metrics = run / rundir.METRICS
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def pretrain(task: str, cube_size: int, out: Path, args: argparse.Namespace,
             data: tuple[str, ...] = ("--data", str(NPZ), "--spacing", "native")) -> dict:
    """Pretrain `task` for args.steps x args.batch_size on `data` (rubikssl pretrain arguments) unless done;
    returns the last held-out pretext metrics."""
    run = out / f"pretrain_{task}"
    if last_step(run) < args.steps:  # a best model alone may come from a run stopped half-way
        rubikssl("pretrain", "--task", task, *data, "--out", str(run), "--steps", str(args.steps),
                 "--batch-size", str(args.batch_size), "--cube-size", str(cube_size),
                 "--eval-every", str(args.steps // 4), "--val-puzzles", "64", *(["--resume"] if run.exists() else []))
    history = [json.loads(line) for line in (run / rundir.METRICS).read_text().splitlines()]
    return {key: value for key, value in history[-1].items() if key.startswith("val_")}


def describe(pretext_metrics: dict) -> str:
    """'ordering_acc 0.953, loss 0.491' from pretrain()'s {'val_ordering_acc': 0.953, 'val_loss': 0.491}."""
    return ", ".join(f"{key.removeprefix('val_')} {value:.3f}" for key, value in pretext_metrics.items())


def finetune(init: str, name: str, seed: int, out: Path, args: argparse.Namespace,
             recipe: str = "default") -> dict[str, float]:
    run = out / "finetune" / (f"{name}_seed{seed}" if recipe == "default" else f"{name}_{recipe}_seed{seed}")
    if not evaluate.finished(run, args.epochs):
        rubikssl("finetune", "--task", "classify", "--train", str(NPZ), "--val", str(NPZ), "--out", str(run),
                 "--init", init, "--label-fraction", str(args.fraction), "--epochs", str(args.epochs),
                 "--seed", str(seed), *RECIPES[recipe], *(["--resume"] if run.exists() else []))
    return {key: evaluate.score(run, key, args.last_epochs) for key in ("val_auc", "val_acc")}


def label(recipe: str) -> str:
    return "" if recipe == "default" else f" ({recipe})"


def row(name: str, pretext: str, scores: list[dict], baselines: list[list[dict] | None]) -> str:
    """A table row; one paired AUC difference (and seeds improved) per baseline given, '–' for None."""
    auc = [s["val_auc"] for s in scores]
    cells = [name, pretext, spread(auc), spread([s["val_acc"] for s in scores])]
    for baseline in baselines:
        if baseline is None:
            cells.append("–")
            continue
        summary = evaluate.summarise({"f": {"scratch": [s["val_auc"] for s in baseline], "pretrained": auc}})["f"]
        cells.append(f"{summary['difference_mean']:+.3f} ± {summary['difference_sd']:.3f} "
                     f"({summary['seeds_improved']}/{summary['seeds']})")
    return "| " + " | ".join(cells) + " |"


def spread(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tasks", default="rubik,rubik+,rubik++,jigsaw,rotation,rpl:20,exemplar,cpc,mae,genesis",
                        help="names, each optionally with its own cube size as name:N (rpl's 3x3x3 grid needs <= 21)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cube-size", type=int, default=28, help="fits a 2x2x2 grid with gaps in 64^3")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--last-epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--recipes", default="default", help=f"fine-tuning recipes, from {','.join(RECIPES)}")
    args = parser.parse_args()
    seeds = range(args.seeds)
    recipes = args.recipes.split(",")
    unknown = set(recipes) - set(RECIPES)
    if unknown:
        parser.error(f"unknown recipes {sorted(unknown)}; choose from {list(RECIPES)}")
    scratch: dict[str, list[dict]] = {}  # the default recipe first: every row compares with it
    rows = []
    for recipe in ["default"] + [r for r in recipes if r in FOR_SCRATCH_TOO and r != "default"]:
        scratch[recipe] = [finetune("scratch", "scratch", seed, args.out, args, recipe) for seed in seeds]
        rows.append(row(f"scratch{label(recipe)}", "–", scratch[recipe],
                        [None if recipe == "default" else scratch["default"], None]))
    for entry in args.tasks.split(","):
        task, _, cube_size = entry.partition(":")
        pretext_text = describe(pretrain(task, int(cube_size or args.cube_size), args.out, args))
        for recipe in recipes:
            scores = [finetune(str(args.out / f"pretrain_{task}"), task, seed, args.out, args, recipe) for seed in seeds]
            rows.append(row(f"{task}{label(recipe)}", pretext_text, scores,
                            [scratch["default"], scratch.get(recipe) if recipe != "default" else None]))
        print(f"finished {task}", flush=True)
    table = [f"AdrenalMNIST3D val (98 volumes), {args.fraction:g} of the labels, {args.epochs} epochs, mean of the last "
             f"{args.last_epochs}; pretraining {args.steps} steps x {args.batch_size}; mean ± sd over {args.seeds} paired seeds",
             "", "| init (recipe) | pretext metric (held-out) | AUC | ACC | AUC - default scratch (paired, seeds improved) "
             "| AUC - scratch with the same recipe |", "|---|---|---|---|---|---|", *rows]
    (args.out / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
