"""The Slicer module's MRML half run on Slicer's own libraries (slicer-core, PyPI): real scenes, nodes, storage
nodes, readers and module logics; only what slicer-core lacks (Qt, slicer.app) is stood in for, in
slicerstandin.py. What the module writes for a worker, what it loads back, the click loop against real markups and
the real `serve` worker, and the panel's own widget and interactive section driven through their handlers."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from conftest import REPO, shared

STROKE, STROKE_LESION = "seg/stroke_t2/T2.nii.gz", "seg/stroke_t2/lesionT2.nii.gz"
OBLIQUE_FLAIR = "pretrain/msl_patient20_study2_FLAIR.nii.gz"  # 0.9 x 0.9 x 3 mm, oblique


# ---------------------------------------------------------------------------------------------------- helpers

def load_volume(path: Path, name: str = "volume", labelmap: bool = False):
    """A file into the scene with Slicer's volume reader (vtkSlicerVolumesLogic, what File > Add Data runs)."""
    import slicer

    return slicer.modules.volumes.logic().AddArchetypeVolume(str(path), name, 4 | (1 if labelmap else 0))


def ijk_to_ras(node) -> np.ndarray:
    import slicer
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def non_lps_oblique_copy(folder: Path) -> Path:
    """The oblique, anisotropic MS FLAIR with its axes reordered (k first) and two flipped: not LPS-ordered."""
    image = sitk.ReadImage(str(shared(OBLIQUE_FLAIR)))
    permuted = sitk.Flip(sitk.PermuteAxes(image, [2, 0, 1]), [True, False, True])
    path = folder / "flair_permuted.nrrd"
    sitk.WriteImage(permuted, str(path))
    return path


def known_segmentation(volume_path: Path, out: Path) -> dict:
    """Run `predict.segment` with a network that answers a known label map (thresholds of the volume itself) on its
    grid, so the written .seg.nrrd / .labels.nrrd are what a model's result is, without training one."""
    import torch

    from RubikSSLLib import predict, preprocess
    from RubikSSLLib.config import FinetuneConfig

    config = FinetuneConfig(task="segment", train=["x"], val=["x"], out="y", spacing_mm=2.0, patch_size=(16, 16, 16))
    image, volume = preprocess.network_input([str(volume_path)], config.to_json(), ["MR"])
    indices = np.digitize(image[0], np.percentile(image[0], [70, 92])).astype(np.int64)

    class Oracle(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.from_numpy(indices), 3).permute(3, 0, 1, 2)[None].float()

    classes = [{"index": 0, "value": 0, "name": "background", "color": [0, 0, 0]},
               {"index": 1, "value": 1, "name": "white matter", "color": [0.9, 0.8, 0.1]},
               {"index": 2, "value": 4, "name": "bright lesion", "color": [0.8, 0.1, 0.2]}]
    card = {"task": "segment", "config": {**config.to_json(), "patch_size": list(indices.shape)}, "classes": classes,
            "channels": ["MR"], "postprocessing": {"largest_component": []}}
    original = predict.load_finetuned
    predict.load_finetuned = lambda *args, **kwargs: (Oracle(), card)
    try:
        return predict.segment("oracle", [str(volume_path)], out)
    finally:
        predict.load_finetuned = original


# --------------------------------------------------------------------------- our outputs through Slicer's readers

@pytest.mark.parametrize("which", ["oblique", "oblique_permuted"])
def test_our_segmentation_loads_in_slicer_with_its_names_colours_and_the_input_geometry(slicer_standin, tmp_path,
                                                                                         which) -> None:
    """The .seg.nrrd read by Slicer's segmentation reader has the model's segment names and colours and the
    input's geometry, and Slicer's own export onto the input volume gives back .labels.nrrd voxel for voxel, on an
    oblique, anisotropic volume, and on one whose axes are not in LPS order."""
    import slicer

    from RubikSSLModuleLib import nodeio, results

    source = shared(OBLIQUE_FLAIR) if which == "oblique" else non_lps_oblique_copy(tmp_path)
    summary = known_segmentation(source, tmp_path / "result.seg.nrrd")
    volume = load_volume(source, "FLAIR")
    message = results.loadSegmentation(tmp_path / "result.seg.nrrd", volume)
    segmentation = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
    assert results.segmentNames(segmentation) == ["white matter", "bright lesion"] and "bright lesion" in message
    colours = [segmentation.GetSegmentation().GetNthSegment(i).GetColor() for i in range(2)]
    np.testing.assert_allclose(colours, [[0.9, 0.8, 0.1], [0.8, 0.1, 0.2]], atol=1e-6)
    assert segmentation.GetModifiedSinceRead()  # read from a work folder: Save writes it anew

    labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    ids, _ = nodeio.segments_in_order(segmentation.GetSegmentation())
    assert slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(
        segmentation, nodeio._string_array(ids), labelmap, volume)
    np.testing.assert_allclose(ijk_to_ras(labelmap), ijk_to_ras(volume), atol=1e-4)
    ours = sitk.GetArrayFromImage(sitk.ReadImage(summary["labelmap"]))
    exported = slicer.util.arrayFromVolume(labelmap)  # segment i+1 in export order: ours has values 1 and 4
    np.testing.assert_array_equal(np.select([exported == 1, exported == 2], [1, 4], 0), ours)
    assert summary["voxels"]["bright lesion"] == int((ours == 4).sum()) > 1000
    written = load_volume(Path(summary["labelmap"]), "labels", labelmap=True)
    np.testing.assert_allclose(ijk_to_ras(written), ijk_to_ras(volume), atol=1e-4)


def test_a_volume_node_written_for_a_worker_keeps_its_voxels_and_place(slicer_standin, tmp_path) -> None:
    """nodeio.write_volume from a real node (loaded by Slicer's reader): the worker's file has the node's voxels,
    and RAS = LPS with the first two axes negated at every voxel; a box restricts it to the ROI's voxels."""
    import slicer

    from RubikSSLLib import slicergeometry
    from RubikSSLModuleLib import nodeio

    volume = load_volume(non_lps_oblique_copy(tmp_path), "FLAIR")
    path = nodeio.write_volume(volume, tmp_path / "input.nrrd")
    image = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), slicer.util.arrayFromVolume(volume))
    for ijk in ((0, 0, 0), (17, 5, 33)):
        ras = ijk_to_ras(volume) @ np.array([*ijk, 1.0])
        lps = image.TransformIndexToPhysicalPoint(ijk)
        np.testing.assert_allclose(ras[:3], (-lps[0], -lps[1], lps[2]), atol=1e-4)
    bounds = [0.0] * 6
    volume.GetRASBounds(bounds)
    centre = [(bounds[2 * a] + bounds[2 * a + 1]) / 2 for a in range(3)]
    box = [centre[0] - 30, centre[0] + 30, centre[1] - 25, centre[1] + 25, centre[2] - 20, centre[2] + 20]
    cropped = sitk.ReadImage(str(nodeio.write_volume(volume, tmp_path / "roi.nrrd", rasBounds=box)))
    expected, _ = slicergeometry.crop_to_ras_box(slicer.util.arrayFromVolume(volume), ijk_to_ras(volume), box, margin_voxels=8)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(cropped), expected)
    assert cropped.GetSize() != image.GetSize()


# ----------------------------------------------------------------------------- a labelled case from a segmentation

def segmentation_with(volume, masks: dict[str, np.ndarray]):
    """A real segmentation node on `volume` with one segment per mask (K, J, I), set as the Segment Editor would."""
    import slicer

    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "labels")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for name, mask in masks.items():
        segment_id = node.GetSegmentation().AddEmptySegment("", name)
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), node, segment_id, volume)
    return node


def test_a_labelled_case_refuses_overlapping_segments_and_leaves_no_node_behind(slicer_standin, tmp_path) -> None:
    import slicer

    from RubikSSLModuleLib import nodeio

    volume = load_volume(shared(STROKE), "T2")
    shape = slicer.util.arrayFromVolume(volume).shape
    lesion, edema, apart = (np.zeros(shape, bool) for _ in range(3))
    lesion[40:60, 80:120, 80:120] = True
    edema[50:70, 100:140, 100:140] = True  # shares 10 x 20 x 20 = 4000 voxels with the lesion
    apart[5:10, 10:20, 10:20] = True
    overlapping = segmentation_with(volume, {"lesion": lesion, "edema": edema})
    assert overlapping.GetSegmentation().GetNumberOfLayers() == 2
    nodes = slicer.mrmlScene.GetNumberOfNodes()
    with pytest.raises(ValueError, match=r"'lesion' and 'edema' .* overlap in 4000 voxels"):
        nodeio.write_labelled_case(volume, overlapping, tmp_path)
    assert slicer.mrmlScene.GetNumberOfNodes() == nodes and not (tmp_path / nodeio.DATALIST).exists()

    separate = segmentation_with(volume, {"lesion": lesion, "elsewhere": apart})
    nodes = slicer.mrmlScene.GetNumberOfNodes()
    datalist = json.loads(nodeio.write_labelled_case(volume, separate, tmp_path).read_text())
    assert slicer.mrmlScene.GetNumberOfNodes() == nodes  # labelmap, its display node and colour table removed
    assert datalist["labels"] == {"1": "lesion", "2": "elsewhere"}
    label = sitk.GetArrayFromImage(sitk.ReadImage(datalist["training"][0]["label"]))
    np.testing.assert_array_equal(label, np.select([lesion, apart], [1, 2], 0))


def test_the_input_volume_offered_first_is_a_plain_scalar_volume(slicer_standin) -> None:
    """Vector (RGB), tensor (DTI) and diffusion-weighted volumes are vtkMRMLScalarVolumeNode subclasses, as
    labelmaps are: none of them is picked as the panel's first input."""
    import slicer

    from RubikSSLModuleLib import nodeio

    for class_name in ("vtkMRMLLabelMapVolumeNode", "vtkMRMLVectorVolumeNode", "vtkMRMLDiffusionTensorVolumeNode",
                       "vtkMRMLDiffusionWeightedVolumeNode"):
        slicer.mrmlScene.AddNewNodeByClass(class_name, class_name)
        assert nodeio.first_scalar_volume(slicer.mrmlScene) is None, class_name
    plain = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "T1")
    assert nodeio.first_scalar_volume(slicer.mrmlScene) is plain


# ------------------------------------------------------------------------------ a worker's results into the scene

@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A few-step pretraining on real MRI and a few-step interactive segmentation model on the stroke case: the
    real files the panel's jobs produce, quickly."""
    from conftest import rubikssl

    folder = tmp_path_factory.mktemp("models")
    volumes = [str(shared(f"pretrain/msl_patient{p}_T1W.nii.gz")) for p in ("12_study1", "20_study2")]
    pretrain = rubikssl("pretrain", "--data", *volumes, "--out", str(folder / "pretrain"), "--steps", "2",
                        "--cube-size", "16", "--widths", "8,16", "--batch-size", "2", "--val-puzzles", "4",
                        "--shortcut-puzzles", "0", "--progress", "none")
    assert pretrain.returncode == 0, pretrain.stderr
    case = {"image": str(shared(STROKE)), "label": str(shared(STROKE_LESION))}
    datalist = folder / "stroke.json"
    datalist.write_text(json.dumps({"labels": {"1": "lesion"}, "training": [case], "validation": [case]}))
    interactive = rubikssl("finetune", "--task", "segment", "--interactive", "--train", str(datalist), "--val",
                           str(datalist), "--out", str(folder / "interactive"), "--spacing", "4", "--patch-size", "16",
                           "--batch-size", "2", "--epochs", "1", "--iterations-per-epoch", "2", "--widths", "8,16",
                           "--progress", "none")
    assert interactive.returncode == 0, interactive.stderr
    return {"pretrain": folder / "pretrain", "interactive": folder / "interactive", "datalist": datalist}


def test_a_scrambled_and_a_solved_puzzle_load_as_volumes_named_cubes_and_a_table(slicer_standin, tiny_models,
                                                                                tmp_path) -> None:
    import slicer

    from conftest import rubikssl
    from RubikSSLModuleLib import results

    volume = load_volume(shared(STROKE), "T2")
    for solve in (False, True):
        out = tmp_path / f"puzzle_{solve}"
        model = ["--model", str(tiny_models["pretrain"])] if solve else ["--cube-size", "16"]
        assert rubikssl("puzzle", "--volume", str(shared(STROKE)), "--out", str(out), *model,
                        "--progress", "none").returncode == 0
        message = results.loadPuzzle(out, volume)
        cubes = slicer.mrmlScene.GetFirstNodeByName("T2 cubes") if not solve else \
            slicer.mrmlScene.GetNodesByName("T2 cubes").GetItemAsObject(1)
        assert results.segmentNames(cubes) == [f"cube {i}" for i in range(1, 9)]
        scrambled = slicer.util.getNode("T2 scrambled*")
        assert scrambled.GetModifiedSinceRead() and cubes.GetModifiedSinceRead()  # Save writes them anew
        puzzle = json.loads((out / "puzzle.json").read_text())
        tables = slicer.util.getNodesByClass("vtkMRMLTableNode")
        assert tables[-1].GetNumberOfRows() == 8
        if solve:
            assert "cubes placed" in message and slicer.mrmlScene.GetFirstNodeByName("T2 solved") is not None
            placed = puzzle["prediction"]["cube_placed_correctly"]
            for slot, cube in enumerate(puzzle["permutation"]):
                colour = cubes.GetSegmentation().GetNthSegment(cube).GetColor()
                expected = "correct" if placed[slot] and puzzle["prediction"]["cube_oriented_correctly"][slot] else \
                    "placed only" if placed[slot] else "wrong"
                np.testing.assert_allclose(colour, results.CUBE_COLOURS[expected])
        else:
            assert "Permutation" in message


def test_a_pretext_sample_a_classification_and_a_ranking_load_into_the_scene(slicer_standin, tmp_path) -> None:
    import slicer

    from conftest import rubikssl
    from RubikSSLModuleLib import results

    volume = load_volume(shared(STROKE), "T2")
    out = tmp_path / "sample"
    assert rubikssl("puzzle", "--volume", str(shared(STROKE)), "--out", str(out), "--task", "mae",
                    "--cube-size", "16", "--progress", "none").returncode == 0
    assert "mae" in results.loadTaskSample(out, volume)
    assert slicer.mrmlScene.GetFirstNodeByName("T2 mae input").GetModifiedSinceRead()

    classification = tmp_path / "classification.json"
    classification.write_text(json.dumps({"volumes": ["x"], "classes": ["normal", "mass"],
                                          "probabilities": {"normal": 0.2, "mass": 0.8}, "predicted": "mass"}))
    assert results.loadClassification(classification, volume) == "Predicted class: mass"
    table = slicer.mrmlScene.GetFirstNodeByName("T2 RubikSSL classes")
    assert [table.GetCellText(row, 1) for row in range(2)] == ["0.2000", "0.8000"] and table.GetCellText(1, 2) == "yes"
    assert slicer.app.applicationLogic().GetSelectionNode().GetActiveTableID() == table.GetID()

    ranking = tmp_path / "ranking.json"
    ranking.write_text(json.dumps({"cases": [{"case": "b.nii", "uncertainty": 0.3, "found": True, "foreground_voxels": 9},
                                             {"case": "a.nii", "uncertainty": 0.0, "found": False, "foreground_voxels": 0}]}))
    assert "correct b.nii first" in results.loadRanking(ranking)
    shown = slicer.mrmlScene.GetNodeByID(slicer.app.applicationLogic().GetSelectionNode().GetActiveTableID())
    assert shown.GetCellText(1, 2) == "nothing found"


# ------------------------------------------------------------------------ the panel, driven through its handlers

def panel(standin, **parameters):
    """The module's widget set up on the real scene (Qt stood in for), with `parameters` set on its real
    parameter node."""
    import RubikSSL

    widget = RubikSSL.RubikSSLWidget()
    widget.setup()
    for name, value in parameters.items():
        setattr(widget._parameterNode, name, value)
    return widget


def run_timer_until_idle(widget, timeout_s: float = 300) -> None:
    from RubikSSLModuleLib import jobcontrol

    deadline = time.monotonic() + timeout_s
    while widget.logic.control.state != jobcontrol.IDLE:
        assert time.monotonic() < deadline, widget.logic.control.job.state.log[-5:]
        widget._timer.fire()
        time.sleep(0.05)


def test_scramble_from_the_panel_runs_the_worker_and_loads_the_puzzle(slicer_standin) -> None:
    """A button press to a loaded puzzle, as a user sees it: the worker (the real command line in its own
    process), the progress, Cancel's place taken by the button, then idle with the button's own text."""
    import slicer

    volume = load_volume(shared(STROKE), "T2")
    widget = panel(slicer_standin, inputVolume=volume, cubeSize=16)
    scramble = widget.ui.scrambleButton
    assert scramble.enabled and scramble.text == "Scramble"
    scramble.click()
    assert scramble.text == "Cancel" and not widget.ui.pretrainButton.enabled and widget.ui.progressBar.visible
    run_timer_until_idle(widget)
    assert scramble.text == "Scramble" and scramble.enabled and not widget.ui.progressBar.visible
    assert "Permutation" in widget.ui.statusLabel.text
    assert slicer.mrmlScene.GetFirstNodeByName("T2 cubes") is not None
    assert "wrote" in widget.ui.logTextEdit.plainText


def test_a_space_typed_into_a_path_field_stays_and_quotes_are_dropped_where_the_path_is_used(slicer_standin,
                                                                                             tmp_path) -> None:
    """ctkPathLineEdit emits currentPathChanged per keystroke: the text is stored as typed, never rewritten while
    typing; the logic uses it without surrounding spaces and without Explorer's "Copy as path" quotes."""
    widget = panel(slicer_standin)
    field = widget.ui.pretrainRunPathLineEdit
    typed = str(tmp_path / "my runs") + " "
    field.type(typed)
    assert field.currentPath == typed and widget._parameterNode.pretrainRun == typed
    from RubikSSLModuleLib.parameters import cleanPath

    assert cleanPath(typed) == str(tmp_path / "my runs")
    assert cleanPath(f'"{tmp_path / "my runs" / "a"}"') == str(tmp_path / "my runs" / "a")
    assert cleanPath("  ") == "" and cleanPath("'a b'") == "a b"
    widget._parameterNode.pretrainRun = ""  # set by the logic: shown in the field
    assert field.currentPath == ""


def recorded_starts(widget, monkeypatch) -> list:
    """The jobs the logic starts, recorded instead of launched (command, options, run folder)."""
    started = []
    monkeypatch.setattr(widget.logic, "start", lambda command, options, runDir=None, **kwargs:
                        started.append((command, options, runDir)))
    return started


def test_each_run_owns_its_inputs_and_resume_reads_its_own(slicer_standin, tmp_path, monkeypatch) -> None:
    """Start run A, start run B, Resume A: A's inputs are A's (inside its run folder, which a reboot keeps), and a
    new start in a folder that holds a run is refused before anything is written."""
    from RubikSSLModuleLib import nodeio

    first, second = load_volume(shared(STROKE), "T2"), load_volume(shared(OBLIQUE_FLAIR), "FLAIR")
    widget = panel(slicer_standin)
    started = recorded_starts(widget, monkeypatch)
    p = widget._parameterNode
    runs = {"A": tmp_path / "run A", "B": tmp_path / "run B"}
    for name, node in (("A", first), ("B", second)):
        p.pretrainRun = f" {runs[name]} "
        widget.logic.startPretraining(p, [node])
        data = started[-1][1]["data"]
        assert data == [str(runs[name] / nodeio.RUN_INPUTS / "volume_000.nrrd")] and started[-1][2] == str(runs[name])
        (runs[name] / "config.json").write_text(json.dumps({"data": data}))  # what the run writes when it starts
    a_input = sitk.GetArrayFromImage(sitk.ReadImage(str(runs["A"] / nodeio.RUN_INPUTS / "volume_000.nrrd")))
    np.testing.assert_array_equal(a_input, sitk.GetArrayFromImage(sitk.ReadImage(str(shared(STROKE)))))
    p.pretrainRun = str(runs["A"])
    widget.logic.startPretraining(p, [], resume=True)
    assert started[-1][1]["data"] == [str(runs["A"] / nodeio.RUN_INPUTS / "volume_000.nrrd")] and started[-1][1]["resume"]
    (runs["A"] / "checkpoint.safetensors").write_bytes(b"a run")
    with pytest.raises(ValueError, match="already holds a run"):
        widget.logic.startPretraining(p, [second])
    np.testing.assert_array_equal(  # nothing of A's was replaced
        sitk.GetArrayFromImage(sitk.ReadImage(str(runs["A"] / nodeio.RUN_INPUTS / "volume_000.nrrd"))), a_input)


def test_accepted_cases_are_named_by_their_voxels_listed_and_removable(slicer_standin, tmp_path) -> None:
    """Keyed by the volume's name and a hash of its voxels, not by its node ID (which Close Scene resets): the
    next patient after a scene close is a case of its own, the same volume accepted again replaces its own."""
    import slicer

    widget = panel(slicer_standin, acceptedFolder=str(tmp_path / "accepted cases"))
    p = widget._parameterNode
    first = load_volume(shared(STROKE), "T2")
    shape = slicer.util.arrayFromVolume(first).shape
    mask = np.zeros(shape, bool)
    mask[40:60, 80:120, 80:120] = True
    case_a = widget.logic.acceptCase(p, first, segmentation_with(first, {"lesion": mask}))
    slicer.mrmlScene.Clear()  # Close Scene: node IDs start again
    p = widget.logic.getParameterNode()
    p.acceptedFolder = str(tmp_path / "accepted cases")
    second = load_volume(shared(OBLIQUE_FLAIR), "T2")  # same name, same node ID, another patient
    assert second.GetID() == first.GetID() if first.GetScene() is None else True
    case_b = widget.logic.acceptCase(p, second, segmentation_with(second, {"lesion": np.ones(
        slicer.util.arrayFromVolume(second).shape, bool)}))
    assert case_a != case_b and case_a.name.startswith("T2-") and case_b.name.startswith("T2-")
    again = widget.logic.acceptCase(p, second, segmentation_with(second, {"lesion": np.zeros(
        slicer.util.arrayFromVolume(second).shape, bool) | True}))
    assert again == case_b and len(widget.logic.acceptedCases(p)) == 2
    datalist = json.loads((tmp_path / "accepted cases" / "datalist.json").read_text())
    assert len(datalist["training"]) == 2 and all(Path(c["image"]).exists() for c in datalist["training"])
    widget.setParameterNode(p)
    widget.render()
    assert widget.ui.acceptedCasesList.items == [case_a.name, case_b.name] and "2 accepted" in widget.ui.acceptedCountLabel.text
    widget.ui.acceptedCasesList.currentRow = 0
    widget.ui.removeAcceptedButton.click()
    assert [c.name for c in widget.logic.acceptedCases(p)] == [case_b.name] and not case_a.exists()
    assert len(json.loads((tmp_path / "accepted cases" / "datalist.json").read_text())["training"]) == 1


def test_every_round_of_fine_tuning_on_accepted_cases_gets_its_own_run_and_becomes_the_model(slicer_standin, tmp_path,
                                                                                          monkeypatch) -> None:
    from RubikSSLModuleLib import nodeio

    accepted = tmp_path / "accepted"
    widget = panel(slicer_standin, acceptedFolder=str(accepted), interactiveModel=str(tmp_path / "first model"))
    started = recorded_starts(widget, monkeypatch)
    p = widget._parameterNode
    (accepted / nodeio.ACCEPTED_CASES / "T2-0123").mkdir(parents=True)
    (accepted / nodeio.ACCEPTED_CASES / "T2-0123" / nodeio.DATALIST).write_text(json.dumps({"training": [{"image": "i", "label": "l"}]}))
    rounds = []
    for _ in range(2):
        calls = []
        monkeypatch.setattr(widget.logic, "start", lambda command, options, runDir=None, onFinished=None, **kwargs:
                            calls.append((options, runDir, onFinished)))
        widget.logic.startContinuedFinetuning(p)
        options, run, finished = calls[0]
        assert options["resume_from"] == p.interactiveModel and run == options["out"]
        Path(run).mkdir(parents=True)  # the round's run writes its folder
        rounds.append(run)
        assert "is now the interactive model" in finished(type("State", (), {"metrics": {}})())
        assert p.interactiveModel == run
    assert [Path(r).name for r in rounds] == ["round_001", "round_002"]
    del started


def test_the_panel_fine_tunes_an_interactive_model(slicer_standin, tmp_path, monkeypatch) -> None:
    widget = panel(slicer_standin, finetuneRun=str(tmp_path / "ft"), labelledData=str(tmp_path / "data.json"),
                   fromScratch=True, interactiveFinetune=True)
    started = recorded_starts(widget, monkeypatch)
    widget.logic.startFinetuning(widget._parameterNode)
    assert started[-1][1]["interactive"] is True and started[-1][1]["task"] == "segment"
    from test_slicer_module import accepted_by_the_cli

    accepted_by_the_cli("finetune", started[-1][1])


# ------------------------------------------------------------------------------------------ the click loop

class FakeServe:
    """The `serve` worker as jobs.Job shows it, answering only when the test says so: requests are kept, `answer`
    writes a region result as the real worker does."""

    def __init__(self, args, env=None, requests=False) -> None:
        from RubikSSLLib.jobs import JobState

        self.args, self.requests, self.events, self.running = args, [], [{"event": "ready"}], True
        self.state = JobState()

    def send(self, request) -> bool:
        self.requests.append(request)
        return self.running

    def poll(self) -> list:
        events, self.events = self.events, []
        return events

    def answer(self, request: dict, region: np.ndarray, start_kji: tuple[int, int, int]) -> None:
        np.save(request["out"], region.astype(np.uint16), allow_pickle=False)
        self.events.append({"event": "result", "id": request["id"], "ok": True, "out": request["out"],
                            "start_kji": list(start_kji), "clicks": len(request["clicks"]), "seconds": 0.1})

    def die(self, error: str) -> None:
        self.running, self.state.error, self.state.exit_code = False, error, 1

    def close_requests(self) -> None:
        pass

    def shutdown(self, timeout_s=20.0, saving_s=60.0, report=None) -> None:
        self.running = False


def interactive_panel(standin, monkeypatch, model: Path):
    """The widget's Interactive section started on the stroke T2 with a FakeServe worker."""
    import slicer

    from RubikSSLModuleLib import interactivepanel

    monkeypatch.setattr(interactivepanel.jobs, "Job", FakeServe)
    volume = load_volume(shared(STROKE), "T2")
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "clicked")
    widget = panel(standin, inputVolume=volume, interactiveSegmentation=segmentation, interactiveModel=str(model))
    widget.ui.interactiveStartButton.click()
    assert widget.interactive is not None and widget.interactive.running, standin.messages
    return widget, widget.interactive, volume, segmentation


def place(points, ras: tuple[float, float, float]) -> None:
    """A point placed as the place widget does: added, then its position defined (two observed events)."""
    points.AddControlPoint(*ras)


def segment_voxels(segmentation, segment_id: str, volume) -> np.ndarray:
    import slicer

    from RubikSSLModuleLib import nodeio

    with nodeio.temporary_nodes(slicer.mrmlScene):
        return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume).copy()


def voxel_ras(volume, kji: tuple[int, int, int]) -> tuple[float, float, float]:
    return tuple(float(v) for v in (ijk_to_ras(volume) @ np.array([*kji[::-1], 1.0]))[:3])


def test_an_answer_goes_to_the_segment_it_was_asked_for_and_accept_waits_for_it(slicer_standin, monkeypatch,
                                                                                tiny_models, tmp_path) -> None:
    """Next segment while a click is in flight: the late answer fills the first segment, not the new one; Accept
    while one is in flight keeps the case only once that answer is in, and with it."""
    import slicer

    widget, session_panel, volume, segmentation = interactive_panel(slicer_standin, monkeypatch, tiny_models["interactive"])
    widget._parameterNode.acceptedFolder = str(tmp_path / "accepted")
    worker, include = session_panel.session.job, session_panel.lists["include"]
    session_panel.poll()  # "ready"
    place(include, voxel_ras(volume, (50, 100, 100)))
    first_segment, request = session_panel.segmentId, worker.requests[-1]
    widget.ui.nextSegmentButton.click()  # in flight: Next waits for it
    assert session_panel.accepting and not widget.ui.acceptButton.enabled
    region = np.zeros((4, 5, 6))
    region[1:3, 1:4, 1:5] = 1
    worker.answer(request, region, (48, 98, 97))
    session_panel.timer.fire()
    assert not session_panel.accepting and session_panel.segmentId != first_segment
    expected = np.zeros(slicer.util.arrayFromVolume(volume).shape, bool)
    expected[49:51, 99:102, 98:102] = True
    np.testing.assert_array_equal(segment_voxels(segmentation, first_segment, volume), expected)
    assert not segment_voxels(segmentation, session_panel.segmentId, volume).any()
    case = widget.logic.acceptedCases(widget._parameterNode)[0]
    kept = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "label.nrrd")))
    assert kept.sum() == expected.sum()  # the case was kept with the answer that was in flight
    assert include.GetNumberOfControlPoints() == 0 and not Path(request["out"]).exists()


def test_a_late_answer_for_an_earlier_segment_never_fills_the_new_one(slicer_standin, monkeypatch, tiny_models) -> None:
    widget, session_panel, volume, segmentation = interactive_panel(slicer_standin, monkeypatch, tiny_models["interactive"])
    worker, include = session_panel.session.job, session_panel.lists["include"]
    session_panel.poll()
    place(include, voxel_ras(volume, (50, 100, 100)))
    first, request = session_panel.segmentId, worker.requests[-1]
    session_panel.session.clear(None)  # as a Next segment that did not wait would
    session_panel.newSegment()
    worker.answer(request, np.ones((2, 2, 2)), (50, 100, 100))
    session_panel.poll()
    assert segment_voxels(segmentation, first, volume).sum() == 8
    assert not segment_voxels(segmentation, session_panel.segmentId, volume).any()


def test_removing_the_last_point_empties_the_segment_and_stale_points_are_not_sent(slicer_standin, monkeypatch,
                                                                               tiny_models) -> None:
    import slicer

    stale = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "RubikSSL include")
    stale.AddControlPoint(9999.0, 9999.0, 9999.0)  # from an earlier session, on another volume
    widget, session_panel, volume, segmentation = interactive_panel(slicer_standin, monkeypatch, tiny_models["interactive"])
    worker, include = session_panel.session.job, session_panel.lists["include"]
    assert include is stale and include.GetNumberOfControlPoints() == 0
    session_panel.poll()
    place(include, voxel_ras(volume, (50, 100, 100)))
    assert len(worker.requests) == 1 and len(worker.requests[0]["clicks"]) == 1
    worker.answer(worker.requests[0], np.ones((3, 3, 3)), (49, 99, 99))
    session_panel.poll()
    assert segment_voxels(segmentation, session_panel.segmentId, volume).sum() == 27
    widget.ui.undoClickButton.click()
    assert include.GetNumberOfControlPoints() == 0
    session_panel.poll()
    assert not segment_voxels(segmentation, session_panel.segmentId, volume).any() and len(worker.requests) == 1
    assert "empty" in widget.ui.interactiveStatusLabel.text


def test_when_the_worker_dies_the_panel_returns_to_idle_by_itself(slicer_standin, monkeypatch, tiny_models) -> None:
    widget, session_panel, volume, segmentation = interactive_panel(slicer_standin, monkeypatch, tiny_models["interactive"])
    assert widget.ui.interactiveStartButton.text == "Stop interactive" and widget.ui.includePlaceWidget.enabled
    session_panel.session.job.die("out of memory")
    session_panel.timer.fire()  # only the section's own timer runs: the widget's is idle
    assert widget.ui.interactiveStartButton.text == "Start interactive"
    assert not widget.ui.undoClickButton.enabled and not widget.ui.includePlaceWidget.enabled
    assert not widget.ui.includePlaceWidget.placeModeEnabled and "out of memory" in widget.ui.interactiveStatusLabel.text
    place(session_panel.lists["include"], voxel_ras(volume, (50, 100, 100)))  # nothing listens, nothing breaks
    widget.ui.interactiveStartButton.click()  # Start again: a new worker
    assert widget.interactive is not session_panel and widget.interactive.running


def test_the_interactive_section_refuses_a_model_that_is_not_interactive(slicer_standin, monkeypatch,
                                                                         tiny_models) -> None:
    import slicer

    from RubikSSLModuleLib import interactivepanel

    monkeypatch.setattr(interactivepanel.jobs, "Job", FakeServe)
    volume = load_volume(shared(STROKE), "T2")
    widget = panel(slicer_standin, inputVolume=volume, interactiveModel=str(tiny_models["pretrain"]),
                   interactiveSegmentation=slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode"))
    widget.ui.interactiveStartButton.click()
    assert widget.interactive is None and "is not an interactive model" in slicer_standin.messages[-1][1]
    assert "Interactive checked" in widget.ui.interactiveModelPathLineEdit.toolTip


@pytest.mark.slow
def test_clicks_on_real_markups_go_through_the_real_worker_into_the_segment(slicer_standin, tiny_models) -> None:
    """The whole loop on real parts: a point placed in RAS on a real markups node, the real `serve` worker, its
    region answer into the segment in memory. The point lands inside the lesion in the worker's voxel space."""
    import slicer

    from RubikSSLLib import clicks, preprocess
    from RubikSSLLib.geometry import Grid
    from RubikSSLLib.labeled import load_label_map

    volume = load_volume(shared(STROKE), "T2")
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "clicked")
    widget = panel(slicer_standin, inputVolume=volume, interactiveSegmentation=segmentation,
                   interactiveModel=str(tiny_models["interactive"]), device="cpu")
    widget.ui.interactiveStartButton.click()
    session_panel = widget.interactive
    lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(shared(STROKE_LESION))))
    inside = tuple(int(v) for v in np.argwhere(lesion > 0).mean(axis=0).round())
    assert lesion[inside]
    nodes = slicer.mrmlScene.GetNumberOfNodes()
    place(session_panel.lists["include"], voxel_ras(volume, inside))

    card = json.loads((tiny_models["interactive"] / "model.json").read_text())
    image, network = preprocess.network_input([str(shared(STROKE))], card["config"], card["channels"])
    sent = session_panel.session.include or []
    deadline = time.monotonic() + 120
    while not session_panel.session.settled or session_panel.session.sent == 0:
        assert time.monotonic() < deadline and session_panel.running, session_panel.session.job.state.log[-5:]
        session_panel.timer.fire()
        time.sleep(0.05)
    [(voxel, include)] = clicks.voxel_clicks([clicks.Click(tuple(np.array(sent[0]) * [-1, -1, 1]))], network.geometry,
                                             image.shape[1:])
    on_network = load_label_map(str(shared(STROKE_LESION)), str(shared(STROKE)), Grid(image.shape[1:], network.geometry))
    assert include and on_network[voxel] == 1  # the RAS click is inside the lesion where the network looks
    assert "points" in widget.ui.interactiveStatusLabel.text and "voxels" in widget.ui.interactiveStatusLabel.text
    assert slicer.mrmlScene.GetNumberOfNodes() == nodes  # in memory: no labelmap, display or storage node
    assert not list(session_panel.session.folder.glob("click_*.npy"))
    widget.ui.interactiveStartButton.click()
    assert widget.interactive is None


def test_every_segment_is_exported_in_segment_order_hidden_ones_too(slicer_standin, tmp_path) -> None:
    import slicer

    from RubikSSLModuleLib import nodeio

    volume = load_volume(shared(STROKE), "T2")
    shape = slicer.util.arrayFromVolume(volume).shape
    masks = {name: np.zeros(shape, bool) for name in ("tumour", "oedema", "cyst")}
    for index, mask in enumerate(masks.values()):
        mask[10 + 20 * index:20 + 20 * index, 50:60, 50:60] = True
    segmentation = segmentation_with(volume, masks)
    segmentation.GetDisplayNode().SetSegmentVisibility(segmentation.GetSegmentation().GetNthSegmentID(1), False)
    datalist = json.loads(nodeio.write_labelled_case(volume, segmentation, tmp_path).read_text())
    assert datalist["labels"] == {"1": "tumour", "2": "oedema", "3": "cyst"}  # the hidden oedema keeps its place
    label = sitk.GetArrayFromImage(sitk.ReadImage(datalist["training"][0]["label"]))
    for value, mask in enumerate(masks.values(), start=1):
        np.testing.assert_array_equal(label == value, mask)


def test_placed_markups_points_become_the_workers_voxels_on_an_oblique_volume(slicer_standin) -> None:
    """Real control points in RAS (one still being placed, which does not count), through the session's request,
    read back by the worker's click parser as the oblique volume's own voxels."""
    import slicer

    from RubikSSLLib import clicks, clicksession
    from RubikSSLLib.volumes import geometry_of

    volume = load_volume(shared(OBLIQUE_FLAIR), "FLAIR")
    voxels_ijk = np.array([[100.0, 120.0, 20.0], [3.0, 7.0, 1.0]])
    points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "points")
    for ijk in voxels_ijk:
        points.AddControlPoint(*(ijk_to_ras(volume) @ np.array([*ijk, 1.0]))[:3])
    points.AddControlPoint(0.0, 0.0, 0.0)
    points.ResetNthControlPointPosition(2)  # back to "preview": following the mouse, not placed
    assert points.GetNthControlPointPositionStatus(2) == slicer.vtkMRMLMarkupsNode.PositionPreview
    defined = clicksession.defined_points(points)
    assert len(defined) == 2
    session = clicksession.ClickSession(FakeServe([]), ["v.nii"], Path("."))
    session.set_points(defined[:1], defined[1:])
    request = json.loads(json.dumps(session.request()))  # as the worker reads it
    parsed = clicks.parse({"coordinateSystem": request["coordinateSystem"], "clicks": request["clicks"]}, "request")
    geometry = geometry_of(sitk.ReadImage(str(shared(OBLIQUE_FLAIR))))
    np.testing.assert_allclose(clicks.to_voxels(parsed, geometry), voxels_ijk[:, ::-1], atol=1e-4)
    assert [c.include for c in parsed] == [True, False]


def test_install_asks_once_runs_once_and_disables_every_job_meanwhile(slicer_standin, monkeypatch) -> None:
    widget = panel(slicer_standin)
    assert widget.ui.installButton.text == "Install missing packages"
    missing = ["monai"]
    monkeypatch.setattr(widget.logic, "missingPackages", lambda: list(missing))
    monkeypatch.setattr(widget.logic, "dependencyProblem", lambda: "missing monai" if missing else "")
    seen = []

    def install() -> None:  # Slicer's install pumps GUI events: the user can press buttons meanwhile
        seen.append([button.enabled for button in widget.buttons.values()] + [widget.ui.installButton.enabled])
        widget.onInstall()  # a second press while installing
        widget.buttons["scramble"].click()
        missing.clear()

    monkeypatch.setattr(widget.logic, "installDependencies", install)
    widget.render()
    assert widget.ui.installButton.enabled
    widget.ui.installButton.click()
    confirmations = [m for m in slicer_standin.messages if m[0] == "confirm"]
    assert len(seen) == 1 and not any(seen[0]) and len(confirmations) == 2  # one for each press, one install
    assert widget.logic.control.state == "idle" and not widget.logic.control.installing
    assert not widget.ui.installButton.enabled  # nothing left to install


def test_a_too_old_torch_is_reported_with_what_to_do_and_no_job_starts(slicer_standin, monkeypatch) -> None:
    volume = load_volume(shared(STROKE), "T2")
    widget = panel(slicer_standin, inputVolume=volume)
    versions = dict(widget.logic.installedVersions(), torch="2.1.0+cu118")
    monkeypatch.setattr(widget.logic, "installedVersions", lambda: versions)
    started = recorded_starts(widget, monkeypatch)
    widget.ui.scrambleButton.click()
    assert not started and slicer_standin.messages[-1][0] == "error"
    assert "PyTorch 2.1.0+cu118 is installed but RubikSSL needs torch>=2.3" in slicer_standin.messages[-1][1]


class RunningJob:
    """A long job that has started (what a pretraining is while the user reloads the module)."""

    def __init__(self) -> None:
        from RubikSSLLib.jobs import JobState

        self.state, self.running, self.cancelled, self.shut_down = JobState(), True, 0, 0

    def poll(self) -> list:
        return []

    def cancel(self) -> None:
        self.cancelled += 1

    def shutdown(self, timeout_s=20.0, saving_s=60.0, report=None) -> None:
        self.shut_down += 1
        self.running = False
        self.state.finish(3)


def test_reload_reloads_the_module_package_and_keeps_a_running_pretraining(slicer_standin, monkeypatch) -> None:
    """Developer Reload: RubikSSLModuleLib's modules are executed anew (not only RubikSSL.py), and a running job
    is handed to the new panel, which goes on polling it, instead of being cancelled."""
    import slicer

    from RubikSSLModuleLib import jobcontrol, nodeio

    widget = panel(slicer_standin)
    job = RunningJob()
    widget.logic.control.start("pretrain", job, needs_scene=False)
    old_function, old_class = nodeio.case_name, jobcontrol.JobControl
    widget.onReload()
    import RubikSSL

    assert sys.modules["RubikSSLModuleLib.nodeio"].case_name is not old_function  # executed anew
    assert sys.modules["RubikSSLModuleLib.jobcontrol"].JobControl is not old_class
    assert job.shut_down == 0 and job.cancelled == 0
    assert "continues in the reloaded module" in slicer_standin.messages[-1][1]
    reloaded = RubikSSL.RubikSSLWidget()
    reloaded.setup()
    assert reloaded.logic.control.job is job and reloaded.logic.control.state == jobcontrol.RUNNING
    assert reloaded._timer.isActive() and reloaded.buttons["pretrain"].text == "Cancel"
    assert getattr(slicer.modules, "RubikSSLRunningJob", None) is None  # taken once
    reloaded.cleanup()  # Slicer closing now: the job is stopped, and the status bar says what it waits for
    assert job.shut_down == 1


def test_a_scene_close_stops_the_interactive_worker_and_keeps_training(slicer_standin, monkeypatch, tiny_models) -> None:
    import slicer

    widget, session_panel, volume, segmentation = interactive_panel(slicer_standin, monkeypatch, tiny_models["interactive"])
    job = RunningJob()
    widget.logic.control.start("pretrain", job, needs_scene=False)
    slicer.mrmlScene.Clear()
    assert widget.interactive is None and not session_panel.running and job.running and job.cancelled == 0


def test_the_screenshot_script_renders_the_cube_grid_in_slicers_slice_view(tmp_path) -> None:
    """Screenshots/make_screenshots.py on a scrambled puzzle: Slicer's slice logic and segmentation displayable
    manager draw it offscreen, each cube outlined in its segment's colour over the scrambled volume."""
    from conftest import rubikssl, shared as data

    import slicerstandin

    slicerstandin.import_slicer_core()
    pytest.importorskip("trame_slicer", reason="trame-slicer (the test extra) renders Slicer's slice views")
    sys.path.insert(0, str(REPO / "Screenshots"))
    import make_screenshots

    out = tmp_path / "puzzle"
    assert rubikssl("puzzle", "--volume", str(data(STROKE)), "--out", str(out), "--cube-size", "16",
                    "--progress", "none").returncode == 0
    record = json.loads((out / "puzzle.json").read_text())
    record["prediction"] = {"cube_placed_correctly": [True, False] * 4, "cube_oriented_correctly": [True] * 8,
                            "permutation": record["permutation"], "order_correct": False}
    (out / "puzzle.json").write_text(json.dumps(record))
    image = make_screenshots.puzzle_picture(out)
    view = image[24:-22, : image.shape[1] // 2]  # the scrambled cubes' slice view
    green, red = (np.array(c) * 255 for c in (make_screenshots.visualize.CUBE_COLOURS["correct"],
                                               make_screenshots.visualize.CUBE_COLOURS["wrong"]))
    near = lambda colour: (np.abs(view.astype(int) - colour).max(axis=-1) < 40).sum()  # noqa: E731
    assert near(green) > 200 and near(red) > 200  # outlines of both kinds drawn
    assert view.std() > 20  # the volume under them
