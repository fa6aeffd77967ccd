"""The Slicer panel's interactive segmentation without Qt or Slicer: points, undo, and the `serve` worker's requests.

The panel hands over the current include / exclude points (RAS mm, as Slicer's markups give them) whenever one
is added, moved or removed; the session sends the worker one request at a time and, when points change while a
request is in flight, sends only the newest state once the reply is in (so a fast series of clicks never queues
stale work, and the GUI never waits: `poll` never blocks). Each result is a labelmap file on the input volume's
grid that the panel loads into the chosen segment. Imports neither torch nor SimpleITK.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from RubikSSLLib.jobs import Job

Point = tuple[float, float, float]  # RAS mm
POSITION_DEFINED = 2  # vtkMRMLMarkupsNode::PositionDefined (PositionUndefined 0, PositionPreview 1)


def defined_points(markups) -> list[Point]:
    """The placed control points of a Slicer markups point list, in world RAS mm (a point being placed, still
    following the mouse, is not one). `markups`: a vtkMRMLMarkupsFiducialNode or anything with its methods."""
    points = []
    for index in range(markups.GetNumberOfControlPoints()):
        if markups.GetNthControlPointPositionStatus(index) != POSITION_DEFINED:
            continue
        position = [0.0, 0.0, 0.0]
        markups.GetNthControlPointPositionWorld(index, position)
        points.append(tuple(float(v) for v in position))
    return points


@dataclass
class Result:
    """A finished request: the labelmap file (None when the worker refused it) and the worker's reply."""

    path: Path | None
    reply: dict[str, Any]
    error: str = ""


@dataclass
class ClickSession:
    """One interactive segment on one volume. `job`: a running `rubikssl serve` (jobs.Job with requests=True);
    volume_files: the case's channel files as the worker reads them; results go to `folder`."""

    job: Job
    volume_files: list[str]
    folder: Path
    include: list[Point] = field(default_factory=list)
    exclude: list[Point] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # "include" / "exclude" of each point, in placing order
    ready: bool = False
    in_flight: int | None = None
    dirty: bool = False
    sent: int = 0
    last_result: Result | None = None

    def set_points(self, include: list[Point], exclude: list[Point]) -> None:
        """The current points of both lists; a change (add, move, delete) asks for a new result."""
        include, exclude = [tuple(map(float, p)) for p in include], [tuple(map(float, p)) for p in exclude]
        if (include, exclude) == (self.include, self.exclude):
            return
        self._follow_order("include", len(self.include), len(include))
        self._follow_order("exclude", len(self.exclude), len(exclude))
        self.include, self.exclude = include, exclude
        self.dirty = True
        self._send_if_free()

    def _follow_order(self, kind: str, before: int, after: int) -> None:
        if after > before:
            self.order += [kind] * (after - before)
        for _ in range(before - after):  # removed: forget the newest of that kind
            index = len(self.order) - 1 - self.order[::-1].index(kind)
            del self.order[index]

    def undo_target(self) -> str | None:
        """Which list holds the last placed point ("include" / "exclude"): the panel removes that list's last point."""
        return self.order[-1] if self.order else None

    def clear(self) -> None:
        """Accept / next segment: the points are gone, the next click starts a new object."""
        self.include, self.exclude, self.order = [], [], []
        self.dirty = False
        self.last_result = None

    @property
    def busy(self) -> bool:
        return self.in_flight is not None

    def request(self) -> dict[str, Any]:
        self.sent += 1
        clicks = [{"position": list(p), "include": True} for p in self.include] + \
                 [{"position": list(p), "include": False} for p in self.exclude]
        return {"id": self.sent, "volume": self.volume_files, "clicks": clicks, "coordinateSystem": "RAS",
                "out": str(self.folder / f"click_{self.sent}.nrrd")}

    def _send_if_free(self) -> None:
        if not self.ready or self.busy or not self.dirty or not (self.include or self.exclude):
            return
        request = self.request()
        if self.job.send(request):
            self.in_flight, self.dirty = request["id"], False

    def poll(self) -> Result | None:
        """Drain the worker's events (never blocks); the newest finished result, if one arrived."""
        newest = None
        for event in self.job.poll():
            if event.get("event") == "ready":
                self.ready = True
            elif event.get("event") == "result" and event.get("id") == self.in_flight:
                self.in_flight = None
                ok = bool(event.get("ok"))
                newest = Result(Path(event["out"]) if ok else None, event, "" if ok else event.get("error", ""))
        if newest is not None:
            self.last_result = newest
        self._send_if_free()
        return newest
