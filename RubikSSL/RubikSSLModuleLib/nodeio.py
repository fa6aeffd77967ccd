"""Scene nodes -> the files a worker reads: volumes (KJI array + IJKToRAS -> an uncompressed NRRD in LPS), a
labelled case from a segmentation, the folders they go to, and the clean-up of every temporary node.

File names are fixed (input.nrrd, result.seg.nrrd, ...): node names are for people and may hold characters that
are not legal in file names (DICOM volumes are named "<series number>: <description>", "/" makes folders). A
training run owns its inputs: they are written into its run folder (`run_inputs`), so a Resume reads the run's
own data, after a reboot too. Short-lived jobs (puzzle, inference, the interactive worker) have one work folder
per kind, emptied when the next job of that kind starts. Writing is uncompressed: a 10 MB volume takes a few
hundredths of a second, gzip took seconds on the GUI thread. Slicer is imported inside the functions that need
it; the pure helpers are tested without Slicer, the rest on Slicer's own libraries (slicer-core).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

INPUT_VOLUME = "input.nrrd"
SEGMENTATION_RESULT = "result.seg.nrrd"
CLASSIFICATION_RESULT = "classification.json"
LABELLED_IMAGE, LABELLED_LABEL, DATALIST = "image.nrrd", "label.nrrd", "datalist.json"
RANKING = "ranking.json"
RUN_INPUTS = "inputs"  # inside a run folder: the volumes the panel wrote for it
ACCEPTED_CASES, INTERACTIVE_ROUNDS = "cases", "models"  # inside the accepted-cases folder
SCALAR_VOLUME = "vtkMRMLScalarVolumeNode"


def pretraining_volume(index: int) -> str:
    return f"volume_{index:03d}.nrrd"


def run_inputs(run_folder: str | Path) -> Path:
    """Where the panel writes a new run's input volumes: inside the run folder, which the run owns."""
    return Path(run_folder) / RUN_INPUTS


def holds_run(run_folder: str | Path) -> bool:
    """A run folder with a checkpoint: a new start there is refused (Resume continues it)."""
    return (Path(run_folder) / "checkpoint.safetensors").exists()


def check_new_run(run_folder: str | Path) -> None:
    """Refuse (one line) a new run where a run already is, or where another process is using the folder:
    writing its inputs there would replace another run's data."""
    if holds_run(run_folder):
        raise ValueError(f"{run_folder} already holds a run: press Resume to continue it, or choose another run folder.")
    lock = Path(run_folder) / ".lock"
    if lock.exists():
        try:
            from filelock import FileLock, Timeout
        except ImportError:
            return
        probe = FileLock(str(lock))
        try:
            probe.acquire(timeout=0)
            probe.release()
        except Timeout:
            raise ValueError(f"{run_folder} is being used by another RubikSSL process: wait for it or choose another "
                             "run folder.") from None


def fresh_inputs_folder(run_folder: str | Path) -> Path:
    """An empty `run_inputs` folder for a new run (check_new_run first)."""
    check_new_run(run_folder)
    folder = run_inputs(run_folder)
    if folder.exists():
        shutil.rmtree(folder)  # inputs of a start that failed before its first checkpoint
    folder.mkdir(parents=True)
    return folder


def case_name(node_name: str, digest: str) -> str:
    """The folder name of an accepted case: readable (the volume's name, only safe characters) and unique and
    stable (the first 12 hex digits of its voxels' and geometry's hash): the same volume, accepted again after a
    restart, replaces its own case and never another patient's."""
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", node_name).strip("_")[:40] or "case"
    return f"{readable}-{digest[:12]}"


def volume_digest(array, ijk_to_ras) -> str:
    """sha256 of a volume's voxels (with their type and shape) and its IJK-to-RAS matrix."""
    import numpy as np

    digest = hashlib.sha256()
    digest.update(f"{array.dtype}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(np.asarray(ijk_to_ras, dtype=np.float64).round(6).tobytes())
    return digest.hexdigest()


def accepted_cases(folder: str | Path) -> list[Path]:
    """The case folders of an accepted-cases folder, oldest name first."""
    cases = Path(folder) / ACCEPTED_CASES
    return sorted(p.parent for p in cases.glob("*/" + DATALIST)) if cases.is_dir() else []


def remove_accepted_case(folder: str | Path, name: str) -> None:
    case = Path(folder) / ACCEPTED_CASES / name
    if case.parent != Path(folder) / ACCEPTED_CASES or not (case / DATALIST).exists():
        raise ValueError(f"{name} is not an accepted case of {folder}")
    shutil.rmtree(case)


def write_accepted_datalist(folder: str | Path) -> Path:
    """One datalist of every accepted case of `folder` (each case folder holds its own one-case datalist); they
    train and validate alike, as a single labelled case does."""
    cases = []
    for case in accepted_cases(folder):
        cases += json.loads((case / DATALIST).read_text(encoding="utf-8"))["training"]
    path = Path(folder) / DATALIST
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"training": cases, "validation": cases}, indent=2), encoding="utf-8")
    return path


def next_round(folder: str | Path) -> Path:
    """The run folder of the next human-in-the-loop fine-tuning round: models/round_001, round_002, ... (each
    round a run of its own, so the second round never meets the first one's checkpoint)."""
    rounds = Path(folder) / INTERACTIVE_ROUNDS
    numbers = [int(p.name[6:]) for p in rounds.glob("round_*") if p.name[6:].isdigit()]
    return rounds / f"round_{max(numbers, default=0) + 1:03d}"


def work_folder(base: Path, kind: str, keep: bool = False) -> Path:
    """`base`/`kind`, emptied first unless `keep`."""
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


@contextlib.contextmanager
def temporary_nodes(scene) -> Iterator[None]:
    """Every node added to `scene` inside the block is removed at its end (a labelmap node that an export made,
    its display node, its colour table, a storage node): the scene is left as it was."""
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield
    finally:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in [n for n in added if n.GetID() not in before]:
            if node.GetScene() is not None:
                scene.RemoveNode(node)


def node_array(volumeNode):
    """(KJI array view, IJKToRAS as a numpy 4x4) of a volume node."""
    import slicer
    import vtk

    ijkToRAS = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRAS)
    return slicer.util.arrayFromVolume(volumeNode), slicer.util.arrayFromVTKMatrix(ijkToRAS)


def write_volume(volumeNode, path: Path, rasBounds=None) -> Path:
    """A scalar or labelmap volume node (optionally only the part inside an RAS box) as an uncompressed NRRD."""
    from RubikSSLLib import slicergeometry
    from RubikSSLLib.volumes import write_volume as write  # SimpleITK: imported on first use, not at startup

    check_untransformed(volumeNode)
    array, matrix = node_array(volumeNode)
    if rasBounds is not None:
        array, matrix = slicergeometry.crop_to_ras_box(array, matrix, rasBounds, margin_voxels=8)
    write(path, array.copy(), slicergeometry.geometry_from_ijk_to_ras(matrix), compress=False)
    return path


def overlapping_segments(segmentationNode, ids: list[str], volumeNode) -> list[tuple[str, str, int]]:
    """Pairs of segments that share voxels on `volumeNode`'s grid: (name, name, voxels). Segments of one shared
    labelmap layer cannot overlap, so only segmentations with several layers are exported segment by segment."""
    import numpy as np

    import slicer

    segmentation = segmentationNode.GetSegmentation()
    if segmentation.GetNumberOfLayers() < 2:
        return []
    masks = {}
    with temporary_nodes(slicer.mrmlScene):
        for segment_id in ids:
            labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
            only = _string_array([segment_id])
            slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(segmentationNode, only, labelmap, volumeNode)
            masks[segment_id] = slicer.util.arrayFromVolume(labelmap) > 0
    overlaps = []
    for a, first in enumerate(ids):
        for second in ids[a + 1:]:
            shared = int(np.count_nonzero(masks[first] & masks[second]))
            if shared:
                overlaps.append((segmentation.GetSegment(first).GetName(), segmentation.GetSegment(second).GetName(), shared))
    return overlaps


def _string_array(values: list[str]):
    import vtk

    array = vtk.vtkStringArray()
    for value in values:
        array.InsertNextValue(value)
    return array


def write_labelled_case(volumeNode, segmentationNode, folder: Path) -> Path:
    """The volume and ALL its segments (hidden ones too, numbered in segment order) as a one-case datalist with
    the segment names as labels. A training label map holds one class per voxel, so overlapping segments are
    refused (naming them and the voxels they share) instead of letting the later one silently win. Every node the
    export creates (labelmap, display, colour table) is removed."""
    import slicer

    ids, names = segments_in_order(segmentationNode.GetSegmentation())
    if not ids:
        raise ValueError(f"{segmentationNode.GetName()} has no segments to learn from.")
    overlaps = overlapping_segments(segmentationNode, ids, volumeNode)
    if overlaps:
        first, second, shared = overlaps[0]
        raise ValueError(f"Segments '{first}' and '{second}' of {segmentationNode.GetName()} overlap in {shared} voxels "
                         "and a training label map holds one class per voxel: remove the overlap (Segment Editor, "
                         "Logical operators: Subtract) and try again.")
    with temporary_nodes(slicer.mrmlScene):
        labelmapNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        if not slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(segmentationNode, _string_array(ids),
                                                                                labelmapNode, volumeNode):
            raise RuntimeError(f"Could not export the segments of {segmentationNode.GetName()}.")
        image = write_volume(volumeNode, folder / LABELLED_IMAGE)
        label = write_volume(labelmapNode, folder / LABELLED_LABEL)
    case = {"image": str(image), "label": str(label)}
    datalist = folder / DATALIST
    datalist.write_text(json.dumps({"labels": names, "training": [case], "validation": [case]}, indent=2), encoding="utf-8")
    return datalist


def is_plain_scalar_volume(node) -> bool:
    """A scalar volume that is one: not a labelmap, vector (RGB), tensor (DTI) or diffusion-weighted volume, which
    are all vtkMRMLScalarVolumeNode subclasses."""
    return node is not None and node.GetClassName() == SCALAR_VOLUME


def first_scalar_volume(scene):
    """The first volume the input combo can show: a plain scalar volume (is_plain_scalar_volume)."""
    for index in range(scene.GetNumberOfNodesByClass(SCALAR_VOLUME)):
        node = scene.GetNthNodeByClass(index, SCALAR_VOLUME)
        if is_plain_scalar_volume(node):
            return node
    return None
