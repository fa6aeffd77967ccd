"""Turn what the user names on the command line into cases (lists of channel files).

Accepted: volume files, DICOM series folders, folders of volumes (searched recursively), a MONAI-style datalist
JSON ({"training": [{"image": ...}], "validation": [...]}), an nnU-Net raw dataset folder (imagesTr/ with _0000,
_0001 channel suffixes) and a NumPy archive of arrays (MedMNIST layout: train_images, val_images, ...).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from RubikSSLLib.errors import BadInput
from RubikSSLLib.volumes import Geometry, Volume, check_voxels, is_dicom_file, is_volume_file, load_case

NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})(?P<ext>\.nii\.gz|\.nii|\.nrrd|\.mha|\.mhd)$")


@dataclass(frozen=True)
class CaseSource:
    """Where one case comes from: one file/DICOM folder per channel, or one array of an .npz archive."""

    channels: tuple[str, ...]
    npz_key: str = ""
    npz_index: int = -1

    @property
    def name(self) -> str:
        if self.npz_key:
            return f"{self.channels[0]}[{self.npz_key}][{self.npz_index}]"
        return self.channels[0]


@dataclass
class CasePools:
    """Cases to train on, and cases the data itself declares as validation (may be empty)."""

    train: list[CaseSource]
    validation: list[CaseSource]


def resolve(items: list[str]) -> CasePools:
    """Expand command-line DATA items into case pools; refuse an empty result."""
    pools = CasePools([], [])
    for item in items:
        found = _resolve_one(Path(item))
        pools.train += found.train
        pools.validation += found.validation
    if not pools.train:
        raise BadInput(f"no volumes found in {' '.join(items) or 'the data list'}; pass volume files, folders or a datalist JSON")
    return pools


def _resolve_one(path: Path) -> CasePools:
    if not path.exists():
        raise BadInput(f"{path}: no such file or folder; check the path")
    if path.is_dir():
        return _resolve_folder(path)
    name = path.name.lower()
    if name.endswith(".json"):
        return _resolve_datalist(path)
    if name.endswith(".npz"):
        return _resolve_npz(path)
    if is_volume_file(path) or is_dicom_file(path):
        return CasePools([CaseSource((str(path),))], [])
    raise BadInput(f"{path}: not a volume, folder, datalist .json or .npz archive; use NIfTI, NRRD, MHA/MHD or DICOM")


def _resolve_folder(folder: Path) -> CasePools:
    if (folder / "imagesTr").is_dir():
        return CasePools(nnunet_cases(folder / "imagesTr"), [])
    if any(is_dicom_file(p) for p in folder.iterdir() if p.is_file()):
        return CasePools([CaseSource((str(folder),))], [])
    cases = []
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            cases += _resolve_folder(child).train
        elif is_volume_file(child):
            cases.append(CaseSource((str(child),)))
    return CasePools(cases, [])


def nnunet_cases(images: Path) -> list[CaseSource]:
    channels: dict[str, dict[int, str]] = {}
    for file in sorted(images.iterdir()):
        match = NNUNET_CHANNEL.match(file.name)
        if match:
            channels.setdefault(match["case"], {})[int(match["channel"])] = str(file)
    cases = []
    for case, by_index in sorted(channels.items()):
        if sorted(by_index) != list(range(len(by_index))):
            raise BadInput(f"{images}: case {case} has channels {sorted(by_index)}; nnU-Net needs _0000 .. _{len(by_index) - 1:04d}")
        cases.append(CaseSource(tuple(by_index[i] for i in range(len(by_index)))))
    return cases


def read_datalist(path: Path) -> dict:
    """A MONAI-style datalist: a JSON object whose 'training' / 'validation' (if present) are lists. The one
    reader of pretraining and fine-tuning datalists; entries are read with `image_files`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadInput(f"{path}: not a readable datalist JSON ({error}); fix the file") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path}: a datalist is a JSON object with a 'training' list, not a {type(data).__name__}; "
                       "see the README's datalist example")
    for section in ("training", "validation"):
        if not isinstance(data.get(section, []), list):
            raise BadInput(f"{path}: '{section}' must be a list of {{\"image\": ...}} entries")
    return data


def image_files(path: Path, image: object, where: str) -> tuple[str, ...]:
    """An entry's 'image' (a path, or a list of channel paths, relative to the datalist) as absolute paths."""
    files = image if isinstance(image, list) else [image]
    if not files or not all(isinstance(f, str) and f for f in files):
        raise BadInput(f"{where}: 'image' must be a file path or a list of channel file paths, not {image!r}")
    return tuple(str((path.parent / f).resolve()) for f in files)


def _resolve_datalist(path: Path) -> CasePools:
    data = read_datalist(path)

    def cases(section: str) -> list[CaseSource]:
        found = []
        for number, entry in enumerate(data.get(section, [])):
            image = entry.get("image") if isinstance(entry, dict) else entry
            found.append(CaseSource(image_files(path, image, f"{path}: '{section}' entry {number}")))
        return found

    return CasePools(cases("training"), cases("validation"))


@functools.lru_cache(maxsize=4)
def open_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise BadInput(f"{path}: not a readable .npz archive ({error}); re-download or re-save it") from None


def _resolve_npz(path: Path) -> CasePools:
    arrays = open_npz(str(path))
    train_keys = [k for k in ("train_images", "images") if k in arrays]
    if not train_keys:
        raise BadInput(f"{path}: .npz needs a 'train_images' or 'images' array of shape (N, Z, Y, X)")

    def cases(key: str) -> list[CaseSource]:
        if key not in arrays:
            return []
        if arrays[key].ndim != 4:
            raise BadInput(f"{path}: array '{key}' has shape {arrays[key].shape}; expected (N, Z, Y, X) 3D volumes")
        return [CaseSource((str(path),), key, i) for i in range(len(arrays[key]))]

    return CasePools(cases(train_keys[0]), cases("val_images"))  # test_images are never used for pretraining


def load(source: CaseSource, spacing_mm: float | None = None, canonical: bool = True) -> Volume:
    """Load one case as a Volume. Arrays from .npz keep their dtype and get a 1 mm identity geometry."""
    if source.npz_key:
        array = open_npz(source.channels[0])[source.npz_key][source.npz_index]
        check_voxels(array, source.name)
        return Volume(array[None], Geometry(), [source.name])
    return load_case(list(source.channels), spacing_mm, canonical)


def file_digest(path: str) -> str:
    """sha256 of a file, or of the sorted file digests of a folder (a DICOM series); computed once per version
    of the file (its size and modification time)."""
    status = Path(path).stat()
    return _digest(str(path), status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    target = Path(path)
    digest = hashlib.sha256()
    if target.is_dir():
        for child in sorted(p for p in target.iterdir() if p.is_file()):
            digest.update(file_digest(str(child)).encode())
    else:
        with open(target, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def describe(sources: list[CaseSource]) -> list[dict]:
    """The data list for a model card: each case's channel files with their hashes; archive cases grouped."""
    entries: list[dict] = []
    archives: dict[tuple[str, str], dict] = {}
    for source in sources:
        if source.npz_key:
            key = (source.channels[0], source.npz_key)
            if key not in archives:
                archives[key] = {"archive": key[0], "key": key[1], "sha256": file_digest(key[0]), "indices": []}
                entries.append(archives[key])
            archives[key]["indices"].append(source.npz_index)
        else:
            entries.append({"case": source.name, "channels": [{"path": c, "sha256": file_digest(c)} for c in source.channels]})
    return entries


def recorded_files(entries: list[dict]) -> dict[str, str]:
    """path -> sha256 of every file a model card's data list names (`describe`'s entries, or {"path", "sha256"})."""
    files = {}
    for entry in entries:
        if "archive" in entry:
            files[entry["archive"]] = entry["sha256"]
        elif "channels" in entry:
            files.update({channel["path"]: channel["sha256"] for channel in entry["channels"]})
        else:
            files[entry["path"]] = entry["sha256"]
    return files


def check_unchanged(recorded: dict[str, str], current: set[str], run: str | Path, ignored: set[str] = frozenset()) -> None:
    """A resume continues on the data its run began with: every file the run recorded is there with the same
    sha256, and no file joined (`current`: the files the resumed run would read; `ignored`: ones it skipped as
    unusable). Else one line naming the file and the way out."""
    for path, digest in recorded.items():
        if not Path(path).exists():
            raise BadInput(f"{run}: cannot resume: its data file {path} is gone; put it back, or start a new run")
        if file_digest(path) != digest:
            raise BadInput(f"{run}: cannot resume: {path} is not the file the run began with (its sha256 differs); "
                           "resume only on the run's own data, or start a new run")
    joined = sorted(current - set(recorded) - set(ignored))
    if joined:
        more = f" and {len(joined) - 1} more" if len(joined) > 1 else ""
        raise BadInput(f"{run}: cannot resume: {joined[0]}{more} joined its data since the run began; resume on the "
                       "run's own data, or start a new run")
