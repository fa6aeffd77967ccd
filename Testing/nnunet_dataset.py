"""A small nnU-Net dataset made from the 4 BraTS cases of ../shared/data, planned and preprocessed by nnU-Net
itself (nnunetv2's own API, in this process), for the nnU-Net tests and the nnU-Net benchmark.

nnU-Net reads its folders from environment variables (nnunetv2.paths; before 2.7 once, at import): `use_folders`
sets them, and points the copies an older nnunetv2 made at import at them too. BraTS is under a non-commercial licence: tests and benchmarks only, never bundled.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

BRATS = "seg/brats2015_deepmedic"
CASES = ("brats_2013_pat0001_1", "brats_2013_pat0002_1", "brats_2013_pat0003_1", "brats_2013_pat0005_1")
CHANNELS = {"0": "FLAIR", "1": "T1c"}
LABELS = {"background": 0, "necrosis": 1, "edema": 2, "non-enhancing": 3, "enhancing": 4}
PATHS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def use_folders(root: Path) -> dict[str, Path]:
    """nnU-Net's three folders under `root`, in the environment and in nnunetv2 if it is loaded already."""
    folders = {name: root / name for name in PATHS}
    for name, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(folder)
    for module in [m for n, m in list(sys.modules.items()) if n.startswith("nnunetv2") and m is not None]:
        for name, folder in folders.items():  # nnunetv2 < 2.7 copied the variables at import; later ones read them
            if isinstance(getattr(module, name, 0), str) or (hasattr(module, name) and getattr(module, name) is None):
                setattr(module, name, str(folder))
    return folders


def resampled(path: Path, spacing_mm: float, label: bool = False) -> sitk.Image:
    image = sitk.ReadImage(str(path))
    size = [int(round(n * s / spacing_mm)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    interpolator = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    out = sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), (spacing_mm,) * 3,
                        image.GetDirection(), 0, sitk.sitkUInt8 if label else sitk.sitkFloat32)
    return out


def make_raw_dataset(shared: Path, raw: Path, dataset_id: int = 901, spacing_mm: float = 3.0,
                     cases: tuple[str, ...] = CASES) -> Path:
    """DatasetNNN_BraTSTiny in nnU-Net's raw layout: FLAIR and T1c (channels 0000, 0001) and the label map of each
    case, resampled to `spacing_mm` (3 mm: 80 x 80 x 52 voxels, so nnU-Net plans a small network)."""
    folder = raw / f"Dataset{dataset_id:03d}_BraTSTiny"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(exist_ok=True)
    for case in cases:
        source = shared / BRATS / case
        for index, name in enumerate(("Flair_subtrMeanDivStd", "T1c_subtrMeanDivStd")):
            sitk.WriteImage(resampled(source / f"{name}.nii.gz", spacing_mm), str(folder / "imagesTr" / f"{case}_{index:04d}.nii.gz"))
        label = resampled(source / "OTMultiClass.nii.gz", spacing_mm, label=True)
        array = np.clip(sitk.GetArrayFromImage(label), 0, 4).astype(np.uint8)
        written = sitk.GetImageFromArray(array)
        written.CopyInformation(label)
        sitk.WriteImage(written, str(folder / "labelsTr" / f"{case}.nii.gz"))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": CHANNELS, "labels": LABELS,
                                                      "numTraining": len(cases), "file_ending": ".nii.gz"}, indent=2))
    return folder


def plan_and_preprocess(dataset_id: int, configurations: tuple[str, ...] = ("3d_fullres",)) -> Path:
    """nnU-Net's fingerprint, planning and preprocessing of a dataset (one process); returns the plans file."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess
    from nnunetv2.paths import nnUNet_preprocessed

    extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=True, verbose=False)
    plan_experiments([dataset_id])
    preprocess([dataset_id], configurations=configurations, num_processes=[1] * len(configurations), verbose=False)
    return next(Path(nnUNet_preprocessed).glob(f"Dataset{dataset_id:03d}_*")) / "nnUNetPlans.json"


def add_configuration(plans_file: Path, name: str, features: tuple[int, ...], patch_size: tuple[int, ...] | None = None,
                      batch_size: int = 2) -> str:
    """A configuration of the same plans with fewer features per stage (and a smaller patch): nnU-Net's own
    `inherits_from` mechanism, the same preprocessed data, a network small enough for a CPU test."""
    plans = json.loads(plans_file.read_text())
    base = plans["configurations"]["3d_fullres"]
    architecture = json.loads(json.dumps(base["architecture"]))
    architecture["arch_kwargs"]["features_per_stage"] = list(features)
    derived = {"inherits_from": "3d_fullres", "architecture": architecture, "batch_size": batch_size}
    if patch_size is not None:
        derived["patch_size"] = list(patch_size)
    plans["configurations"][name] = derived
    plans_file.write_text(json.dumps(plans, indent=2))
    return name


def write_splits(preprocessed: Path, cases: tuple[str, ...] = CASES) -> None:
    """nnU-Net's splits_final.json: one fold per case, trained on the others (its own 5-fold split needs 5 cases)."""
    folds = [{"train": [c for c in cases if c != held], "val": [held]} for held in cases]
    (preprocessed / "splits_final.json").write_text(json.dumps(folds, indent=2))
