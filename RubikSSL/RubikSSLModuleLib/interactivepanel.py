"""The panel's "Interactive" section: include / exclude points placed with Slicer's own markups widgets update one
segment through a `rubikssl serve` worker (RubikSSLLib.clicksession talks to it; torch never runs in Slicer).

Start loads the model once in the worker and writes the input volume once; every added, moved or removed point
then sends the current points (one request at a time, the newest state wins), and each result replaces the
chosen segment. Undo removes the last placed point, Accept keeps the segment and clears the points, Next segment
does the same and starts a new segment. The segment can be refined with the Segment Editor as usual.
"""

from pathlib import Path

import qt
import slicer
from slicer.i18n import tr as _

from RubikSSLLib import clicksession, jobs
from RubikSSLModuleLib import nodeio, results

POLL_INTERVAL_MS = 50
POINT_EVENTS = ("PointModifiedEvent", "PointPositionDefinedEvent", "PointRemovedEvent")
COLORS = {"include": (0.2, 0.8, 0.2), "exclude": (0.9, 0.2, 0.2)}


def serveCommand(python: str, modelFolder: str, device: str) -> list:
    """The worker's command line: `rubikssl serve` on the model, JSON events on stdout."""
    return jobs.command_line(python, "serve", {"model": modelFolder, "device": device})


class InteractivePanel:
    """Owns the worker, the two point lists' observers and the segment being drawn."""

    def __init__(self, ui, python: str, environment, workBase: Path) -> None:
        self.ui, self.python, self.environment, self.workBase = ui, python, environment, workBase
        self.session = None
        self.inputNode = self.segmentationNode = None
        self.segmentId = ""
        self.lists = {}
        self.observations = []
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self.poll)

    @property
    def running(self) -> bool:
        return self.session is not None and self.session.job.running

    # ---- start and stop
    def start(self, modelFolder: str, inputNode, segmentationNode, device: str) -> None:
        folder = nodeio.work_folder(self.workBase, "interactive")
        volume = nodeio.write_volume(inputNode, folder / nodeio.INPUT_VOLUME)
        job = jobs.Job(serveCommand(self.python, modelFolder, device), env=self.environment, requests=True)
        self.session = clicksession.ClickSession(job, [str(volume)], folder)
        self.inputNode, self.segmentationNode = inputNode, segmentationNode
        segmentationNode.CreateDefaultDisplayNodes()  # a node made by the combo's "add" has none: nothing would show
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(inputNode)
        self.newSegment()
        for kind in ("include", "exclude"):
            self.lists[kind] = self.pointList(kind)
            placeWidget = getattr(self.ui, f"{kind}PlaceWidget")
            placeWidget.setCurrentNode(self.lists[kind])
            placeWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        self.observe()
        self.timer.start()

    def stop(self) -> None:
        """End the worker cleanly (end of input; a bounded graceful stop if it does not go)."""
        self.timer.stop()
        self.unobserve()
        if self.session is not None:
            self.session.job.close_requests()
            self.session.job.shutdown(timeout_s=10)
        self.session = None

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
        if self.session is not None:
            self.session.set_points(clicksession.defined_points(self.lists["include"]),
                                    clicksession.defined_points(self.lists["exclude"]))

    def undo(self) -> None:
        kind = self.session.undo_target() if self.session else None
        if kind is not None:
            node = self.lists[kind]
            node.RemoveNthControlPoint(node.GetNumberOfControlPoints() - 1)  # observed: a new request follows

    def accept(self, nextSegment: bool = False) -> None:
        """Keep the segment as it is and clear the points (without a request); optionally start a new segment."""
        self.unobserve()
        for node in self.lists.values():
            node.RemoveAllControlPoints()
        self.session.clear()
        self.observe()
        if nextSegment:
            self.newSegment()

    # ---- results
    def poll(self) -> None:
        result = self.session.poll() if self.session else None
        if self.session is not None and not self.session.job.running:
            self.ui.interactiveStatusLabel.text = _("The interactive worker stopped: {error}").format(
                error=self.session.job.state.error or self.session.job.state.status)
            self.stop()
            return
        if result is None:
            return
        if result.path is None:
            self.ui.interactiveStatusLabel.text = _("Not segmented: {error}").format(error=result.error)
            return
        voxels = results.loadIntoSegment(result.path, self.segmentationNode, self.segmentId, self.inputNode)
        result.path.unlink(missing_ok=True)
        self.ui.interactiveStatusLabel.text = _("{voxels} voxels, {seconds:.2f} s (worker) for {clicks} points").format(
            voxels=voxels, seconds=result.reply.get("seconds", 0.0), clicks=result.reply.get("clicks", 0))
