"""The command line as a user or the Slicer panel meets it: outputs, the progress protocol, bad input."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import TINY_RUN, rubikssl, shared
from RubikSSLLib import checkpoint, progress, puzzleview
from RubikSSLLib.errors import BadInput


def events(stdout: str) -> list[dict]:
    return [e for e in (progress.parse_line(line) for line in stdout.splitlines()) if e]


def assert_bad_input(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("rubikssl: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_probe_prints_versions_and_devices_as_json() -> None:
    result = rubikssl("probe")
    assert result.returncode == 0
    report = json.loads(result.stdout)
    assert report["versions"]["torch"] == torch.__version__
    assert report["devices"][0]["type"] == "cpu" and report["devices"][0]["threads"] >= 1


@pytest.mark.parametrize("command", ["pretrain", "finetune", "evaluate", "puzzle", "segment", "classify", "demo"])
def test_every_command_prints_its_help(command: str) -> None:
    result = rubikssl(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: rubikssl " + command)


def test_fine_tuning_metrics_are_reported_per_epoch(capsys) -> None:
    import io

    events = io.StringIO()
    progress.Reporter("json", stream=events).metric(4, unit="epoch", val_auc=0.8)
    assert progress.parse_line(events.getvalue()) == {"event": "metric", "step": 4, "epoch": 4, "val_auc": 0.8}
    progress.Reporter("bar").metric(4, unit="epoch", val_auc=0.8)
    assert capsys.readouterr().err.startswith("epoch 4: val_auc 0.800")


def test_parse_line_reads_events_and_ignores_everything_else() -> None:
    assert progress.parse_line('@rubikssl {"event": "progress", "step": 3}') == {"event": "progress", "step": 3}
    for other in ("step 3", "@rubikssl {not json", '@rubikssl {"step": 3}', '@rubikssl [1]', ""):
        assert progress.parse_line(other) is None


def test_puzzle_writes_viewable_volumes_in_the_source_geometry(tmp_path: Path) -> None:
    source = shared("pretrain/niivue_M2208_T2w.nii.gz")
    result = rubikssl("puzzle", "--volume", str(source), "--out", str(tmp_path), "--seed", "3", "--progress", "json")
    assert result.returncode == 0, result.stderr
    for name in puzzleview.OUTPUTS.values():
        assert (tmp_path / name).is_file(), name
    record = json.loads((tmp_path / "puzzle.json").read_text())
    crop = tuple(record["crop_size_zyx"])
    scrambled = sitk.ReadImage(str(tmp_path / "scrambled.nrrd"))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "scrambled_labels.nrrd")))
    assert sitk.GetArrayFromImage(scrambled).shape == crop == labels.shape
    # the crop sits where it was cut. The 2 mm grid starts at the file's first voxel face (its first centre half a
    # 2 mm voxel inside it, geometry.aligned_grid); thin axes are padded symmetrically
    source_image = sitk.DICOMOrient(sitk.ReadImage(str(source)), "LPS")
    spacing = np.array(source_image.GetSpacing())
    resampled_xyz = np.floor(np.array(source_image.GetSize()) * spacing / 2.0 + 0.5)
    padding_xyz = np.maximum(np.array(crop[::-1]) - resampled_xyz, 0) // 2
    first_centre = np.array(source_image.GetOrigin()) + np.reshape(source_image.GetDirection(), (3, 3)) @ ((2.0 - spacing) / 2)
    expected_origin = first_centre + (np.array(record["crop_start_zyx"][::-1]) - padding_xyz) * 2.0
    np.testing.assert_allclose(scrambled.GetOrigin(), expected_origin, atol=1e-3)
    assert scrambled.GetSpacing() == (2.0, 2.0, 2.0)
    assert sorted(np.unique(labels)) == list(range(9))
    original = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "original.nrrd")))
    recovered = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "recovered.nrrd")))
    np.testing.assert_array_equal(recovered, original)
    assert not np.array_equal(sitk.GetArrayFromImage(scrambled), original)
    assert record["permutation"] == np.argsort(np.argsort(record["permutation"])).tolist()
    kinds = {e["kind"] for e in events(result.stdout) if e["event"] == "artifact"}
    assert {"scrambled", "scrambled_labels", "recovered", "montage", "puzzle"} <= kinds
    assert events(result.stdout)[-1]["event"] == "done"


def test_volume_smaller_than_the_puzzle_names_the_minimum(tmp_path: Path) -> None:
    result = rubikssl("puzzle", "--volume", str(shared("pretrain/HeadMRVolume.mhd")), "--out", str(tmp_path / "o"),
                      "--cube-size", "32", "--spacing", "4")
    assert_bad_input(result, "HeadMRVolume.mhd", "needs at least 64x64x64")
    assert not (tmp_path / "o").exists()


def test_cube_smaller_than_the_encoder_can_take_names_the_minimum(tmp_path: Path) -> None:
    result = rubikssl("pretrain", "--data", str(shared("pretrain/HeadMRVolume.mhd")), "--out", str(tmp_path / "o"),
                      "--cube-size", "12", "--steps", "2", "--progress", "json")
    assert_bad_input(result, "--cube-size 12", "at least 16")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["missing", "two_d", "four_d", "nan", "constant", "mismatched", "empty", "truncated",
                                  "unwritable"])
def test_pretrain_refuses_bad_input_with_one_line_and_writes_nothing(tmp_path: Path, case: str) -> None:
    out = tmp_path / "run"
    data: list[str]
    if case == "missing":
        data = [str(tmp_path / "nowhere.nii.gz")]
    elif case in ("two_d", "four_d", "nan", "constant"):
        array = {"two_d": np.random.rand(64, 64), "four_d": np.random.rand(2, 40, 40, 40),
                 "nan": np.full((40, 40, 40), np.nan), "constant": np.zeros((40, 40, 40))}[case]
        data = [str(tmp_path / f"{case}.nrrd")]
        sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.float32), isVector=False), data[0])
    elif case == "mismatched":
        datalist = tmp_path / "list.json"
        datalist.write_text(json.dumps({"training": [{"image": [
            str(shared("pretrain/msl_patient01_study1_FLAIR.nii.gz")), str(shared("pretrain/msl_patient01_study1_T1W.nii.gz"))]}]}))
        data = [str(datalist)]
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        data = [str(tmp_path / "empty")]
    elif case == "truncated":
        raw = shared("pretrain/niivue_M2208_T2w.nii.gz").read_bytes()
        data = [str(tmp_path / "cut.nii.gz")]
        Path(data[0]).write_bytes(raw[: len(raw) // 3])
    else:
        data = [str(shared("pretrain/HeadMRVolume.mhd"))]
        (tmp_path / "a_file").write_text("")
        out = tmp_path / "a_file" / "run"
    result = rubikssl("pretrain", "--data", *data, "--out", str(out), "--steps", "2", *TINY_RUN)
    expected = {"missing": "nowhere.nii.gz", "two_d": "2D image", "four_d": "4D image", "nan": "NaN/Inf",
                "constant": "constant", "mismatched": "geometry differs", "empty": "no volumes found",
                "truncated": "truncated", "unwritable": "cannot write the run folder"}[case]
    assert_bad_input(result, expected)
    error_events = [e for e in events(result.stdout) if e["event"] == "error"]
    assert error_events and error_events[0]["exit_code"] == 2
    assert not out.exists()  # a run folder created by a failed run is removed again


def test_foreign_and_corrupt_checkpoints_are_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(pickle.dumps(Exploit()))
    result = rubikssl("puzzle", "--volume", str(shared("pretrain/niivue_M2208_T2w.nii.gz")), "--out", str(tmp_path / "o"),
                      "--model", str(run))
    assert_bad_input(result, "model.safetensors")
    assert not marker.exists()

    torch.save({"weights": torch.zeros(3)}, run / "model.safetensors")  # a PyTorch pickle with our file name
    assert_bad_input(rubikssl("puzzle", "--volume", str(shared("pretrain/niivue_M2208_T2w.nii.gz")), "--out",
                              str(tmp_path / "o"), "--model", str(run)), "model.safetensors")

    from safetensors.torch import save_file

    save_file({"weights": torch.zeros(3)}, str(run / "model.safetensors"))  # valid safetensors, not ours
    with pytest.raises(BadInput, match="not a RubikSSL checkpoint"):
        checkpoint.load_model(run / "model.safetensors")


def test_skip_unusable_leaves_out_thin_volumes_and_says_so(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    head = sitk.ReadImage(str(shared("pretrain/HeadMRVolume.mhd")))
    sitk.WriteImage(head, str(folder / "head.nrrd"))
    sitk.WriteImage(head[:, :, :10], str(folder / "thin_slab.nrrd"))  # 10 slices: below the 24 the puzzle needs
    arguments = ["pretrain", "--data", str(folder), "--steps", "2", "--eval-every", "2", *TINY_RUN]
    assert_bad_input(rubikssl(*arguments, "--out", str(tmp_path / "strict")), "thin_slab.nrrd", "needs at least")
    result = rubikssl(*arguments, "--out", str(tmp_path / "lenient"), "--skip-unusable")
    assert result.returncode == 0, result.stderr
    logs = [e["message"] for e in map(progress.parse_line, result.stdout.splitlines()) if e and e["event"] == "log"]
    assert any(m.startswith("skipped:") and "thin_slab.nrrd" in m for m in logs)


@pytest.mark.slow
def test_demo_runs_every_stage_on_the_bundled_data(tmp_path: Path) -> None:
    """The README's first command, with a tiny budget: pretrain, puzzle, fine-tune, segment an unseen scan."""
    import slicerio

    from RubikSSLLib.cli import SAMPLE_DATA
    from RubikSSLLib.progress import parse_line

    result = rubikssl("demo", "--out", str(tmp_path), "--steps", "4", "--finetune-epochs", "1", "--progress", "json")
    assert result.returncode == 0, result.stderr
    events = [e for e in map(parse_line, result.stdout.splitlines()) if e]
    assert events[-1]["event"] == "done" and events[-1]["status"] == "ok"
    # with a model, the scrambled cubes are the network's [-1, 1] input: each montage column needs its own window
    # (a shared one drew the scrambled and solved columns black)
    from PIL import Image

    montage = np.asarray(Image.open(tmp_path / "puzzle" / "montage.png"))
    spread = [c[c < 255].std() for c in np.array_split(montage, 3, axis=1)]  # original | scrambled | recovered
    assert min(spread) > 0.5 * max(spread) > 10
    finetune_card = json.loads((tmp_path / "finetune" / "model.json").read_text())
    assert finetune_card["init"]["loaded"] > 0 and finetune_card["init"]["missing"] == []
    segmentation = slicerio.read_segmentation(str(tmp_path / "segment" / "M2265.seg.nrrd"))
    assert [s["name"] for s in segmentation["segments"]] == ["stroke lesion"]
    labels = sitk.ReadImage(str(tmp_path / "segment" / "M2265.labels.nrrd"))
    source = sitk.ReadImage(str(SAMPLE_DATA / "t2lesion_M2265_T2w.nii.gz"))
    assert labels.GetSize() == source.GetSize()
    assert np.allclose(labels.GetOrigin(), source.GetOrigin(), atol=1e-4)
    assert np.allclose(labels.GetDirection(), source.GetDirection(), atol=1e-6)
