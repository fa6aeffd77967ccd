"""Scratch versus pretrained at several label fractions and paired seeds: a Markdown table and a PNG plot.

Each (fraction, seed) pair fine-tunes both initialisations on the same labelled subset (the subset depends only
on the seed). A run's score is the mean of its last `last_epochs` validation scores, not its best epoch, so a
lucky epoch does not decide the comparison. Finished runs are reused, so an interrupted evaluation resumes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from RubikSSLLib import rundir
from RubikSSLLib.files import atomic_path, write_json_atomic, write_text_atomic
from RubikSSLLib.finetune import FinetuneConfig, Finetuning
from RubikSSLLib.progress import Reporter

# The first metric decides the plot; every one gets its own table.
METRICS = {"classify": ("val_auc", "val_acc"), "segment": ("val_mean_dice",)}


def score(run: Path, key: str, last_epochs: int) -> float:
    """A fine-tune's score: the mean of `key` over its last `last_epochs` validation epochs, never its best one."""
    history = [json.loads(line) for line in (run / rundir.METRICS).read_text().splitlines()]
    return float(np.mean([h[key] for h in history[-last_epochs:]]))


def finished(run: Path, epochs: int) -> bool:
    """True once the run in `run` has logged `epochs` validation epochs."""
    metrics = run / rundir.METRICS
    return metrics.exists() and len(metrics.read_text().splitlines()) >= epochs


def run_evaluation(base: FinetuneConfig, pretrained: str, fractions: list[float], seeds: list[int], out: Path,
                   reporter: Reporter, last_epochs: int = 3) -> dict:
    """Fine-tune scratch and `pretrained` for every fraction x seed; write results.json, results.md, results.png."""
    keys = METRICS[base.task]
    out.mkdir(parents=True, exist_ok=True)
    scores: dict[str, dict[str, dict[str, list[float]]]] = {key: {} for key in keys}
    total, done = len(fractions) * len(seeds) * 2, 0
    for fraction in fractions:
        for seed in seeds:
            for init in ("scratch", pretrained):
                role = "scratch" if init == "scratch" else "pretrained"
                run = out / f"fraction{fraction:g}_seed{seed}_{role}"
                if not finished(run, base.epochs):
                    config = dataclasses.replace(base, init=init, label_fraction=fraction, seed=seed, out=str(run))
                    Finetuning(config, Reporter("none"), resume=run.exists()).run()
                for key in keys:
                    scores[key].setdefault(f"{fraction:g}", {}).setdefault(role, []).append(
                        score(run, key, last_epochs))
                done += 1
                reporter.progress(done, total, run=run.name)
    summaries = {key: summarise(by_fraction) for key, by_fraction in scores.items()}
    key, summary = keys[0], summaries[keys[0]]
    write_json_atomic(out / "results.json", {
        "metric": key, "last_epochs": last_epochs, "pretrained": pretrained, "seeds": seeds,
        "scores": scores[key], "summary": summary,
        "other_metrics": {other: {"scores": scores[other], "summary": summaries[other]} for other in keys[1:]},
    })
    write_text_atomic(out / "results.md", "\n".join(markdown(summaries[k], k, last_epochs, len(seeds)) for k in keys))
    plot(summary, key, out / "results.png")
    return summary


def summarise(scores: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Per fraction: mean and sd of each init, the paired difference (pretrained - scratch) and how many seeds improved."""
    summary = {}
    for fraction, by_init in scores.items():
        scratch, pretrained = np.array(by_init["scratch"]), np.array(by_init["pretrained"])
        difference = pretrained - scratch
        summary[fraction] = {
            "scratch_mean": float(scratch.mean()), "scratch_sd": float(scratch.std(ddof=1)) if len(scratch) > 1 else 0.0,
            "pretrained_mean": float(pretrained.mean()),
            "pretrained_sd": float(pretrained.std(ddof=1)) if len(pretrained) > 1 else 0.0,
            "difference_mean": float(difference.mean()),
            "difference_sd": float(difference.std(ddof=1)) if len(difference) > 1 else 0.0,
            "seeds_improved": int((difference > 0).sum()), "seeds": len(difference),
        }
    return summary


def markdown(summary: dict, key: str, last_epochs: int, seeds: int) -> str:
    lines = [f"{key}: mean of the last {last_epochs} epochs, mean ± sd over {seeds} paired seeds", "",
             "| label fraction | scratch | pretrained | paired difference | seeds improved |", "|---|---|---|---|---|"]
    for fraction, row in summary.items():
        lines.append(f"| {fraction} | {row['scratch_mean']:.3f} ± {row['scratch_sd']:.3f} | "
                     f"{row['pretrained_mean']:.3f} ± {row['pretrained_sd']:.3f} | "
                     f"{row['difference_mean']:+.3f} ± {row['difference_sd']:.3f} | {row['seeds_improved']}/{row['seeds']} |")
    return "\n".join(lines) + "\n"


SERIES = {"scratch": "#787878", "pretrained": "#1e5ac8"}  # grey and blue, as the caption says


def plot(summary: dict, key: str, path: Path, size: tuple[int, int] = (640, 420)) -> None:
    """Metric against label fraction (log axis), mean ± sd for scratch (grey) and pretrained (blue)."""
    import matplotlib

    matplotlib.use("Agg")  # no screen in a worker process
    from matplotlib.figure import Figure

    figure = Figure(figsize=(size[0] / 100, size[1] / 100), dpi=100)
    axes = figure.add_subplot()
    fractions = [float(f) for f in summary]
    for init, colour in SERIES.items():
        means = [summary[k][f"{init}_mean"] for k in summary]
        spreads = [summary[k][f"{init}_sd"] for k in summary]
        axes.errorbar(fractions, means, yerr=spreads, color=colour, marker="o", capsize=4, linewidth=2, label=init)
    axes.set_xscale("log")
    axes.set_xticks(fractions, [f"{f:g}" for f in fractions])
    axes.set_xlabel("label fraction (log)")
    axes.set_ylabel(key)
    axes.set_title(f"{key}: scratch (grey) vs pretrained (blue), mean ± sd", fontsize=10)
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
