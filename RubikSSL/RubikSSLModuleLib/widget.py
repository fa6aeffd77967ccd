"""The panel: binds the .ui to the parameter node and draws what the logic's job control decides."""

import importlib
import sys
from typing import Optional

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from RubikSSLModuleLib import jobcontrol, nodeio
from RubikSSLModuleLib.logic import JOB_BUTTONS, RubikSSLLogic
from RubikSSLModuleLib.parameters import PATH_FIELDS, RubikSSLParameterNode, cleanPath, isSet

POLL_INTERVAL_MS = 200
# Reloaded in this order on the developer Reload (leaves first), so the new module runs the new code.
RELOADED = ("parameters", "install", "jobcontrol", "nodeio", "results", "interactivepanel", "logic", "widget")


class RubikSSLWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Draws the panel from the logic's job control (jobcontrol.JobControl) after every tick and every action."""

    def __init__(self, parent=None, logic=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = logic
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._reloading = False
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPoll)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RubikSSL.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.buttons = {key: getattr(self.ui, f"{key}Button") for key in JOB_BUTTONS}
        self.logic = self.logic or RubikSSLLogic()
        self.logic.control.texts = {key: button.text for key, button in self.buttons.items()}
        self.interactive = None

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        starts = {"scramble": lambda: self.logic.startPuzzle(self._parameterNode, solve=False),
                  "solve": lambda: self.logic.startPuzzle(self._parameterNode, solve=True),
                  "pretrain": lambda: self.logic.startPretraining(self._parameterNode, self.pretrainVolumes()),
                  "resumePretrain": lambda: self.logic.startPretraining(self._parameterNode, [], resume=True),
                  "finetune": lambda: self.logic.startFinetuning(self._parameterNode),
                  "resumeFinetune": lambda: self.logic.startFinetuning(self._parameterNode, resume=True),
                  "run": lambda: self.logic.startInference(self._parameterNode),
                  "continueFinetune": lambda: self.logic.startContinuedFinetuning(self._parameterNode),
                  "rank": lambda: self.logic.startRanking(self._parameterNode, self.pretrainVolumes())}
        for key, start in starts.items():
            self.buttons[key].connect("clicked(bool)", lambda checked, key=key, start=start: self.onJobButton(key, start))
        self.ui.installButton.connect("clicked(bool)", self.onInstall)
        self.ui.labelledFolderButton.connect("clicked(bool)", self.onChooseLabelledFolder)
        self.ui.pretrainVolumesSelector.connect("checkedNodesChanged()", self.updateButtons)
        for name, widgetName in PATH_FIELDS.items():
            getattr(self.ui, widgetName).connect("currentPathChanged(QString)",
                                                 lambda text, name=name: self.onPathEdited(name, text))
        self.ui.interactiveStartButton.connect("clicked(bool)", self.onInteractiveStartOrStop)
        self.ui.undoClickButton.connect("clicked(bool)", lambda: self.interactive and self.interactive.undo())
        self.ui.acceptButton.connect("clicked(bool)", lambda: self.onAccept(nextSegment=False))
        self.ui.nextSegmentButton.connect("clicked(bool)", lambda: self.onAccept(nextSegment=True))
        self.ui.removeAcceptedButton.connect("clicked(bool)", self.onRemoveAccepted)
        self.showVersions()
        self.initializeParameterNode()
        if self.logic.control.state != jobcontrol.IDLE:  # a job handed over across a Reload: keep polling it
            self._timer.start()
        self.render()

    # --- Slicer's module life: reload, close, scene close ---

    def onReload(self) -> None:
        """Developer Reload: the module's own package is reloaded too (Slicer re-executes RubikSSL.py only), and a
        running job is handed to the new panel instead of being cancelled."""
        self._reloading = True
        for name in RELOADED:
            module = sys.modules.get(f"RubikSSLModuleLib.{name}")
            if module is not None:
                importlib.reload(module)
        ScriptedLoadableModuleWidget.onReload(self)

    def cleanup(self) -> None:
        """Reload: hand a running job over and stop only the interactive worker. Slicer closing: stop every worker
        gracefully (STOP, then escalate within a bound), saying in the status bar what it waits for."""
        self._timer.stop()
        self.stopInteractive()
        if self._reloading and self.logic.handOverForReload():
            self.showWaiting(_("RubikSSL: the running job continues in the reloaded module."))
        else:
            self.logic.control.application_closing(report=self.showWaiting)
        self.removeObservers()

    def showWaiting(self, text: str) -> None:
        slicer.util.showStatusMessage(text)
        slicer.app.processEvents()

    def stopInteractive(self) -> None:
        if self.interactive is not None:
            self.interactive.stop(report=lambda text: self.showWaiting(_("Stopping the interactive worker: ") + text))
            self.interactive = None

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        # Jobs keep running (and the timer keeps polling) while the user works in other modules.
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        """Jobs that load into the scene are cancelled (gracefully) and load nothing; training jobs run on."""
        self.stopInteractive()
        self.logic.control.scene_closing()
        self.setParameterNode(None)
        self.render()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()
        self.render()

    # --- the parameter node ---

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = nodeio.first_scalar_volume(slicer.mrmlScene)

    def setParameterNode(self, parameterNode: Optional[RubikSSLParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        for name, widgetName in PATH_FIELDS.items():
            widget = getattr(self.ui, widgetName)
            if p is not None and widget.currentPath != getattr(p, name):
                widget.currentPath = getattr(p, name)
        self.updateButtons()

    def onPathEdited(self, name: str, text: str) -> None:
        """Store the text as typed (spaces and all): it is cleaned where it is used (parameters.cleanPath), never
        while typing, so the field is never rewritten under the cursor."""
        if self._parameterNode is not None and getattr(self._parameterNode, name) != text:
            setattr(self._parameterNode, name, text)

    def onChooseLabelledFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Labelled data folder"),
                                                     cleanPath(self._parameterNode.labelledData) if self._parameterNode else "")
        if folder:
            self._parameterNode.labelledData = folder

    def pretrainVolumes(self) -> list:
        return list(self.ui.pretrainVolumesSelector.checkedNodes())

    # --- drawing: the job control decides, this only shows it ---

    def updateButtons(self, caller=None, event=None) -> None:
        self.render()

    def render(self) -> None:
        control, p = self.logic.control, self._parameterNode
        ready = self.logic.readiness(p, bool(self.ui.pretrainVolumesSelector.checkedNodes())) if p else {}
        for key, button in self.buttons.items():
            button.text = control.button_text(key)
            button.enabled = control.button_enabled(key, ready.get(key, False))
        view = control.view()
        self.ui.installButton.enabled = not view.busy and bool(self.logic.missingPackages())
        if view.progress is None:
            self.ui.progressBar.hide()
        else:
            self.ui.progressBar.show()
            self.ui.progressBar.setRange(0, 0 if view.progress == jobcontrol.PROGRESS_BUSY else 1000)
            self.ui.progressBar.value = max(view.progress, 0)
        if view.status:
            self.ui.statusLabel.text = view.status
        self.renderInteractive(p)

    def renderInteractive(self, p) -> None:
        interactive = self.interactive is not None and self.interactive.running
        accepting = interactive and self.interactive.accepting
        self.ui.interactiveStartButton.text = _("Stop interactive") if interactive else _("Start interactive")
        self.ui.interactiveStartButton.enabled = not self.logic.control.installing and (
            interactive or bool(p and p.inputVolume and p.interactiveSegmentation and isSet(p.interactiveModel)))
        for button in (self.ui.undoClickButton, self.ui.acceptButton, self.ui.nextSegmentButton):
            button.enabled = interactive and not accepting
        for placeWidget in (self.ui.includePlaceWidget, self.ui.excludePlaceWidget):
            placeWidget.enabled = interactive and not accepting
        cases = self.logic.acceptedCases(p) if p else []
        self.ui.acceptedCasesList.clear()
        for case in cases:
            self.ui.acceptedCasesList.addItem(case.name)
        self.ui.acceptedCountLabel.text = _("{count} accepted cases").format(count=len(cases))
        self.ui.removeAcceptedButton.enabled = bool(cases)

    # --- long jobs: the pressed button's Start turns into Cancel ---

    def onJobButton(self, key: str, start) -> None:
        action = self.logic.control.press(key)
        if action == "start" and self.ensureDependencies():
            with slicer.util.tryWithErrorDisplay(_("Could not start the job."), waitCursor=True):
                start()
                self.logic.control.active = key
                self.ui.logTextEdit.clear()
                self._timer.start()
        self.render()

    def onPoll(self) -> None:
        control = self.logic.control
        control.poll()
        for line in control.new_log_lines():
            self.ui.logTextEdit.appendPlainText(line)
        if control.state == jobcontrol.IDLE:
            self._timer.stop()
            error = control.take_error()
            if error:
                slicer.util.errorDisplay(error, windowTitle=_("RubikSSL"))
        self.render()

    # --- interactive segmentation ---

    def onInteractiveStartOrStop(self) -> None:
        if self.interactive is not None and self.interactive.running:
            self.stopInteractive()
        elif self.ensureDependencies():
            from RubikSSLModuleLib import interactivepanel

            p = self._parameterNode
            self.interactive = None
            with slicer.util.tryWithErrorDisplay(_("Could not start the interactive worker."), waitCursor=True):
                panel = interactivepanel.InteractivePanel(self.ui, self.logic.python(), self.logic.environment(p.device),
                                                          self.logic.workBase(), onChanged=self.render)
                panel.start(cleanPath(p.interactiveModel), p.inputVolume, p.interactiveSegmentation, p.device)
                self.interactive = panel
        self.render()

    def onAccept(self, nextSegment: bool) -> None:
        """Keep the segment once the last answer is in, clear the points, and keep the case for the next fine-tune
        (human in the loop) in the accepted-cases folder."""
        if self.interactive is None or not self.interactive.running:
            return
        p, panel = self._parameterNode, self.interactive
        if not isSet(p.acceptedFolder):
            slicer.util.errorDisplay(_("Choose a folder for accepted cases first (Interactive: Accepted cases)."))
            return

        def keepCase() -> None:
            with slicer.util.tryWithErrorDisplay(_("Could not keep the accepted case."), waitCursor=True):
                folder = self.logic.acceptCase(p, panel.inputNode, panel.segmentationNode)
                self.ui.interactiveStatusLabel.text = _("Accepted as {name}; {count} accepted cases for the next "
                                                        "fine-tune.").format(name=folder.name, count=len(self.logic.acceptedCases(p)))

        panel.accept(nextSegment, keepCase)
        self.render()

    def onRemoveAccepted(self) -> None:
        row, p = self.ui.acceptedCasesList.currentRow, self._parameterNode
        cases = self.logic.acceptedCases(p)
        if not 0 <= row < len(cases):
            slicer.util.errorDisplay(_("Select the accepted case to remove in the list first."))
            return
        if slicer.util.confirmOkCancelDisplay(_("Remove the accepted case {name}?").format(name=cases[row].name)):
            with slicer.util.tryWithErrorDisplay(_("Could not remove the case."), waitCursor=True):
                self.logic.removeAcceptedCase(p, cases[row].name)
        self.render()

    # --- dependencies ---

    def showVersions(self) -> None:
        versions = self.logic.installedVersions()
        self.ui.versionsLabel.text = ", ".join(f"{name} {version or _('missing')}" for name, version in versions.items())

    def ensureDependencies(self) -> bool:
        """True when every package is there and torch is new enough; else ask once to install what is missing."""
        problem = self.logic.dependencyProblem()
        if not problem:
            return True
        if not self.logic.missingPackages():  # too old a torch: an install keeps it, so say what to do
            slicer.util.errorDisplay(problem, windowTitle=_("RubikSSL"))
            return False
        if not slicer.util.confirmOkCancelDisplay(
                _("RubikSSL needs PyTorch and a few Python packages ({packages}). Install them now? "
                  "This can take several minutes.").format(packages=", ".join(self.logic.missingPackages()))):
            return False
        self.runInstall()
        return not self.logic.dependencyProblem()

    def onInstall(self) -> None:
        """The Install missing packages button: confirm once, then install."""
        if not self.logic.missingPackages():
            self.showVersions()
            return
        if slicer.util.confirmOkCancelDisplay(_("Install {packages}? This can take several minutes.").format(
                packages=", ".join(self.logic.missingPackages()))):
            self.runInstall()

    def runInstall(self) -> None:
        """One install at a time, every job button disabled meanwhile (installing pumps GUI events, so the panel
        stays clickable)."""
        if not self.logic.control.begin_install():
            return
        self.render()
        status = _("Installed.")
        try:
            with slicer.util.tryWithErrorDisplay(_("Installing the dependencies failed."), waitCursor=True):
                self.logic.installDependencies()
        finally:
            problem = self.logic.dependencyProblem()
            self.logic.control.end_install(problem or status)
            self.showVersions()
            self.render()
