"""The files a worker wrote -> scene nodes: a segmentation with its named, coloured segments, class probabilities as
a table, a scrambled puzzle with its cubes and the network's answer, a pretext task's input and target, and the
interactive worker's labelmap into one segment. Results are placed beside their input in the subject hierarchy."""

import json
from pathlib import Path

import slicer
from slicer.i18n import tr as _


def placeUnder(node, inputNode) -> None:
    """Put a result beside its input in the subject hierarchy (same patient/study)."""
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    parent = shNode.GetItemParent(shNode.GetItemByDataNode(inputNode))
    shNode.SetItemParent(shNode.GetItemByDataNode(node), parent)


def loadSegmentation(path: Path, inputNode) -> str:
    segmentationNode = slicer.util.loadSegmentation(str(path))
    segmentationNode.SetName(slicer.mrmlScene.GenerateUniqueName(f"{inputNode.GetName()} RubikSSL"))
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(inputNode)  # also references the input
    segmentationNode.CreateClosedSurfaceRepresentation()
    placeUnder(segmentationNode, inputNode)
    slicer.util.setSliceViewerLayers(background=inputNode)
    names = [segmentationNode.GetSegmentation().GetNthSegment(i).GetName()
             for i in range(segmentationNode.GetSegmentation().GetNumberOfSegments())]
    return _("Segmentation loaded: {names}. Edit it in the Segment Editor.").format(names=", ".join(names))


def loadClassification(path: Path, inputNode) -> str:
    result = json.loads(Path(path).read_text(encoding="utf-8"))
    table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", f"{inputNode.GetName()} RubikSSL classes")
    table.AddColumn().SetName("class")
    table.AddColumn().SetName("probability")
    table.AddColumn().SetName("predicted")
    for name, value in result["probabilities"].items():
        row = table.AddEmptyRow()
        table.SetCellText(row, 0, name)
        table.SetCellText(row, 1, f"{value:.4f}")
        table.SetCellText(row, 2, "yes" if name == result["predicted"] else "")
    placeUnder(table, inputNode)
    slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
    slicer.app.applicationLogic().PropagateTableSelection()
    return _("Predicted class: {name}").format(name=result["predicted"])


def loadPuzzle(folder: Path, inputNode) -> str:
    """The scrambled volume, one segment per cube, and a table of the permutation (and the model's answer)."""
    puzzle = json.loads((folder / "puzzle.json").read_text(encoding="utf-8"))
    name = inputNode.GetName()
    scrambled = slicer.util.loadVolume(str(folder / "scrambled.nrrd"), {"name": f"{name} scrambled"})
    cubes = slicer.util.loadSegmentation(str(folder / "scrambled_labels.nrrd"))
    cubes.SetName(f"{name} cubes")
    nameCubes(cubes, puzzle)
    nodes = [scrambled, cubes, puzzleTable(puzzle, f"{name} puzzle")]
    if "prediction" in puzzle:
        nodes.append(slicer.util.loadVolume(str(folder / "recovered.nrrd"), {"name": f"{name} solved"}))
    for node in nodes:
        placeUnder(node, inputNode)
    slicer.util.setSliceViewerLayers(background=nodes[-1] if "prediction" in puzzle else scrambled)
    if "prediction" not in puzzle:
        return _("Permutation {index} of the table, rotations {rotations}.").format(
            index=puzzle["permutation_index"], rotations=puzzle["rotations"])
    prediction = puzzle["prediction"]
    return _("Network: order {order}, {placed}/8 cubes placed, {oriented}/8 oriented correctly.").format(
        order=_("correct") if prediction["order_correct"] else _("wrong"),
        placed=sum(prediction["cube_placed_correctly"]), oriented=sum(prediction["cube_oriented_correctly"]))


def loadTaskSample(folder: Path, inputNode) -> str:
    """A pretext task's network input and target (rotation, rpl, exemplar, cpc, restorations), beside the input."""
    sample = json.loads((folder / "sample.json").read_text(encoding="utf-8"))
    name = f"{inputNode.GetName()} {sample['task']}"
    shown = slicer.util.loadVolume(str(folder / "input.nrrd"), {"name": f"{name} input"})
    target = slicer.util.loadVolume(str(folder / "target.nrrd"), {"name": f"{name} target"})
    for node in (shown, target):
        placeUnder(node, inputNode)
    slicer.util.setSliceViewerLayers(background=shown, foreground=target, foregroundOpacity=0.0)
    return _("{task}: network input and its target loaded (fade between them with the slice view's opacity slider)").format(
        task=sample["task"])


def nameCubes(cubes, puzzle: dict) -> None:
    """Segment of label L = original cube L - 1. With a model's answer: green if the network placed and oriented
    that cube correctly, orange if only placed, red otherwise."""
    segmentation = cubes.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):  # imported in label order: label index + 1
        segment = segmentation.GetNthSegment(index)
        segment.SetName(f"cube {index + 1}")
        if "prediction" in puzzle:
            slot = puzzle["permutation"].index(index)
            placed = puzzle["prediction"]["cube_placed_correctly"][slot]
            oriented = puzzle["prediction"]["cube_oriented_correctly"][slot]
            segment.SetColor(*((0.2, 0.8, 0.2) if placed and oriented else (1.0, 0.6, 0.0) if placed else (0.9, 0.1, 0.1)))


def puzzleTable(puzzle: dict, name: str):
    table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", name)
    columns = ["slot", "cube", "rotation"] + (["placed correctly", "oriented correctly"] if "prediction" in puzzle else [])
    for column in columns:
        table.AddColumn().SetName(column)
    for slot, cube in enumerate(puzzle["permutation"]):
        row = table.AddEmptyRow()
        values = [slot + 1, cube + 1, puzzle["rotation_names"][puzzle["rotations"][slot]]]
        if "prediction" in puzzle:
            values += [puzzle["prediction"]["cube_placed_correctly"][slot], puzzle["prediction"]["cube_oriented_correctly"][slot]]
        for column, value in enumerate(values):
            table.SetCellText(row, column, str(value))
    return table


def loadIntoSegment(labelmapPath: Path, segmentationNode, segmentId: str, inputNode) -> int:
    """Replace segment `segmentId` with the foreground of a labelmap file on `inputNode`'s grid (the interactive
    worker's result). Returns the number of segment voxels. The temporary labelmap node is removed."""
    import vtk

    labelmapNode = slicer.util.loadLabelVolume(str(labelmapPath), {"show": False, "name": "RubikSSL click result"})
    try:
        segmentIds = vtk.vtkStringArray()
        segmentIds.InsertNextValue(segmentId)
        if not slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmapNode, segmentationNode, segmentIds):
            raise RuntimeError(_("Could not import the result into the segment."))
        return int((slicer.util.arrayFromVolume(labelmapNode) > 0).sum())
    finally:
        slicer.mrmlScene.RemoveNode(labelmapNode)


def loadRanking(path: Path) -> str:
    """The `rubikssl rank` result as a table: the case to correct first on top."""
    ranking = json.loads(Path(path).read_text(encoding="utf-8"))["cases"]
    table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", slicer.mrmlScene.GenerateUniqueName("RubikSSL ranking"))
    for column in ("rank", "case", "uncertainty", "foreground voxels"):
        table.AddColumn().SetName(column)
    for rank, row in enumerate(ranking, start=1):
        index = table.AddEmptyRow()
        values = [rank, row["case"], f"{row['uncertainty']:.4f}" if row["found"] else _("nothing found"), row["foreground_voxels"]]
        for column, value in enumerate(values):
            table.SetCellText(index, column, str(value))
    slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
    slicer.app.applicationLogic().PropagateTableSelection()
    return _("Ranked {count} cases: correct {first} first.").format(count=len(ranking), first=ranking[0]["case"] if ranking else "-")
