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
from RubikSSLLib.volumes import Geometry, Volume, geometry_of, load_case, read_image


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
    """Labelled cases of `split` ("train" or "val") from one DATA item."""
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
    values = np.asarray(arrays[labels]).reshape(len(arrays[labels]), -1)[:, 0]
    if len(values) != len(arrays[images]):
        raise BadInput(f"{path}: {len(arrays[images])} images but {len(values)} labels in the {split} split")
    cases = [LabeledSource(datasources.CaseSource((str(path),), images, i), int(v)) for i, v in enumerate(values)]
    return LabeledSet(cases, {})


def _datalist(path: Path, split: str) -> LabeledSet:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadInput(f"{path}: not a readable datalist JSON ({error}); fix the file") from None
    section = "training" if split == "train" or "validation" not in data else "validation"
    cases = []
    for entry in data.get(section, []):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise BadInput(f"{path}: every '{section}' entry needs an 'image' and a 'label'")
        files = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
        image = datasources.CaseSource(tuple(str((path.parent / f).resolve()) for f in files))
        label = entry["label"]
        cases.append(LabeledSource(image, label if isinstance(label, int) else str((path.parent / label).resolve())))
    names = {int(k): str(v) for k, v in data.get("labels", {}).items()}
    return LabeledSet(cases, names)


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
        labels = json.loads(dataset.read_text(encoding="utf-8")).get("labels", {})
        names = {int(v): str(k) for k, v in labels.items() if isinstance(v, int)}
    return LabeledSet(cases, names)


def _header(path: str) -> tuple[Geometry, tuple[int, ...]] | None:
    """(geometry, size) of a volume file without reading its voxels; None for a DICOM folder."""
    if Path(path).is_dir():
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return Geometry(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()), reader.GetSize()


def load_label_map(path: str, image_source: str, grid: sitk.Image | None = None) -> np.ndarray:
    """A label map (Z, Y, X) int64, refused if its grid differs from its image's file. With `grid` (the image's
    processed grid: reoriented, resampled) it is put on that grid by nearest neighbour, voxel for voxel."""
    label = read_image(path)
    header = _header(image_source)
    if header is not None and (label.GetSize() != header[1] or not geometry_of(label).matches(header[0])):
        raise BadInput(f"{path}: label map geometry differs from its image {image_source}; resample the labels onto the image grid")
    if grid is not None:
        label = sitk.Resample(label, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    array = sitk.GetArrayFromImage(label)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise BadInput(f"{path}: label map has non-integer values; labels must be whole class numbers")
    return array.astype(np.int64)


def load_image(source: datasources.CaseSource, spacing_mm: float | None, canonical: bool) -> Volume:
    if source.npz_key:
        return datasources.load(source)
    return load_case(list(source.channels), spacing_mm, canonical)


