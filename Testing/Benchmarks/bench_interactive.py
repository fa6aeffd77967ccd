"""Click-guided segmentation: Dice after 0, 1, 3, 5, 10 simulated clicks and NoC@85, per dataset and model; and the
latency of one click through the `serve` worker. Prints Markdown tables. Not a test: it takes an hour on a CPU.

    python Testing/Benchmarks/bench_interactive.py --out bench-interactive [--init rubik=PRETRAIN_RUN] [--latency]

Datasets of ../shared/data/seg, each split into folds that fine-tune on the other cases and score the held-out one:
BraTS 2015 whole tumour (FLAIR + T1c, 4 cases, 4 folds) and MS lesions (FLAIR, 2 patients, 2 folds). The stroke
case is the only labelled one of its kind, so it has no held-out case and is left out. Models, same recipe and
budget: the automatic U-Net (no clicks: its Dice is the same at every click count), the interactive U-Net from
scratch, and the interactive U-Net from each --init pretraining run. The simulated user is deterministic
(interactive.simulated_session): the first click at the centre of the object, each next one at the centre of the
largest error. Runs go through the command line, one thread each; finished runs are reused.

--latency: end-to-end time of one click (request line in, result file written, reply line out) through
`rubikssl serve` for a 96^3 region at the model's 1 mm grid on a BraTS case, median and 95th percentile over
--clicks requests, with 1 and 2 threads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from RubikSSLLib import evaluate, guidance, interactive, predict, preprocess  # noqa: E402
from RubikSSLLib.files import write_json_atomic  # noqa: E402
from RubikSSLLib.progress import parse_line  # noqa: E402

SEG = REPO.parent / "shared/data/seg"
BRATS = ("brats_2013_pat0001_1", "brats_2013_pat0002_1", "brats_2013_pat0003_1", "brats_2013_pat0005_1")
DATASETS = {
    "BraTS whole tumour": [{"image": [str(SEG / f"brats2015_deepmedic/{c}/Flair_subtrMeanDivStd.nii.gz"),
                                      str(SEG / f"brats2015_deepmedic/{c}/T1c_subtrMeanDivStd.nii.gz")],
                            "label": str(SEG / f"brats2015_deepmedic/{c}/OTMultiClass.nii.gz")} for c in BRATS],
    "MS lesions": [{"image": str(SEG / f"ms_lesion_mni/{p}/FLAIR.nii.gz"), "label": str(SEG / f"ms_lesion_mni/{p}/lesion_gt.nii.gz")}
                   for p in ("patient07", "patient19")],
}
CLICK_COUNTS = (0, 1, 3, 5, 10)


def rubikssl(*arguments: str, threads: int = 1) -> None:
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, "-m", "RubikSSLLib", *arguments, "--progress", "none", "--device", "cpu"],
                   check=True, env=environment, cwd=REPO)


def fold_list(cases: list[dict], fold: int, out: Path) -> Path:
    path = out / f"fold{fold}.json"
    write_json_atomic(path, {"training": [c for i, c in enumerate(cases) if i != fold], "validation": [cases[fold]]})
    return path


def train(dataset: str, fold: int, model: str, init: str, out: Path, args: argparse.Namespace, seed: int = 0) -> Path:
    run = out / (f"{model}_fold{fold}" if seed == 0 else f"{model}_fold{fold}_seed{seed}")
    if not evaluate.finished(run, args.epochs):
        data = str(fold_list(DATASETS[dataset], fold, out))
        rubikssl("finetune", "--task", "segment", "--train", data, "--val", data, "--out", str(run), "--init", init,
                 *(["--interactive"] if model != "automatic" else []), "--epochs", str(args.epochs),
                 "--iterations-per-epoch", str(args.iterations), "--patch-size", str(args.patch_size),
                 "--spacing", str(args.spacing), "--batch-size", "2", "--seed", str(seed),
                 *(["--resume"] if run.exists() else []))
    return run


def held_out(case: dict, card: dict) -> tuple[np.ndarray, np.ndarray]:
    """The held-out case's network input and its object (Z, Y, X bool) on the model's grid."""
    import SimpleITK as sitk

    from RubikSSLLib.volumes import Grid, resample_onto

    images = case["image"] if isinstance(case["image"], list) else [case["image"]]
    image, volume = preprocess.network_input(images, card["config"], card["channels"])
    truth = resample_onto(sitk.ReadImage(case["label"]), Grid(image.shape[1:], volume.geometry), nearest=True) > 0
    return image, truth


def score(run: Path, case: dict, interactive_model: bool) -> list[float]:
    """Dice after 0 .. max(CLICK_COUNTS) clicks of the deterministic simulated user (the automatic model: its one
    Dice, repeated)."""
    model, card = predict.load_finetuned(run, "segment", "cpu")
    image, truth = held_out(case, card)
    patch = tuple(card["config"]["patch_size"])
    if not interactive_model:
        labels = predict.whole_volume_classes(model, image, patch) > 0
        return [interactive.dice(labels, truth)] * (max(CLICK_COUNTS) + 1)
    return interactive.simulated_session(model, image, truth, max(CLICK_COUNTS), patch)


def accuracy_table(args: argparse.Namespace) -> str:
    models = [("automatic", "scratch"), ("interactive scratch", "scratch")] + [
        (f"interactive {name}", run) for name, run in (entry.split("=", 1) for entry in args.init)]
    lines = [f"{args.epochs} epochs x {args.iterations} batches of 2 x {args.patch_size}^3 at {args.spacing:g} mm, "
             f"one thread, seeds {args.seed_list}; Dice on the held-out case of each fold, mean ± sd over folds and seeds",
             "", "| data | model | " + " | ".join(f"Dice@{n}" for n in CLICK_COUNTS) + " | NoC@85 (cap 10) | min per fine-tune |",
             "|---" * (len(CLICK_COUNTS) + 4) + "|"]
    results = {}
    for dataset, cases in DATASETS.items():
        if args.datasets and dataset.split()[0].lower() not in args.datasets.split(","):
            continue
        out = args.out / dataset.split()[0].lower()
        out.mkdir(parents=True, exist_ok=True)
        for model, init in models:
            sessions, minutes = [], []
            for seed in args.seed_list:
                for fold in range(len(cases)):
                    started = time.monotonic()
                    run = train(dataset, fold, model.replace(" ", "_"), init, out, args, seed)
                    minutes.append((time.monotonic() - started) / 60)
                    sessions.append(score(run, cases[fold], model != "automatic"))
            results[f"{dataset} / {model}"] = sessions
            cells = [f"{np.mean([s[n] for s in sessions]):.3f} ± {np.std([s[n] for s in sessions]):.3f}" for n in CLICK_COUNTS]
            noc = [interactive.clicks_to_reach(s, 0.85) for s in sessions]
            lines.append(f"| {dataset} | {model} | " + " | ".join(cells) + f" | {np.mean(noc):.1f} | {max(minutes):.1f} |")
            print(lines[-1], flush=True)
    write_json_atomic(args.out / f"results_seeds{'-'.join(map(str, args.seed_list))}.json", results)
    return "\n".join(lines)


def latency_table(args: argparse.Namespace) -> str:
    """Median and 95th percentile of one click through the worker, 1 and 2 threads."""
    case = DATASETS["BraTS whole tumour"][3]
    run = args.out / "latency_model"
    if not evaluate.finished(run, 1):  # the weights do not matter for the time: one short epoch
        data = str(fold_list(DATASETS["BraTS whole tumour"], 3, args.out))
        rubikssl("finetune", "--task", "segment", "--interactive", "--train", data, "--val", data, "--out", str(run),
                 "--epochs", "1", "--iterations-per-epoch", "1", "--patch-size", "96", "--spacing", "1",
                 "--batch-size", "1")
    model, card = predict.load_finetuned(run, "segment", "cpu")
    image, truth = held_out(case, card)
    from RubikSSLLib import clicks as clickfile
    from RubikSSLLib.volumes import load_case

    geometry = load_case(case["image"], card["config"]["spacing_mm"]).geometry
    rng = np.random.default_rng(0)
    points = [guidance.first_click(truth, rng)[0] for _ in range(args.clicks)]
    lines = ["| threads | clicks | median s | 95th percentile s | until the labels are on the input grid, median s |", "|---|---|---|---|---|"]
    for threads in (1, 2):
        worker = subprocess.Popen([sys.executable, "-m", "RubikSSLLib", "serve", "--model", str(run), "--device", "cpu"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, cwd=REPO,
                                  env={**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
        read = lambda: next(e for e in map(parse_line, iter(worker.stdout.readline, "")) if e)  # noqa: E731
        assert read()["event"] == "ready"
        seconds, network = [], []
        for number, point in enumerate([points[0], *points]):  # the first request also reads the volume: not timed
            click = clickfile.from_voxels(np.array([point]), [True], geometry)[0]
            request = {"id": number, "volume": case["image"], "clicks": [click.to_json()],
                       "out": str(args.out / "latency_result.nrrd")}
            started = time.perf_counter()
            worker.stdin.write(json.dumps(request) + "\n")
            worker.stdin.flush()
            reply = read()
            if number:
                seconds.append(time.perf_counter() - started)
                network.append(reply["until_labels_done_s"])
        worker.stdin.close()
        worker.wait()
        lines.append(f"| {threads} | {len(seconds)} | {np.median(seconds):.3f} | {np.percentile(seconds, 95):.3f} | "
                     f"{np.median(network):.3f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--init", nargs="*", default=[], help="NAME=PRETRAINING_RUN_DIR, one per pretrained init")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--patch-size", type=int, default=48)
    parser.add_argument("--spacing", type=float, default=2.0)
    parser.add_argument("--seeds", default="0", help="fine-tuning seeds, as 0,1,2 (each fold and model per seed)")
    parser.add_argument("--datasets", default="", help="only these, as brats,ms (default: all)")
    parser.add_argument("--latency", action="store_true", help="only the latency table")
    parser.add_argument("--clicks", type=int, default=50, help="timed clicks per thread count")
    args = parser.parse_args()
    args.seed_list = [int(v) for v in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    print(latency_table(args) if args.latency else accuracy_table(args))


if __name__ == "__main__":
    main()
