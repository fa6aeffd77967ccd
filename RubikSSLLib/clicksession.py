"""The Slicer panel's interactive segmentation without Qt or Slicer: points, undo, and the `serve` worker's requests.

The panel hands over the current include / exclude points (RAS mm, as Slicer's markups give them) whenever one
is added, moved or removed; the session sends the worker one request at a time and, when points change while a
request is in flight, sends only the newest state once the reply is in (so a fast series of clicks never queues
stale work, and the GUI never waits: `poll` never blocks).

Every request carries the `target` it was made for (the panel's segment): its reply goes there, even if the user
has moved on to the next segment since. A reply older than a result already applied to its target (a point list
emptied after it was sent) is dropped. With no points left the answer needs no worker: an empty result ("clear").
`settled` says that no answer is pending: Accept waits for it, so a case is never kept without its last
correction. Each result is the region the model predicted, as a .npy file of the input volume's voxels and the
region's place on its grid. Imports neither torch nor SimpleITK.
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
    """A finished request for `target`: the region's labels file (None when cleared or refused), where the region
    starts on the input volume's grid (k, j, i), and the worker's reply."""

    target: str
    path: Path | None
    reply: dict[str, Any]
    error: str = ""
    start_kji: tuple[int, int, int] = (0, 0, 0)

    @property
    def cleared(self) -> bool:
        """No points: the segment is to be emptied."""
        return self.path is None and not self.error


@dataclass
class ClickSession:
    """Interactive segments on one volume. `job`: a running `rubikssl serve` (jobs.Job with requests=True);
    volume_files: the case's channel files as the worker reads them; results go to `folder`; `target`: what the
    next request is for (the panel's segment ID)."""

    job: Job
    volume_files: list[str]
    folder: Path
    target: str = ""
    include: list[Point] = field(default_factory=list)
    exclude: list[Point] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # "include" / "exclude" of each point, in placing order
    ready: bool = False
    in_flight: tuple[int, str, int] | None = None  # (request id, target, generation)
    dirty: bool = False
    sent: int = 0
    generation: int = 0  # counts point changes and clears
    applied: dict[str, int] = field(default_factory=dict)  # target -> generation of its newest result
    pending: list[Result] = field(default_factory=list)  # answers that need no worker (clears)
    last_result: Result | None = None

    def set_points(self, include: list[Point], exclude: list[Point]) -> None:
        """The current points of both lists; a change (add, move, delete) asks for a new result."""
        include, exclude = [tuple(map(float, p)) for p in include], [tuple(map(float, p)) for p in exclude]
        if (include, exclude) == (self.include, self.exclude):
            return
        self._follow_order("include", len(self.include), len(include))
        self._follow_order("exclude", len(self.exclude), len(exclude))
        self.include, self.exclude = include, exclude
        self.generation += 1
        if include or exclude:
            self.dirty = True
            self._send_if_free()
        else:  # undo of the last point, or "delete all": an empty segment, now
            self.dirty = False
            self.pending.append(Result(self.target, None, {"clicks": 0}))
            self.applied[self.target] = self.generation

    def _follow_order(self, kind: str, before: int, after: int) -> None:
        if after > before:
            self.order += [kind] * (after - before)
        for _ in range(before - after):  # removed: forget the newest of that kind
            index = len(self.order) - 1 - self.order[::-1].index(kind)
            del self.order[index]

    def undo_target(self) -> str | None:
        """Which list holds the last placed point ("include" / "exclude"): the panel removes that list's last point."""
        return self.order[-1] if self.order else None

    def clear(self, target: str | None = None) -> None:
        """Accept / next segment: the points are gone (nothing is sent) and the next click starts a new object,
        for `target` if given. A request in flight still answers for the target it was made for."""
        self.include, self.exclude, self.order = [], [], []
        self.dirty = False
        self.generation += 1
        self.last_result = None
        if target is not None:
            self.target = target

    @property
    def busy(self) -> bool:
        return self.in_flight is not None

    @property
    def settled(self) -> bool:
        """Nothing is on its way: no request in flight, no change waiting to be sent, no answer not yet handed out."""
        return not self.busy and not self.dirty and not self.pending

    def request(self) -> dict[str, Any]:
        self.sent += 1
        clicks = [{"position": list(p), "include": True} for p in self.include] + \
                 [{"position": list(p), "include": False} for p in self.exclude]
        return {"id": self.sent, "volume": self.volume_files, "clicks": clicks, "coordinateSystem": "RAS",
                "out": str(self.folder / f"click_{self.sent}.npy")}

    def _send_if_free(self) -> None:
        if not self.ready or self.busy or not self.dirty or not (self.include or self.exclude):
            return
        request = self.request()
        if self.job.send(request):
            self.in_flight, self.dirty = (request["id"], self.target, self.generation), False

    def poll(self) -> list[Result]:
        """Drain the worker's events (never blocks): the results to apply now, oldest first."""
        results, self.pending = self.pending, []
        for event in self.job.poll():
            if event.get("event") == "ready":
                self.ready = True
            elif event.get("event") == "result" and self.in_flight and event.get("id") == self.in_flight[0]:
                _, target, generation = self.in_flight
                self.in_flight = None
                if generation < self.applied.get(target, -1):
                    continue  # its target was cleared (or answered anew) since it was sent
                self.applied[target] = generation
                ok = bool(event.get("ok"))
                start = tuple(int(v) for v in event.get("start_kji", (0, 0, 0)))
                results.append(Result(target, Path(event["out"]) if ok else None, event,
                                      "" if ok else event.get("error", "refused"), start))
        if results:
            self.last_result = results[-1]
        self._send_if_free()
        return results
