"""The panel: binds the .ui to the parameter node and draws what the logic's job control decides."""

from typing import Optional

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from RubikSSLModuleLib import jobcontrol, nodeio
from RubikSSLModuleLib.logic import JOB_BUTTONS, RubikSSLLogic
from RubikSSLModuleLib.parameters import PATH_FIELDS, RubikSSLParameterNode, isSet

POLL_INTERVAL_MS = 200


class RubikSSLWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Draws the panel from the logic's job control (jobcontrol.JobControl) after every tick and every action."""

    def __init__(self, parent=None, logic=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = logic
        self._parameterNode = None
        self._parameterNodeGuiTag = None
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
        self.showVersions()
        self.initializeParameterNode()
        self.render()

    def cleanup(self) -> None:
        """Slicer is closing: stop every worker gracefully (STOP, then escalate within a bound)."""
        self._timer.stop()
        if self.interactive is not None:
            self.interactive.stop()
        self.logic.control.application_closing()
        self.removeObservers()

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
        if self.interactive is not None:
            self.interactive.stop()
            self.interactive = None
        self.logic.control.scene_closing()
        self.setParameterNode(None)
        self.render()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()
        self.render()

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
        if self._parameterNode is not None and getattr(self._parameterNode, name) != text.strip():
            setattr(self._parameterNode, name, text.strip())

    def onChooseLabelledFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Labelled data folder"),
                                                     self._parameterNode.labelledData if self._parameterNode else "")
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
        self.ui.installButton.enabled = not view.busy
        if view.progress is None:
            self.ui.progressBar.hide()
        else:
            self.ui.progressBar.show()
            self.ui.progressBar.setRange(0, 0 if view.progress == jobcontrol.PROGRESS_BUSY else 1000)
            self.ui.progressBar.value = max(view.progress, 0)
        if view.status:
            self.ui.statusLabel.text = view.status
        interactive = self.interactive is not None and self.interactive.running
        self.ui.interactiveStartButton.text = _("Stop interactive") if interactive else _("Start interactive")
        self.ui.interactiveStartButton.enabled = interactive or bool(p and p.inputVolume and p.interactiveSegmentation
                                                                     and isSet(p.interactiveModel))
        for button in (self.ui.undoClickButton, self.ui.acceptButton, self.ui.nextSegmentButton):
            button.enabled = interactive

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
            self.interactive.stop()
        elif self.ensureDependencies():
            from RubikSSLModuleLib import interactivepanel

            p = self._parameterNode
            with slicer.util.tryWithErrorDisplay(_("Could not start the interactive worker."), waitCursor=True):
                self.interactive = interactivepanel.InteractivePanel(self.ui, self.logic.python(), self.logic.environment(p.device),
                                                                     self.logic.workBase())
                self.interactive.start(p.interactiveModel, p.inputVolume, p.interactiveSegmentation, p.device)
        self.render()

    def onAccept(self, nextSegment: bool) -> None:
        """Keep the segment, clear the points, and keep the case for the next fine-tune (human in the loop)."""
        if self.interactive is None or not self.interactive.running:
            return
        self.interactive.accept(nextSegment=nextSegment)
        with slicer.util.tryWithErrorDisplay(_("Could not keep the accepted case."), waitCursor=True):
            self.logic.acceptCase(self.interactive.inputNode, self.interactive.segmentationNode)
            self.ui.interactiveStatusLabel.text = _("Accepted; {count} accepted cases for the next fine-tune.").format(
                count=len(self.logic.acceptedCases()))
        self.render()

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
        if self.logic.control.view().busy:
            return
        with slicer.util.tryWithErrorDisplay(_("Installing the dependencies failed."), waitCursor=True):
            self.logic.installDependencies()
        self.showVersions()
