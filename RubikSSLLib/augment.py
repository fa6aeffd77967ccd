"""Training-time augmentation for fine-tuning, with MONAI's transforms, the same for scratch and pretrained inits.

Arrays are channel-first (C, Z, Y, X) in the library's LPS-canonical orientation, so spatial axis 0 is z
(superior-inferior) and axes 1, 2 are y, x (the axial plane). Segmentation samples carry their label map
(1, Z, Y, X) through every spatial transform (nearest neighbour), never through the intensity ones.

Levels:
- none: nothing;
- light: flips along each axis, intensity scale and shift (exact: the image never leaves its label);
- default: light, plus 90-degree turns in the axial plane (where the patch is square there), a small affine
  (rotation up to 15 degrees, scale +-10 %) and Gaussian noise.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

LEVELS = ("none", "light", "default")


def build(level: str, patch_size: tuple[int, int, int], with_label: bool, seed: int) -> Callable[[dict], dict] | None:
    """A seeded transform of {"image": (C, Z, Y, X)[, "label": (1, Z, Y, X)]} -> the same keys, or None for none."""
    if level == "none":
        return None
    from monai.transforms import (Compose, RandAffined, RandFlipd, RandGaussianNoised, RandRotate90d,
                                  RandScaleIntensityd, RandShiftIntensityd)

    keys = ["image", "label"] if with_label else ["image"]
    steps = [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(3)]
    if level == "default":
        if patch_size[1] == patch_size[2]:  # a turn in the axial plane keeps the patch's shape
            steps.append(RandRotate90d(keys, prob=0.5, max_k=3, spatial_axes=(1, 2)))
        steps.append(RandAffined(keys, prob=0.3, rotate_range=(np.pi / 12,) * 3, scale_range=(0.1,) * 3,
                                 mode=("bilinear", "nearest")[: len(keys)], padding_mode="border"))
    steps += [RandScaleIntensityd("image", factors=0.1, prob=0.5), RandShiftIntensityd("image", offsets=0.1, prob=0.5)]
    if level == "default":
        steps.append(RandGaussianNoised("image", prob=0.2, std=0.05))
    transform = Compose(steps)
    transform.set_random_state(seed=seed)
    return transform


def apply(transform: Callable[[dict], dict] | None, image: np.ndarray,
          label: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """image (C, Z, Y, X) float32 [and label (Z, Y, X) int64] through `transform` (None: unchanged)."""
    if transform is None:
        return image, label
    sample = {"image": image} | ({"label": label[None]} if label is not None else {})
    out = transform(sample)
    augmented = np.asarray(out["image"], dtype=np.float32)
    return augmented, (np.asarray(out["label"])[0].astype(label.dtype) if label is not None else None)
