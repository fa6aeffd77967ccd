"""Scratch versus pretrained on a segmentation task: BraTS 2015 glioma, Dice per class. Prints a Markdown table.
Not a test: it takes hours on a CPU. BraTS is licensed for non-commercial use: benchmarks only.

    python Testing/Benchmarks/bench_segmentation_transfer.py --out bench-seg [--tasks rubik,mae] [--init NAME=RUN_DIR ...]

Every pretext task of --tasks pretrains the same encoder with the same budget (steps x batch) on the head MRI and CT
volumes of ../shared/data/pretrain (no BraTS case among them) resampled to 2 mm, those too small for the task left
out; --init adds pretraining runs made elsewhere.

The four BraTS cases of ../shared/data (FLAIR + T1c), with their own labels (--labels brats, the default: Dice per
label and the BraTS regions whole tumour, tumour core, enhancing tumour) or merged into three classes as in the
results of 2026-11-26 (--labels merged: 1 necrosis and 3 non-enhancing -> 1 non-enhancing core, which alone are a
few hundred voxels in some cases; 2 oedema; 4 -> 3 enhancing), are split four ways: each fold fine-tunes on three cases and validates on the fourth, for scratch and
for every pretraining run given, with the same seeds (so the same patches are drawn; --seeds repeats each fold).
A run's score is the mean of its last epochs' foreground Dice per class. Runs go through the `rubikssl` command
line, one thread each; finished runs are reused, so it resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pretext_transfer import describe, pretrain, rubikssl  # noqa: E402

from RubikSSLLib import evaluate, statistics  # noqa: E402
from RubikSSLLib.files import write_json_atomic  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BRATS = REPO.parent / "shared/data/seg/brats2015_deepmedic"
PRETRAIN_DATA = ("--data", str(REPO.parent / "shared/data/pretrain"), "--spacing", "2", "--skip-unusable")
CASES = ("brats_2013_pat0001_1", "brats_2013_pat0002_1", "brats_2013_pat0003_1", "brats_2013_pat0005_1")
LABELS = {
    "brats": ({"1": "necrosis", "2": "oedema", "3": "non-enhancing", "4": "enhancing"}, {v: v for v in range(5)},
              ("whole_tumour", "tumour_core", "enhancing_tumour")),
    "merged": ({"1": "core", "2": "oedema", "3": "enhancing"}, {0: 0, 1: 1, 2: 2, 3: 1, 4: 3}, ()),
}  # name -> (classes, BraTS label -> class value, regions scored)
CLASSES, MERGE, REGIONS = LABELS["brats"]


def use_labels(name: str) -> None:
    global CLASSES, MERGE, REGIONS
    CLASSES, MERGE, REGIONS = LABELS[name]


def merged_labels(case: str, out: Path) -> Path:
    import SimpleITK as sitk

    path = out / f"{case}_labels.nii.gz"
    if not path.exists():
        image = sitk.ReadImage(str(BRATS / case / "OTMultiClass.nii.gz"))
        labels = np.vectorize(MERGE.get)(sitk.GetArrayFromImage(image).astype(int)).astype(np.uint8)
        merged = sitk.GetImageFromArray(labels)
        merged.CopyInformation(image)
        sitk.WriteImage(merged, str(path))
    return path


def datalist(fold: int, out: Path) -> Path:
    entries = [{"image": [str(BRATS / c / "Flair_subtrMeanDivStd.nii.gz"), str(BRATS / c / "T1c_subtrMeanDivStd.nii.gz")],
                "label": str(merged_labels(c, out))} for c in CASES]
    path = out / f"fold{fold}.json"
    # atomic: a second instance of this benchmark may be starting a fine-tune on it
    write_json_atomic(path, {"labels": CLASSES, "training": [e for i, e in enumerate(entries) if i != fold],
                             "validation": [entries[fold]]})
    return path


def finetune(init: str, name: str, fold: int, seed: int, out: Path, args: argparse.Namespace) -> dict[str, float]:
    run = out / (f"{name}_fold{fold}" if seed == 0 else f"{name}_fold{fold}_seed{seed}")
    if not evaluate.finished(run, args.epochs):
        data = str(datalist(fold, out))
        rubikssl("finetune", "--task", "segment", "--train", data, "--val", data, "--out", str(run), "--init", init,
                 "--epochs", str(args.epochs), "--iterations-per-epoch", str(args.iterations), "--patch-size",
                 str(args.patch_size), "--spacing", str(args.spacing), "--batch-size", "2", "--decoder", args.decoder,
                 "--seed", str(seed), *(["--resume"] if run.exists() else []))
    return {c: evaluate.score(run, f"dice_{c}", args.last_epochs) for c in (*CLASSES.values(), *REGIONS)} | {
        "mean": evaluate.score(run, "val_mean_dice", args.last_epochs)}


def fold_interval(scratch: list[dict], pretrained: list[dict], seeds: int, key: str = "mean") -> str:
    """The paired bootstrap interval of pretrained - scratch over folds (each fold's validation case is one case)
    and fine-tuning seeds, and the exact sign-flip p over the 4 fold differences (seeds averaged per fold): with 4
    folds the bootstrap's p can reach 0, the sign flips cannot go below 2/16. Runs are ordered seed-major, as main()
    makes them."""
    def by_seed(runs: list[dict]) -> list[np.ndarray]:
        return [np.array([r[key] for r in runs[s * len(CASES):(s + 1) * len(CASES)]]) for s in range(seeds)]

    row = statistics.paired_bootstrap(by_seed(scratch), by_seed(pretrained), lambda folds, idx: float(folds[idx].mean()),
                                      len(CASES))
    per_fold = np.mean(by_seed(pretrained), axis=0) - np.mean(by_seed(scratch), axis=0)
    return (f"[{row['low']:+.3f}, {row['high']:+.3f}], bootstrap p {row['p_value']:.3f}, "
            f"sign-flip p {statistics.sign_flip_p_value(per_fold):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tasks", default="", help="pretext tasks to pretrain here, each optionally with its own "
                        "cube size as name:N (rpl's 3x3x3 grid: rpl:20)")
    parser.add_argument("--steps", type=int, default=500, help="pretraining steps of every task")
    parser.add_argument("--batch-size", type=int, default=8, help="pretraining crops per step")
    parser.add_argument("--cube-size", type=int, default=32)
    parser.add_argument("--init", nargs="*", default=[], help="NAME=PRETRAINING_RUN_DIR, one per pretrained init")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=20, help="patches batches per epoch")
    parser.add_argument("--last-epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=1, help="fine-tuning seeds 0 .. N-1 per fold, paired across inits")
    parser.add_argument("--patch-size", type=int, default=48)
    parser.add_argument("--spacing", type=float, default=2.0)
    parser.add_argument("--decoder", choices=("unet", "duc"), default="unet")
    parser.add_argument("--labels", choices=tuple(LABELS), default="brats")
    args = parser.parse_args()
    use_labels(args.labels)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = args.out if args.labels == "merged" else args.out / args.labels  # merged: the earlier folders resume
    runs.mkdir(exist_ok=True)
    pretext = {}  # all pretraining first, so that a second instance can pretrain other tasks meanwhile
    for entry in filter(None, args.tasks.split(",")):
        task, _, cube_size = entry.partition(":")
        pretext[task] = describe(pretrain(task, int(cube_size or args.cube_size), args.out, args, PRETRAIN_DATA))
    inits = [("scratch", "scratch")] + [(task, str(args.out / f"pretrain_{task}")) for task in pretext] + [
        tuple(entry.split("=", 1)) for entry in args.init]
    pairs = [(fold, seed) for seed in range(args.seeds) for fold in range(len(CASES))]
    scores = {name: [finetune(init, name, fold, seed, runs, args) for fold, seed in pairs] for name, init in inits}
    columns = [*CLASSES.values(), "mean", *REGIONS]
    lines = [f"BraTS 2015, 4 folds (3 training cases, 1 validation), {args.decoder} decoder, {args.epochs} epochs x "
             f"{args.iterations} batches of 2 x {args.patch_size}^3 at {args.spacing:g} mm; foreground Dice, mean of the "
             f"last {args.last_epochs} epochs, mean ± sd over {len(pairs)} runs ({args.seeds} seed{'s' * (args.seeds > 1)} x {len(CASES)} folds); "
             f"pretraining {args.steps} steps x {args.batch_size}",
             "", "| init | pretext metric (held-out) | " + " | ".join(columns) + " | mean - scratch (paired, runs improved) | 95 % interval, p |",
             "|---" * (len(columns) + 4) + "|"]
    for name, _ in inits:
        cells = [f"{np.mean([s[c] for s in scores[name]]):.3f} ± {np.std([s[c] for s in scores[name]], ddof=1):.3f}"
                 for c in columns]
        difference = [s["mean"] - r["mean"] for s, r in zip(scores[name], scores["scratch"])]
        paired = "–" if name == "scratch" else (f"{np.mean(difference):+.3f} ± {np.std(difference, ddof=1):.3f} "
                                                f"({sum(d > 0 for d in difference)}/{len(difference)})")
        interval = "–" if name == "scratch" else fold_interval(scores["scratch"], scores[name], args.seeds)
        lines.append(f"| {name} | {pretext.get(name, '–')} | " + " | ".join(cells) + f" | {paired} | {interval} |")
    if REGIONS and len(inits) > 1:
        lines += ["", "Per BraTS region, pretrained - scratch, paired over folds and seeds:", "",
                  "| init | " + " | ".join(REGIONS) + " |", "|---" * (len(REGIONS) + 1) + "|"]
        for name, _ in inits[1:]:
            cells = [f"{np.mean([s[r] - c[r] for s, c in zip(scores[name], scores['scratch'])]):+.3f} "
                     f"{fold_interval(scores['scratch'], scores[name], args.seeds, r)}" for r in REGIONS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (runs / "results.json").write_text(json.dumps(scores, indent=1))
    (runs / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
