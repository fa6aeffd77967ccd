"""Volume I/O on real files: geometry round trips, DICOM, channel stacking, and bad volumes."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import shared
from RubikSSLLib import datasources, volumes
from RubikSSLLib.errors import BadInput

OBLIQUE_MRI = "pretrain/msl_patient01_study1_FLAIR.nii.gz"  # anisotropic 0.72 x 0.72 x 4 mm, oblique direction


def test_nifti_to_nrrd_and_back_keeps_voxels_and_geometry(tmp_path: Path) -> None:
    image = volumes.read_image(shared(OBLIQUE_MRI))
    array = sitk.GetArrayFromImage(image)
    geometry = volumes.geometry_of(image)
    volumes.write_volume(tmp_path / "a.nrrd", array, geometry)
    back = volumes.read_image(tmp_path / "a.nrrd")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)
    assert volumes.geometry_of(back).matches(geometry, tolerance=1e-6)
    volumes.write_volume(tmp_path / "b.nii.gz", sitk.GetArrayFromImage(back), volumes.geometry_of(back))
    again = volumes.read_image(tmp_path / "b.nii.gz")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(again), array)
    assert volumes.geometry_of(again).matches(geometry, tolerance=1e-5)


def test_canonical_orientation_keeps_every_voxel_at_its_physical_place() -> None:
    path = shared("seg/totalseg_ct/ct.nii.gz")
    image = sitk.ReadImage(str(path))
    volume = volumes.load_case([str(path)], spacing_mm=None, canonical=True)
    np.testing.assert_allclose(np.reshape(volume.geometry.direction, (3, 3)), np.eye(3), atol=1e-6)
    canonical = volumes.image_from_array(volume.array[0], volume.geometry)
    rng = np.random.default_rng(0)
    for _ in range(20):
        index = [int(rng.integers(s)) for s in image.GetSize()]
        point = image.TransformIndexToPhysicalPoint(index)
        moved = canonical.TransformPhysicalPointToIndex(point)
        assert canonical.GetPixel(moved) == pytest.approx(image.GetPixel(index))


def test_resampling_to_isotropic_spacing_keeps_the_physical_extent() -> None:
    path = str(shared(OBLIQUE_MRI))
    volume = volumes.load_case([path], spacing_mm=2.0)
    assert volume.geometry.spacing_xyz == (2.0, 2.0, 2.0)
    extent_in = np.array(sitk.ReadImage(path).GetSize()) * np.array(sitk.ReadImage(path).GetSpacing())
    extent_out = np.array(volume.array.shape[1:][::-1]) * 2.0
    assert (np.abs(extent_out - extent_in) <= 2.0 + 1e-6).all()
    assert volume.array.dtype == np.float32 and np.isfinite(volume.array).all()


def test_dicom_series_folder_reads_as_one_volume() -> None:
    volume = volumes.load_case([str(shared("pretrain/totalseg_example_ct_dicom"))], spacing_mm=None)
    assert volume.array.shape == (1, 20, 512, 512)
    assert volume.array.min() <= -1000  # HU
    assert volume.geometry.spacing_xyz[2] == pytest.approx(2.0, abs=0.01)


def test_multimodal_channels_are_stacked_in_order() -> None:
    case = shared("seg/brats2015_deepmedic/brats_2013_pat0001_1")
    paths = [str(case / "Flair_subtrMeanDivStd.nii.gz"), str(case / "T1c_subtrMeanDivStd.nii.gz")]
    volume = volumes.load_case(paths, spacing_mm=None, canonical=False)
    assert volume.array.shape == (2, 155, 240, 240)
    np.testing.assert_array_equal(volume.array[1], sitk.GetArrayFromImage(sitk.ReadImage(paths[1])))


def test_channels_with_different_geometry_are_refused_naming_the_file() -> None:
    flair, t1 = shared("pretrain/msl_patient01_study1_FLAIR.nii.gz"), shared("pretrain/msl_patient01_study1_T1W.nii.gz")
    with pytest.raises(BadInput, match="msl_patient01_study1_T1W.*geometry differs"):
        volumes.load_case([str(flair), str(t1)])


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def write_image(path: Path, array: np.ndarray) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=False), str(path))
    return path


@pytest.mark.parametrize(
    ("maker", "message"),
    [
        (lambda d: write_image(d / "flat.nrrd", np.ones((40, 50), np.float32)), "2D image"),
        (lambda d: write_image(d / "slab.nrrd", np.random.rand(1, 40, 50).astype(np.float32)), "2D image"),
        (lambda d: write_image(d / "four.nrrd", np.random.rand(3, 4, 5, 6).astype(np.float32)), "4D image"),
        (lambda d: write_image(d / "nan.nrrd", np.where(np.eye(8)[None] > 0, np.nan, 1.0).repeat(8, 0).astype(np.float32)), "NaN/Inf"),
        (lambda d: write_image(d / "flatline.nrrd", np.full((8, 8, 8), 7, np.int16)), "constant"),
        (lambda d: d / "missing.nii.gz", "no such file"),
        (lambda d: write_text(d / "notes.nrrd", "hello"), "cannot be read"),
    ],
)
def test_bad_volumes_are_refused_with_a_clear_message(tmp_path: Path, maker, message: str) -> None:
    path = maker(tmp_path)
    with pytest.raises(BadInput, match=message) as caught:
        volumes.load_case([str(path)])
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("name", ["truncated.nii.gz", "truncated.nii", "truncated.mha"])
def test_truncated_files_are_refused(tmp_path: Path, name: str) -> None:
    source = shared("pretrain/niivue_MR_Gd_T1c_brain.nii.gz")
    complete = tmp_path / ("complete" + name[len("truncated"):])
    sitk.WriteImage(sitk.ReadImage(str(source)), str(complete), useCompression=name.endswith(".gz"))
    data = complete.read_bytes()
    truncated = tmp_path / name
    truncated.write_bytes(data[: len(data) * 2 // 3])
    volumes.load_case([str(complete)])
    with pytest.raises(BadInput, match=name):
        volumes.load_case([str(truncated)])


def test_folder_datalist_nnunet_and_npz_sources(tmp_path: Path) -> None:
    pretrain = shared("pretrain")
    folder = datasources.resolve([str(pretrain)]).train
    assert len(folder) == 25  # 23 NIfTI + 1 MHD + 1 DICOM series folder
    assert any(Path(s.channels[0]).is_dir() for s in folder)

    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({
        "training": [{"image": str(pretrain / "niivue_M2208_T2w.nii.gz")}],
        "validation": [{"image": [str(pretrain / "HeadMRVolume.mhd")]}],
    }))
    pools = datasources.resolve([str(datalist)])
    assert [len(pools.train), len(pools.validation)] == [1, 1]

    nnunet = tmp_path / "Dataset001_Brain"
    (nnunet / "imagesTr").mkdir(parents=True)
    case = shared("seg/brats2015_deepmedic/brats_2013_pat0001_1")
    shutil.copy(case / "Flair_subtrMeanDivStd.nii.gz", nnunet / "imagesTr" / "brain_001_0000.nii.gz")
    shutil.copy(case / "T1c_subtrMeanDivStd.nii.gz", nnunet / "imagesTr" / "brain_001_0001.nii.gz")
    (nnunet / "dataset.json").write_text("{}")
    cases = datasources.resolve([str(nnunet)]).train
    assert len(cases) == 1 and [Path(c).name for c in cases[0].channels] == ["brain_001_0000.nii.gz", "brain_001_0001.nii.gz"]
    assert datasources.load(cases[0], spacing_mm=None).array.shape[0] == 2

    npz = datasources.resolve([str(shared("cls/adrenalmnist3d_64_trainval.npz"))])
    assert [len(npz.train), len(npz.validation)] == [1188, 98]
    assert datasources.load(npz.train[0]).array.shape == (1, 64, 64, 64)


def test_empty_sources_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="no volumes found"):
        datasources.resolve([str(tmp_path)])
    (tmp_path / "empty.json").write_text(json.dumps({"training": []}))
    with pytest.raises(BadInput, match="no volumes found"):
        datasources.resolve([str(tmp_path / "empty.json")])


def test_gzip_of_a_non_volume_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "fake.nii.gz"
    fake.write_bytes(gzip.compress(b"not a nifti header" * 10))
    with pytest.raises(BadInput, match="fake.nii.gz"):
        volumes.load_case([str(fake)])
