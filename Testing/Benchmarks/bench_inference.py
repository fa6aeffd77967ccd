"""Whole-volume segmentation on CPU: wall time and peak memory of `rubikssl segment` (prints a Markdown table).

    python Testing/Benchmarks/bench_inference.py [--threads 1] [--repeats 3]

The model is the default U-Net (encoder widths 16-32-64-128, patch 64^3) fine-tuned for one step on a BraTS case
(the weights do not change the cost); the input is a two-channel 240x240x155 BraTS volume at 1 mm. BraTS is under a
non-commercial licence: benchmarks only, never bundled.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
CASE = REPO.parent / "shared/data/seg/brats2015_deepmedic/brats_2013_pat0001_1"


# Runs the command line in-process and prints that process's own peak resident memory (kB on Linux) at exit.
MEASURED = """
import resource, runpy, sys
sys.argv = ["rubikssl"] + sys.argv[1:]
try:
    runpy.run_module("RubikSSLLib", run_name="__main__")
except SystemExit as stop:
    assert not stop.code, stop.code
print("@peak_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def rubikssl(*args: str, threads: int) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.run([sys.executable, "-c", MEASURED, *args, "--progress", "none"], capture_output=True,
                          text=True, cwd=REPO, env=environment, check=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    images = [str(CASE / "Flair_subtrMeanDivStd.nii.gz"), str(CASE / "T1c_subtrMeanDivStd.nii.gz")]
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        label = work / "wt.nii.gz"
        sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(CASE / "OTMultiClass.nii.gz")) > 0, sitk.sitkUInt8), str(label))
        datalist = work / "list.json"
        entry = {"image": images, "label": str(label)}
        datalist.write_text(json.dumps({"labels": {"1": "tumour"}, "training": [entry], "validation": [entry]}))
        rubikssl("finetune", "--task", "segment", "--train", str(datalist), "--val", str(datalist), "--out",
                 str(work / "model"), "--epochs", "1", "--iterations-per-epoch", "1", "--batch-size", "2", threads=2)
        times, peaks = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            result = rubikssl("segment", "--model", str(work / "model"), "--volume", *images, "--out",
                              str(work / "r.seg.nrrd"), threads=args.threads)
            times.append(time.perf_counter() - started)
            peaks.append(int(result.stdout.split("@peak_kb")[-1]) / 2**20)
        peak_gib = max(peaks)
    print(f"threads: {args.threads}; {args.repeats} runs; default U-Net, roi 64^3, overlap 0.25, Gaussian blending\n")
    print("| measurement | value |\n|---|---|")
    print(f"| wall time, median (s), incl. process start and file I/O | {statistics.median(times):.1f} |")
    print(f"| wall time, min (s) | {min(times):.1f} |")
    print(f"| peak resident memory of a child process (GiB) | {peak_gib:.2f} |")


if __name__ == "__main__":
    main()
