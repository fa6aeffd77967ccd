"""Labelled data for fine-tuning: cases with a class (classification) or a label map (segmentation).

Classification: an .npz archive with {train,val}_images (N, Z, Y, X) and {train,val}_labels (N,) or (N, 1), or a
datalist JSON whose entries carry "image" and an integer "label". Segmentation: a datalist JSON whose entries carry
"image" (file or list of channel files) and "label" (a label map file), optionally with "labels": {"1": "lesion"}
naming the classes; or an nnU-Net raw dataset folder (imagesTr/, labelsTr/, dataset.json). Given to --val, a
datalist contributes its "validation" list (its "training" list if it has none) and an archive its val_* arrays.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from RubikSSLLib import datasources
from RubikSSLLib.errors import BadInput
from RubikSSLLib.volumes import Grid, Volume, geometry_of, labels_onto, load_case, read_header, read_image


@dataclass(frozen=True)
class LabeledSource:
    image: datasources.CaseSource
    label: int | str  # class index, or the path of a label map

    @property
    def name(self) -> str:
        return self.image.name


@dataclass
class LabeledSet:
    cases: list[LabeledSource]
    class_names: dict[int, str]  # declared label value -> name (may be empty: then inferred from the data)


def resolve(item: str, split: str) -> LabeledSet:
    """Labelled cases of `split` ("train", "val" or "test") from one DATA item."""
    path = Path(item)
    if not path.exists():
        raise BadInput(f"{path}: no such file or folder; check the path")
    if path.is_dir() and (path / "labelsTr").is_dir():
        return _nnunet(path)
    if path.name.lower().endswith(".npz"):
        return _archive(path, split)
    if path.name.lower().endswith(".json"):
        return _datalist(path, split)
    raise BadInput(f"{path}: labelled data must be a datalist .json, an .npz archive or an nnU-Net dataset folder")


def _archive(path: Path, split: str) -> LabeledSet:
    arrays = datasources.open_npz(str(path))
    images, labels = f"{split}_images", f"{split}_labels"
    if images not in arrays or labels not in arrays:
        raise BadInput(f"{path}: needs arrays '{images}' and '{labels}' for the {split} split")
    if arrays[images].ndim != 4:
        raise BadInput(f"{path}: array '{images}' has shape {arrays[images].shape}; expected (N, Z, Y, X) 3D volumes")
    raw = np.asarray(arrays[labels])
    if raw.ndim not in (1, 2) or (raw.ndim == 2 and raw.shape[1] != 1):
        raise BadInput(f"{path}: array '{labels}' has shape {raw.shape}; expected one class number per image, (N,) or (N, 1)")
    values = raw.reshape(-1)
    if len(values) != len(arrays[images]):
        raise BadInput(f"{path}: {len(arrays[images])} images but {len(values)} labels in the {split} split")
    if values.dtype.kind not in "iub" and not (values.dtype.kind == "f" and np.all(np.isfinite(values))
                                              and np.array_equal(values, np.round(values))):
        raise BadInput(f"{path}: array '{labels}' holds non-integer class numbers (e.g. {values.flat[0]}); "
                       "labels must be whole class numbers")
    cases = [LabeledSource(datasources.CaseSource((str(path),), images, i), int(v)) for i, v in enumerate(values)]
    return LabeledSet(cases, {})


def _datalist(path: Path, split: str) -> LabeledSet:
    data = datasources.read_datalist(path)
    section = {"train": "training", "val": "validation", "test": "test"}[split]
    if section not in data:  # a datalist given only for one role holds its cases under 'training'
        section = "validation" if split == "test" and "validation" in data else "training"
    cases = []
    for number, entry in enumerate(data.get(section, [])):
        where = f"{path}: '{section}' entry {number}"
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise BadInput(f"{where} needs an 'image' and a 'label'")
        image = datasources.CaseSource(datasources.image_files(path, entry["image"], where))
        label = entry["label"]
        if isinstance(label, bool) or not isinstance(label, (int, str)) or label == "":
            raise BadInput(f"{where}: 'label' must be a class number or a label map path, not {label!r}")
        cases.append(LabeledSource(image, label if isinstance(label, int) else str((path.parent / label).resolve())))
    return LabeledSet(cases, _class_names(data.get("labels", {}), path, value_to_name=True))


def _class_names(labels: object, path: Path, value_to_name: bool) -> dict[int, str]:
    """Class names from a datalist's {"1": "lesion"} or an nnU-Net dataset.json's {"lesion": 1}."""
    if not isinstance(labels, dict):
        raise BadInput(f"{path}: 'labels' must be an object such as {{\"1\": \"lesion\"}}, not {type(labels).__name__}")
    names = {}
    for key, value in labels.items():
        number, name = (key, value) if value_to_name else (value, key)
        try:
            if isinstance(number, bool) or isinstance(number, float):
                raise ValueError
            names[int(number)] = str(name)
        except (TypeError, ValueError):
            if not value_to_name and isinstance(number, (list, dict)):
                continue  # nnU-Net region labels ({"whole tumour": [1, 2, 3]}) name no single value
            raise BadInput(f"{path}: label value {number!r} of {name!r} is not a whole number; "
                           "give 'labels' as {\"1\": \"lesion\"}") from None
    return names


def _nnunet(folder: Path) -> LabeledSet:
    images = datasources.nnunet_cases(folder / "imagesTr")
    cases = []
    for image in images:
        case_id = Path(image.channels[0]).name.rsplit("_", 1)[0]
        suffix = Path(image.channels[0]).name.split("_")[-1][4:]
        cases.append(LabeledSource(image, str(folder / "labelsTr" / f"{case_id}{suffix}")))
    names = {}
    dataset = folder / "dataset.json"
    if dataset.exists():
        try:
            description = json.loads(dataset.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise BadInput(f"{dataset}: not a readable nnU-Net dataset.json ({error}); fix the file") from None
        if not isinstance(description, dict):
            raise BadInput(f"{dataset}: an nnU-Net dataset.json is a JSON object with 'labels'; fix the file")
        names = _class_names(description.get("labels", {}), dataset, value_to_name=False)
    return LabeledSet(cases, names)


def load_label_map(path: str, image_source: str, grid: Grid | None = None,
                   allowed: set[int] | None = None) -> np.ndarray:
    """A label map (Z, Y, X) int64, refused if its grid differs from its image's file, or (with `allowed`) if it
    holds values outside the classes. Values are checked on the file's own grid, before resampling could drop
    stray voxels. With `grid` (the image's processed grid: reoriented, resampled) it is put on that grid by
    nearest neighbour, voxel for voxel."""
    label = read_image(path)
    header = None if Path(image_source).is_dir() else read_header(image_source)  # a DICOM folder: checked on load
    if header is not None and (label.GetSize() != header[1] or not geometry_of(label).matches(header[0])):
        raise BadInput(f"{path}: label map geometry differs from its image {image_source}; resample the labels onto the image grid")
    native = sitk.GetArrayViewFromImage(label)
    if native.dtype.kind == "f":
        if not np.all(np.isfinite(native)) or not np.array_equal(native, np.round(native)):
            raise BadInput(f"{path}: label map has non-integer values; labels must be whole class numbers")
    if allowed is not None:
        unknown = sorted(set(np.unique(native).astype(np.int64).tolist()) - allowed)  # also catches negative values
        if unknown:
            raise BadInput(f"{path}: holds label values {unknown[:5]} outside the classes {sorted(allowed)}; "
                           "fix the label map or declare the classes in the datalist's 'labels'")
    array = labels_onto(label, grid) if grid is not None else sitk.GetArrayFromImage(label)
    return array.astype(np.int64)


def load_image(source: datasources.CaseSource, spacing_mm: float | None, canonical: bool) -> Volume:
    if source.npz_key:
        return datasources.load(source)
    return load_case(list(source.channels), spacing_mm, canonical)


