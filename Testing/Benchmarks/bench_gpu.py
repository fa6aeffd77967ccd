"""The one command to run when a CUDA GPU is available (issue 25, target 4): prints Markdown tables, in under 8 minutes.

    python Testing/Benchmarks/bench_gpu.py [--device cuda:0] [--out bench-gpu]

Without a CUDA device it says so and exits 0. `--device cpu --tiny` runs every measurement at toy sizes on the
CPU - the same code with the device switched, which is how the tests run it. Everything goes through the product's
command line and serve worker, on the 4 BraTS 2013 cases of ../shared/data (FLAIR + T1c, 240x240x155 at 1 mm):
1. pretraining (rubik, 64^3 cubes, batch 16) by DataLoader workers and precision (fp32, bf16): puzzles/s between
   the run's own progress events after the first ones (warm-up excluded), and the share of that time the step waited
   for data (the progress events' data_wait);
2. fine-tuning a two-channel segmentation U-Net (patch 96^3, batch 2): steps/s;
3. whole-volume segmentation of a 240x240x155 two-channel case with it: seconds, and peak GPU memory;
4. a click answered by `serve` (a click-guided model trained a few steps): median seconds of 5 clicks, the case
   already loaded;
5. DistributedDataParallel: a 1-process pretraining under torch.distributed.run (NCCL on CUDA, gloo on a CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from RubikSSLLib import hugepages  # noqa: E402

hugepages.request()  # as the command line's processes run (torch is imported later, in the measurements)
BRATS = REPO.parent / "shared/data/seg/brats2015_deepmedic"
CASES = ("brats_2013_pat0001_1", "brats_2013_pat0002_1", "brats_2013_pat0003_1", "brats_2013_pat0005_1")


@dataclass(frozen=True)
class Sizes:
    """What each measurement runs: the GPU's sizes, or toy ones for a CPU (--tiny)."""

    cube: int
    pretrain_batch: int
    pretrain_steps: int
    workers: tuple[int, ...]
    spacing: str
    patch: int
    finetune_iterations: int
    clicks: int
    network: tuple[str, ...] = ()  # extra network flags of every run (the tiny encoder)


FULL = Sizes(cube=64, pretrain_batch=16, pretrain_steps=40, workers=(0, 2, 4, 8), spacing="1", patch=96,
             finetune_iterations=40, clicks=5)
TINY = Sizes(cube=12, pretrain_batch=2, pretrain_steps=15, workers=(1,), spacing="4", patch=32,
             finetune_iterations=10, clicks=2, network=("--widths", "8,16,32"))
PRECISIONS = ("fp32", "bf16")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (with --tiny: the tests' run)")
    parser.add_argument("--out", type=Path, default=Path("bench-gpu"), help="working folder (runs, models)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes, for a CPU")
    parser.add_argument("--workers", help="DataLoader workers to compare, e.g. 0,2,4,8")
    args = parser.parse_args(argv)
    sizes = TINY if args.tiny else FULL
    if args.workers:
        try:
            workers = tuple(int(w) for w in args.workers.split(","))
        except ValueError:
            parser.error(f"--workers {args.workers}: give whole numbers separated by commas, e.g. 0,2,4,8")
        if min(workers) < 0:
            parser.error(f"--workers {args.workers}: a number of workers is 0 or more")
        sizes = Sizes(**{**sizes.__dict__, "workers": workers})
    args.sizes = sizes
    return args


def cuda_missing(device: str) -> str | None:
    """Why `device` cannot run, or None."""
    import torch

    if not device.startswith("cuda"):
        return None
    if not torch.cuda.is_available():
        return "no CUDA device here (torch.cuda.is_available() is False): nothing to measure"
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        return f"{device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def rubikssl(*args: str) -> list[dict]:
    """The command line in this process; its progress events (it must succeed)."""
    from RubikSSLLib import cli, progress

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main([*args, "--progress", "json"])
    if code != 0:
        raise SystemExit(f"rubikssl {' '.join(args)} failed ({code}): {stderr.getvalue().strip()[-500:]}")
    return [e for e in map(progress.parse_line, stdout.getvalue().splitlines()) if e]


def steady_rate(events: list[dict]) -> tuple[float, float]:
    """(puzzles/s, mean data_wait) of a pretraining run between its second and last progress events (start-up and
    warm-up excluded). From the events' cumulative rate r = step x batch / t (elapsed_s is rounded to 0.1 s): the
    time to a step is step x batch / r, so the batch cancels in (b - a) / (b / r_b - a / r_a)."""
    steps = [e for e in events if e["event"] == "progress"]
    if len(steps) < 3:
        raise ValueError(f"{len(steps)} progress events: too few steps to measure a rate; run more steps")
    first, last = steps[1], steps[-1]
    span = last["step"] / last["puzzles_per_s"] - first["step"] / first["puzzles_per_s"]
    return (last["step"] - first["step"]) / max(span, 1e-9), statistics.mean(e["data_wait"] for e in steps[2:])


def flairs() -> list[str]:
    return [str(BRATS / case / "Flair_subtrMeanDivStd.nii.gz") for case in CASES]


def channels(case: str) -> list[str]:
    return [str(BRATS / case / name) for name in ("Flair_subtrMeanDivStd.nii.gz", "T1c_subtrMeanDivStd.nii.gz")]


def pretrain_arguments(device: str, sizes: Sizes, out: Path, workers: int, precision: str) -> list[str]:
    return ["pretrain", "--data", *flairs(), "--out", str(out), "--task", "rubik", "--cube-size", str(sizes.cube),
            "--jitter", "4", "--batch-size", str(sizes.pretrain_batch), "--steps", str(sizes.pretrain_steps),
            "--eval-every", str(sizes.pretrain_steps), "--val-puzzles", "8", "--shortcut-puzzles", "0",
            "--spacing", sizes.spacing, "--device", device, "--workers", str(workers), "--precision", precision,
            *sizes.network]


def measure_pretraining(device: str, sizes: Sizes, out: Path) -> list[dict]:
    rows = []
    for precision in PRECISIONS:
        for workers in sizes.workers:
            run = out / f"pretrain_{precision}_w{workers}"
            events = rubikssl(*pretrain_arguments(device, sizes, run, workers, precision))
            rate, wait = steady_rate(events)
            rows.append({"precision": precision, "workers": workers, "puzzles_per_s": rate, "data_wait": wait})
    return rows


def datalist(out: Path) -> Path:
    """BraTS 3 training + 1 validation case, whole tumour (label > 0), two channels."""
    import SimpleITK as sitk

    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for case in CASES:
        label = out / f"{case}_wt.nii.gz"
        if not label.exists():
            image = sitk.ReadImage(str(BRATS / case / "OTMultiClass.nii.gz"))
            sitk.WriteImage(sitk.Cast(image > 0, sitk.sitkUInt8), str(label))
        entries.append({"image": channels(case), "label": str(label)})
    path = out / "brats_wt.json"
    path.write_text(json.dumps({"labels": {"1": "whole tumour"}, "training": entries[:3], "validation": entries[3:]}))
    return path


def finetune_arguments(device: str, sizes: Sizes, listing: Path, out: Path, interactive: bool) -> list[str]:
    return ["finetune", "--task", "segment", *(["--interactive"] if interactive else []), "--train", str(listing),
            "--val", str(listing), "--out", str(out), "--patch-size", str(sizes.patch), "--batch-size", "2",
            "--epochs", "1", "--iterations-per-epoch", str(sizes.finetune_iterations), "--spacing", sizes.spacing,
            "--device", device, "--seed", "0", *sizes.network]


def measure_finetuning(device: str, sizes: Sizes, out: Path) -> tuple[dict, Path]:
    listing = datalist(out)
    model = out / "finetune"
    started = time.perf_counter()
    events = rubikssl(*finetune_arguments(device, sizes, listing, model, interactive=False))
    steps = [e for e in events if e["event"] == "progress"]
    rate = ((steps[-1]["step"] - steps[0]["step"]) / max(steps[-1]["elapsed_s"] - steps[0]["elapsed_s"], 1e-9)
            if len(steps) > 1 else float("nan"))
    return {"steps_per_s": rate, "wall_s": time.perf_counter() - started}, model


def measure_segmentation(device: str, model: Path, out: Path) -> dict:
    import torch

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    rubikssl("segment", "--model", str(model), "--volume", *channels(CASES[3]), "--out", str(out / "case.seg.nrrd"),
             "--device", device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    return {"seconds": seconds, "peak_gpu_gib": peak}


def tumour_point_lps(case: str) -> list[float]:
    """A point inside the case's tumour, in LPS mm (ITK's physical space)."""
    import numpy as np
    import SimpleITK as sitk

    image = sitk.ReadImage(str(BRATS / case / "OTMultiClass.nii.gz"))
    kji = np.argwhere(sitk.GetArrayFromImage(image) > 0)
    middle = kji[np.argmin(((kji - kji.mean(axis=0)) ** 2).sum(axis=1))]  # the tumour voxel nearest its centroid
    return list(image.TransformIndexToPhysicalPoint([int(middle[2]), int(middle[1]), int(middle[0])]))


def measure_click(device: str, sizes: Sizes, out: Path) -> dict:
    from RubikSSLLib import serve

    model = out / "interactive"
    rubikssl(*finetune_arguments(device, sizes, datalist(out), model, interactive=True))
    worker = serve.Worker(str(model), device)
    point = tumour_point_lps(CASES[3])
    seconds = []
    for number in range(sizes.clicks + 1):  # the first request also reads and preprocesses the case
        clicks = [{"position": [p + number for p in point], "include": True}]
        reply = worker.answer({"id": number, "volume": channels(CASES[3]), "clicks": clicks,
                               "coordinateSystem": "LPS", "out": str(out / f"click{number}.npy")})
        if not reply.get("ok"):
            raise SystemExit(f"serve could not answer a click: {reply.get('error')}")
        seconds.append(reply["seconds"])
    return {"first_s": seconds[0], "median_s": statistics.median(seconds[1:]), "clicks": sizes.clicks}


def measure_distributed(device: str, sizes: Sizes, out: Path) -> dict:
    from RubikSSLLib import progress

    arguments = pretrain_arguments(device, sizes, out / "ddp", workers=0, precision="fp32")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                             "-m", "RubikSSLLib", *arguments, "--progress", "json"], capture_output=True, text=True,
                            cwd=REPO, timeout=600)
    events = [e for e in map(progress.parse_line, result.stdout.splitlines()) if e]
    done = [e for e in events if e["event"] == "done"]
    rate = steady_rate(events)[0] if result.returncode == 0 else float("nan")
    return {"backend": "nccl" if device.startswith("cuda") else "gloo", "exit_code": result.returncode,
            "done": bool(done), "puzzles_per_s": rate, "wall_s": time.perf_counter() - started,
            "error": "" if result.returncode == 0 else result.stderr.strip().splitlines()[-1:]}


def tables(device: str, sizes: Sizes, results: dict) -> str:
    """The Markdown report of `results` (what main measured)."""
    lines = [f"device {device}; BraTS 2013 FLAIR (+ T1c), spacing {sizes.spacing} mm", "",
             f"| pretraining: precision | workers | puzzles/s ({sizes.cube}^3 cubes, batch {sizes.pretrain_batch}) "
             "| share of the step waiting for data |", "|---|---|---|---|"]
    lines += [f"| {r['precision']} | {r['workers']} | {r['puzzles_per_s']:.1f} | {r['data_wait']:.2f} |"
              for r in results["pretraining"]]
    tune, segment, click, ddp = results["finetuning"], results["segmentation"], results["click"], results["distributed"]
    lines += ["", "| measurement | value |", "|---|---|",
              f"| fine-tuning, 2-channel U-Net, patch {sizes.patch}^3, batch 2: steps/s | {tune['steps_per_s']:.2f} |",
              f"| whole-volume segmentation, 240x240x155 x 2 channels: s | {segment['seconds']:.1f} |",
              f"| its peak GPU memory: GiB | {segment['peak_gpu_gib']:.2f} |",
              f"| a click answered by serve, median of {click['clicks']}: s | {click['median_s']:.3f} |",
              f"| its first click (reads and preprocesses the case): s | {click['first_s']:.2f} |",
              f"| 1-process DDP pretraining ({ddp['backend']}): exit code | {ddp['exit_code']} |",
              f"| its puzzles/s | {ddp['puzzles_per_s']:.1f} |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    reason = cuda_missing(args.device)
    if reason:
        print(f"bench_gpu: {reason}; run it on a machine with a CUDA GPU (or --device cpu --tiny for the CPU run)")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    started, results, clock = time.perf_counter(), {}, {}

    def timed(name: str, measure, *arguments):
        begun = time.perf_counter()
        value = measure(args.device, *arguments)
        clock[name] = time.perf_counter() - begun
        return value

    results["pretraining"] = timed("pretraining", measure_pretraining, args.sizes, args.out)
    results["finetuning"], model = timed("fine-tuning", measure_finetuning, args.sizes, args.out)
    results["segmentation"] = timed("segmentation", measure_segmentation, model, args.out)
    results["click"] = timed("click", measure_click, args.sizes, args.out)
    results["distributed"] = timed("DDP", measure_distributed, args.sizes, args.out)
    results["wall_s"] = {"all": time.perf_counter() - started, **clock}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(tables(args.device, args.sizes, results))
    print(f"\n{results['wall_s']['all'] / 60:.1f} min in all: "
          + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in clock.items()))
    return 0 if results["distributed"]["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
