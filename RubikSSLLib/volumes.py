"""Reading and writing 3D volumes with their physical geometry.

Arrays inside the library are (C, Z, Y, X): channel, then slice (k), row (j), column (i).
Geometry follows ITK/DICOM: LPS world coordinates in mm, and tuples in (x, y, z) = (i, j, k) order,
which is the reverse of the array axes.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from RubikSSLLib.errors import BadInput
from RubikSSLLib.files import atomic_path, real_name
from RubikSSLLib.geometry import Geometry, Grid, aligned_grid, nearest_onto  # noqa: F401 - re-exported

# ITK prints its warnings (oblique NIfTI, DICOM slice spacing) to stderr itself; our checks say what matters, and
# the warnings it prints all the same (NiftiImageIO's) are routed through our log (itk_output_as_warnings).
sitk.ProcessObject.SetGlobalWarningDisplay(False)
ITK_WARNING = re.compile(r"WARNING: In \S+, line \d+\s*(\w+) \(0x[0-9a-f]+\): (.*?)(?=WARNING: In |\Z)", re.S)


@contextlib.contextmanager
def itk_output_as_warnings(name: str | os.PathLike) -> Iterator[None]:
    """Route what ITK writes to the process's stderr (file descriptor 2, below Python) while reading or writing
    `name` into Python warnings, which the command line logs ("warning: ITK NiftiImageIO: ... (file)") in order
    with its own lines instead of after them."""
    try:
        stderr_fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (captured in-process): nothing to route
        yield
        return
    sys.stderr.flush()
    saved = os.dup(stderr_fd)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), stderr_fd)
        try:
            yield
        finally:
            os.dup2(saved, stderr_fd)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", errors="replace")
            for source, message in ITK_WARNING.findall(text):
                warnings.warn(f"ITK {source}: {' '.join(message.split())} ({name})", stacklevel=3)
            rest = ITK_WARNING.sub("", text).strip()
            if rest:
                warnings.warn(f"ITK: {' '.join(rest.split())} ({name})", stacklevel=3)

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
CANONICAL_ORIENTATION = "LPS"  # i -> Left, j -> Posterior, k -> Superior: identity direction


@dataclass
class Volume:
    """One case: `array` is (C, Z, Y, X), any real dtype; `sources` name the file of each channel.

    native: the grid of the files as read (before reorientation and resampling), where results go back to."""

    array: np.ndarray
    geometry: Geometry
    sources: list[str]
    native: Grid | None = None

    @property
    def name(self) -> str:
        return self.sources[0]


def geometry_of(image: sitk.Image) -> Geometry:
    return Geometry(tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()))


def resample_onto(image: sitk.Image, grid: Grid, nearest: bool = True) -> np.ndarray:
    """`image` resampled onto `grid` (nearest neighbour, geometry.nearest_index, for label maps; else linear):
    a (Z, Y, X) array."""
    if nearest:
        mapped = nearest_onto(sitk.GetArrayViewFromImage(image), geometry_of(image), grid)
        if mapped is not None:
            return mapped
    geometry = grid.geometry
    resampled = sitk.Resample(image, tuple(int(s) for s in grid.size_zyx[::-1]), sitk.Transform(),
                              sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear, geometry.origin_xyz,
                              geometry.spacing_xyz, geometry.direction, 0, image.GetPixelID())
    return sitk.GetArrayFromImage(resampled)


def image_from_array(array_zyx: np.ndarray, geometry: Geometry) -> sitk.Image:
    """A SimpleITK image from a (Z, Y, X) array, or a vector image from (C, Z, Y, X) with C > 1."""
    if array_zyx.ndim == 4:
        image = (
            sitk.GetImageFromArray(array_zyx[0])
            if array_zyx.shape[0] == 1
            else sitk.GetImageFromArray(np.moveaxis(array_zyx, 0, -1), isVector=True)
        )
    else:
        image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(geometry.spacing_xyz)
    image.SetOrigin(geometry.origin_xyz)
    image.SetDirection(geometry.direction)
    return image


def is_volume_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES)


def is_dicom_file(path: Path) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble, whatever their name."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def read_image(path: str | os.PathLike) -> sitk.Image:
    """Read a volume file, or a folder holding one DICOM series (the largest if there are several)."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such file or folder; check the path")
    try:
        with itk_output_as_warnings(path):
            if path.is_dir():
                return _read_dicom_series(path)
            image = sitk.ReadImage(str(path))
        _check_complete(path)
        return image
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1][:160] if str(error).strip() else "unreadable"
        raise BadInput(
            f"{path}: cannot be read as a volume ({reason}); give a NIfTI, NRRD, MHA/MHD file or a DICOM series folder"
        ) from None


def read_header(path: str | os.PathLike) -> tuple[Geometry, tuple[int, ...]]:
    """(geometry, size (x, y, z)) of a volume file from its header alone, or of a DICOM series folder (read)."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such file or folder; check the path")
    if path.is_dir():
        image = read_image(path)
        return geometry_of(image), tuple(image.GetSize())
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with itk_output_as_warnings(path):
            reader.ReadImageInformation()
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1][:160] if str(error).strip() else "unreadable"
        raise BadInput(f"{path}: cannot be read as a volume ({reason}); give a NIfTI, NRRD, MHA/MHD file or a "
                       "DICOM series folder") from None
    return Geometry(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()), tuple(reader.GetSize())


def check_one_grid(paths: list[str], headers: list[tuple[Geometry, tuple[int, ...]]]) -> None:
    """Refuse channel files of one case whose (geometry, size (x, y, z)) headers differ from the first one's."""
    for path, (geometry, size) in zip(paths[1:], headers[1:]):
        if size != headers[0][1] or not geometry.matches(headers[0][0]):
            raise BadInput(f"{path}: channel geometry differs from {paths[0]} (size {size} vs {headers[0][1]}, "
                           f"spacing/origin/direction); resample the channels onto one grid first")


NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 and float64


def _nifti_header(header: bytes) -> tuple[str, tuple[int, ...], int, int, int] | None:
    """(byte order, dims, datatype, bitpix, payload offset) of a NIfTI-1 or NIfTI-2 header, else None."""
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            datatype, bitpix = struct.unpack(order + "2h", header[70:74])
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            return order, dims, datatype, bitpix, max(offset, 352)
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            datatype, bitpix = struct.unpack(order + "2h", header[12:16])
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
            return order, dims, datatype, bitpix, max(offset, 544)
    return None


def _nifti_payload(path: Path) -> tuple[int, int, int]:
    """(bytes the header promises, bytes present, non-finite voxels) of a .nii or .nii.gz file; zeros if it has
    no NIfTI header. Streams the file once. ITK turns NaN and Inf in NIfTI payloads into 0 as it reads, so the
    raw payload is the only place they can be seen."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as handle:
        header = handle.read(540)
        parsed = _nifti_header(header)
        if parsed is None:
            return 0, 0, 0
        order, dims, datatype, bitpix, offset = parsed
        voxels = math.prod(max(1, d) for d in dims[1 : 1 + max(0, min(dims[0], 7))])
        dtype = np.dtype(order + NIFTI_FLOAT_TYPES[datatype]) if datatype in NIFTI_FLOAT_TYPES else None
        present, bad, pending = len(header), 0, header[offset:] if len(header) > offset else b""
        if len(header) < offset:
            skipped = handle.read(offset - len(header))
            present += len(skipped)
        for block in iter(lambda: handle.read(1 << 22), b""):
            present += len(block)
            if dtype is not None:
                pending += block
                usable = len(pending) - len(pending) % dtype.itemsize
                bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(pending[:usable], dtype))))
                pending = pending[usable:]
        if dtype is not None and pending:
            usable = len(pending) - len(pending) % dtype.itemsize
            bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(pending[:usable], dtype))))
    return offset + voxels * bitpix // 8, present, bad


def _check_complete(path: Path) -> None:
    """ITK zero-fills a truncated NIfTI without complaint, and reads NaN/Inf as 0: check the raw payload."""
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return
    try:
        expected, present, non_finite = _nifti_payload(path)
    except (OSError, EOFError, zlib.error) as error:
        raise BadInput(f"{path}: is truncated or corrupt ({error}); copy the file again") from None
    if present < expected:
        raise BadInput(f"{path}: is truncated ({present} of {expected} bytes); copy the file again")
    if non_finite:
        raise BadInput(f"{path}: contains {non_finite} NaN/Inf voxels; replace them (e.g. with 0) before using this volume")


SLICE_STEP_TOLERANCE = 0.1  # a step between slice positions this far (relative) from the series' usual step: a gap


def _read_dicom_series(folder: Path) -> sitk.Image:
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise BadInput(f"{folder}: folder holds no DICOM series; pass volume files or a DICOM series folder")
    listed = [sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids]
    _check_no_unreadable_slice(folder, {Path(f).resolve() for files in listed for f in files})
    files = max(listed, key=len)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    image = reader.Execute()
    _check_no_missing_slice(folder, files, [_slice_position(reader, index) for index in range(len(files))])
    return image


def _check_no_unreadable_slice(folder: Path, listed: set[Path]) -> None:
    """GDCM leaves a DICOM file it cannot parse (a truncated copy) out of every series without a word, and the
    series is then read without that slice: refuse it, naming the file."""
    for path in sorted(folder.iterdir()):
        if path.name.upper() == "DICOMDIR" or path.resolve() in listed or not is_dicom_file(path):
            continue
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise BadInput(f"{path}: is a DICOM file that cannot be read (truncated or corrupt), so its series would "
                           "miss a slice; copy the series again") from None


def _slice_position(reader: sitk.ImageSeriesReader, index: int) -> float | None:
    """Slice `index`'s position (mm) along the series' normal (Image Position x the orientation's normal)."""
    try:
        position = np.array([float(v) for v in reader.GetMetaData(index, "0020|0032").split("\\")])
        orientation = np.array([float(v) for v in reader.GetMetaData(index, "0020|0037").split("\\")])
    except (RuntimeError, ValueError):
        return None
    if position.size != 3 or orientation.size != 6:
        return None
    return float(np.dot(position, np.cross(orientation[:3], orientation[3:])))


def _check_no_missing_slice(folder: Path, files: tuple[str, ...], positions: list[float | None]) -> None:
    """ITK stacks the slices it is given at one mean spacing, so a missing slice stretches the whole volume: refuse a
    series whose slice positions do not step evenly. Series without positions are left to ITK."""
    if len(files) < 3 or any(p is None for p in positions):
        return
    steps = np.abs(np.diff(np.asarray(positions, dtype=float)))
    usual = float(np.median(steps))
    worst = int(np.argmax(np.abs(steps - usual)))
    if usual > 0 and abs(steps[worst] - usual) > SLICE_STEP_TOLERANCE * usual:
        raise BadInput(f"{folder}: slices {Path(files[worst]).name} and {Path(files[worst + 1]).name} are "
                       f"{steps[worst]:.3g} mm apart where the series steps {usual:.3g} mm: slices are missing (or two "
                       "series share the folder); copy the whole series, one series per folder")


MIN_SPACING_MM = 1e-3  # a micrometre: finer is a broken header (ITK's filters refuse it as "suspiciously small")


def _check_is_3d(image: sitk.Image, path: str) -> None:
    spacing = image.GetSpacing()
    if not all(math.isfinite(v) and v >= MIN_SPACING_MM for v in spacing):
        raise BadInput(f"{path}: has voxel spacing {'x'.join(f'{v:g}' for v in spacing)} mm in its header; fix the "
                       "header's spacing (Slicer: Volumes module, Volume Information)")
    size = image.GetSize()
    if image.GetDimension() == 2 or (image.GetDimension() == 3 and min(size) == 1):
        raise BadInput(f"{path}: is a 2D image (size {'x'.join(map(str, size))}); RubikSSL needs 3D volumes")
    if image.GetDimension() != 3:
        raise BadInput(
            f"{path}: is a {image.GetDimension()}D image (size {'x'.join(map(str, size))}); "
            "split it into 3D volumes (one file per channel or time point)"
        )


MAX_VOXELS = 2**28  # 268 M voxels (1 GiB as float32) per channel: more than any CT at 0.5 mm
MAX_UPSAMPLING = 20  # a file whose voxels are 20x coarser than the target along an axis is not a 3D volume


def check_resampling(size_xyz: tuple[int, ...], spacing_xyz: tuple[float, ...], spacing_mm: float, name: str) -> None:
    """Refuse resampling that would allocate an absurd grid, or invent most of a volume from a few slices."""
    new_size = [max(1, int(math.floor(n * o / spacing_mm))) for n, o in zip(size_xyz, spacing_xyz)]
    voxels = math.prod(new_size)
    if voxels > MAX_VOXELS:
        raise BadInput(f"{name}: resampled to {spacing_mm:g} mm it would be {'x'.join(map(str, new_size[::-1]))} voxels "
                       f"({voxels * 4 / 2**30:.1f} GiB per channel); use a coarser --spacing")
    coarsest = max(spacing_xyz)
    if coarsest / spacing_mm > MAX_UPSAMPLING:
        raise BadInput(f"{name}: has {coarsest:g} mm between voxels along one axis (spacing "
                       f"{'x'.join(f'{v:g}' for v in spacing_xyz)} mm); resampled to {spacing_mm:g} mm most of it would "
                       "be interpolated; give a 3D volume with finer slices, or a coarser --spacing")


def resample_to_spacing(image: sitk.Image, spacing_mm: float, name: str = "volume") -> sitk.Image:
    """Linear resampling to isotropic `spacing_mm` on the face-aligned grid (geometry.aligned_grid), Gaussian-
    smoothed first along axes that get coarser."""
    old = np.array(image.GetSpacing())
    new = np.full(3, float(spacing_mm))
    if np.allclose(old, new, rtol=1e-3):
        return image
    check_resampling(image.GetSize(), image.GetSpacing(), spacing_mm, name)
    sigma = np.where(new > old * 1.01, np.sqrt(np.maximum(new**2 - old**2, 0.0)) / 2.355, 0.0)
    source = sitk.Cast(image, sitk.sitkFloat32)
    if sigma.max() > 0:
        source = sitk.SmoothingRecursiveGaussian(source, [float(s) if s > 0 else 1e-6 for s in sigma])
    size, grid = aligned_grid(image.GetSize(), geometry_of(image), spacing_mm)
    return sitk.Resample(source, size, sitk.Transform(), sitk.sitkLinear, grid.origin_xyz, grid.spacing_xyz,
                         grid.direction, 0.0, sitk.sitkFloat32, True)  # edge voxels extend, no zero slab


def labels_onto(label: sitk.Image, grid: Grid) -> np.ndarray:
    """A label map (a file's) on `grid` (a network's): each grid voxel takes the label that fills most of it
    (linear interpolation of each label's mask; an even share goes to the higher label value, by a margin that
    floating-point noise cannot cross). A 2 mm voxel over 2x2x2 voxels of 1 mm takes what it covers, where a
    nearest neighbour would pick whichever 1 mm neighbour rounding favours: labels shifted by half a voxel."""
    array = sitk.GetArrayViewFromImage(label)
    mapped = nearest_onto(np.asarray(array), geometry_of(label), grid)
    if mapped is not None and np.allclose(label.GetSpacing(), grid.geometry.spacing_xyz, rtol=1e-6):
        return mapped  # the same voxels, reordered (reorientation only): nothing to interpolate
    values = np.unique(array)
    best = np.full(tuple(grid.size_zyx), -1.0, dtype=np.float32)
    labels = np.zeros(tuple(grid.size_zyx), dtype=array.dtype)
    for rank, value in enumerate(values):
        share = resample_onto(sitk.Cast(label == float(value), sitk.sitkFloat32), grid, nearest=False) + rank * 1e-4
        wins = share > best
        labels[wins], best[wins] = value, share[wins]
    return labels


def check_voxels(array: np.ndarray, name: str) -> None:
    """Refuse NaN/Inf and constant volumes: the first poison training, the second teach nothing."""
    if array.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise BadInput(f"{name}: contains {bad} NaN/Inf voxels; replace them (e.g. with 0) before using this volume")
    low, high = array.min(), array.max()
    if low == high:
        raise BadInput(f"{name}: is constant (every voxel is {low}); it holds no image to learn from, remove it")


def load_case(paths: list[str], spacing_mm: float | None = None, canonical: bool = True) -> Volume:
    """Read the channel files of one case, check they share one grid, stack them as (C, Z, Y, X) float32.

    canonical: reorient to LPS (identity direction) so that array axes mean the same anatomy in every case.
    spacing_mm: resample to this isotropic spacing (None keeps the native grid).
    """
    images = []
    for path in paths:
        image = read_image(path)
        _check_is_3d(image, str(path))
        if image.GetNumberOfComponentsPerPixel() > 1:
            raise BadInput(f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; save each channel as its own 3D file")
        images.append(image)
    first = geometry_of(images[0])
    check_one_grid(paths, [(geometry_of(image), tuple(image.GetSize())) for image in images])
    arrays = []
    for path, image in zip(paths, images):
        check_voxels(sitk.GetArrayViewFromImage(image), str(path))
        if canonical:
            image = sitk.DICOMOrient(image, CANONICAL_ORIENTATION)
        if spacing_mm:
            image = resample_to_spacing(image, spacing_mm, str(path))
        arrays.append(sitk.GetArrayFromImage(image).astype(np.float32, copy=False))
        geometry = geometry_of(image)
    native = Grid(tuple(images[0].GetSize()[::-1]), first)
    return Volume(np.stack(arrays), geometry, [str(p) for p in paths], native)


def write_volume(path: str | os.PathLike, array: np.ndarray, geometry: Geometry, compress: bool = True,
                 atomic: bool = True) -> None:
    """Write (Z, Y, X) or (C, Z, Y, X); the format follows the extension (.nrrd, .nii.gz, ...). atomic=False:
    `path` is already a temp file of the caller's (atomic_path) and is written directly."""
    image = image_from_array(np.ascontiguousarray(array), geometry)
    if not atomic:
        _write_image(image, Path(path), compress, array.nbytes)
        return
    with atomic_path(path) as tmp:
        _write_image(image, tmp, compress, array.nbytes)


def _write_image(image: sitk.Image, path: Path, compress: bool, nbytes: int) -> None:
    """SimpleITK's writer, whose failures all read "Exception thrown in SimpleITK ImageFileWriter_Execute": a full
    disk or an unwritable folder becomes the OSError it is (files.write_refusal names the user's file)."""
    try:
        with itk_output_as_warnings(real_name(path)):
            sitk.WriteImage(image, str(path), useCompression=compress)
    except RuntimeError as error:
        folder = path.parent
        if shutil.disk_usage(folder).free < nbytes + (1 << 20):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        if not os.access(folder, os.W_OK):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(path)) from None
        reason = str(error).strip().splitlines()[-1][:160] if str(error).strip() else "unknown"
        raise OSError(errno.EIO, f"SimpleITK could not write it ({reason})", str(path)) from None
