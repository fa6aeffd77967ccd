"""Clean-up of predicted label maps, as nnU-Net users know it: keep only the largest connected part of a class."""

from __future__ import annotations

import numpy as np
from skimage.measure import label as connected_components

from RubikSSLLib.errors import BadInput


def parse_classes(choice: str, card: dict) -> list[int]:
    """The label values whose largest component is kept: 'card' (the model card's postprocessing), 'none', 'all'
    (every foreground class) or values such as '1,2'."""
    values = [c["value"] for c in card["classes"][1:]]
    if choice == "card":
        return list(card.get("postprocessing", {}).get("largest_component", []))
    if choice == "none":
        return []
    if choice == "all":
        return values
    try:
        chosen = [int(v) for v in choice.split(",")]
    except ValueError:
        raise BadInput(f"--largest-component {choice}: give card, none, all or label values as 1,2") from None
    unknown = sorted(set(chosen) - set(values))
    if unknown:
        raise BadInput(f"--largest-component {choice}: the model has no class with value {unknown[0]}; its classes are "
                       f"{values}")
    return chosen


def keep_largest_component(labels_zyx: np.ndarray, values: list[int]) -> np.ndarray:
    """A copy of the label map where each class in `values` keeps only its largest 26-connected component; the
    voxels of its other components become background (0)."""
    cleaned = labels_zyx.copy()
    for value in values:
        components = connected_components(labels_zyx == value, connectivity=3)
        if components.max() <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        cleaned[(components > 0) & (components != int(np.argmax(sizes)))] = 0
    return cleaned
