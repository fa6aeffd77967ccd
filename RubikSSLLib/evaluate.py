"""Scratch versus pretrained at several label fractions and paired seeds: a Markdown table and a PNG plot.

Each (fraction, seed) pair fine-tunes both initialisations on the same labelled subset (the subset depends only
on the seed). A run's score is the mean of its last `last_epochs` validation scores, not its best epoch, so a
lucky epoch does not decide the comparison. Then every run scores its cases one by one: on `--test` (the model
picked on the validation set; nothing else touches the test cases) or, without one, on the validation set (the last
model, which no validation score picked), and a paired bootstrap over cases and seeds gives the difference a 95 %
interval and a p-value (statistics.py). Finished runs and their case scores are reused, so an interrupted
evaluation resumes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from RubikSSLLib import downstream, finetune, rundir, shortcuts, statistics
from RubikSSLLib.errors import BadInput
from RubikSSLLib.files import atomic_path, write_json_atomic, write_text_atomic
from RubikSSLLib.finetune import FinetuneConfig, Finetuning
from RubikSSLLib.progress import Reporter

# The first metric decides the plot; every one gets its own table.
METRICS = {"classify": ("val_auc", "val_acc"), "segment": ("val_mean_dice",)}
# What the paired bootstrap recomputes on each resample of cases, per task.
CASE_METRICS = {"classify": ("AUC", statistics.classification_metric),
                "segment": ("mean foreground Dice", statistics.segmentation_metric)}


def score(run: Path, key: str, last_epochs: int) -> float:
    """A fine-tune's score: the mean of `key` over its last `last_epochs` validation epochs, never its best one."""
    history = [json.loads(line) for line in (run / rundir.METRICS).read_text().splitlines()]
    return float(np.mean([h[key] for h in history[-last_epochs:]]))


def finished(run: Path, epochs: int) -> bool:
    """True once the run in `run` has logged `epochs` validation epochs."""
    metrics = run / rundir.METRICS
    return metrics.exists() and len(metrics.read_text().splitlines()) >= epochs


def case_outputs(run: Path, items: list[str], split: str) -> dict:
    """Per-case outputs of a finished run on the cases of `items` (split "test": its best model, picked on the
    validation set; "val": its last model), cached in the run folder."""
    from RubikSSLLib import predict

    which = rundir.BEST_MODEL if split == "test" else rundir.LAST_MODEL
    cache = run / f"cases_{split}.json"
    if cache.exists():
        return json.loads(cache.read_text(encoding="utf-8"))
    card_task = json.loads((run / rundir.BEST_MODEL).with_suffix(".json").read_text(encoding="utf-8"))["task"]
    model, card = predict.load_finetuned(run / which, card_task)
    config = FinetuneConfig.from_json(card["config"])
    values = {c["value"]: c["index"] for c in card["classes"]}
    sources = finetune.gather(items, split).cases
    if not sources:
        raise BadInput(f"no labelled cases found in --{split}; check the data")
    finetune.check_label_kinds(sources, config.task)
    if config.task == "classify":
        unknown = sorted({int(s.label) for s in sources} - set(values))
        if unknown:
            raise BadInput(f"--{split} holds classes {unknown} that no training case has; check the data")
    task = downstream.TASKS[config.task](config, np.random.default_rng(config.seed))
    task.set_classes(values)
    if isinstance(task, downstream.Classification):
        task.set_prior(card.get("class_prior"))
    cases = finetune.load_cases(sources, config, task, values)
    with torch.inference_mode():
        outputs = task.case_outputs(model, cases, torch.device("cpu"), len(card["classes"]))
    write_json_atomic(cache, {"model": which, **outputs})
    return {"model": which, **outputs}


def run_evaluation(base: FinetuneConfig, pretrained: str, fractions: list[float], seeds: list[int], out: Path,
                   reporter: Reporter, last_epochs: int = 3, test: list[str] | None = None,
                   resamples: int = 2000) -> dict:
    """Fine-tune scratch and `pretrained` for every fraction x seed, score each on `test` (else on the validation
    data); write results.json, results.md, results.png."""
    keys = METRICS[base.task]
    out.mkdir(parents=True, exist_ok=True)
    split, items = ("test", test) if test else ("val", base.val)
    scores: dict[str, dict[str, dict[str, list[float]]]] = {key: {} for key in keys}
    outputs: dict[str, dict[str, list[dict]]] = {}
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
                outputs.setdefault(f"{fraction:g}", {}).setdefault(role, []).append(case_outputs(run, items, split))
                done += 1
                reporter.progress(done, total, run=run.name)
    summaries = {key: summarise(by_fraction) for key, by_fraction in scores.items()}
    key, summary = keys[0], summaries[keys[0]]
    paired = paired_differences(outputs, base.task, resamples)
    diagnostics = diagnose(base, pretrained, out)
    write_json_atomic(out / "results.json", {
        "metric": key, "last_epochs": last_epochs, "pretrained": pretrained, "seeds": seeds,
        "scores": scores[key], "summary": summary,
        "other_metrics": {other: {"scores": scores[other], "summary": summaries[other]} for other in keys[1:]},
        "paired": {"split": split, "metric": CASE_METRICS[base.task][0], "by_fraction": paired},
        "diagnostics": diagnostics,
    })
    tables = [markdown(summaries[k], k, last_epochs, len(seeds)) for k in keys]
    tables.append(markdown_paired(paired, split, CASE_METRICS[base.task][0], len(seeds)))
    tables += diagnosis_text(diagnostics)
    write_text_atomic(out / "results.md", "\n".join(tables))
    plot(summary, key, out / "results.png", paired)
    return summary


PROBE_MARGIN = 0.01  # a probe within this of the random encoder's AUC counts as no better


def diagnosis_text(diagnostics: dict) -> list[str]:
    """The report's verdict on the linear probe and the puzzle shortcut, with what to try (RESULTS.md §12: a
    longer pretraining that probed below random lost 0.10 AUC on 10 of 10 seeds)."""
    if not diagnostics:
        return []
    probe = diagnostics["linear_probe_auc"]
    gap = probe["pretrained"] - probe["random"]
    lines = [f"Frozen-feature linear probe (all training cases -> validation AUC): pretrained encoder "
             f"{probe['pretrained']:.3f}, random encoder {probe['random']:.3f}. "
             + (f"The pretrained features are better than random ones by {gap:+.3f}.\n" if gap > PROBE_MARGIN else
                "The pretrained features are no better than random ones: expect no gain from this pretraining, or a "
                "loss. Try fewer pretraining steps (an earlier run), --init-stages 1, or another pretext task (on "
                "AdrenalMNIST3D masked autoencoding, --task mae, probed best: 0.769 against 0.738 for random features).\n")]
    shortcut = diagnostics.get("puzzle_shortcut")
    if shortcut:
        network, trivial = shortcut["network_ordering_acc"], shortcut["trivial_ordering_acc"]
        verdict = ("Far above chance: the puzzle is partly won without anatomy, and solving it says little about the "
                   "encoder; training longer on it can make the encoder worse, and smaller cubes, which leave fewer "
                   "cues, did not transfer better on AdrenalMNIST3D." if shortcuts.far_above_chance(shortcut)
                   else "Near chance: the puzzle cannot be won from these cues.")
        lines.append(f"Puzzle shortcut on these images: trivial cues (cube mean, spread, empty share, face means) order "
                     f"{trivial:.3f} of held-out puzzles (chance {shortcut['chance_ordering']:.3f}; the network: "
                     f"{'n/a' if network is None else f'{network:.3f}'}). {verdict}\n")
    return lines


def diagnose(base: FinetuneConfig, pretrained: str, out: Path) -> dict:
    """Where pretraining might not help: for classification, the frozen-feature linear probe of the pretrained
    encoder against a random one (linearprobe.py), cached in `out`."""
    from RubikSSLLib import linearprobe

    if base.task != "classify":
        return {}
    cache = out / "linear_probe.json"
    if cache.exists():
        return json.loads(cache.read_text(encoding="utf-8"))
    task = downstream.Classification(dataclasses.replace(base, augment="none"), np.random.default_rng(base.seed))
    train_set = finetune.gather(base.train, "train")
    values, names = task.class_values(train_set)
    train = finetune.load_cases(train_set.cases, base, task, values)
    val = finetune.load_cases(finetune.gather(base.val, "val").cases, base, task, values)
    result = {"linear_probe_auc": {init: linearprobe.probe(base, train, val, len(names), source)
                                   for init, source in (("pretrained", pretrained), ("random", None))}}
    result |= puzzle_shortcut(base, pretrained)
    write_json_atomic(cache, result)
    return result


def puzzle_shortcut(base: FinetuneConfig, pretrained: str, cases: int = 200) -> dict:
    """For a cube-grid pretext (rubik, rubik+, jigsaw): how well trivial cues order the cubes of puzzles cut from
    this evaluation's training images (shortcuts.py), beside the pretrained network's own held-out accuracy."""
    from RubikSSLLib import checkpoint, datasources, shortcuts, taskspec, tasks, training
    from RubikSSLLib.config import PretrainConfig
    from RubikSSLLib.transfer import pretrained_model_file

    card = checkpoint.read_card(pretrained_model_file(pretrained))
    if card.get("task") not in taskspec.PUZZLE_TASKS:
        return {}
    config = dataclasses.replace(PretrainConfig.from_card(card, Path(pretrained), "pretrain"), data=list(base.train))
    task = tasks.create(config)
    sources = datasources.resolve(config.data).train[:cases]
    prepared = [case for _, case in training.load_cases(sources, config, Reporter("none"), task.shape)]
    shortcut = shortcuts.trivial_ordering_accuracy(task, prepared, seed=base.seed)
    return {"puzzle_shortcut": shortcut | {"network_ordering_acc": card.get("best", {}).get("val_ordering_acc")}}



def paired_differences(outputs: dict[str, dict[str, list[dict]]], task: str, resamples: int) -> dict[str, dict]:
    """Per fraction: the bootstrap interval of pretrained - scratch over cases and seeds (statistics.py)."""
    metric = CASE_METRICS[task][1]
    result = {}
    for fraction, by_init in outputs.items():
        cases = len(by_init["scratch"][0]["cases"])
        result[fraction] = statistics.paired_bootstrap(by_init["scratch"], by_init["pretrained"], metric, cases,
                                                       resamples) | {"cases": cases}
    return result


def markdown_paired(paired: dict, split: str, metric: str, seeds: int) -> str:
    where = "the test set (models picked on --val)" if split == "test" else "the validation set (last models)"
    lines = [f"{metric} on {where}, pretrained - scratch, paired over {seeds} seeds and the cases, "
             "95 % bootstrap interval", "", "| label fraction | cases | difference | 95 % interval | p |",
             "|---|---|---|---|---|"]
    for fraction, row in paired.items():
        lines.append(f"| {fraction} | {row['cases']} | {row['difference']:+.3f} | [{row['low']:+.3f}, {row['high']:+.3f}] | "
                     f"{row['p_value']:.3f} |")
    return "\n".join(lines) + "\n"


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


def plot(summary: dict, key: str, path: Path, paired: dict | None = None, size: tuple[int, int] = (640, 420)) -> None:
    """Metric against label fraction (log axis), mean ± sd for scratch (grey) and pretrained (blue); with `paired`,
    a second panel: the paired difference with its 95 % bootstrap interval, and the zero line."""
    import matplotlib

    matplotlib.use("Agg")  # no screen in a worker process
    from matplotlib.figure import Figure

    figure = Figure(figsize=(size[0] / 100, size[1] / 100), dpi=100)
    axes, difference_axes = figure.subplots(1, 2, width_ratios=(3, 2)) if paired else (figure.add_subplot(), None)
    fractions = [float(f) for f in summary]
    for init, colour in SERIES.items():
        means = [summary[k][f"{init}_mean"] for k in summary]
        spreads = [summary[k][f"{init}_sd"] for k in summary]
        axes.errorbar(fractions, means, yerr=spreads, color=colour, marker="o", capsize=4, linewidth=2, label=init)
    axes.set_xscale("log")
    axes.set_xticks(fractions, [f"{f:g}" for f in fractions])
    axes.set_xlabel("label fraction (log)")
    axes.set_ylabel(key)
    axes.set_title(f"{key}: scratch (grey) vs pretrained (blue), mean ± sd", fontsize=9)
    axes.legend()
    if paired:
        fractions = [float(f) for f in paired]
        middle = [paired[f]["difference"] for f in paired]
        errors = [[m - paired[f]["low"] for f, m in zip(paired, middle)], [paired[f]["high"] - m for f, m in zip(paired, middle)]]
        difference_axes.errorbar(fractions, middle, yerr=errors, color="black", marker="s", capsize=4, linewidth=1.5)
        difference_axes.axhline(0.0, color="#787878", linewidth=1, linestyle="--")
        difference_axes.set_xscale("log")
        difference_axes.set_xticks(fractions, [f"{f:g}" for f in fractions])
        difference_axes.set_xlabel("label fraction (log)")
        difference_axes.set_title("pretrained - scratch, 95 % interval", fontsize=9)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
