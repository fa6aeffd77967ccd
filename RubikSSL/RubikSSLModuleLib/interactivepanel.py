"""The panel's "Interactive" section: include / exclude points placed with Slicer's own markups widgets update one
segment through a `rubikssl serve` worker (RubikSSLLib.clicksession talks to it; torch never runs in Slicer).

Start checks that the model is an interactive one, loads it once in the worker, writes the input volume once and
empties both point lists (points of an earlier session are not sent again). Every added, moved or removed point
then sends the current points (one request at a time, the newest state wins); each answer is the region the model
predicted and replaces, in memory, the segment it was asked for, even if the user has moved on to the next
segment. With no points left (undo of the last one, "delete all") the segment is emptied. Accept waits for the
answer in flight, then keeps the case; Next segment does the same and starts a new segment. If the worker dies,
the section returns to its idle state by itself (`onChanged` redraws the panel). The segment can be refined with
the Segment Editor as usual.
"""

import json
from pathlib import Path

import qt
import slicer
from slicer.i18n import tr as _

from RubikSSLLib import clicksession, jobs
from RubikSSLModuleLib import nodeio, results

POLL_INTERVAL_MS = 50
POINT_EVENTS = ("PointModifiedEvent", "PointPositionDefinedEvent", "PointRemovedEvent")
COLORS = {"include": (0.2, 0.8, 0.2), "exclude": (0.9, 0.2, 0.2)}
MODEL_CARD = "model.json"


def serveCommand(python: str, modelFolder: str, device: str) -> list:
    """The worker's command line: `rubikssl serve` on the model, JSON events on stdout."""
    return jobs.command_line(python, "serve", {"model": modelFolder, "device": device})


def modelProblem(modelFolder: str) -> str:
    """Why `modelFolder` cannot drive the Interactive section ("" if it can): it must be a fine-tuning run of an
    interactive segmentation model (its model card says so; read without torch)."""
    card = Path(modelFolder) / MODEL_CARD
    try:
        data = json.loads(card.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return _("{folder} holds no model card (model.json): choose a fine-tuning run folder.").format(folder=modelFolder)
    if data.get("task") != "segment" or not data.get("config", {}).get("interactive"):
        return _("{folder} is not an interactive model: fine-tune one with 'Interactive' checked (Fine-tune section), "
                 "or run this model with Run a model.").format(folder=modelFolder)
    return ""


class InteractivePanel:
    """Owns the worker, the two point lists' observers and the segments being drawn."""

    def __init__(self, ui, python: str, environment, workBase: Path, onChanged=None) -> None:
        self.ui, self.python, self.environment, self.workBase = ui, python, environment, workBase
        self.onChanged = onChanged or (lambda: None)
        self.session = None
        self.inputNode = self.segmentationNode = None
        self.segmentId = ""
        self.lists = {}
        self.observations = []
        self.pendingAccept = None  # (nextSegment, onAccepted) while Accept waits for the answer in flight
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self.poll)

    @property
    def running(self) -> bool:
        return self.session is not None and self.session.job.running

    @property
    def accepting(self) -> bool:
        return self.pendingAccept is not None

    # ---- start and stop
    def start(self, modelFolder: str, inputNode, segmentationNode, device: str) -> None:
        problem = modelProblem(modelFolder)
        if problem:
            raise ValueError(problem)
        folder = nodeio.work_folder(self.workBase, "interactive")
        volume = nodeio.write_volume(inputNode, folder / nodeio.INPUT_VOLUME)
        self.inputNode, self.segmentationNode = inputNode, segmentationNode
        segmentationNode.CreateDefaultDisplayNodes()  # a node made by the combo's "add" has none: nothing would show
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(inputNode)
        for kind in ("include", "exclude"):
            self.lists[kind] = self.pointList(kind)
            self.lists[kind].RemoveAllControlPoints()  # an earlier session's points are not this volume's
            placeWidget = getattr(self.ui, f"{kind}PlaceWidget")
            placeWidget.setCurrentNode(self.lists[kind])
            placeWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        job = jobs.Job(serveCommand(self.python, modelFolder, device), env=self.environment, requests=True)
        self.session = clicksession.ClickSession(job, [str(volume)], folder)
        self.newSegment()
        self.observe()
        self.timer.start()

    def stop(self, report=None) -> None:
        """End the worker cleanly (end of input; a bounded graceful stop if it does not go) and stop placing."""
        self.timer.stop()
        self.unobserve()
        for kind in ("include", "exclude"):
            placeWidget = getattr(self.ui, f"{kind}PlaceWidget")
            placeWidget.setPlaceModeEnabled(False)
        if self.session is not None:
            self.session.job.close_requests()
            self.session.job.shutdown(timeout_s=10, saving_s=0, report=report)
        self.session, self.pendingAccept = None, None

    def pointList(self, kind: str):
        """The include / exclude point list, reused if the scene has it."""
        name = f"RubikSSL {kind}"
        node = slicer.mrmlScene.GetFirstNodeByName(name)
        if node is None or not node.IsA("vtkMRMLMarkupsFiducialNode"):
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
            node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().SetSelectedColor(*COLORS[kind])
        return node

    def newSegment(self) -> None:
        segmentation = self.segmentationNode.GetSegmentation()
        self.segmentId = segmentation.AddEmptySegment("", f"RubikSSL {segmentation.GetNumberOfSegments() + 1}")
        self.session.target = self.segmentId

    # ---- points
    def observe(self) -> None:
        for node in self.lists.values():
            for event in POINT_EVENTS:
                self.observations.append((node, node.AddObserver(getattr(slicer.vtkMRMLMarkupsNode, event), self.onPoints)))

    def unobserve(self) -> None:
        for node, tag in self.observations:
            node.RemoveObserver(tag)
        self.observations = []

    def onPoints(self, caller=None, event=None) -> None:
        if self.session is not None and not self.accepting:
            self.session.set_points(clicksession.defined_points(self.lists["include"]),
                                    clicksession.defined_points(self.lists["exclude"]))

    def undo(self) -> None:
        kind = self.session.undo_target() if self.session and not self.accepting else None
        if kind is not None:
            node = self.lists[kind]
            node.RemoveNthControlPoint(node.GetNumberOfControlPoints() - 1)  # observed: a new request (or a clear)

    def accept(self, nextSegment: bool, onAccepted) -> None:
        """Keep the segment as it is once the answer in flight has arrived (onAccepted() is then called, to keep
        the case), clear the points (without a request), and optionally start a new segment."""
        if self.session is None or self.accepting:
            return
        self.pendingAccept = (nextSegment, onAccepted)
        self.ui.interactiveStatusLabel.text = _("Accepting: waiting for the answer to the last points...")
        self.poll()

    def _finishAccept(self) -> None:
        nextSegment, onAccepted = self.pendingAccept
        self.pendingAccept = None
        self.unobserve()
        try:
            onAccepted()
        finally:
            for node in self.lists.values():
                node.RemoveAllControlPoints()
            self.session.clear()
            if nextSegment:
                self.newSegment()
            self.observe()
            self.onChanged()

    # ---- results
    def poll(self) -> None:
        if self.session is None:
            return
        answers = self.session.poll()
        if not self.session.job.running:
            error = self.session.job.state.error or self.session.job.state.status
            self.stop()
            self.ui.interactiveStatusLabel.text = _("The interactive worker stopped ({error}); press Start interactive "
                                                    "to start it again.").format(error=error)
            self.onChanged()
            return
        for answer in answers:
            self.apply(answer)
        if self.accepting and self.session.settled:
            self._finishAccept()

    def apply(self, answer: clicksession.Result) -> None:
        """One answer into the segment it was asked for (its target), in memory."""
        import numpy as np

        if answer.error:
            self.ui.interactiveStatusLabel.text = _("Not segmented: {error}").format(error=answer.error)
            return
        segmentation = self.segmentationNode.GetSegmentation()
        if segmentation.GetSegment(answer.target) is None:
            return  # the user deleted that segment meanwhile
        if answer.cleared:
            results.updateSegmentFromRegion(self.segmentationNode, answer.target, self.inputNode, np.zeros((1, 1, 1)), (0, 0, 0))
            self.ui.interactiveStatusLabel.text = _("No points: the segment is empty.")
            return
        region = np.load(answer.path, allow_pickle=False)
        answer.path.unlink(missing_ok=True)
        voxels = results.updateSegmentFromRegion(self.segmentationNode, answer.target, self.inputNode, region,
                                                 answer.start_kji)
        self.ui.interactiveStatusLabel.text = _("{voxels} voxels, {seconds:.2f} s (worker) for {clicks} points").format(
            voxels=voxels, seconds=answer.reply.get("seconds", 0.0), clicks=answer.reply.get("clicks", 0))
