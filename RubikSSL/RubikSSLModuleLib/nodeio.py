"""Scene nodes -> the files a worker reads: volumes (KJI array + IJKToRAS -> an uncompressed NRRD in LPS), a
labelled case from a segmentation, and the work folders they go to.

File names are fixed (input.nrrd, result.seg.nrrd, ...): node names are for people and may hold characters that
are not legal in file names (DICOM volumes are named "<series number>: <description>", "/" makes folders). Each job
kind has one work folder, emptied when its next job starts, so temporary data does not grow without bound.
Writing is uncompressed: a 10 MB volume takes a few hundredths of a second, gzip took seconds on the GUI thread.
Slicer is imported inside the functions that need it; the pure helpers are tested without Slicer.
"""

from __future__ import annotations

import shutil
from pathlib import Path

INPUT_VOLUME = "input.nrrd"
SEGMENTATION_RESULT = "result.seg.nrrd"
CLASSIFICATION_RESULT = "classification.json"
LABELLED_IMAGE, LABELLED_LABEL, DATALIST = "image.nrrd", "label.nrrd", "datalist.json"
RANKING = "ranking.json"


def pretraining_volume(index: int) -> str:
    return f"volume_{index:03d}.nrrd"


def accepted_case(node_id: str) -> str:
    """The folder name of an accepted case: from the node's ID (vtkMRMLScalarVolumeNode3 -> case_vtkMRMLScalarVolumeNode3)."""
    return "case_" + "".join(c for c in node_id if c.isalnum())


def write_accepted_datalist(folder: Path) -> Path:
    """One datalist of every accepted case under `folder` (each case folder holds its own one-case datalist);
    they train and validate alike, as a single labelled case does."""
    import json

    cases = []
    for case_list in sorted(Path(folder).glob("*/" + DATALIST)):
        cases += json.loads(case_list.read_text(encoding="utf-8"))["training"]
    path = Path(folder) / DATALIST
    path.write_text(json.dumps({"training": cases, "validation": cases}, indent=2), encoding="utf-8")
    return path


def work_folder(base: Path, kind: str, keep: bool = False) -> Path:
    """`base`/`kind`, emptied first unless `keep` (a resumed run reads what its first start wrote)."""
    folder = Path(base) / kind
    if folder.exists() and not keep:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def segments_in_order(segmentation) -> tuple[list[str], dict[str, str]]:
    """Every segment of a vtkSegmentation (hidden ones too) in order, and label value -> name for that order:
    the exported labelmap numbers the segments it is given 1, 2, ... in this order."""
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    names = {str(i + 1): segmentation.GetSegment(segment_id).GetName() for i, segment_id in enumerate(ids)}
    return ids, names


def check_untransformed(node) -> None:
    if node.GetParentTransformNode() is not None:
        raise ValueError(f"{node.GetName()} is under a transform: harden the transform first (Data module).")


def write_volume(volumeNode, path: Path, rasBounds=None) -> Path:
    """A scalar or labelmap volume node (optionally only the part inside an RAS box) as an uncompressed NRRD."""
    import slicer
    import vtk

    from RubikSSLLib import slicergeometry
    from RubikSSLLib.volumes import write_volume as write  # SimpleITK: imported on first use, not at startup

    check_untransformed(volumeNode)
    array = slicer.util.arrayFromVolume(volumeNode)
    ijkToRAS = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRAS)
    matrix = slicer.util.arrayFromVTKMatrix(ijkToRAS)
    if rasBounds is not None:
        array, matrix = slicergeometry.crop_to_ras_box(array, matrix, rasBounds, margin_voxels=8)
    write(path, array.copy(), slicergeometry.geometry_from_ijk_to_ras(matrix), compress=False)
    return path


def write_labelled_case(volumeNode, segmentationNode, folder: Path) -> Path:
    """The volume and ALL its segments (hidden ones too, numbered in segment order) as a one-case datalist with
    the segment names as labels. The temporary labelmap and the colour table the export creates are removed."""
    import json

    import slicer
    import vtk

    ids, names = segments_in_order(segmentationNode.GetSegmentation())
    segmentIds = vtk.vtkStringArray()
    for segment_id in ids:
        segmentIds.InsertNextValue(segment_id)
    labelmapNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    colorNode = None
    try:
        if not slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(segmentationNode, segmentIds,
                                                                                labelmapNode, volumeNode):
            raise RuntimeError(f"Could not export the segments of {segmentationNode.GetName()}.")
        colorNode = labelmapNode.GetDisplayNode().GetColorNode() if labelmapNode.GetDisplayNode() else None
        image = write_volume(volumeNode, folder / LABELLED_IMAGE)
        label = write_volume(labelmapNode, folder / LABELLED_LABEL)
    finally:
        slicer.mrmlScene.RemoveNode(labelmapNode)
        if colorNode is not None and colorNode.GetScene() is not None:
            slicer.mrmlScene.RemoveNode(colorNode)
    case = {"image": str(image), "label": str(label)}
    datalist = folder / DATALIST
    datalist.write_text(json.dumps({"labels": names, "training": [case], "validation": [case]}, indent=2), encoding="utf-8")
    return datalist


def first_scalar_volume(scene):
    """The first volume the input combo can show: a scalar volume that is not a labelmap."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
        if not node.IsA("vtkMRMLLabelMapVolumeNode"):
            return node
    return None
