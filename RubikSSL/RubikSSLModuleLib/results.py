"""The files a worker wrote -> scene nodes: a segmentation with its named, coloured segments, class probabilities as
a table, a scrambled puzzle with its cubes and the network's answer, a pretext task's input and target, and the
interactive worker's region into one segment. Results are placed beside their input in the subject hierarchy.

Files are read by the module logics' own readers (what Slicer's IO manager calls for a .seg.nrrd or a volume:
vtkSlicerSegmentationsModuleLogic.LoadSegmentationFromFile, vtkSlicerVolumesLogic.AddArchetypeVolume). They are
read from a work folder that the next job of that kind empties, so each loaded node is marked modified since read:
Save writes it anew instead of pointing the scene at a file that will be gone.
"""

import json
from pathlib import Path

import slicer
from slicer.i18n import tr as _

from RubikSSLLib import visualize

SINGLE_FILE = 4  # vtkSlicerVolumesLogic loading option: read this file only, not a numbered series beside it
LABEL_MAP = 1


def placeUnder(node, inputNode) -> None:
    """Put a result beside its input in the subject hierarchy (same patient/study)."""
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    parent = shNode.GetItemParent(shNode.GetItemByDataNode(inputNode))
    shNode.SetItemParent(shNode.GetItemByDataNode(node), parent)


def readSegmentation(path: Path, name: str):
    node = slicer.modules.segmentations.logic().LoadSegmentationFromFile(str(path), True, name)
    if node is None:
        raise RuntimeError(_("Could not read the segmentation {path}.").format(path=path))
    node.StorableModified()
    return node


def readVolume(path: Path, name: str, labelmap: bool = False):
    node = slicer.modules.volumes.logic().AddArchetypeVolume(str(path), name, SINGLE_FILE | (LABEL_MAP if labelmap else 0))
    if node is None:
        raise RuntimeError(_("Could not read the volume {path}.").format(path=path))
    node.StorableModified()
    return node


def segmentNames(segmentationNode) -> list:
    segmentation = segmentationNode.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


def loadSegmentation(path: Path, inputNode) -> str:
    segmentationNode = readSegmentation(path, slicer.mrmlScene.GenerateUniqueName(f"{inputNode.GetName()} RubikSSL"))
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(inputNode)  # also references the input
    segmentationNode.CreateClosedSurfaceRepresentation()
    placeUnder(segmentationNode, inputNode)
    slicer.util.setSliceViewerLayers(background=inputNode)
    return _("Segmentation loaded: {names}. Edit it in the Segment Editor.").format(names=", ".join(segmentNames(segmentationNode)))


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
    showTable(table)
    return _("Predicted class: {name}").format(name=result["predicted"])


def showTable(table) -> None:
    applicationLogic = slicer.app.applicationLogic()
    applicationLogic.GetSelectionNode().SetActiveTableID(table.GetID())
    applicationLogic.PropagateTableSelection()


def loadPuzzle(folder: Path, inputNode) -> str:
    """The scrambled volume, one segment per cube, and a table of the permutation (and the model's answer)."""
    puzzle = json.loads((folder / "puzzle.json").read_text(encoding="utf-8"))
    name = inputNode.GetName()
    scrambled = readVolume(folder / "scrambled.nrrd", f"{name} scrambled")
    cubes = readSegmentation(folder / "scrambled_labels.nrrd", f"{name} cubes")
    nameCubes(cubes, puzzle)
    nodes = [scrambled, cubes, puzzleTable(puzzle, f"{name} puzzle")]
    if "prediction" in puzzle:
        nodes.append(readVolume(folder / "recovered.nrrd", f"{name} solved"))
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
    shown = readVolume(folder / "input.nrrd", f"{name} input")
    target = readVolume(folder / "target.nrrd", f"{name} target")
    for node in (shown, target):
        placeUnder(node, inputNode)
    slicer.util.setSliceViewerLayers(background=shown, foreground=target, foregroundOpacity=0.0)
    return _("{task}: network input and its target loaded (fade between them with the slice view's opacity slider)").format(
        task=sample["task"])


CUBE_COLOURS = visualize.CUBE_COLOURS  # the montage's colours (RubikSSLLib.visualize): one legend for both


def nameCubes(cubes, puzzle: dict) -> None:
    """Segment of label L = original cube L - 1. With a model's answer: green if the network placed and oriented
    that cube correctly, orange if only placed, red otherwise (the montage's colours: RubikSSLLib.visualize)."""
    segmentation = cubes.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):  # imported in label order: label index + 1
        segment = segmentation.GetNthSegment(index)
        segment.SetName(f"cube {index + 1}")
        if "prediction" in puzzle:
            slot = puzzle["permutation"].index(index)
            placed = puzzle["prediction"]["cube_placed_correctly"][slot]
            oriented = puzzle["prediction"]["cube_oriented_correctly"][slot]
            segment.SetColor(*CUBE_COLOURS[visualize.cube_statuses([placed], [oriented])[0]])


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


def regionImage(mask_kji, start_kji, inputNode):
    """A vtkOrientedImageData holding `mask_kji` (uint8, 0/1) at voxel `start_kji` of `inputNode`'s grid."""
    import numpy as np
    import vtk
    from vtk.util import numpy_support

    depth, rows, columns = mask_kji.shape
    k, j, i = (int(v) for v in start_kji)
    image = slicer.vtkOrientedImageData()
    image.SetExtent(i, i + columns - 1, j, j + rows - 1, k, k + depth - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = np.ascontiguousarray(mask_kji, dtype=np.uint8).ravel()
    ijkToRAS = vtk.vtkMatrix4x4()
    inputNode.GetIJKToRASMatrix(ijkToRAS)
    image.SetImageToWorldMatrix(ijkToRAS)
    return image


def updateSegmentFromRegion(segmentationNode, segmentId: str, inputNode, mask_kji, start_kji) -> int:
    """Replace segment `segmentId` in memory with the foreground of a region of `inputNode`'s grid (the interactive
    worker's answer): nothing is written to disk or read back, and no node is created. Empty `mask_kji`: the
    segment is emptied. Returns the segment's voxel count."""
    import numpy as np

    mask = np.asarray(mask_kji) > 0
    if not mask.any():
        mask, start_kji = np.zeros((1, 1, 1), bool), (0, 0, 0)
    image = regionImage(mask, start_kji, inputNode)
    replace = slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE
    if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(image, segmentationNode, segmentId, replace):
        raise RuntimeError(_("Could not update the segment."))
    return int(mask.sum())


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
    showTable(table)
    return _("Ranked {count} cases: correct {first} first.").format(count=len(ranking), first=ranking[0]["case"] if ranking else "-")
