"""The paired statistics of `rubikssl evaluate`: AUC as MONAI computes it, and a bootstrap interval that covers the
true difference at about its nominal rate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import compute_roc_auc

from RubikSSLLib import statistics


@pytest.mark.parametrize("classes", [2, 3])
def test_auc_equals_monais(classes: int) -> None:
    rng = np.random.default_rng(classes)
    truth = rng.integers(0, classes, 80)
    probabilities = rng.dirichlet(np.ones(classes), 80) + 0.3 * np.eye(classes)[truth]
    probabilities = np.round(probabilities, 2)  # ties too
    onehot = torch.nn.functional.one_hot(torch.from_numpy(truth), classes)
    theirs = compute_roc_auc(torch.from_numpy(probabilities[:, 1] if classes == 2 else probabilities),
                             torch.from_numpy(truth) if classes == 2 else onehot)
    assert statistics.auc(truth, probabilities) == pytest.approx(float(theirs), abs=1e-9)
    assert np.isnan(statistics.auc(np.zeros(5, int), np.full((5, 2), 0.5)))  # one class: no AUC


def synthetic_study(rng: np.random.Generator, effect: float, seeds: int = 5, cases: int = 40) -> tuple[list, list]:
    """Per-case scores of both inits over seeds: case difficulty and seed luck shared by the pair, plus noise."""
    difficulty = rng.normal(0.7, 0.1, cases)
    scratch, pretrained = [], []
    for _ in range(seeds):
        luck = rng.normal(0, 0.02)
        base = difficulty + luck + rng.normal(0, 0.03, cases)
        gain = effect + rng.normal(0, 0.01) + rng.normal(0, 0.05, cases)
        scratch.append({"dice": base[:, None]})
        pretrained.append({"dice": (base + gain)[:, None]})
    return scratch, pretrained


def test_the_bootstrap_interval_covers_a_known_effect_at_about_the_nominal_rate() -> None:
    rng = np.random.default_rng(0)
    results = [statistics.paired_bootstrap(*synthetic_study(rng, 0.02), statistics.segmentation_metric, 40,
                                           resamples=300, seed=i) for i in range(120)]
    coverage = np.mean([r["low"] <= 0.02 <= r["high"] for r in results])
    assert 0.88 <= coverage <= 1.0, coverage  # nominal 0.95; 120 studies
    assert all(r["low"] <= r["difference"] <= r["high"] for r in results)
    null = [statistics.paired_bootstrap(*synthetic_study(rng, 0.0), statistics.segmentation_metric, 40,
                                        resamples=300, seed=i)["p_value"] for i in range(120)]
    assert np.mean(np.array(null) < 0.05) <= 0.12  # about 5 % false positives under no effect
    strong = [statistics.paired_bootstrap(*synthetic_study(rng, 0.05), statistics.segmentation_metric, 40,
                                          resamples=300, seed=i)["p_value"] for i in range(20)]
    assert np.mean(np.array(strong) < 0.05) >= 0.9  # and the power to see a clear one


def test_the_report_says_what_to_do_when_the_probe_is_no_better_than_random() -> None:
    from RubikSSLLib.evaluate import diagnosis_text

    shortcut = {"network_ordering_acc": 1.0, "trivial_ordering_acc": 0.365, "chance_ordering": 0.01}
    worse = diagnosis_text({"linear_probe_auc": {"pretrained": 0.691, "random": 0.738}, "puzzle_shortcut": shortcut})
    assert "no better than random" in worse[0] and "--init-stages 1" in worse[0] and "Far above chance" in worse[1]
    better = diagnosis_text({"linear_probe_auc": {"pretrained": 0.80, "random": 0.738},
                             "puzzle_shortcut": {**shortcut, "trivial_ordering_acc": 0.02}})
    assert "better than random ones by +0.062" in better[0] and "Near chance" in better[1]
    assert diagnosis_text({}) == []


def test_sign_flip_p_value_is_exact() -> None:
    # four differences of one sign: only "all +" and "all -" are as extreme, 2 of 16 patterns
    assert statistics.sign_flip_p_value([-0.03, -0.01, -0.02, -0.05]) == 2 / 16
    # +1, +1, +1, -1: mean 0.5; patterns with |mean| >= 0.5 are those with 3 or 4 equal signs: 2 + 8 of 16
    assert statistics.sign_flip_p_value([1, 1, 1, -1]) == 10 / 16
    assert statistics.sign_flip_p_value([0.0, 0.0]) == 1.0
    with pytest.raises(ValueError):
        statistics.sign_flip_p_value([])
