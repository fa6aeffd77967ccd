"""The fine-tuning recipe's parts on real data: augmentation keeps image and label together, balanced sampling draws
the classes evenly, BraTS regions are scored as the challenge scores them."""

from __future__ import annotations

import json
from pathlib import Path

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


def brats_sources() -> list:
    cases = ("brats_2013_pat0001_1", "brats_2013_pat0002_1", "brats_2013_pat0003_1", "brats_2013_pat0005_1")
    return [labeled.LabeledSource(labeled.datasources.CaseSource(
        (str(shared(f"seg/brats2015_deepmedic/{c}/Flair_subtrMeanDivStd.nii.gz")),
         str(shared(f"seg/brats2015_deepmedic/{c}/T1c_subtrMeanDivStd.nii.gz")))),
        str(shared(f"seg/brats2015_deepmedic/{c}/OTMultiClass.nii.gz"))) for c in cases]


def ms_sources() -> list:
    return [labeled.LabeledSource(labeled.datasources.CaseSource(
        tuple(str(shared(f"seg/ms_lesion_mni/{p}/{m}.nii.gz")) for m in ("FLAIR", "T1", "T1POST", "T2"))),
        str(shared(f"seg/ms_lesion_mni/{p}/lesion_gt.nii.gz"))) for p in ("patient07", "patient19")]


def test_planning_of_the_shared_brats_and_ms_cases_equals_the_hand_derivation() -> None:
    from RubikSSLLib import planning
    from RubikSSLLib.config import EncoderConfig

    brats, encoder = {"task": "segment"}, EncoderConfig(2, (16, 32, 64, 128))
    record = planning.plan(brats, brats_sources(), encoder, "cpu")
    # 240x240x155 voxels of 1 mm: spacing 1; median image (155, 240, 240) -> multiples of 16: (144, 240, 240);
    # above 96^3 the largest axis (the later on a tie) loses 16 until all three are 96
    assert brats["spacing_mm"] == 1.0 and record["median_shape_zyx"] == [155, 240, 240]
    assert brats["patch_size"] == (96, 96, 96)
    # a sample: 96^3 voxels x (2 x (16/8 + 32/64 + 64/512 + 128/4096) encoder + the same decoder + 2 x 16 + 2
    # channels at full resolution) x 4 bytes x 3 = 474 MB; 1 GiB holds 2
    assert planning.sample_bytes((96, 96, 96), encoder, "segment") == int(4 * 96**3 * 44.625 * 3)
    assert brats["batch_size"] == 2
    on_gpu = planning.planned_patch(np.array([155, 240, 240]), 16, planning.PATCH_BUDGET["cuda"], "segment")
    assert on_gpu == (128, 128, 128)  # (144, 144, 144) is 2.99 M voxels; one step less each fits 128^3
    ms = {"task": "segment", "patch_size": (64, 64, 64)}  # a given option is never planned over
    record = planning.plan(ms, ms_sources(), EncoderConfig(4, (16, 32, 64, 128)), "cpu")
    # 182x218x182 voxels of 1 mm
    assert ms["spacing_mm"] == 1.0 and record["median_shape_zyx"] == [182, 218, 182]
    assert ms["patch_size"] == (64, 64, 64) and "patch_size" not in record
    assert "planned from 2 training cases on cpu" in planning.describe(record)


def test_finetune_logs_and_records_its_plan(small_adrenal: Path, tmp_path: Path) -> None:
    from conftest import rubikssl

    with np.load(small_adrenal) as archive:
        data = {"train_images": archive["train_images"][:16], "train_labels": np.arange(16) % 2,
                "val_images": archive["val_images"][:8], "val_labels": np.arange(8) % 2}
    path = tmp_path / "data.npz"
    np.savez(path, **data)
    result = rubikssl("finetune", "--task", "classify", "--train", str(path), "--val", str(path), "--out",
                      str(tmp_path / "run"), "--epochs", "1", "--widths", "8,16", "--intensity", "none")
    assert result.returncode == 0, result.stderr
    assert "planned from 16 training cases on cpu" in result.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["plan"]["patch_size"] == [64, 64, 64] == config["patch_size"]  # the whole 64^3 archive image
    assert config["spacing_mm"] is None and config["batch_size"] == config["plan"]["batch_size"] >= 2
    card = json.loads((tmp_path / "run" / "model.json").read_text())
    assert card["config"]["plan"] == config["plan"]
