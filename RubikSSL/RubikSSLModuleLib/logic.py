"""The panel's actions without the panel: scene nodes to files, one job at a time, files back to nodes."""

import json
import logging
import shutil
import sys
from pathlib import Path

import slicer
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from RubikSSLLib import jobs, taskspec
from RubikSSLModuleLib import install, jobcontrol, nodeio, results
from RubikSSLModuleLib.parameters import RubikSSLParameterNode, isSet, storedConfig

JOB_BUTTONS = ("scramble", "solve", "pretrain", "resumePretrain", "finetune", "resumeFinetune", "run",
               "continueFinetune", "rank")


class RubikSSLLogic(ScriptedLoadableModuleLogic):
    """The panel's actions without the panel: nodes to files, one job at a time (`self.control`), files to nodes."""

    # torch's floor is pyproject.toml's; the rest is the one list in Resources/requirements.txt (a test checks both)
    TORCH_REQUIREMENT = ">=2.3"
    PACKAGES = ("torch", *install.requirement_names(install.REQUIREMENTS))

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.control = jobcontrol.JobControl(texts={key: key for key in JOB_BUTTONS})

    def getParameterNode(self):
        return RubikSSLParameterNode(super().getParameterNode())

    def readiness(self, p, pretrainVolumesChecked: bool) -> dict:
        """Which job buttons have their inputs."""
        hasVolume = bool(p.inputVolume)
        return {"scramble": hasVolume, "solve": hasVolume and isSet(p.pretrainRun),
                "pretrain": isSet(p.pretrainRun) and (isSet(p.pretrainFolder) or pretrainVolumesChecked),
                "resumePretrain": isSet(p.pretrainRun),
                "finetune": isSet(p.finetuneRun) and (isSet(p.labelledData) or (hasVolume and bool(p.labelledSegmentation)))
                and (p.fromScratch or isSet(p.pretrainRun)),
                "resumeFinetune": isSet(p.finetuneRun), "run": hasVolume and isSet(p.modelRun),
                "continueFinetune": isSet(p.interactiveModel) and isSet(p.finetuneRun) and bool(self.acceptedCases()),
                "rank": isSet(p.interactiveModel) and (isSet(p.pretrainFolder) or pretrainVolumesChecked)}

    # --- dependencies: versions read without importing, installs only on request ---

    def installedVersions(self) -> dict:
        return install.installed_versions(list(self.PACKAGES))

    def missingPackages(self) -> list:
        return [name for name, version in self.installedVersions().items() if version is None]

    def installDependencies(self) -> None:
        install.install(install.REQUIREMENTS, self.TORCH_REQUIREMENT, nodeio.work_folder(self.workBase(), "install"))

    # --- jobs ---

    def workBase(self) -> Path:
        return Path(slicer.util.tempDirectory("RubikSSL", includeDateTime=False))

    def python(self) -> str:
        return shutil.which("PythonSlicer") or sys.executable

    def environment(self, device: str) -> dict:
        return jobs.worker_environment(slicer.util.startupEnvironment(), cpu_only=(device == "cpu"))

    def start(self, command: str, options: dict, runDir=None, device: str = "auto", onFinished=None,
              needsScene: bool = False) -> None:
        args = jobs.command_line(self.python(), command, options)
        logging.info("RubikSSL: " + " ".join(args))
        job = jobs.Job(args, run_dir=runDir, env=self.environment(device))
        self.control.start(command, job, needsScene, onFinished)

    def startPretraining(self, p: RubikSSLParameterNode, volumes: list, resume: bool = False) -> None:
        """Resume reads the run's own stored data list: the volumes are not written again."""
        data = [p.pretrainFolder] if isSet(p.pretrainFolder) else []
        if resume:
            data = storedConfig(p.pretrainRun).get("data", data)
        else:
            folder = nodeio.work_folder(self.workBase(), "pretrain")
            data += [str(nodeio.write_volume(node, folder / nodeio.pretraining_volume(index)))
                     for index, node in enumerate(volumes)]
        options = {"data": data or None, "out": p.pretrainRun, "task": p.pretrainTask, "steps": p.steps,
                   "cube_size": p.cubeSize, "permutations": p.numPermutations, "batch_size": p.batchSize,
                   "device": p.device, "skip_unusable": True, "resume": resume}
        self.start("pretrain", options, runDir=p.pretrainRun, device=p.device,
                   onFinished=lambda state: _("Pretraining finished: {metrics}").format(metrics=json.dumps(state.metrics)))

    def startFinetuning(self, p: RubikSSLParameterNode, resume: bool = False) -> None:
        if resume:
            train = storedConfig(p.finetuneRun).get("train", [p.labelledData])  # what the first start wrote
        elif isSet(p.labelledData):
            train = p.labelledData
        else:
            train = str(nodeio.write_labelled_case(p.inputVolume, p.labelledSegmentation,
                                                   nodeio.work_folder(self.workBase(), "finetune")))
        options = {"task": p.finetuneTask, "train": train, "val": train, "out": p.finetuneRun,
                   "init": "scratch" if p.fromScratch else p.pretrainRun, "decoder": p.decoder, "epochs": p.epochs,
                   "label_fraction": p.labelFraction, "device": p.device, "resume": resume}
        self.start("finetune", options, runDir=p.finetuneRun, device=p.device,
                   onFinished=lambda state: _("Fine-tuning finished: {metrics}").format(metrics=json.dumps(state.metrics)))

    def startInference(self, p: RubikSSLParameterNode) -> None:
        card = json.loads((Path(p.modelRun) / "model.json").read_text(encoding="utf-8"))
        folder = nodeio.work_folder(self.workBase(), "inference")
        bounds = None
        if p.roi:
            bounds = [0.0] * 6
            p.roi.GetRASBounds(bounds)
        volume = nodeio.write_volume(p.inputVolume, folder / nodeio.INPUT_VOLUME, rasBounds=bounds)
        inputNode = p.inputVolume
        if card.get("task") == "classify":
            out = folder / nodeio.CLASSIFICATION_RESULT
            self.start("classify", {"model": p.modelRun, "volume": str(volume), "out": str(out), "device": p.device},
                       device=p.device, needsScene=True, onFinished=lambda state: results.loadClassification(out, inputNode))
        else:
            out = folder / nodeio.SEGMENTATION_RESULT
            self.start("segment", {"model": p.modelRun, "volume": str(volume), "out": str(out), "device": p.device},
                       device=p.device, needsScene=True, onFinished=lambda state: results.loadSegmentation(out, inputNode))

    def startPuzzle(self, p: RubikSSLParameterNode, solve: bool) -> None:
        folder = nodeio.work_folder(self.workBase(), "puzzle")
        volume = nodeio.write_volume(p.inputVolume, folder / nodeio.INPUT_VOLUME)
        options = {"volume": str(volume), "out": str(folder / "puzzle"), "seed": p.puzzleSeed}
        # a model brings its own puzzle settings; without one, the panel's cube size and K apply
        options.update({"model": p.pretrainRun} if solve else
                       {"cube_size": p.cubeSize, "permutations": p.numPermutations, "task": p.pretrainTask})
        inputNode = p.inputVolume
        if not solve and p.pretrainTask not in taskspec.PUZZLE_TASKS:  # other tasks: show their input and target
            self.start("puzzle", options, needsScene=True,
                       onFinished=lambda state: results.loadTaskSample(folder / "puzzle", inputNode))
            return
        self.start("puzzle", options, needsScene=True, onFinished=lambda state: results.loadPuzzle(folder / "puzzle", inputNode))

    # --- human in the loop: accepted cases, continued fine-tuning, which case next ---

    def acceptCase(self, inputNode, segmentationNode) -> Path:
        """Keep the volume and its segments (as they are now) as a labelled case; accepting the same volume again
        replaces its case. Returns the datalist of every accepted case."""
        accepted = nodeio.work_folder(self.workBase(), "accepted", keep=True)
        folder = accepted / nodeio.accepted_case(inputNode.GetID())
        folder.mkdir(exist_ok=True)
        nodeio.write_labelled_case(inputNode, segmentationNode, folder)
        return nodeio.write_accepted_datalist(accepted)

    def acceptedCases(self) -> list:
        folder = self.workBase() / "accepted"
        return sorted(folder.glob("*/" + nodeio.DATALIST)) if folder.is_dir() else []

    def startContinuedFinetuning(self, p: RubikSSLParameterNode) -> None:
        """Continue the interactive model on the accepted cases, into the fine-tuning run folder."""
        datalist = str(nodeio.write_accepted_datalist(nodeio.work_folder(self.workBase(), "accepted", keep=True)))
        options = {"task": "segment", "resume_from": p.interactiveModel, "train": datalist, "val": datalist,
                   "out": p.finetuneRun, "epochs": p.epochs, "device": p.device}
        self.start("finetune", options, runDir=p.finetuneRun, device=p.device,
                   onFinished=lambda state: _("Continued fine-tuning finished: {metrics}; use {run} as the interactive "
                                              "model").format(metrics=json.dumps(state.metrics), run=p.finetuneRun))

    def startRanking(self, p: RubikSSLParameterNode, volumes: list) -> None:
        folder = nodeio.work_folder(self.workBase(), "rank")
        data = [p.pretrainFolder] if isSet(p.pretrainFolder) else []
        data += [str(nodeio.write_volume(node, folder / nodeio.pretraining_volume(index))) for index, node in enumerate(volumes)]
        out = folder / nodeio.RANKING
        self.start("rank", {"model": p.interactiveModel, "data": data, "out": str(out), "device": p.device},
                   device=p.device, needsScene=True, onFinished=lambda state: results.loadRanking(out))
