"""Tumour regions scored the way BraTS scores them, from label maps with BraTS label values.

BraTS labels (2012-2020): 1 necrotic / non-enhancing core, 2 oedema, 3 non-enhancing tumour (2015), 4 enhancing
tumour. The challenge scores nested regions, not labels: whole tumour (every tumour label), tumour core (all but
oedema) and enhancing tumour.
"""

from __future__ import annotations

import numpy as np

BRATS_REGIONS = {"whole_tumour": (1, 2, 3, 4), "tumour_core": (1, 3, 4), "enhancing_tumour": (4,)}


def regions_for(values: set[int]) -> dict[str, tuple[int, ...]]:
    """The BraTS regions when the label values are BraTS's (1, 2 and 4 among 0-4), else none."""
    return BRATS_REGIONS if {1, 2, 4} <= set(values) <= {0, 1, 2, 3, 4} else {}


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty (nothing to find, nothing found)."""
    total = int(prediction.sum()) + int(truth.sum())
    return float("nan") if total == 0 else 2.0 * int(np.logical_and(prediction, truth).sum()) / total


def region_dice(prediction: np.ndarray, truth: np.ndarray, regions: dict[str, tuple[int, ...]]) -> dict[str, float]:
    """Dice per region of two label maps of label values (same shape)."""
    return {name: dice(np.isin(prediction, labels), np.isin(truth, labels)) for name, labels in regions.items()}
