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
from RubikSSLModuleLib.parameters import RubikSSLParameterNode, cleanPath, isSet, storedConfig

JOB_BUTTONS = ("scramble", "solve", "pretrain", "resumePretrain", "finetune", "resumeFinetune", "run",
               "continueFinetune", "rank")
# A running job is handed from the old module to the new one across Slicer's developer Reload (RubikSSL.onReload):
# reloading code must not cancel a pretraining. The attribute lives on slicer.modules, which a reload keeps.
HANDOVER = "RubikSSLRunningJob"


class RubikSSLLogic(ScriptedLoadableModuleLogic):
    """The panel's actions without the panel: nodes to files, one job at a time (`self.control`), files to nodes."""

    # torch's floor is pyproject.toml's; the rest is the one list in Resources/requirements.txt (a test checks both)
    TORCH_REQUIREMENT = ">=2.3"
    PACKAGES = ("torch", *install.requirement_names(install.REQUIREMENTS))

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        handed = getattr(slicer.modules, HANDOVER, None)
        if handed is not None:  # a job started before a Reload: keep watching it
            setattr(slicer.modules, HANDOVER, None)
            self.control = handed
        else:
            self.control = jobcontrol.JobControl(texts={key: key for key in JOB_BUTTONS})

    def handOverForReload(self) -> bool:
        """Keep a running job for the module that a Reload creates; True if there was one."""
        if self.control.state == jobcontrol.IDLE:
            return False
        setattr(slicer.modules, HANDOVER, self.control)
        return True

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
                "continueFinetune": isSet(p.interactiveModel) and bool(self.acceptedCases(p)),
                "rank": isSet(p.interactiveModel) and (isSet(p.pretrainFolder) or pretrainVolumesChecked)}

    # --- dependencies: versions read without importing, installs only on request ---

    def installedVersions(self) -> dict:
        return install.installed_versions(list(self.PACKAGES))

    def missingPackages(self) -> list:
        return [name for name, version in self.installedVersions().items() if version is None]

    def dependencyProblem(self) -> str:
        """What stops a job from running ("" if nothing): missing packages, or a torch older than the floor that
        another extension installed (an install keeps it, pinned: it must be replaced by hand)."""
        missing = self.missingPackages()
        if missing:
            return _("Missing: {packages}. Press Install missing packages (Dependencies).").format(packages=", ".join(missing))
        return install.torch_too_old(self.installedVersions()["torch"], self.TORCH_REQUIREMENT)

    def installDependencies(self) -> None:
        """Install what is missing; the user has confirmed once (Slicer's own dialogs do not ask again)."""
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
        """A new run writes its volumes into its own run folder (nodeio.run_inputs); Resume reads the run's stored
        data list and rewrites nothing (the library checks the data still match the hashes the run recorded)."""
        run = cleanPath(p.pretrainRun)
        data = [cleanPath(p.pretrainFolder)] if isSet(p.pretrainFolder) else []
        if resume:
            data = storedConfig(run).get("data", data)
        else:
            folder = nodeio.fresh_inputs_folder(run)
            data += [str(nodeio.write_volume(node, folder / nodeio.pretraining_volume(index)))
                     for index, node in enumerate(volumes)]
        options = {"data": data or None, "out": run, "task": p.pretrainTask, "steps": p.steps,
                   "cube_size": p.cubeSize, "permutations": p.numPermutations, "batch_size": p.batchSize,
                   "device": p.device, "skip_unusable": True, "resume": resume}
        self.start("pretrain", options, runDir=run, device=p.device,
                   onFinished=lambda state: _("Pretraining finished: {metrics}").format(metrics=json.dumps(state.metrics)))

    def startFinetuning(self, p: RubikSSLParameterNode, resume: bool = False) -> None:
        run = cleanPath(p.finetuneRun)
        if resume:
            train = storedConfig(run).get("train", [cleanPath(p.labelledData)])  # what the first start used
        elif isSet(p.labelledData):
            nodeio.check_new_run(run)
            train = cleanPath(p.labelledData)
        else:
            train = str(nodeio.write_labelled_case(p.inputVolume, p.labelledSegmentation, nodeio.fresh_inputs_folder(run)))
        options = {"task": p.finetuneTask, "train": train, "val": train, "out": run,
                   "init": "scratch" if p.fromScratch else cleanPath(p.pretrainRun), "decoder": p.decoder,
                   "epochs": p.epochs, "label_fraction": p.labelFraction, "device": p.device, "resume": resume,
                   "interactive": p.interactiveFinetune and p.finetuneTask == "segment" and not resume}
        self.start("finetune", options, runDir=run, device=p.device,
                   onFinished=lambda state: _("Fine-tuning finished: {metrics}").format(metrics=json.dumps(state.metrics)))

    def startInference(self, p: RubikSSLParameterNode) -> None:
        model = cleanPath(p.modelRun)
        card = json.loads((Path(model) / "model.json").read_text(encoding="utf-8"))
        folder = nodeio.work_folder(self.workBase(), "inference")
        bounds = None
        if p.roi:
            bounds = [0.0] * 6
            p.roi.GetRASBounds(bounds)
        volume = nodeio.write_volume(p.inputVolume, folder / nodeio.INPUT_VOLUME, rasBounds=bounds)
        inputNode = p.inputVolume
        if card.get("task") == "classify":
            out = folder / nodeio.CLASSIFICATION_RESULT
            self.start("classify", {"model": model, "volume": str(volume), "out": str(out), "device": p.device},
                       device=p.device, needsScene=True, onFinished=lambda state: results.loadClassification(out, inputNode))
        else:
            out = folder / nodeio.SEGMENTATION_RESULT
            self.start("segment", {"model": model, "volume": str(volume), "out": str(out), "device": p.device},
                       device=p.device, needsScene=True, onFinished=lambda state: results.loadSegmentation(out, inputNode))

    def startPuzzle(self, p: RubikSSLParameterNode, solve: bool) -> None:
        folder = nodeio.work_folder(self.workBase(), "puzzle")
        volume = nodeio.write_volume(p.inputVolume, folder / nodeio.INPUT_VOLUME)
        options = {"volume": str(volume), "out": str(folder / "puzzle"), "seed": p.puzzleSeed}
        # a model brings its own puzzle settings; without one, the panel's cube size and K apply
        options.update({"model": cleanPath(p.pretrainRun)} if solve else
                       {"cube_size": p.cubeSize, "permutations": p.numPermutations, "task": p.pretrainTask})
        inputNode = p.inputVolume
        if not solve and p.pretrainTask not in taskspec.PUZZLE_TASKS:  # other tasks: show their input and target
            self.start("puzzle", options, needsScene=True,
                       onFinished=lambda state: results.loadTaskSample(folder / "puzzle", inputNode))
            return
        self.start("puzzle", options, needsScene=True, onFinished=lambda state: results.loadPuzzle(folder / "puzzle", inputNode))

    # --- human in the loop: accepted cases, continued fine-tuning, which case next ---

    def acceptedFolder(self, p: RubikSSLParameterNode) -> Path:
        if not isSet(p.acceptedFolder):
            raise ValueError(_("Choose a folder for accepted cases first (Interactive: Accepted cases)."))
        return Path(cleanPath(p.acceptedFolder))

    def acceptCase(self, p: RubikSSLParameterNode, inputNode, segmentationNode) -> Path:
        """Keep the volume and its segments (as they are now) as a labelled case in the chosen folder, named by
        the volume and a hash of its voxels: accepting the same volume again replaces its own case, another
        volume never does (after Close Scene or a restart too). Returns the case folder."""
        array, matrix = nodeio.node_array(inputNode)
        folder = self.acceptedFolder(p) / nodeio.ACCEPTED_CASES / nodeio.case_name(inputNode.GetName(),
                                                                                   nodeio.volume_digest(array, matrix))
        staging = folder.with_name(folder.name + ".new")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            nodeio.write_labelled_case(inputNode, segmentationNode, staging)
            datalist = json.loads((staging / nodeio.DATALIST).read_text(encoding="utf-8"))
            for entry in datalist["training"] + datalist["validation"]:  # the paths the case will have
                entry.update({key: str(folder / Path(entry[key]).name) for key in ("image", "label")})
            (staging / nodeio.DATALIST).write_text(json.dumps(datalist, indent=2), encoding="utf-8")
            shutil.rmtree(folder, ignore_errors=True)
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        nodeio.write_accepted_datalist(self.acceptedFolder(p))
        return folder

    def acceptedCases(self, p: RubikSSLParameterNode) -> list:
        return nodeio.accepted_cases(cleanPath(p.acceptedFolder)) if isSet(p.acceptedFolder) else []

    def removeAcceptedCase(self, p: RubikSSLParameterNode, name: str) -> None:
        nodeio.remove_accepted_case(self.acceptedFolder(p), name)
        nodeio.write_accepted_datalist(self.acceptedFolder(p))

    def startContinuedFinetuning(self, p: RubikSSLParameterNode) -> None:
        """Continue the interactive model on the accepted cases, into the next round's own run folder (models/
        round_NNN of the accepted-cases folder); when it finishes, that round becomes the interactive model."""
        accepted = self.acceptedFolder(p)
        datalist = str(nodeio.write_accepted_datalist(accepted))
        run = nodeio.next_round(accepted)
        options = {"task": "segment", "resume_from": cleanPath(p.interactiveModel), "train": datalist, "val": datalist,
                   "out": str(run), "epochs": p.epochs, "device": p.device}

        def finished(state) -> str:
            p.interactiveModel = str(run)
            return _("Continued fine-tuning finished: {metrics}; {run} is now the interactive model.").format(
                metrics=json.dumps(state.metrics), run=run)

        self.start("finetune", options, runDir=str(run), device=p.device, onFinished=finished)

    def startRanking(self, p: RubikSSLParameterNode, volumes: list) -> None:
        folder = nodeio.work_folder(self.workBase(), "rank")
        data = [cleanPath(p.pretrainFolder)] if isSet(p.pretrainFolder) else []
        data += [str(nodeio.write_volume(node, folder / nodeio.pretraining_volume(index))) for index, node in enumerate(volumes)]
        out = folder / nodeio.RANKING
        self.start("rank", {"model": cleanPath(p.interactiveModel), "data": data, "out": str(out), "device": p.device},
                   device=p.device, needsScene=True, onFinished=lambda state: results.loadRanking(out))
