"""Is the pretrained init better than scratch, beyond noise? A paired bootstrap over cases and seeds.

Both inits of a seed see the same labelled cases and are scored on the same held-out cases, so the comparison is
paired twice: by seed and by case. Each bootstrap resample draws seeds and cases with replacement and recomputes
the metric of both inits on the drawn cases (an AUC is recomputed, not averaged per case); the 2.5 and 97.5
percentiles of the paired difference give the 95 % interval, and the share of resamples on the other side of 0
the two-sided p-value.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from scipy.stats import rankdata


def auc(truth: np.ndarray, probabilities: np.ndarray) -> float:
    """ROC-AUC (Mann-Whitney, ties counted half) of (N,) class indices against (N, K) probabilities; for K > 2 the
    mean of the one-vs-rest AUCs of the classes present. NaN when only one class is present."""
    truth = np.asarray(truth)
    probabilities = np.asarray(probabilities, dtype=float)
    classes = [1] if probabilities.shape[1] == 2 else list(range(probabilities.shape[1]))
    values = []
    for positive in classes:
        is_positive = truth == positive
        count = int(is_positive.sum())
        if count in (0, len(truth)):
            continue
        ranks = rankdata(probabilities[:, positive])
        values.append((ranks[is_positive].sum() - count * (count + 1) / 2) / (count * (len(truth) - count)))
    return float(np.mean(values)) if values else float("nan")


def paired_bootstrap(scratch: list, pretrained: list, metric: Callable[[object, np.ndarray], float],
                     cases: int, resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """scratch[s], pretrained[s]: the per-case outputs of seed s (anything `metric(outputs, case_indices)` scores).

    Returns the observed paired difference (pretrained - scratch, mean over seeds on all cases), its 95 % bootstrap
    interval and the two-sided p-value of "no difference"."""
    seeds = len(scratch)
    everything = np.arange(cases)
    observed = float(np.mean([metric(p, everything) - metric(s, everything) for s, p in zip(scratch, pretrained)]))
    rng = np.random.default_rng(seed)
    differences = np.empty(resamples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a draw with one class only has no AUC: left out
        for b in range(resamples):
            drawn_cases = rng.integers(0, cases, cases)
            drawn_seeds = rng.integers(0, seeds, seeds)
            drawn = np.array([metric(pretrained[s], drawn_cases) - metric(scratch[s], drawn_cases) for s in drawn_seeds])
            differences[b] = drawn.mean() if np.isfinite(drawn).all() else np.nanmean(drawn)
    differences = differences[np.isfinite(differences)]
    low, high = np.percentile(differences, [2.5, 97.5])
    p_value = min(1.0, 2 * min(float(np.mean(differences <= 0)), float(np.mean(differences >= 0))))
    return {"difference": observed, "low": float(low), "high": float(high), "p_value": p_value,
            "resamples": int(len(differences))}


def sign_flip_p_value(differences: list[float] | np.ndarray) -> float:
    """Exact two-sided p-value of "no difference" for paired differences (N,) by flipping their signs in all 2^N
    ways: the share of sign patterns whose mean is at least as far from 0 as the observed one. For the few paired
    units a bootstrap resamples badly (4 folds give 35 distinct draws); N <= 20."""
    values = np.asarray(differences, dtype=float)
    if not 0 < len(values) <= 20:
        raise ValueError(f"sign flips need 1-20 differences, got {len(values)}")
    signs = 1 - 2 * ((np.arange(2 ** len(values))[:, None] >> np.arange(len(values))) & 1)
    means = np.abs(signs @ np.abs(values)) / len(values)
    return float(np.mean(means >= abs(values.mean()) - 1e-12))


def classification_metric(outputs: dict, indices: np.ndarray) -> float:
    """AUC of one run's per-case outputs {"truth": (N,), "probabilities": (N, K)} on the cases `indices`."""
    return auc(np.asarray(outputs["truth"])[indices], np.asarray(outputs["probabilities"])[indices])


def segmentation_metric(outputs: dict, indices: np.ndarray) -> float:
    """Mean foreground Dice of one run's per-case outputs {"dice": (N, classes)} on the cases `indices`: per class
    over the cases where it is present (NaN elsewhere), then over classes, as the validation metric is."""
    # np.nanmean twice, written out: the bootstrap calls this 10^5-10^6 times, and nanmean's checks were most of it
    values = np.asarray(outputs["dice"], dtype=float)[indices]
    present = ~np.isnan(values)
    counts = present.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):  # a class absent from every drawn case: left out
        per_class = np.where(present, values, 0.0).sum(axis=0) / counts
    per_class = per_class[counts > 0]
    return float(per_class.mean()) if per_class.size else float("nan")
