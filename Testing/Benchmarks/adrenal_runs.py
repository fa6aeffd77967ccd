"""Shared by the AdrenalMNIST3D benchmarks: fine-tune one setting over seeds (resumably) and summarise it."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from RubikSSLLib import cli, evaluate  # noqa: E402

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "cls" / "adrenalmnist3d_64_trainval.npz"
HEADER = "| labels | {what} | AUC | ACC | s per fine-tune |\n|---|---|---|---|---|"


def sd(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def run_seeds(out: Path, name: str, fraction: float, seeds: int, epochs: int, extra: list[str]) -> tuple:
    """Fine-tune from scratch on AdrenalMNIST3D for seeds 0 .. N-1 (finished runs reused); returns the table row
    (fraction, name, AUC mean, sd, ACC mean, sd, median seconds) of the last-3-epoch scores."""
    auc, acc, seconds = [], [], []
    for seed in range(seeds):
        run = out / f"{name.replace(' ', '_').replace(',', '')}_f{fraction:g}_s{seed}"
        if not evaluate.finished(run, epochs):
            started = time.monotonic()
            code = cli.main(["finetune", "--task", "classify", "--train", str(DATA), "--val", str(DATA), "--out", str(run),
                             "--label-fraction", str(fraction), "--epochs", str(epochs), "--seed", str(seed),
                             "--device", "cpu", "--progress", "none", *(["--resume"] if run.exists() else []), *extra])
            assert code == 0, run
            (run / "wall_s.json").write_text(json.dumps(time.monotonic() - started))
        auc.append(evaluate.score(run, "val_auc", 3))
        acc.append(evaluate.score(run, "val_acc", 3))
        wall = run / "wall_s.json"
        seconds.append(json.loads(wall.read_text()) if wall.exists() else float("nan"))
    return fraction, name, np.mean(auc), sd(auc), np.mean(acc), sd(acc), float(np.nanmedian(seconds))


def print_table(title: str, what: str, rows: list[tuple]) -> None:
    print(title)
    print(HEADER.format(what=what))
    for fraction, name, auc_m, auc_s, acc_m, acc_s, wall in rows:
        print(f"| {fraction:g} | {name} | {auc_m:.3f} ± {auc_s:.3f} | {acc_m:.3f} ± {acc_s:.3f} | {wall:.0f} |")
