"""The panel's settings (saved with the scene) and the helpers that read them."""

import json
from pathlib import Path
from typing import Annotated

from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

# Path settings are plain strings synced by the widget: parameterNodeWrapper writes a Path("") default as "." into
# a ctkPathLineEdit, which then cannot be emptied, and text typed after it became a relative path. They are stored
# as typed (a space typed at the end stays) and cleaned (`cleanPath`) where they are used.
PATH_FIELDS = {"pretrainFolder": "pretrainFolderPathLineEdit", "labelledData": "labelledDataPathLineEdit",
               "pretrainRun": "pretrainRunPathLineEdit", "finetuneRun": "finetuneRunPathLineEdit",
               "modelRun": "modelRunPathLineEdit", "interactiveModel": "interactiveModelPathLineEdit",
               "acceptedFolder": "acceptedFolderPathLineEdit"}
QUOTES = "\"'"


@parameterNodeWrapper
class RubikSSLParameterNode:
    """The panel's settings; they are saved with the scene.

    inputVolume: the volume to scramble, solve or segment. roi: optional box that restricts inference.
    Paths ("" when unset; stored as typed, read through cleanPath) are run folders (pretrainRun, finetuneRun,
    modelRun, interactiveModel), data (pretrainFolder, labelledData: a folder, datalist JSON or nnU-Net raw folder)
    or the folder that keeps the accepted interactive cases and the models trained on them (acceptedFolder).
    Sizes are voxels, steps are optimiser steps. interactiveFinetune: fine-tune a click-guided model.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    labelledSegmentation: vtkMRMLSegmentationNode
    roi: vtkMRMLMarkupsROINode
    interactiveSegmentation: vtkMRMLSegmentationNode
    puzzleSeed: Annotated[int, WithinRange(0, 1_000_000)] = 0
    pretrainFolder: str = ""
    pretrainRun: str = ""
    pretrainTask: Annotated[str, Choice(["rubik", "rubik+", "rubik++", "jigsaw", "rotation", "rpl", "exemplar", "cpc", "mae", "genesis"])] = "rubik"
    cubeSize: Annotated[int, WithinRange(8, 128)] = 32
    numPermutations: Annotated[int, WithinRange(2, 1000)] = 100
    steps: Annotated[int, WithinRange(1, 10_000_000)] = 2000
    batchSize: Annotated[int, WithinRange(1, 512)] = 8
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    finetuneTask: Annotated[str, Choice(["segment", "classify"])] = "segment"
    labelledData: str = ""
    fromScratch: bool = False
    decoder: Annotated[str, Choice(["unet", "duc"])] = "unet"
    epochs: Annotated[int, WithinRange(1, 100_000)] = 20
    labelFraction: Annotated[float, WithinRange(0.01, 1.0)] = 1.0
    finetuneRun: str = ""
    interactiveFinetune: bool = False
    modelRun: str = ""
    interactiveModel: str = ""
    acceptedFolder: str = ""


def cleanPath(text) -> str:
    """A path as the user meant it: surrounding spaces and the quotes of Windows Explorer's "Copy as path" removed
    ("C:\\my runs\\a" stays "C:\\my runs\\a"); spaces inside are kept."""
    text = "" if text is None else str(text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in QUOTES:
        text = text[1:-1].strip()
    return "" if text == "." else text


def isSet(path) -> bool:
    return cleanPath(path) != ""


def storedConfig(runFolder: str) -> dict:
    """A run's own config.json ({} if it has none yet): what Resume continues with."""
    try:
        return json.loads((Path(cleanPath(runFolder)) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
