"""The fine-tuning recipe's parts on real data: augmentation keeps image and label together, balanced sampling draws
the classes evenly, BraTS regions are scored as the challenge scores them."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare

from conftest import shared
from RubikSSLLib import augment, downstream, labeled, regions
from RubikSSLLib.config import FinetuneConfig
from RubikSSLLib.finetune import load_cases

STROKE = {"image": "seg/stroke_t2/T2.nii.gz", "label": "seg/stroke_t2/lesionT2.nii.gz"}


def stroke_patch() -> tuple[np.ndarray, np.ndarray]:
    """A real 48^3 patch around the stroke lesion at 3 mm: image (1, Z, Y, X) in [-1, 1], labels (Z, Y, X)."""
    config = FinetuneConfig(task="segment", train=["x"], val=["x"], out="y", spacing_mm=3.0, patch_size=(48, 48, 48),
                            augment="none")
    task = downstream.Segmentation(config, np.random.default_rng(0))
    source = labeled.LabeledSource(labeled.datasources.CaseSource((str(shared(STROKE["image"])),)),
                                   str(shared(STROKE["label"])))
    case = load_cases([source], config, task, {0: 0, 1: 1})[0]
    centre = np.argwhere(case.target > 0).mean(axis=0).astype(int)
    start = np.clip(centre - 24, 0, np.array(case.target.shape) - 48)
    region = tuple(slice(s, s + 48) for s in start)
    return case.image[(slice(None), *region)], case.target[region]


@pytest.mark.parametrize("level", ["light", "default"])
def test_augmentation_never_moves_an_image_away_from_its_label(level: str) -> None:
    """The label rides along as an extra image channel (interpolated like the image) and as the label (nearest):
    after every draw the two agree, so image and label moved together."""
    image, label = stroke_patch()
    assert label.sum() > 100
    carried = np.concatenate([image, label[None].astype(np.float32)])
    transform = augment.build(level, (48, 48, 48), with_label=True, seed=3)
    moved = 0
    for _ in range(12):
        out_image, out_label = augment.apply(transform, carried, label)
        assert out_image.shape == carried.shape and out_label.shape == label.shape and out_label.dtype == label.dtype
        assert set(np.unique(out_label)) <= {0, 1}
        riding = out_image[1] > 0.5
        overlap = 2 * np.logical_and(riding, out_label > 0).sum() / (riding.sum() + (out_label > 0).sum())
        if level == "light":  # flips move both alike; a +-10 % intensity change keeps the carried channel above 0.5
            assert overlap > 0.99
        else:
            assert overlap > 0.9, overlap
        moved += not np.array_equal(out_label, label)
    assert moved >= 6  # it does augment


def test_augmentation_none_is_the_identity_and_levels_are_seeded() -> None:
    image, label = stroke_patch()
    assert augment.build("none", (48, 48, 48), True, 0) is None
    assert augment.apply(None, image, label)[0] is image
    first = [augment.apply(augment.build("default", (48, 48, 48), True, 7), image, label)[0] for _ in range(2)]
    np.testing.assert_array_equal(first[0], first[1])


def test_balanced_sampling_draws_the_classes_evenly() -> None:
    config = FinetuneConfig(task="classify", train=["x"], val=["x"], out="y", batch_size=8, augment="none",
                            patch_size=(16, 16, 16))
    task = downstream.Classification(config, np.random.default_rng(0))
    targets = [0] * 90 + [1] * 10
    cases = [downstream.Case(str(i), np.zeros((1, 16, 16, 16), np.float32), t) for i, t in enumerate(targets)]
    batches = task.batches(cases)
    drawn = np.concatenate([next(batches)["target"].numpy() for _ in range(100)])
    counts = np.bincount(drawn, minlength=2)
    assert chisquare(counts).pvalue > 0.01, counts  # consistent with 50:50
    unbalanced = downstream.Classification(FinetuneConfig(**{**config.__dict__, "class_balance": "none"}),
                                           np.random.default_rng(0)).batches(cases)
    share = np.mean(np.concatenate([next(unbalanced)["target"].numpy() for _ in range(100)]))
    assert 0.05 < share < 0.15  # as the cases come


def test_brats_region_dice_equals_the_hand_computed_value() -> None:
    truth = np.zeros((4, 4, 4), np.int64)
    truth[0, :2, :2] = 4   # 4 voxels enhancing
    truth[1, :2, :2] = 1   # 4 voxels necrosis
    truth[2, :, :] = 2     # 16 voxels oedema
    prediction = truth.copy()
    prediction[0, 0, 0] = 2     # one enhancing voxel called oedema
    prediction[3, 0, :] = 2     # 4 oedema voxels too many
    scores = regions.region_dice(prediction, truth, regions.regions_for({0, 1, 2, 4}))
    # whole tumour: truth 24, prediction 28, overlap 24 -> 48/52; core: truth 8, prediction 7, overlap 7 -> 14/15;
    # enhancing: truth 4, prediction 3, overlap 3 -> 6/7
    assert scores == pytest.approx({"whole_tumour": 48 / 52, "tumour_core": 14 / 15, "enhancing_tumour": 6 / 7})
    assert regions.regions_for({0, 1}) == {}
    assert np.isnan(regions.dice(np.zeros(3, bool), np.zeros(3, bool)))
