"""nnU-Net from scratch vs nnU-Net from our pretraining (Rubik's cube, MAE) on BraTS, and nnU-Net vs our own U-Net
fine-tune at equal wall time. Prints a Markdown table. Not a test: an hour or more on a CPU. Needs the nnU-Net extra.

    python Testing/Benchmarks/bench_nnunet.py --out bench-nnunet [--iterations 250] [--pretrain-steps rubik=300,mae=60] [--threads 2]
    python Testing/Benchmarks/bench_nnunet.py --out bench-nnunet --throughput   # puzzles/s, nnU-Net's network vs ours

1. The four BraTS cases of ../shared/data (FLAIR + T1c, labels 1-4) at --spacing mm become an nnU-Net dataset that
   nnU-Net itself fingerprints, plans and preprocesses (its 3d_fullres configuration); one fold per case, trained on
   the other three (splits_final.json).
2. Our pretext tasks pretrain the plan's own network (`rubikssl pretrain --network nnunet`): rubik on its encoder, mae
   on its whole U-Net, on the FLAIR + T1-weighted pairs of the MS patients in ../shared/data/pretrain (no BraTS case
   among them, so no fold's validation case is seen), preprocessed by nnU-Net's preprocessor for the plan; then
   `rubikssl export-nnunet` writes what nnU-Net's -pretrained_weights loads.
3. Each fold is trained by nnU-Net's own nnUNetTrainer (its loss, deep supervision, augmentation, poly schedule)
   for --iterations iterations, from scratch and from each export, with the same seed per fold (paired), then its
   own validation (perform_actual_validation: sliding window over the held-out case); Dice of the BraTS regions
   (whole tumour, tumour core, enhancing) on the raw label grid.
4. Our own U-Net fine-tune (`rubikssl finetune --task segment`, from scratch, default recipe) on the same files and
   folds gets the wall time nnU-Net's scratch run took on that fold (its steps calibrated from three short runs).

Each run is a child process (nnU-Net's validation spawns workers; one thread budget per run); finished runs are
reused, so the benchmark resumes. BraTS is licensed for non-commercial use: benchmarks only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(REPO / "Testing"), str(HERE)]

import nnunet_dataset  # noqa: E402
from bench_pretext_transfer import last_step, rubikssl, thread_environment  # noqa: E402

from RubikSSLLib import evaluate, regions, rundir, statistics  # noqa: E402
from RubikSSLLib.files import write_json_atomic  # noqa: E402

SHARED = REPO.parent / "shared/data"
DATASET_ID = 911
PLANNED = "3d_fullres"
PRETEXT = {"rubik": ("--cube-size", "16,24,24", "--jitter", "2"), "mae": ()}  # task -> its own pretrain flags (a 3 mm head
# is 57 voxels wide after nnU-Net crops it: 2 x 24 and a gap fit, with 2 voxels per axis left at the bottleneck)
REGIONS = tuple(regions.BRATS_REGIONS)
CLASSES = {"1": "necrosis", "2": "oedema", "3": "non-enhancing", "4": "enhancing"}


def planned_dataset(out: Path, spacing_mm: float) -> Path:
    """The BraTS dataset planned and preprocessed by nnU-Net under `out`/nnunet (once); returns its plans file."""
    folders = nnunet_dataset.use_folders(out / "nnunet")
    found = list(folders["nnUNet_preprocessed"].glob(f"Dataset{DATASET_ID}_*/nnUNetPlans.json"))
    if found:
        return found[0]
    nnunet_dataset.make_raw_dataset(SHARED, folders["nnUNet_raw"], DATASET_ID, spacing_mm)
    plans = nnunet_dataset.plan_and_preprocess(DATASET_ID, (PLANNED,))
    nnunet_dataset.write_splits(plans.parent)
    return plans


def configuration_name(plans: Path, args: argparse.Namespace) -> str:
    """The planned configuration, or (--features) one inheriting from it with fewer features per stage: nnU-Net's
    network, preprocessing and recipe all the same, at a fraction of the FLOPs."""
    if not args.features:
        return PLANNED
    name = f"{PLANNED}_f{args.features.replace(',', '-')}"
    if name not in json.loads(plans.read_text())["configurations"]:
        nnunet_dataset.add_configuration(plans, name, tuple(int(f) for f in args.features.split(",")),
                                         batch_size=json.loads(plans.read_text())["configurations"][PLANNED]["batch_size"])
    return name


def raw_folder(out: Path) -> Path:
    return next((out / "nnunet/nnUNet_raw").glob(f"Dataset{DATASET_ID}_*"))


def pretraining_datalist(out: Path) -> Path:
    """The MS patients' FLAIR + T1-weighted pairs (the plan's two channels, in its order), each T1w resampled onto
    its FLAIR's grid (the two were scanned on different grids; nnU-Net needs one per case); the last for validation."""
    import SimpleITK as sitk

    folder = out / "pretrain_data"
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for flair in sorted((SHARED / "pretrain").glob("msl_*_FLAIR.nii.gz")):
        t1w = flair.with_name(flair.name.replace("_FLAIR.", "_T1W."))
        if not t1w.exists():
            continue
        aligned = folder / t1w.name
        if not aligned.exists():
            reference = sitk.ReadImage(str(flair))
            sitk.WriteImage(sitk.Resample(sitk.ReadImage(str(t1w), sitk.sitkFloat32), reference), str(aligned))
        pairs.append({"image": [str(flair), str(aligned)]})
    path = out / "pretrain_ms_pairs.json"
    path.write_text(json.dumps({"training": pairs[:-1], "validation": pairs[-1:]}, indent=1))
    return path


def steps_of(task: str, budget: str) -> int:
    """A task's pretraining steps from --pretrain-steps: one number for all, or task=N,task=N."""
    if "=" not in budget:
        return int(budget)
    return int(dict(entry.split("=") for entry in budget.split(","))[task])


def pretrain(task: str, plans: Path, out: Path, args: argparse.Namespace) -> tuple[Path, dict, float]:
    """Pretrain `task` on the plan's network unless done, export it; returns the export, its last held-out pretext
    metrics and the pretraining's wall time (s; NaN for a run resumed by an earlier version of this script)."""
    run = out / f"pretrain_{task}"
    timing = out / "results" / f"pretrain_{task}.json"
    start = time.perf_counter()
    steps = steps_of(task, args.pretrain_steps)
    if last_step(run) < steps:
        rubikssl("pretrain", "--network", "nnunet", "--plans", str(plans), "--configuration",
                 configuration_name(plans, args), "--task", task, "--data", str(pretraining_datalist(out)), "--out", str(run),
                 "--steps", str(steps), "--batch-size", str(args.pretrain_batch_size),
                 "--eval-every", str(max(1, steps // 4)), "--val-puzzles", str(args.val_puzzles),
                 *PRETEXT[task], *(["--resume"] if run.exists() else []), threads=args.threads)
        write_json_atomic(timing, {"wall_s": time.perf_counter() - start})
    weights = run / "nnunet_pretrained.pth"
    if not weights.exists():
        rubikssl("export-nnunet", str(run), "--out", str(weights), threads=args.threads)
    history = [json.loads(line) for line in (run / rundir.METRICS).read_text().splitlines()]
    wall_s = json.loads(timing.read_text())["wall_s"] if timing.exists() else float("nan")
    return weights, {k.removeprefix("val_"): v for k, v in history[-1].items() if k.startswith("val_")}, wall_s


def throughput(plans: Path, args: argparse.Namespace, steps: int = 25) -> list[str]:
    """Rubik pretraining puzzles/s on nnU-Net's planned network (its encoder, the plan's preprocessing) and on ours
    (the default encoder, our preprocessing at --spacing), the same cubes, batch and volumes, at 1 and 2 threads:
    the steady rate between the runs' own progress events (bench_gpu.steady_rate), sampler included."""
    from bench_gpu import steady_rate

    from RubikSSLLib import progress

    data = ("--data", str(pretraining_datalist(args.out)))
    networks = {"nnU-Net's plan (" + PLANNED + ")": ("--network", "nnunet", "--plans", str(plans), "--configuration",
                                                  PLANNED),
                "RubikSSL's encoder": ("--spacing", str(args.spacing))}
    lines = [f"Rubik pretraining, cubes 16x24x24 (jitter 2), batch {args.pretrain_batch_size}, {steps} steps, 7 MS "
             "FLAIR + T1w pairs; puzzles/s between the second and the last progress event", "",
             "| network | 1 thread | 2 threads |", "|---|---|---|"]
    for name, flags in networks.items():
        rates = []
        for threads in (1, 2):
            run = args.out / f"throughput_{'nnunet' if '--plans' in flags else 'ours'}_{threads}"
            shutil.rmtree(run, ignore_errors=True)  # a fresh run each time: its rate, not a resume's
            result = subprocess.run(
                [sys.executable, "-m", "RubikSSLLib", "pretrain", *flags, *data, "--task", "rubik", *PRETEXT["rubik"],
                 "--out", str(run), "--steps", str(steps), "--eval-every", str(steps), "--batch-size",
                 str(args.pretrain_batch_size), "--val-puzzles", "2", "--shortcut-puzzles", "0", "--progress", "json"],
                capture_output=True, text=True, env=thread_environment(threads), cwd=REPO, check=True)
            rates.append(steady_rate([e for e in map(progress.parse_line, result.stdout.splitlines()) if e])[0])
        lines.append(f"| {name} | {rates[0]:.2f} | {rates[1]:.2f} |")
    return lines


def child(arguments: list[str], threads: int) -> None:
    subprocess.run([sys.executable, str(Path(__file__).resolve()), *arguments], check=True,
                   env=thread_environment(threads), cwd=REPO)


def nnunet_run(arm: str, fold: int, weights: Path | None, args: argparse.Namespace) -> dict:
    """One nnU-Net training + validation of `arm` on `fold` (in a child process, unless its result exists)."""
    result = args.out / "results" / f"nnunet_{arm}_fold{fold}.json"
    if not result.exists():
        child(["--out", str(args.out), "--one-nnunet", arm, str(fold), "--weights", str(weights or ""),
               "--iterations", str(args.iterations), "--epochs", str(args.epochs), "--seed", str(args.seed),
               "--threads", str(args.threads), "--features", args.features, *(["--tta"] if args.tta else [])],
              args.threads)
    return json.loads(result.read_text())


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_one_nnunet(arm: str, fold: int, weights: str, args: argparse.Namespace) -> None:
    """nnUNetTrainer with args.iterations iterations (args.epochs epochs), from `weights` if given; writes the
    held-out case's region Dice and the wall times to results/nnunet_ARM_foldF.json."""
    import torch

    os.environ.setdefault("nnUNet_n_proc_DA", "0")  # augmentation in this process: the thread budget is the run's
    os.environ.setdefault("nnUNet_def_n_proc", "1")
    plans_file = planned_dataset(args.out, args.spacing)
    torch.set_num_threads(args.threads)
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    per_epoch = max(1, args.iterations // args.epochs)

    class Budget(nnUNetTrainer):  # nnU-Net reads its trainers' __init__ signature: spelled out as its own
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cpu")) -> None:
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = args.epochs, per_epoch, 1

    Budget.__name__ = Budget.__qualname__ = f"nnUNetTrainerBench_{arm}_{args.iterations}"  # its output folder
    plans = json.loads(plans_file.read_text()) | {"continue_training": False}
    dataset = json.loads((plans_file.parent / "dataset.json").read_text())
    seed_everything(args.seed * 1000 + fold)
    trainer = Budget(plans, configuration_name(plans_file, args), fold, dataset, device=torch.device("cpu"))
    trainer.initialize()
    if weights:
        load_pretrained_weights(trainer.network, weights, verbose=False)
    start = time.perf_counter()
    trainer.run_training()
    trained = time.perf_counter()
    if not args.tta:  # its mirroring test-time augmentation: 8 forward passes per window on a 3D patch
        trainer.inference_allowed_mirroring_axes = None
    trainer.perform_actual_validation(False)
    validated = time.perf_counter()
    case = nnunet_dataset.CASES[fold]
    scores = region_scores(Path(trainer.output_folder) / "validation" / f"{case}.nii.gz",
                           raw_folder(args.out) / "labelsTr" / f"{case}.nii.gz")
    write_json_atomic(args.out / "results" / f"nnunet_{arm}_fold{fold}.json", scores | {
        "train_s": trained - start, "validation_s": validated - trained, "iterations": per_epoch * args.epochs})


def region_scores(prediction: Path, truth: Path) -> dict[str, float]:
    import SimpleITK as sitk

    def read(path: Path) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.int64)

    return {name: (0.0 if np.isnan(d) else d) for name, d in  # an empty prediction of a present region scores 0
            regions.region_dice(read(prediction), read(truth), regions.BRATS_REGIONS).items()}


def our_datalist(fold: int, out: Path) -> Path:
    """The nnU-Net raw files themselves (the same 3 mm voxels and labels nnU-Net's runs see), fold `fold` held out."""
    raw = raw_folder(out)
    entries = [{"image": [str(raw / "imagesTr" / f"{c}_0000.nii.gz"), str(raw / "imagesTr" / f"{c}_0001.nii.gz")],
                "label": str(raw / "labelsTr" / f"{c}.nii.gz")} for c in nnunet_dataset.CASES]
    path = out / f"ours_fold{fold}.json"
    path.write_text(json.dumps({"labels": CLASSES, "training": [e for i, e in enumerate(entries) if i != fold],
                                "validation": [entries[fold]]}, indent=1))
    return path


def our_finetune(run: Path, fold: int, epochs: int, per_epoch: int, args: argparse.Namespace) -> float:
    """`rubikssl finetune --task segment` from scratch; returns its wall time (s)."""
    data = str(our_datalist(fold, args.out))
    start = time.perf_counter()
    rubikssl("finetune", "--task", "segment", "--train", data, "--val", data, "--out", str(run),
             "--init", "scratch", "--epochs", str(epochs), "--iterations-per-epoch", str(per_epoch), "--patch-size",
             str(args.patch_size), "--spacing", str(args.spacing), "--batch-size", "2", "--seed", str(args.seed * 1000 + fold),
             threads=args.threads)
    return time.perf_counter() - start


def our_step_cost(args: argparse.Namespace) -> dict[str, float]:
    """Our fine-tune's wall time as start-up + epochs x validation + steps x step (s), from three short runs:
    1 epoch of 10 steps, 1 of 30, 2 of 10."""
    cache = args.out / "results" / "ours_calibration.json"
    if not cache.exists():
        one = our_finetune(args.out / "calibration_1x10", 0, 1, 10, args)
        longer = our_finetune(args.out / "calibration_1x30", 0, 1, 30, args)
        two = our_finetune(args.out / "calibration_2x10", 0, 2, 10, args)
        step = (longer - one) / 20
        validation = max(0.0, two - one - 10 * step)
        write_json_atomic(cache, {"step_s": step, "validation_s": validation,
                             "startup_s": max(0.0, one - 10 * step - validation)})
    return json.loads(cache.read_text())


def ours_run(fold: int, wall_s: float, args: argparse.Namespace) -> dict:
    """Our U-Net fine-tune on `fold` in the wall time `wall_s` nnU-Net's scratch run took there (the cost model of
    our_step_cost; its step time then corrected by the previous fold's run, within a factor of 2)."""
    result = args.out / "results" / f"ours_fold{fold}.json"
    if not result.exists():
        cost = our_step_cost(args)
        epochs = args.our_epochs
        overhead = cost["startup_s"] + epochs * cost["validation_s"]
        per_epoch = max(1, int((wall_s - overhead) / cost["step_s"]) // epochs)
        run = args.out / f"ours_fold{fold}"
        took = our_finetune(run, fold, epochs, per_epoch, args)
        observed = (took - overhead) / (per_epoch * epochs)
        cost["step_s"] = float(np.clip(observed, cost["step_s"] / 2, cost["step_s"] * 2))
        write_json_atomic(args.out / "results" / "ours_calibration.json", cost)
        write_json_atomic(result, {r: evaluate.score(run, f"dice_{r}", 1) for r in REGIONS} | {
            "train_s": took, "validation_s": 0.0, "iterations": per_epoch * epochs})
    return json.loads(result.read_text())


def interval(scratch: list[dict], other: list[dict], key: str) -> str:
    """mean difference, its paired bootstrap 95 % interval over the folds and the exact sign-flip p."""
    a, b = np.array([[s[key] for s in scratch]]), np.array([[o[key] for o in other]])
    row = statistics.paired_bootstrap(list(a), list(b), lambda folds, idx: float(folds[idx].mean()), a.shape[1])
    return (f"{row['difference']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}] "
            f"p {statistics.sign_flip_p_value(b[0] - a[0]):.2f}")


def table(arms: dict[str, list[dict]], pretext: dict[str, tuple[dict, float]], args: argparse.Namespace,
          plans: Path) -> list[str]:
    name = configuration_name(plans, args)
    planned = json.loads(plans.read_text())["configurations"]
    configuration = planned[PLANNED] | planned[name]
    architecture = configuration["architecture"]["arch_kwargs"]
    scratch = arms["nnU-Net scratch"]
    pairs = len(json.loads((args.out / "pretrain_ms_pairs.json").read_text())["training"])
    lines = [f"BraTS 2015 (4 cases of ../shared/data, FLAIR + T1c) at {args.spacing:g} mm, 4 folds (3 training cases, "
             f"1 held out), seed {args.seed} per fold paired across arms; nnU-Net {PLANNED} as nnU-Net planned it"
             f"{'' if name == PLANNED else ' but with ' + args.features + ' features per stage (its inherits_from)'} "
             f"(patch {'x'.join(map(str, configuration['patch_size']))}, batch {configuration['batch_size']}, "
             f"features {'-'.join(map(str, architecture['features_per_stage']))}), nnUNetTrainer for "
             f"{scratch[0]['iterations']} iterations ({args.epochs} epochs), {args.threads} CPU threads; pretraining "
             f"{args.pretrain_steps} steps x {args.pretrain_batch_size} on {pairs} MS FLAIR + T1w pairs; Dice on the held-out "
             f"case (nnU-Net's own sliding-window validation{', mirroring' if args.tta else ', no mirroring'}), mean ± sd over folds; differences paired over folds "
             f"with the bootstrap 95 % interval and the exact sign-flip p (its floor with 4 folds is 0.125).", "",
             "| arm | pretext (held-out) | " + " | ".join(REGIONS) + " | train + validation per fold (s) | "
             + " | ".join(f"{r} - nnU-Net scratch" for r in REGIONS) + " |", "|---" * (2 * len(REGIONS) + 3) + "|"]
    for name, runs in arms.items():
        cells = [f"{np.mean([r[k] for r in runs]):.3f} ± {np.std([r[k] for r in runs], ddof=1):.3f}" for k in REGIONS]
        seconds = np.mean([r["train_s"] + r["validation_s"] for r in runs])
        versus = ["–"] * len(REGIONS) if runs is scratch else [interval(scratch, runs, k) for k in REGIONS]
        task = name.removeprefix("nnU-Net from ")
        described = ", ".join(f"{k} {v:.3f}" for k, v in pretext[task][0].items()) if task in pretext else "–"
        if task in pretext:
            described += f"; {pretext[task][1] / 60:.0f} min"
        lines.append(f"| {name} | {described} | " + " | ".join(cells) + f" | {seconds:.0f} | " + " | ".join(versus) + " |")
    ours = arms.get("our U-Net, equal wall time")
    if ours:
        lines += ["", f"Our U-Net ran {', '.join(str(r['iterations']) for r in ours)} steps of 2 x "
                      f"{args.patch_size}^3 on folds {', '.join(map(str, range(len(ours))))} ({args.our_epochs} epochs) "
                      f"in about the wall time of nnU-Net's scratch run there (its own column says how close)."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--spacing", type=float, default=3.0, help="mm; 3 mm keeps nnU-Net's plan CPU-sized")
    parser.add_argument("--iterations", type=int, default=250, help="nnU-Net training iterations per run")
    parser.add_argument("--epochs", type=int, default=10, help="nnU-Net epochs the iterations are spread over")
    parser.add_argument("--pretrain-steps", default="rubik=300,mae=60", help="N, or task=N,task=N")
    parser.add_argument("--pretrain-batch-size", type=int, default=4)
    parser.add_argument("--our-epochs", type=int, default=5)
    parser.add_argument("--patch-size", type=int, default=48, help="our U-Net's patch (voxels)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--features", default="", help="features per stage instead of the plan's, e.g. 16,32,64,128,160")
    parser.add_argument("--tta", action="store_true", help="validate with nnU-Net's mirroring (8x the passes)")
    parser.add_argument("--val-puzzles", type=int, default=8, help="pretraining's held-out samples")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tasks", default="rubik,mae", help=f"pretext tasks, from {','.join(PRETEXT)}")
    parser.add_argument("--folds", default="0,1,2,3")
    parser.add_argument("--throughput", action="store_true",
                        help="instead: Rubik pretraining puzzles/s on nnU-Net's network and on ours, 1 and 2 threads")
    parser.add_argument("--one-nnunet", nargs=2, metavar=("ARM", "FOLD"), help=argparse.SUPPRESS)
    parser.add_argument("--weights", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out = args.out.resolve()
    if args.one_nnunet:
        train_one_nnunet(args.one_nnunet[0], int(args.one_nnunet[1]), args.weights, args)
        return
    plans = planned_dataset(args.out, args.spacing)
    if args.throughput:
        print("\n".join(throughput(plans, args)))
        return
    folds = [int(f) for f in args.folds.split(",")]
    pretext = {task: pretrain(task, plans, args.out, args) for task in args.tasks.split(",")}
    arms = {"nnU-Net scratch": [nnunet_run("scratch", f, None, args) for f in folds]}
    for task, (weights, _, _) in pretext.items():
        arms[f"nnU-Net from {task}"] = [nnunet_run(task, f, weights, args) for f in folds]
    arms["our U-Net, equal wall time"] = [
        ours_run(f, s["train_s"] + s["validation_s"], args) for f, s in zip(folds, arms["nnU-Net scratch"])]
    lines = table(arms, {t: (m, s) for t, (_, m, s) in pretext.items()}, args, plans)
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
