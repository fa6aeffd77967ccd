"""RubikSSL: self-supervised pretraining, fine-tuning and inference of 3D CNNs from inside 3D Slicer.

Thin by design: the widget binds the .ui to a parameter node, the logic turns MRML nodes into files and back, and
every long job is the RubikSSLLib command line in a separate process (`RubikSSLLib.jobs`), read through its JSON
progress lines. torch, MONAI and slicerio are never imported into Slicer's process.
"""

import json
import logging
import re
import shutil
import sys
from importlib import metadata
from pathlib import Path
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# From the source tree RubikSSLLib sits beside this module's folder; installed, it sits beside this file.
_SOURCE_TREE = Path(__file__).resolve().parent.parent
if (_SOURCE_TREE / "RubikSSLLib").is_dir() and str(_SOURCE_TREE) not in sys.path:
    sys.path.insert(0, str(_SOURCE_TREE))

# Light parts of the library only (stdlib, numpy, SimpleITK: all bundled with Slicer).
from RubikSSLLib import jobs, slicergeometry, tasks  # noqa: E402

POLL_INTERVAL_MS = 200


class RubikSSL(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("RubikSSL")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["RubikSSL developers"]
        self.parent.helpText = _(
            "Teach a 3D network from your own unlabeled volumes by solving Rubik's cube puzzles, fine-tune it on the "
            "few cases you labelled, and run it: results load as named, coloured segments or class probabilities. "
            'See the <a href="https://github.com/rubikssl/SlicerRubikSSL#3d-slicer">README</a>.')
        self.parent.acknowledgementText = _(
            "Rubik's cube recovery: Zhuang et al., MICCAI 2019. Built on PyTorch, MONAI, SimpleITK and slicerio.")


@parameterNodeWrapper
class RubikSSLParameterNode:
    """The panel's settings; they are saved with the scene.

    inputVolume: the volume to scramble, solve or segment. roi: optional box that restricts inference.
    Paths are run folders (pretrainRun, finetuneRun, modelRun) or data (pretrainFolder, labelledData: a folder,
    datalist JSON or nnU-Net raw folder). Sizes are voxels, steps are optimiser steps.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    labelledSegmentation: vtkMRMLSegmentationNode
    roi: vtkMRMLMarkupsROINode
    puzzleSeed: Annotated[int, WithinRange(0, 1_000_000)] = 0
    pretrainFolder: Path = Path("")
    pretrainRun: Path = Path("")
    pretrainTask: Annotated[str, Choice(["rubik", "rubik+", "rubik++", "jigsaw", "rotation", "rpl", "exemplar", "cpc", "mae", "genesis"])] = "rubik"
    cubeSize: Annotated[int, WithinRange(8, 128)] = 32
    numPermutations: Annotated[int, WithinRange(2, 1000)] = 100
    steps: Annotated[int, WithinRange(1, 10_000_000)] = 2000
    batchSize: Annotated[int, WithinRange(1, 512)] = 8
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    finetuneTask: Annotated[str, Choice(["segment", "classify"])] = "segment"
    labelledData: Path = Path("")
    fromScratch: bool = False
    decoder: Annotated[str, Choice(["unet", "duc"])] = "unet"
    epochs: Annotated[int, WithinRange(1, 100_000)] = 20
    labelFraction: Annotated[float, WithinRange(0.01, 1.0)] = 1.0
    finetuneRun: Path = Path("")
    modelRun: Path = Path("")


def isSet(path: Optional[Path]) -> bool:
    return path is not None and str(path) not in ("", ".")


class RubikSSLWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._activeButton = None
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPoll)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RubikSSL.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = RubikSSLLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.scrambleButton.connect("clicked(bool)", self.onScramble)
        self.ui.solveButton.connect("clicked(bool)", self.onSolve)
        self.ui.pretrainButton.connect("clicked(bool)", lambda: self.onStartOrCancel(self.ui.pretrainButton, self.startPretraining))
        self.ui.resumePretrainButton.connect("clicked(bool)", lambda: self.onStartOrCancel(self.ui.resumePretrainButton, lambda: self.startPretraining(resume=True)))
        self.ui.finetuneButton.connect("clicked(bool)", lambda: self.onStartOrCancel(self.ui.finetuneButton, self.startFinetuning))
        self.ui.resumeFinetuneButton.connect("clicked(bool)", lambda: self.onStartOrCancel(self.ui.resumeFinetuneButton, lambda: self.startFinetuning(resume=True)))
        self.ui.runButton.connect("clicked(bool)", lambda: self.onStartOrCancel(self.ui.runButton, self.startInference))
        self.ui.installButton.connect("clicked(bool)", self.onInstall)
        self.ui.pretrainVolumesSelector.connect("checkedNodesChanged()", self.updateButtons)
        self.ui.progressBar.hide()
        self.showVersions()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Slicer is closing: end the worker so no process is orphaned."""
        self._timer.stop()
        self.logic.stopJob(now=True)
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        # The job keeps running (and the timer keeps polling it) while the user works in other modules.
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.stopJob(now=True)  # the job's inputs and outputs belong to the scene being closed
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, parameterNode: Optional[RubikSSLParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
            self.updateButtons()

    def updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        busy = self.logic.job is not None
        hasVolume = bool(p and p.inputVolume)
        for button, ready in (
            (self.ui.scrambleButton, hasVolume),
            (self.ui.solveButton, hasVolume and isSet(p.pretrainRun)),
            (self.ui.pretrainButton, isSet(p.pretrainRun) and (isSet(p.pretrainFolder) or bool(self.ui.pretrainVolumesSelector.checkedNodes()))),
            (self.ui.resumePretrainButton, isSet(p.pretrainRun)),
            (self.ui.finetuneButton, isSet(p.finetuneRun) and (isSet(p.labelledData) or (hasVolume and bool(p.labelledSegmentation)))
             and (p.fromScratch or isSet(p.pretrainRun))),
            (self.ui.resumeFinetuneButton, isSet(p.finetuneRun)),
            (self.ui.runButton, hasVolume and isSet(p.modelRun)),
        ) if p else ():
            button.enabled = (button is self._activeButton) or (ready and not busy)

    # --- long jobs: Start turns into Cancel ---

    def onStartOrCancel(self, button, start) -> None:
        if self.logic.job is not None:
            if button is self._activeButton:
                self.ui.statusLabel.text = _("Cancelling: the worker saves a checkpoint, then stops...")
                self.logic.stopJob()
            return
        if not self.ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start the job."), waitCursor=True):
            start()
            self._activeButton = button
            self._activeButtonText = button.text
            button.text = _("Cancel")
            self.ui.progressBar.setRange(0, 0)  # busy until the first progress event
            self.ui.progressBar.show()
            self.ui.logTextEdit.clear()
            self._timer.start()
        self.updateButtons()

    def startPretraining(self, resume: bool = False) -> None:
        volumes = list(self.ui.pretrainVolumesSelector.checkedNodes())
        self.logic.startPretraining(self._parameterNode, volumes, resume=resume)

    def startFinetuning(self, resume: bool = False) -> None:
        self.logic.startFinetuning(self._parameterNode, resume=resume)

    def startInference(self) -> None:
        self.logic.startInference(self._parameterNode)

    def onScramble(self) -> None:
        self.onStartOrCancel(self.ui.scrambleButton, lambda: self.logic.startPuzzle(self._parameterNode, solve=False))

    def onSolve(self) -> None:
        self.onStartOrCancel(self.ui.solveButton, lambda: self.logic.startPuzzle(self._parameterNode, solve=True))

    def onPoll(self) -> None:
        job = self.logic.job
        if job is None:
            self._timer.stop()
            return
        for event in job.poll():
            if event["event"] == "progress":
                self.ui.progressBar.setRange(0, 1000)
                self.ui.progressBar.value = int(1000 * job.state.fraction)
            elif event["event"] == "metric":
                shown = {k: v for k, v in event.items() if k not in ("event",)}
                self.ui.statusLabel.text = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
        for line in job.state.log[self._shownLines():]:
            self.ui.logTextEdit.appendPlainText(line)
        self._logLinesShown = len(job.state.log)
        if not job.running:
            self.onJobFinished()

    def _shownLines(self) -> int:
        return getattr(self, "_logLinesShown", 0)

    def onJobFinished(self) -> None:
        self._timer.stop()
        self._logLinesShown = 0
        state = self.logic.job.state
        self.ui.progressBar.hide()
        if self._activeButton is not None:
            self._activeButton.text = self._activeButtonText
            self._activeButton = None
        with slicer.util.tryWithErrorDisplay(_("Could not load the results."), waitCursor=True):
            message = self.logic.finishJob()
            self.ui.statusLabel.text = message
        if state.status == "failed":
            slicer.util.errorDisplay(state.error, windowTitle=_("RubikSSL"))
        self.updateButtons()

    # --- dependencies ---

    def showVersions(self) -> None:
        versions = self.logic.installedVersions()
        self.ui.versionsLabel.text = ", ".join(f"{name} {version or _('missing')}" for name, version in versions.items())

    def ensureDependencies(self) -> bool:
        if not self.logic.missingPackages():
            return True
        if not slicer.util.confirmOkCancelDisplay(
                _("RubikSSL needs PyTorch and a few Python packages ({packages}). Install them now? "
                  "This can take several minutes.").format(packages=", ".join(self.logic.missingPackages()))):
            return False
        self.onInstall()
        return not self.logic.missingPackages()

    def onInstall(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Installing the dependencies failed."), waitCursor=True):
            self.logic.installDependencies(self.resourcePath("requirements.txt"))
        self.showVersions()


REQUIREMENTS = Path(__file__).resolve().parent / "Resources" / "requirements.txt"


def requirementNames(path: Path) -> list:
    """Distribution names of a requirements file (`monai>=1.3` -> `monai`), comments skipped."""
    lines = [line.split("#")[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [re.split(r"[<>=!~; \[]", line, maxsplit=1)[0] for line in lines if line]


class RubikSSLLogic(ScriptedLoadableModuleLogic):
    """Nodes to files, files to nodes, and the one running worker (`self.job`). Usable without the widget."""

    # torch's floor is pyproject.toml's; the rest is the one list in Resources/requirements.txt (a test checks both)
    TORCH_REQUIREMENT = ">=2.3"
    PACKAGES = ("torch", *requirementNames(REQUIREMENTS))

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.job = None
        self._onFinished = None

    def getParameterNode(self):
        return RubikSSLParameterNode(super().getParameterNode())

    # --- dependencies: versions read without importing, installs only on request ---

    def installedVersions(self) -> dict:
        versions = {}
        for name in self.PACKAGES:
            try:
                versions[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                versions[name] = None
        return versions

    def missingPackages(self) -> list:
        return [name for name, version in self.installedVersions().items() if version is None]

    def installDependencies(self, requirementsPath: str) -> None:
        if self.installedVersions()["torch"] is None:
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(_("Install the PyTorch extension from the Extensions Manager, restart Slicer, then try again.")) from None
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True, torchVersionRequirement=self.TORCH_REQUIREMENT) is None:
                raise RuntimeError(_("PyTorch was not installed."))
        if hasattr(slicer, "packaging"):  # Slicer >= 5.12
            slicer.packaging.pip_ensure(slicer.packaging.load_requirements(requirementsPath), requester="RubikSSL")
        else:
            requirements = [line.strip() for line in Path(requirementsPath).read_text().splitlines()
                            if line.strip() and not line.startswith("#")]
            slicer.util.pip_install(requirements)

    # --- nodes to files ---

    def workDirectory(self) -> Path:
        return Path(slicer.util.tempDirectory("RubikSSL"))

    def writeVolume(self, volumeNode, path: Path, rasBounds=None) -> Path:
        """Write a scalar volume node (optionally only the part inside an RAS box) for the worker."""
        from RubikSSLLib.volumes import write_volume

        if volumeNode.GetParentTransformNode() is not None:
            raise ValueError(_("{name} is under a transform: harden the transform first (Data module).").format(name=volumeNode.GetName()))
        array = slicer.util.arrayFromVolume(volumeNode)
        ijkToRAS = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRAS)
        matrix = slicer.util.arrayFromVTKMatrix(ijkToRAS)
        if rasBounds is not None:
            array, matrix = slicergeometry.crop_to_ras_box(array, matrix, rasBounds, margin_voxels=8)
        write_volume(path, array.copy(), slicergeometry.geometry_from_ijk_to_ras(matrix))
        return path

    def writeLabelledCase(self, volumeNode, segmentationNode, folder: Path) -> Path:
        """The input volume and its segmentation as a one-case datalist (labels named after the segments)."""
        labelmapNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        try:
            slicer.modules.segmentations.logic().ExportVisibleSegmentsToLabelmapNode(segmentationNode, labelmapNode, volumeNode)
            image = self.writeVolume(volumeNode, folder / "image.nrrd")
            label = self.writeVolume(labelmapNode, folder / "label.nrrd")
        finally:
            slicer.mrmlScene.RemoveNode(labelmapNode)
        segmentation = segmentationNode.GetSegmentation()
        names = {str(i + 1): segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())}
        case = {"image": str(image), "label": str(label)}
        datalist = folder / "datalist.json"
        datalist.write_text(json.dumps({"labels": names, "training": [case], "validation": [case]}, indent=2))
        return datalist

    # --- jobs ---

    def python(self) -> str:
        return shutil.which("PythonSlicer") or sys.executable

    def start(self, command: str, options: dict, runDir=None, device: str = "auto", onFinished=None) -> None:
        if self.job is not None:
            raise RuntimeError(_("A RubikSSL job is already running; cancel it first."))
        environment = jobs.worker_environment(slicer.util.startupEnvironment(), cpu_only=(device == "cpu"))
        args = jobs.command_line(self.python(), command, options)
        logging.info("RubikSSL: " + " ".join(args))
        self.job = jobs.Job(args, run_dir=runDir, env=environment)
        self._onFinished = onFinished

    def stopJob(self, now: bool = False) -> None:
        if self.job is None:
            return
        if now:
            self.job.kill()
            self.job = None
        else:
            self.job.cancel()

    def finishJob(self) -> str:
        """Called once the worker has exited: load its results. Returns a one-line status."""
        job, onFinished = self.job, self._onFinished
        self.job, self._onFinished = None, None
        state = job.state
        if state.status == "cancelled":
            return _("Cancelled; the checkpoint is kept: Resume continues.")
        if state.status != "ok":
            return _("Failed: {error}").format(error=state.error)
        return onFinished(state) if onFinished else _("Done.")

    def startPretraining(self, p: RubikSSLParameterNode, volumes: list, resume: bool = False) -> None:
        data = [str(p.pretrainFolder)] if isSet(p.pretrainFolder) else []
        folder = self.workDirectory()
        data += [str(self.writeVolume(node, folder / f"{index:03d}.nrrd")) for index, node in enumerate(volumes)]
        options = {"data": data, "out": str(p.pretrainRun), "task": p.pretrainTask, "steps": p.steps, "cube_size": p.cubeSize,
                   "permutations": p.numPermutations, "batch_size": p.batchSize, "device": p.device,
                   "skip_unusable": True, "resume": resume}
        self.start("pretrain", options, runDir=p.pretrainRun, device=p.device,
                   onFinished=lambda state: _("Pretraining finished: {metrics}").format(metrics=json.dumps(state.metrics)))

    def startFinetuning(self, p: RubikSSLParameterNode, resume: bool = False) -> None:
        if isSet(p.labelledData):
            train = str(p.labelledData)
        else:
            train = str(self.writeLabelledCase(p.inputVolume, p.labelledSegmentation, self.workDirectory()))
        options = {"task": p.finetuneTask, "train": train, "val": train, "out": str(p.finetuneRun),
                   "init": "scratch" if p.fromScratch else str(p.pretrainRun), "decoder": p.decoder, "epochs": p.epochs,
                   "label_fraction": p.labelFraction, "device": p.device, "resume": resume}
        self.start("finetune", options, runDir=p.finetuneRun, device=p.device,
                   onFinished=lambda state: _("Fine-tuning finished: {metrics}").format(metrics=json.dumps(state.metrics)))

    def startInference(self, p: RubikSSLParameterNode) -> None:
        card = json.loads((Path(p.modelRun) / "model.json").read_text(encoding="utf-8"))
        folder = self.workDirectory()
        bounds = None
        if p.roi:
            bounds = [0.0] * 6
            p.roi.GetRASBounds(bounds)
        volume = self.writeVolume(p.inputVolume, folder / "input.nrrd", rasBounds=bounds)
        inputNode = p.inputVolume
        if card.get("task") == "classify":
            out = folder / "classification.json"
            self.start("classify", {"model": str(p.modelRun), "volume": str(volume), "out": str(out)},
                       onFinished=lambda state: self.loadClassification(out, inputNode))
        else:
            out = folder / f"{inputNode.GetName()}.seg.nrrd"
            self.start("segment", {"model": str(p.modelRun), "volume": str(volume), "out": str(out)},
                       onFinished=lambda state: self.loadSegmentation(out, inputNode))

    def startPuzzle(self, p: RubikSSLParameterNode, solve: bool) -> None:
        folder = self.workDirectory()
        volume = self.writeVolume(p.inputVolume, folder / "input.nrrd")
        options = {"volume": str(volume), "out": str(folder / "puzzle"), "seed": p.puzzleSeed}
        # a model brings its own puzzle settings; without one, the panel's cube size and K apply
        options.update({"model": str(p.pretrainRun)} if solve else
                       {"cube_size": p.cubeSize, "permutations": p.numPermutations, "task": p.pretrainTask})
        inputNode = p.inputVolume
        if not solve and p.pretrainTask not in tasks.PUZZLE_TASKS:  # other tasks: show their input and target
            self.start("puzzle", options, onFinished=lambda state: self.loadTaskSample(folder / "puzzle", inputNode))
            return
        self.start("puzzle", options, onFinished=lambda state: self.loadPuzzle(folder / "puzzle", inputNode))

    # --- files to nodes ---

    def placeUnder(self, node, inputNode) -> None:
        """Put a result beside its input in the subject hierarchy (same patient/study)."""
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        parent = shNode.GetItemParent(shNode.GetItemByDataNode(inputNode))
        shNode.SetItemParent(shNode.GetItemByDataNode(node), parent)

    def loadSegmentation(self, path: Path, inputNode) -> str:
        segmentationNode = slicer.util.loadSegmentation(str(path))
        segmentationNode.SetName(slicer.mrmlScene.GenerateUniqueName(f"{inputNode.GetName()} RubikSSL"))
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(inputNode)  # also references the input
        segmentationNode.CreateClosedSurfaceRepresentation()
        self.placeUnder(segmentationNode, inputNode)
        slicer.util.setSliceViewerLayers(background=inputNode)
        names = [segmentationNode.GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(segmentationNode.GetSegmentation().GetNumberOfSegments())]
        return _("Segmentation loaded: {names}. Edit it in the Segment Editor.").format(names=", ".join(names))

    def loadClassification(self, path: Path, inputNode) -> str:
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
        self.placeUnder(table, inputNode)
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()
        return _("Predicted class: {name}").format(name=result["predicted"])

    def loadPuzzle(self, folder: Path, inputNode) -> str:
        """The scrambled volume, one segment per cube, and a table of the permutation (and the model's answer)."""
        puzzle = json.loads((folder / "puzzle.json").read_text(encoding="utf-8"))
        name = inputNode.GetName()
        scrambled = slicer.util.loadVolume(str(folder / "scrambled.nrrd"), {"name": f"{name} scrambled"})
        cubes = slicer.util.loadSegmentation(str(folder / "scrambled_labels.nrrd"))
        cubes.SetName(f"{name} cubes")
        self.nameCubes(cubes, puzzle)
        nodes = [scrambled, cubes, self.puzzleTable(puzzle, f"{name} puzzle")]
        if "prediction" in puzzle:
            nodes.append(slicer.util.loadVolume(str(folder / "recovered.nrrd"), {"name": f"{name} solved"}))
        for node in nodes:
            self.placeUnder(node, inputNode)
        slicer.util.setSliceViewerLayers(background=nodes[-1] if "prediction" in puzzle else scrambled)
        if "prediction" not in puzzle:
            return _("Permutation {index} of the table, rotations {rotations}.").format(
                index=puzzle["permutation_index"], rotations=puzzle["rotations"])
        prediction = puzzle["prediction"]
        return _("Network: order {order}, {placed}/8 cubes placed, {oriented}/8 oriented correctly.").format(
            order=_("correct") if prediction["order_correct"] else _("wrong"),
            placed=sum(prediction["cube_placed_correctly"]), oriented=sum(prediction["cube_oriented_correctly"]))

    def loadTaskSample(self, folder: Path, inputNode) -> str:
        """A pretext task's network input and target (rotation, rpl, exemplar, cpc, restorations), beside the input."""
        sample = json.loads((folder / "sample.json").read_text(encoding="utf-8"))
        name = f"{inputNode.GetName()} {sample['task']}"
        shown = slicer.util.loadVolume(str(folder / "input.nrrd"), {"name": f"{name} input"})
        target = slicer.util.loadVolume(str(folder / "target.nrrd"), {"name": f"{name} target"})
        for node in (shown, target):
            self.placeUnder(node, inputNode)
        slicer.util.setSliceViewerLayers(background=shown, foreground=target, foregroundOpacity=0.0)
        return _("{task}: network input and its target loaded (fade between them with the slice view's opacity slider)").format(
            task=sample["task"])

    def nameCubes(self, cubes, puzzle: dict) -> None:
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

    def puzzleTable(self, puzzle: dict, name: str):
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


class RubikSSLTest(ScriptedLoadableModuleTest):
    """Inside Slicer (`--testing`): a small synthetic volume through scramble, a few pretraining steps, cancel,
    and loading a segmentation result. Needs the dependencies installed (they are not installed in testing mode)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_geometry_round_trip()
        self.setUp()
        self.test_scramble_pretrain_cancel_and_load()

    def syntheticVolume(self):
        import numpy as np

        rng = np.random.default_rng(0)
        array = rng.normal(100, 20, (64, 96, 96)).astype(np.float32)  # K, J, I; 96 x 96 x 128 mm
        array[10:50, 20:70, 25:80] += 200
        ijkToRAS = np.diag([-1.0, -1.0, 2.0, 1.0])
        ijkToRAS[:3, 3] = (30.0, 20.0, -10.0)
        return slicer.util.addVolumeFromArray(array, ijkToRAS, name="synthetic")

    def waitFor(self, logic, timeoutSeconds=600):
        import time

        deadline = time.monotonic() + timeoutSeconds
        while logic.job is not None and logic.job.running:
            logic.job.poll()
            slicer.app.processEvents()
            self.assertLess(time.monotonic(), deadline, "the worker did not finish")
            time.sleep(0.1)
        return logic.finishJob()

    def test_geometry_round_trip(self):
        import numpy as np

        import SimpleITK as sitk

        volume = self.syntheticVolume()
        logic = RubikSSLLogic()
        path = logic.writeVolume(volume, logic.workDirectory() / "synthetic.nrrd")
        image = sitk.ReadImage(str(path))
        ijkToRAS = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(ijkToRAS)
        lps = image.TransformIndexToPhysicalPoint((5, 6, 7))
        ras = np.array(ijkToRAS.MultiplyPoint((5, 6, 7, 1)))[:3]
        np.testing.assert_allclose(ras, (-lps[0], -lps[1], lps[2]), atol=1e-4)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), slicer.util.arrayFromVolume(volume))

    def test_scramble_pretrain_cancel_and_load(self):
        logic = RubikSSLLogic()
        if logic.missingPackages():
            self.delayDisplay("Skipping the worker test: install the dependencies first")
            return
        p = logic.getParameterNode()
        p.inputVolume = self.syntheticVolume()
        p.cubeSize, p.steps, p.batchSize, p.device = 16, 100000, 2, "cpu"
        p.pretrainRun = logic.workDirectory() / "run"

        logic.startPuzzle(p, solve=False)
        self.waitFor(logic)
        self.assertIsNotNone(slicer.mrmlScene.GetFirstNodeByName("synthetic scrambled"))

        logic.startPretraining(p, [p.inputVolume])
        while logic.job.running and logic.job.state.step < 2:
            logic.job.poll()
            slicer.app.processEvents()
        logic.stopJob()
        self.waitFor(logic)
        self.assertTrue((Path(p.pretrainRun) / "checkpoint.safetensors").exists())
        self.delayDisplay("Scramble, pretraining, cancel: passed")
