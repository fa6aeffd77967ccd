"""A corpus of bad inputs, one or more per class, through the real command line (in-process: `cli.main`).

Every case must end with exit 2 (3 for a cancel), a stderr whose last line is the one error line naming the file
or value, no traceback, and no output left behind. Real volumes from ../shared/data are truncated, corrupted and
mis-shaped in each test's temp folder.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO, shared
from RubikSSLLib import checkpoint, cli, rundir

TINY_PRETRAIN = ["--cube-size", "12", "--jitter", "2", "--spacing", "native", "--widths", "8,16", "--batch-size", "4",
                 "--val-puzzles", "4", "--intensity", "none"]
TINY_FINETUNE = ["--widths", "8,16", "--batch-size", "2", "--epochs", "1", "--iterations-per-epoch", "1",
                 "--patch-size", "16", "--spacing", "4"]
STROKE_IMAGE, STROKE_LABEL = "seg/stroke_t2/T2.nii.gz", "seg/stroke_t2/lesionT2.nii.gz"


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(capsys: pytest.CaptureFixture, args: list, *fragments: str, code: int = 2) -> str:
    exit_code, _, err = run(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_code == code, err
    assert lines and lines[-1].startswith("rubikssl: error: "), err
    assert "Traceback" not in err and "WARNING" not in err, err
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


@contextlib.contextmanager
def tmpfs(mount: Path, options: str):
    """A small (or read-only) file system at `mount` for the test's duration; skipped where none can be mounted."""
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("no tmpfs can be mounted here (needs root and mount permission)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.fixture(scope="module")
def stroke_list(tmp_path_factory: pytest.TempPathFactory) -> Path:
    entry = {"image": str(shared(STROKE_IMAGE)), "label": str(shared(STROKE_LABEL))}
    path = tmp_path_factory.mktemp("stroke") / "stroke.json"
    path.write_text(json.dumps({"labels": {"1": "lesion"}, "training": [entry], "validation": [entry]}))
    return path


@pytest.fixture(scope="module")
def pretrained(small_adrenal: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "run"
    assert cli.main(["pretrain", "--data", str(small_adrenal), "--out", str(out), "--steps", "2", "--eval-every", "1",
                     "--progress", "none", *TINY_PRETRAIN]) == 0
    return out


@pytest.fixture(scope="module")
def segmenter(stroke_list: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("seg") / "run"
    assert cli.main(["finetune", "--task", "segment", "--train", str(stroke_list), "--val", str(stroke_list),
                     "--out", str(out), "--progress", "none", *TINY_FINETUNE]) == 0
    return out


# ---- 1. --resume resumes the folder it is given

@pytest.mark.parametrize("how", ["moved", "copied"])
def test_pretrain_resume_of_a_moved_run_trains_the_named_folder(small_adrenal: Path, tmp_path: Path, capsys, how: str) -> None:
    first = tmp_path / "first"
    assert run(capsys, "pretrain", "--data", small_adrenal, "--out", first, "--steps", "2", "--eval-every", "1",
               *TINY_PRETRAIN)[0] == 0
    named = tmp_path / "named"
    if how == "moved":
        first.rename(named)
    else:
        subprocess.run(["cp", "-r", str(first), str(named)], check=True)
        before = (first / rundir.TRAINING_STATE).read_bytes()
    code, out, err = run(capsys, "pretrain", "--data", small_adrenal, "--out", named, "--steps", "4", "--resume",
                         "--progress", "json", *TINY_PRETRAIN)
    assert code == 0, err
    _, state = checkpoint._open(named / rundir.TRAINING_STATE, "training_state", "state")
    assert state["step"] == 4
    assert "resumed" in out and "at step 2" in out
    if how == "moved":
        assert not first.exists()  # the stored path was not re-created
    else:
        assert (first / rundir.TRAINING_STATE).read_bytes() == before  # the original was not touched
    assert json.loads((named / rundir.CONFIG).read_text())["out"] == str(named)


def test_finetune_resume_of_a_moved_run_trains_the_named_folder(stroke_list: Path, tmp_path: Path, capsys) -> None:
    first = tmp_path / "first"
    assert run(capsys, "finetune", "--task", "segment", "--train", stroke_list, "--val", stroke_list, "--out", first,
               *TINY_FINETUNE)[0] == 0
    named = tmp_path / "moved"
    first.rename(named)
    code, _, err = run(capsys, "finetune", "--task", "segment", "--train", stroke_list, "--val", stroke_list,
                       "--out", named, "--resume", *TINY_FINETUNE[:-8], "--epochs", "2")
    assert code == 0, err
    assert not first.exists()
    assert [json.loads(line)["epoch"] for line in (named / rundir.METRICS).read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("content", ["{broken", "[1, 2]", '{"task": "segment"}', '{"data": 3, "out": "x"}'])
def test_a_broken_or_foreign_config_met_by_resume_is_one_line(small_adrenal: Path, stroke_list: Path, tmp_path: Path,
                                                              capsys, content: str) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / rundir.CONFIG).write_text(content)
    assert_one_line_error(capsys, ["pretrain", "--data", small_adrenal, "--out", tmp_path / "run", "--resume"],
                          "config.json", "start a new run")
    assert_one_line_error(capsys, ["finetune", "--task", "segment", "--train", stroke_list, "--val", stroke_list,
                                   "--out", tmp_path / "run", "--resume"], "config.json", "start a new run")


# ---- 2. datalists, archives, cards, output paths and values

@pytest.mark.parametrize("datalist, fragment", [
    ({"training": [{"image": 3, "label": "x.nii.gz"}]}, "'image' must be a file path"),
    ({"training": [{"image": None, "label": "x.nii.gz"}]}, "'image' must be a file path"),
    ({"training": [{"image": "T2.nii.gz", "label": None}]}, "'label' must be a class number or a label map path"),
    ({"training": [{"image": "T2.nii.gz", "label": [1]}]}, "'label' must be a class number"),
    ({"labels": ["lesion"], "training": [{"image": "T2.nii.gz", "label": "l.nii.gz"}]}, "'labels' must be an object"),
    ({"labels": {"one": "lesion"}, "training": [{"image": "T2.nii.gz", "label": "l.nii.gz"}]}, "is not a whole number"),
    ([{"image": "T2.nii.gz", "label": "l.nii.gz"}], "is a JSON object with a 'training' list"),
    ({"training": {"image": "T2.nii.gz"}}, "must be a list"),
])
def test_datalists_with_wrong_field_types(tmp_path: Path, capsys, datalist, fragment: str) -> None:
    path = tmp_path / "list.json"
    path.write_text(json.dumps(datalist))
    assert_one_line_error(capsys, ["finetune", "--task", "segment", "--train", path, "--val", path,
                                   "--out", tmp_path / "run", *TINY_FINETUNE], str(path), fragment)
    assert not (tmp_path / "run").exists()


def test_a_segmentation_datalist_given_to_classify(stroke_list: Path, tmp_path: Path, capsys) -> None:
    assert_one_line_error(capsys, ["finetune", "--task", "classify", "--train", stroke_list, "--val", stroke_list,
                                   "--out", tmp_path / "run", *TINY_FINETUNE], "segmentation data", "--task segment")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dataset_json", ["{not json", "[]", '{"labels": {"lesion": "one"}}'])
def test_a_malformed_nnunet_dataset_json(tmp_path: Path, capsys, dataset_json: str) -> None:
    folder = tmp_path / "Dataset001"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    os.symlink(shared(STROKE_IMAGE), folder / "imagesTr" / "case_0000.nii.gz")
    os.symlink(shared(STROKE_LABEL), folder / "labelsTr" / "case.nii.gz")
    (folder / "dataset.json").write_text(dataset_json)
    assert_one_line_error(capsys, ["finetune", "--task", "segment", "--train", folder, "--val", folder,
                                   "--out", tmp_path / "run", *TINY_FINETUNE], "dataset.json")
    assert not (tmp_path / "run").exists()


def adrenal_arrays(count: int = 8) -> dict[str, np.ndarray]:
    with np.load(shared("cls/adrenalmnist3d_64_trainval.npz")) as archive:
        return {"train_images": archive["train_images"][:count], "train_labels": archive["train_labels"][:count],
                "val_images": archive["val_images"][:count], "val_labels": archive["val_labels"][:count]}


@pytest.mark.parametrize("kind, fragment", [
    ("truncated", "not a readable .npz archive"),
    ("three_d", "expected (N, Z, Y, X)"),
    ("zero_d_labels", "one class number per image"),
    ("one_class", "one class only"),
    ("fractional", "non-integer class numbers"),
])
def test_npz_archives_that_cannot_train_a_classifier(tmp_path: Path, capsys, kind: str, fragment: str) -> None:
    arrays = adrenal_arrays()
    path = tmp_path / "data.npz"
    if kind == "three_d":
        arrays["train_images"] = arrays["train_images"][0]
    elif kind == "zero_d_labels":
        arrays["train_labels"] = np.array(1)
    elif kind == "one_class":
        arrays["train_labels"] = np.zeros_like(arrays["train_labels"])
    elif kind == "fractional":
        arrays["train_labels"] = arrays["train_labels"].astype(np.float32) + 0.7
    np.savez(path, **arrays)
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_one_line_error(capsys, ["finetune", "--task", "classify", "--train", path, "--val", path,
                                   "--out", tmp_path / "run", "--patch-size", "32", "--widths", "8,16", "--epochs", "1"],
                          fragment)
    assert not (tmp_path / "run").exists()


def test_cards_and_run_folders_that_are_not_what_the_command_needs(pretrained: Path, segmenter: Path, tmp_path: Path,
                                                                   capsys) -> None:
    volume = shared(STROKE_IMAGE)
    assert_one_line_error(capsys, ["puzzle", "--volume", volume, "--out", tmp_path / "p", "--model", segmenter],
                          "fine-tuned segment model", "pretraining run")
    assert_one_line_error(capsys, ["segment", "--model", pretrained, "--volume", volume, "--out", tmp_path / "a.seg.nrrd"],
                          "is a pretraining model")
    for key in ("config", "classes", "permutations"):
        damaged = tmp_path / f"no_{key}"
        damaged.mkdir()
        source = pretrained if key == "permutations" else segmenter
        state, card = checkpoint.load_model(source / rundir.BEST_MODEL)
        card.pop(key)
        checkpoint.save_model(damaged / rundir.BEST_MODEL, state, card)
        if key == "permutations":
            assert_one_line_error(capsys, ["puzzle", "--volume", volume, "--out", tmp_path / "p", "--model", damaged],
                                  "solves no puzzle")
        else:
            assert_one_line_error(capsys, ["segment", "--model", damaged, "--volume", volume,
                                           "--out", tmp_path / "a.seg.nrrd"], f"lacks {key}")
    assert not (tmp_path / "p").exists() and not (tmp_path / "a.seg.nrrd").exists()


def test_output_paths_that_cannot_be_used(segmenter: Path, pretrained: Path, tmp_path: Path, capsys) -> None:
    volume = shared(STROKE_IMAGE)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    folder = tmp_path / "folder.seg.nrrd"
    folder.mkdir()
    assert_one_line_error(capsys, ["puzzle", "--volume", volume, "--out", a_file], "is a file, not a folder")
    assert_one_line_error(capsys, ["puzzle", "--volume", volume, "--out", a_file / "below"], "is a file, not a folder")
    assert_one_line_error(capsys, ["segment", "--model", segmenter, "--volume", volume, "--out", folder], "is a folder")
    assert_one_line_error(capsys, ["segment", "--model", segmenter, "--volume", volume,
                                   "--out", a_file / "x.seg.nrrd"], "is a file, not a folder")
    assert_one_line_error(capsys, ["classify", "--model", segmenter, "--volume", volume, "--out", tmp_path], "is a folder")
    assert_one_line_error(capsys, ["classify", "--model", segmenter, "--volume", volume,
                                   "--out", a_file / "r.json"], "is a file, not a folder")
    for command in (["puzzle", "--volume", volume, "--out", "/proc/rubikssl/puzzle"],
                    ["segment", "--model", segmenter, "--volume", volume, "--out", "/proc/rubikssl/x.seg.nrrd"]):
        assert_one_line_error(capsys, command, "/proc/rubikssl")
    assert a_file.read_text() == "" and not any(folder.iterdir())


@pytest.mark.parametrize("option, value, fragment", [
    ("--learning-rate", "0", "--learning-rate 0"), ("--learning-rate", "-1", "--learning-rate -1"),
    ("--learning-rate", "inf", "--learning-rate inf"), ("--learning-rate", "50", "--learning-rate 50"),
    ("--widths", "0", "--widths 0"), ("--patch-size", "0", "--patch-size 0"), ("--batch-size", "0", "--batch-size 0"),
    ("--epochs", "0", "--epochs 0"), ("--epochs", "-1", "--epochs -1"),
    ("--iterations-per-epoch", "0", "--iterations-per-epoch"), ("--spacing", "-2", "--spacing -2"),
])
def test_fine_tuning_values_nobody_checked(stroke_list: Path, tmp_path: Path, capsys, option: str, value: str,
                                           fragment: str) -> None:
    args = ["finetune", "--task", "segment", "--train", stroke_list, "--val", stroke_list, "--out", tmp_path / "run",
            *TINY_FINETUNE, option, value]
    assert_one_line_error(capsys, args, fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option, value, fragment", [
    ("--learning-rate", "0", "--learning-rate 0"), ("--steps", "0", "--steps 0"), ("--batch-size", "0", "--batch-size 0"),
    ("--widths", "0", "--widths 0"), ("--eval-every", "0", "--eval-every 0"),
    ("--spacing", "0.1", "GiB per channel"), ("--spacing", "0.01", "--spacing 0.01"),
])
def test_pretraining_values_nobody_checked(tmp_path: Path, capsys, option: str, value: str, fragment: str) -> None:
    volume = shared("pretrain/niivue_M2208_T2w.nii.gz")
    args = ["pretrain", "--data", volume, "--out", tmp_path / "run", *TINY_PRETRAIN, option, value]
    assert_one_line_error(capsys, args, fragment)
    assert not (tmp_path / "run").exists()


def test_default_crops_fit_a_brain_at_two_mm_for_every_task(tmp_path: Path) -> None:
    from RubikSSLLib import datasources, sampling, tasks
    from RubikSSLLib.config import PretrainConfig

    volume = datasources.load(datasources.CaseSource((str(shared("pretrain/niivue_M2208_T2w.nii.gz")),)), 2.0)
    for name in tasks.names():
        config = PretrainConfig.from_values({"data": ["x"], "out": "y", "task": name})
        shape = tasks.create(config).shape
        sampling.prepare(volume, shape, config.intensity)  # raises BadInput if the brain is too small
        assert all(v <= s for v, s in zip(shape.min_volume_size, volume.array.shape[1:])), name


# ---- 3. what was accepted and must not be

@pytest.mark.parametrize("fill", ["partly_nan", "all_nan", "inf"])
def test_nan_and_inf_in_nifti_are_refused(tmp_path: Path, capsys, fill: str) -> None:
    image = sitk.ReadImage(str(shared("pretrain/niivue_M2208_T2w.nii.gz")), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    if fill == "all_nan":
        array[:] = np.nan
    else:
        array[10:20, 10:20, 10:20] = np.nan if fill == "partly_nan" else np.inf
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(image)
    path = tmp_path / "bad.nii.gz"
    sitk.WriteImage(bad, str(path))
    line = assert_one_line_error(capsys, ["pretrain", "--data", path, "--out", tmp_path / "run", *TINY_PRETRAIN],
                                 str(path), "NaN/Inf")
    assert "constant" not in line
    assert_one_line_error(capsys, ["puzzle", "--volume", path, "--out", tmp_path / "p"], "NaN/Inf")
    assert not (tmp_path / "run").exists() and not (tmp_path / "p").exists()


@pytest.mark.parametrize("stray", ["value_outside", "fractional"])
def test_label_values_are_checked_on_the_files_own_grid(tmp_path: Path, capsys, stray: str) -> None:
    """One stray voxel vanishes when the map is resampled to 4 mm; it must be refused before that."""
    label = sitk.ReadImage(str(shared(STROKE_LABEL)), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(label)
    array[1, 1, 1] = 7 if stray == "value_outside" else 0.5
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(label)
    path = tmp_path / "label.nii.gz"
    sitk.WriteImage(bad, str(path))
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"labels": {"1": "lesion"},
                                    "training": [{"image": str(shared(STROKE_IMAGE)), "label": str(path)}]}))
    fragment = "outside the classes" if stray == "value_outside" else "non-integer"
    assert_one_line_error(capsys, ["finetune", "--task", "segment", "--train", datalist, "--val", datalist,
                                   "--out", tmp_path / "run", *TINY_FINETUNE], str(path), fragment)


def test_a_volume_of_far_apart_slices_is_refused_with_its_spacing(tmp_path: Path, capsys) -> None:
    image = sitk.ReadImage(str(shared("pretrain/niivue_M2208_T2w.nii.gz")))
    image.SetSpacing((image.GetSpacing()[0], image.GetSpacing()[1], 400.0))
    path = tmp_path / "thick.nii.gz"
    sitk.WriteImage(image, str(path))
    assert_one_line_error(capsys, ["pretrain", "--data", path, "--out", tmp_path / "run", "--steps", "1"],
                          str(path), "400 mm")


# ---- 4. complete outputs or none, cancels at any moment

def test_an_internal_error_removes_the_run_folder_it_created(small_adrenal: Path, tmp_path: Path, capsys,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from RubikSSLLib import sampling

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(sampling, "fixed_samples", broken)
    code, _, err = run(capsys, "pretrain", "--data", small_adrenal, "--out", tmp_path / "run", *TINY_PRETRAIN)
    assert code == 1 and err.splitlines()[-1] == "rubikssl: error: internal error: RuntimeError: a bug"
    assert not (tmp_path / "run").exists()


def test_a_failed_labelmap_write_leaves_no_segmentation(segmenter: Path, tmp_path: Path, capsys,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from RubikSSLLib import predict

    def full(path, *args, **kwargs):
        raise RuntimeError(f"Could not write {path}: No space left on device")

    monkeypatch.setattr(predict, "write_volume", full)
    out = tmp_path / "result.seg.nrrd"
    assert_one_line_error(capsys, ["segment", "--model", segmenter, "--volume", shared(STROKE_IMAGE), "--out", out],
                          "the disk is full")
    assert list(tmp_path.iterdir()) == []


def test_resume_drops_metrics_past_the_checkpoint_and_repairs_card_copies(small_adrenal: Path, tmp_path: Path,
                                                                         capsys) -> None:
    out = tmp_path / "run"
    args = ["pretrain", "--data", small_adrenal, "--out", out, "--eval-every", "1", *TINY_PRETRAIN]
    assert run(capsys, *args, "--steps", "2")[0] == 0
    with open(out / rundir.METRICS, "a") as log:  # a kill after the metrics line, before the checkpoint
        log.write(json.dumps({"step": 3, "val_ordering_acc": 0.5}) + "\n" + '{"step": 4, "val_or')
    (out / "model.json").write_text(json.dumps({"stale": True}))  # a kill between the model file and its copy
    assert run(capsys, *args, "--steps", "4", "--resume")[0] == 0
    steps = [json.loads(line)["step"] for line in (out / rundir.METRICS).read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert json.loads((out / "model.json").read_text()) == checkpoint.read_card(out / rundir.BEST_MODEL)


def test_disk_full_while_writing_a_checkpoint_names_the_file(small_adrenal: Path, tmp_path: Path, capsys) -> None:
    with tmpfs(tmp_path / "small", "size=300k") as mount:
        out = mount / "run"
        line = assert_one_line_error(capsys, ["pretrain", "--data", small_adrenal, "--out", out, "--steps", "2",
                                              "--eval-every", "1", *TINY_PRETRAIN[:-2], "--widths", "32,64"],
                                     "the disk is full")
        assert str(out) in line
        assert not out.exists() or not (out / rundir.TRAINING_STATE).exists()
        assert not [p for p in mount.rglob(".tmp*")]


def start_worker(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "RubikSSLLib", *map(str, args), "--progress", "json"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigterm_and_stop_during_start_up_end_as_cancelled(small_adrenal: Path, segmenter: Path, tmp_path: Path) -> None:
    """A cancel before the loop: SIGTERM while torch is imported and data loaded, and a STOP file written then."""
    for name, stop in (("term", "signal"), ("file", "stop")):
        out = tmp_path / name
        worker = start_worker("pretrain", "--data", small_adrenal, "--out", out, "--steps", "50", *TINY_PRETRAIN)
        time.sleep(0.5)  # inside the command (handlers installed at once), long before the first step
        if stop == "signal":
            worker.send_signal(signal.SIGTERM)
        else:
            out.mkdir(exist_ok=True)
            (out / rundir.STOP).write_text("")
        stdout, stderr = worker.communicate(timeout=120)
        assert worker.returncode == 3, stderr
        assert "Traceback" not in stderr and "cancelled" in stderr.splitlines()[-1]
        if out.exists():  # a cancel before the first step keeps nothing new: no checkpoint, never half of one
            assert not (out / rundir.TRAINING_STATE).exists() and not (out / rundir.BEST_MODEL).exists()
            assert not (out / rundir.STOP).exists()  # honoured: it cannot cancel the next start
    result = tmp_path / "cancelled.seg.nrrd"
    worker = start_worker("segment", "--model", segmenter, "--volume", shared(STROKE_IMAGE), "--out", result)
    time.sleep(0.5)
    worker.send_signal(signal.SIGTERM)
    _, stderr = worker.communicate(timeout=120)
    assert worker.returncode == 3, stderr
    assert not result.exists() and not result.with_name("cancelled.labels.nrrd").exists()
    assert not list(tmp_path.glob(".tmp*"))


def test_stderr_of_a_failing_command_ends_with_its_error_and_shows_no_itk_warnings(tmp_path: Path, capsys) -> None:
    """An oblique NIfTI makes ITK warn; the user sees the progress lines and then the one error."""
    raw = gzip.decompress(shared("pretrain/niivue_M2208_T2w.nii.gz").read_bytes())
    path = tmp_path / "cut.nii"
    path.write_bytes(raw[: len(raw) // 2])
    assert_one_line_error(capsys, ["pretrain", "--data", shared("pretrain/HeadMRVolume.mhd"), path,
                                   "--out", tmp_path / "run"], str(path), "truncated")


@pytest.mark.parametrize("damage", ["truncated slice file", "slice missing"])
def test_a_dicom_series_with_a_lost_slice_is_refused_not_stretched(tmp_path: Path, capsys, damage: str) -> None:
    """GDCM drops a slice file it cannot parse without a word, and ITK stacks what is left at one mean spacing: 19
    of 20 CT slices read as a volume 2.11 mm apart instead of 2 mm (every voxel past the gap displaced). Both must
    be one line naming the file or the gap."""
    series = tmp_path / "ct"
    shutil.copytree(shared("pretrain/totalseg_example_ct_dicom"), series)
    victim = sorted(series.iterdir())[9]
    if damage == "truncated slice file":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
        fragments = (str(victim), "cannot be read (truncated or corrupt)")
    else:
        victim.unlink()
        fragments = (str(series), "4 mm apart where the series steps 2 mm", "slices are missing")
    assert_one_line_error(capsys, ["pretrain", "--data", series, "--out", tmp_path / "run", *TINY_PRETRAIN], *fragments)
    assert not (tmp_path / "run").exists()


# ---- the last inputs that ended in a traceback, or in a misleading line (issue: a cancel is never lost)

def test_a_datalist_naming_a_missing_image_is_refused_by_the_planner_in_one_line(tmp_path: Path, capsys) -> None:
    """Met first by the planner (no --spacing/--patch-size, and every classification run): no SimpleITK error."""
    missing = tmp_path / "gone" / "case1.nii.gz"
    segment = tmp_path / "segment.json"
    segment.write_text(json.dumps({"training": [{"image": str(missing), "label": str(shared(STROKE_LABEL))}]}))
    assert_one_line_error(capsys, ["finetune", "--task", "segment", "--train", segment, "--val", segment,
                                   "--out", tmp_path / "run"], str(missing), "no such file")
    classify = tmp_path / "classify.json"
    classify.write_text(json.dumps({"training": [{"image": str(missing), "label": 1},
                                                 {"image": str(shared(STROKE_IMAGE)), "label": 0}]}))
    assert_one_line_error(capsys, ["finetune", "--task", "classify", "--train", classify, "--val", classify,
                                   "--out", tmp_path / "run2"], str(missing), "no such file")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cls")
    with np.load(shared("cls/adrenalmnist3d_64_trainval.npz")) as archive:
        np.savez(folder / "labelled.npz", **{f"{split}_{kind}": archive[f"{split}_{kind}"][:12]
                                              for split in ("train", "val") for kind in ("images", "labels")})
    out = folder / "run"
    assert cli.main(["finetune", "--task", "classify", "--train", str(folder / "labelled.npz"), "--val", str(folder / "labelled.npz"),
                     "--out", str(out), "--progress", "none", "--widths", "8,16", "--batch-size", "2", "--epochs", "1",
                     "--iterations-per-epoch", "1"]) == 0
    return out


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="a /proc file system")
def test_outputs_where_nothing_can_be_created_are_one_line_naming_the_users_path(classifier: Path, tmp_path: Path,
                                                                               capsys) -> None:
    """/proc refuses every new file, even to root: the line names the user's --out, not our temp file."""
    volume = shared(STROKE_IMAGE)
    line = assert_one_line_error(capsys, ["puzzle", "--volume", volume, "--out", "/proc/rubikssl_puzzle",
                                          "--cube-size", "16"], "/proc/rubikssl_puzzle", "cannot be written there")
    assert ".tmp" not in line
    with np.load(shared("cls/adrenalmnist3d_64_trainval.npz")) as archive:
        image = sitk.GetImageFromArray(archive["val_images"][0].astype(np.float32))
    sitk.WriteImage(image, str(tmp_path / "adrenal.nrrd"))
    line = assert_one_line_error(capsys, ["classify", "--model", classifier, "--volume", tmp_path / "adrenal.nrrd",
                                          "--out", "/proc/rubikssl_classes.json"], "/proc/rubikssl_classes.json",
                                 "cannot be written there")
    assert ".tmp" not in line


def test_a_read_only_output_folder_is_named_and_not_called_a_full_disk(tmp_path: Path, capsys) -> None:
    with tmpfs(tmp_path / "read-only", "size=1m,ro") as mount:
        line = assert_one_line_error(capsys, ["puzzle", "--volume", shared(STROKE_IMAGE), "--out", mount / "puzzle",
                                              "--cube-size", "16"], str(mount / "puzzle"), "not writable")
        assert ".tmp" not in line and "disk" not in line


def test_an_absurd_jitter_is_refused_with_the_crop_it_would_need(tmp_path: Path, capsys) -> None:
    assert_one_line_error(capsys, ["pretrain", "--data", shared(STROKE_IMAGE), "--out", tmp_path / "run",
                                   "--jitter", "400"], "864x864x864 crop", "use a smaller --cube-size or --jitter")
    assert not (tmp_path / "run").exists()


def test_a_model_card_with_broken_widths_names_the_model_file_not_an_option(segmenter: Path, tmp_path: Path,
                                                                          capsys) -> None:
    state, card = checkpoint.load_model(segmenter / rundir.BEST_MODEL)
    card["config"]["encoder"]["widths"] = "abc"
    broken = tmp_path / "broken"
    broken.mkdir()
    checkpoint.save_model(broken / rundir.BEST_MODEL, state, card)
    line = assert_one_line_error(capsys, ["segment", "--model", broken, "--volume", shared(STROKE_IMAGE),
                                          "--out", tmp_path / "out.seg.nrrd"], str(broken / rundir.BEST_MODEL),
                                 "model card")
    assert "--widths" not in line


def test_a_missing_model_folder_says_which_command_writes_one(tmp_path: Path, capsys) -> None:
    for command, out in (("segment", tmp_path / "a.seg.nrrd"), ("classify", tmp_path / "a.json")):
        line = assert_one_line_error(capsys, [command, "--model", tmp_path / "no model", "--volume", shared(STROKE_IMAGE),
                                              "--out", out], str(tmp_path / "no model"), "rubikssl finetune")
        assert "pretrain" not in line


def test_a_full_disk_under_every_nrrd_writer_is_the_one_disk_full_line(segmenter: Path, tmp_path: Path) -> None:
    """SimpleITK's writer says only "Exception thrown in SimpleITK ImageFileWriter_Execute": `puzzle` and `segment`
    into a nearly full file system end in the same line as the other writers, with nothing left behind."""
    with tmpfs(tmp_path / "full", "size=64k") as mount:
        for args in (["puzzle", "--volume", shared(STROKE_IMAGE), "--out", mount / "puzzle", "--cube-size", "16"],
                     ["segment", "--model", segmenter, "--volume", shared(STROKE_IMAGE), "--out", mount / "s.seg.nrrd"]):
            filler = mount / "filler"
            filler.write_bytes(b"\0" * (shutil.disk_usage(mount).free - 2048))  # 2 KiB left: less than any result
            result = subprocess.run([sys.executable, "-m", "RubikSSLLib", *map(str, args)], capture_output=True,
                                    text=True, cwd=REPO, timeout=300)
            last = result.stderr.strip().splitlines()[-1]
            assert result.returncode == 2 and "the disk is full" in last and str(mount) in last, result.stderr[-800:]
            assert "Traceback" not in result.stderr and "internal error" not in result.stderr
            filler.unlink()
            assert not list(mount.iterdir())


def test_what_itk_prints_itself_comes_through_our_log_before_our_error(tmp_path: Path) -> None:
    """ITK's MetaImage reader writes "MetaImage: Read: Cannot open data file" to the process's stderr by itself
    (below Python, so capsys cannot see it): it arrives as one of our warning lines, before our error line."""
    header = tmp_path / "missing_data.mhd"
    header.write_text("ObjectType = Image\nNDims = 3\nDimSize = 10 10 10\nElementType = MET_FLOAT\n"
                      "ElementDataFile = missing.raw\n")
    result = subprocess.run([sys.executable, "-m", "RubikSSLLib", "pretrain", "--data", str(header), "--out",
                             str(tmp_path / "run")], capture_output=True, text=True, cwd=REPO, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[-1].startswith("rubikssl: error: ") and str(header) in lines[-1]
    assert any(line.startswith("warning: ITK: MetaImage") and str(header) in line for line in lines[:-1]), lines
    assert not [line for line in lines if line.startswith(("MetaImage", "WARNING"))]
