"""The Slicer panel's behaviour outside Slicer: the job state machine (every transition, scene close, application
close, a killed launcher), the node <-> file helpers, the dependency install, and the markups -> clicks path."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO, shared

sys.path.insert(0, str(REPO / "RubikSSL"))

from RubikSSLLib import clicks, clicksession, slicergeometry  # noqa: E402
from RubikSSLLib.jobs import JobState  # noqa: E402
from RubikSSLLib.volumes import geometry_of  # noqa: E402
from RubikSSLModuleLib import install, jobcontrol, nodeio  # noqa: E402

TEXTS = {"pretrain": "Start pretraining", "run": "Run", "scramble": "Scramble"}


class FakeJob:
    """A worker as jobs.Job shows it: `poll` hands out queued events; `finish` ends it as the real JobState does."""

    def __init__(self) -> None:
        self.state, self.queued, self.running = JobState(), [], True
        self.cancelled = self.shut_down = 0

    def emit(self, line: str) -> None:
        self.queued.append(line)

    def finish(self, exit_code: int) -> None:
        self.exit_code = exit_code

    def poll(self) -> list[dict]:
        events = [e for e in map(self.state.feed, self.queued) if e]
        self.queued = []
        if getattr(self, "exit_code", None) is not None and self.running:
            self.state.finish(self.exit_code)
            self.running = False
        return events

    def cancel(self) -> None:
        self.cancelled += 1
        self.state.cancel_requested = True

    def shutdown(self, timeout_s: float) -> None:
        self.shut_down += 1
        self.finish(-15)
        self.poll()


def started(key: str = "pretrain", needs_scene: bool = False, on_finished=None) -> tuple[jobcontrol.JobControl, FakeJob]:
    control, job = jobcontrol.JobControl(dict(TEXTS)), FakeJob()
    assert control.press(key) == "start"
    control.start(key, job, needs_scene, on_finished)
    return control, job


def test_a_job_runs_shows_progress_and_returns_the_panel_to_idle_with_the_buttons_own_texts() -> None:
    control, job = started(on_finished=lambda state: f"finished: {state.metrics}")
    view = control.view()
    assert view.state == jobcontrol.RUNNING and view.progress == jobcontrol.PROGRESS_BUSY and view.busy
    assert control.button_text("pretrain") == "Cancel" and control.button_text("run") == "Run"
    assert control.button_enabled("pretrain", ready=True) and not control.button_enabled("run", ready=True)
    job.emit('@rubikssl {"event": "progress", "step": 5, "total": 10, "fraction": 0.5}')
    job.emit('@rubikssl {"event": "metric", "step": 5, "val_loss": 0.25}')
    job.emit("a log line")
    control.poll()
    assert control.view().progress == 500 and "val_loss 0.250" in control.view().status
    assert control.new_log_lines() == ["a log line"] and control.new_log_lines() == []
    job.emit('@rubikssl {"event": "done", "status": "ok", "exit_code": 0, "val_loss": 0.2}')
    job.finish(0)
    control.poll()
    assert control.state == jobcontrol.IDLE and control.view().progress is None and not control.view().busy
    assert control.status.startswith("finished") and control.take_error() == ""
    assert [control.button_text(k) for k in TEXTS] == list(TEXTS.values())
    assert control.button_enabled("run", ready=True) and not control.button_enabled("run", ready=False)


def test_cancel_shows_cancelling_and_ends_cancelled_even_when_the_launcher_is_killed() -> None:
    control, job = started()
    assert control.press("run") == "ignore" and not job.cancelled  # another button does nothing while a job runs
    assert control.press("pretrain") == "cancel" and job.cancelled == 1
    assert control.view().state == jobcontrol.CANCELLING and control.button_text("pretrain") == "Cancelling..."
    assert control.press("pretrain") == "ignore" and job.cancelled == 1  # pressing again neither re-cancels ...
    assert not control.button_enabled("pretrain", ready=True)
    job.emit('@rubikssl {"event": "done", "status": "cancelled", "exit_code": 3}')
    job.finish(-15)  # ... nor matters that PythonSlicer, the launcher, died of the SIGTERM
    control.poll()
    assert control.state == jobcontrol.IDLE and control.job.state.status == "cancelled"
    assert control.take_error() == "" and "Resume" in control.status
    assert control.button_text("pretrain") == "Start pretraining"  # ... nor loses the label


def test_a_failure_is_shown_once_and_a_result_that_cannot_load_does_not_leave_the_panel_stuck() -> None:
    control, job = started()
    job.emit('@rubikssl {"event": "error", "message": "x.nii: unreadable", "exit_code": 2}')
    job.finish(2)
    control.poll()
    assert control.state == jobcontrol.IDLE and control.take_error() == "x.nii: unreadable" and control.take_error() == ""

    def broken(state):
        raise RuntimeError("the node vanished")

    control.start("run", job := FakeJob(), needs_scene=True, on_finished=broken)
    job.finish(0)
    control.poll()
    assert control.state == jobcontrol.IDLE and "the node vanished" in control.take_error()


def test_scene_close_cancels_a_job_that_loads_into_the_scene_and_drops_its_result() -> None:
    loaded = []
    control, job = started("run", needs_scene=True, on_finished=lambda state: loaded.append(state) or "loaded")
    control.scene_closing()
    assert job.cancelled == 1 and control.view().state == jobcontrol.CANCELLING
    job.finish(0)  # it finished anyway: nothing is loaded into the new scene
    control.poll()
    assert loaded == [] and control.state == jobcontrol.IDLE and control.view().progress is None
    assert control.button_text("run") == "Run" and control.button_enabled("scramble", ready=True)


def test_scene_close_leaves_training_running_and_the_next_jobs_log_starts_at_its_first_line() -> None:
    control, job = started("pretrain", needs_scene=False)
    job.emit("line of the first job")
    control.poll()
    control.new_log_lines()
    control.scene_closing()
    assert job.cancelled == 0 and control.state == jobcontrol.RUNNING
    job.finish(0)
    control.poll()
    second = FakeJob()
    control.start("scramble", second, needs_scene=True)
    second.emit("first line of the second job")
    control.poll()
    assert control.new_log_lines() == ["first line of the second job"]


def test_closing_slicer_stops_the_job_gracefully_and_a_second_start_is_refused_while_busy() -> None:
    control, job = started()
    with pytest.raises(RuntimeError):
        control.start("run", FakeJob(), needs_scene=True)
    control.application_closing()
    assert job.shut_down == 1 and control.state == jobcontrol.IDLE  # shutdown: STOP, then escalate; never a kill first


# --- nodes and files

def test_every_segment_is_exported_in_order_hidden_ones_too() -> None:
    class Segmentation:
        segments = [("Segment_1", "tumour", True), ("Segment_7", "oedema", False), ("Segment_3", "cyst", True)]

        def GetNumberOfSegments(self):
            return len(self.segments)

        def GetNthSegmentID(self, index):
            return self.segments[index][0]

        def GetSegment(self, segment_id):
            name = next(n for i, n, _ in self.segments if i == segment_id)
            return types.SimpleNamespace(GetName=lambda: name)

    ids, names = nodeio.segments_in_order(Segmentation())
    assert ids == ["Segment_1", "Segment_7", "Segment_3"]
    assert names == {"1": "tumour", "2": "oedema", "3": "cyst"}  # the hidden oedema keeps its place


def test_work_folders_are_reused_and_emptied_and_file_names_are_fixed(tmp_path: Path) -> None:
    first = nodeio.work_folder(tmp_path, "inference")
    (first / "old.nrrd").write_text("x")
    again = nodeio.work_folder(tmp_path, "inference")
    assert again == first and not list(again.iterdir())
    (again / "keep.nrrd").write_text("x")
    assert (nodeio.work_folder(tmp_path, "inference", keep=True) / "keep.nrrd").exists()
    assert nodeio.pretraining_volume(3) == "volume_003.nrrd" and nodeio.SEGMENTATION_RESULT == "result.seg.nrrd"


def test_accepted_cases_gather_into_one_datalist(tmp_path: Path) -> None:
    for node_id, image in (("vtkMRMLScalarVolumeNode3", "a.nrrd"), ("vtkMRMLScalarVolumeNode7", "b.nrrd")):
        folder = tmp_path / nodeio.accepted_case(node_id)
        folder.mkdir()
        case = {"image": image, "label": "label.nrrd"}
        (folder / nodeio.DATALIST).write_text(json.dumps({"training": [case], "validation": [case]}))
    datalist = json.loads(nodeio.write_accepted_datalist(tmp_path).read_text())
    assert [c["image"] for c in datalist["training"]] == ["a.nrrd", "b.nrrd"] == [c["image"] for c in datalist["validation"]]
    assert nodeio.accepted_case("vtkMRMLScalarVolumeNode3") == "case_vtkMRMLScalarVolumeNode3"


def test_the_first_volume_offered_is_not_a_labelmap() -> None:
    class Node:
        def __init__(self, labelmap: bool) -> None:
            self.labelmap = labelmap

        def IsA(self, name):
            return name == "vtkMRMLLabelMapVolumeNode" and self.labelmap

    nodes = [Node(True), Node(False)]
    scene = types.SimpleNamespace(GetNumberOfNodesByClass=lambda cls: len(nodes),
                                  GetNthNodeByClass=lambda index, cls: nodes[index])
    assert nodeio.first_scalar_volume(scene) is nodes[1]
    nodes.pop()
    assert nodeio.first_scalar_volume(scene) is None


# --- dependencies

def test_packages_are_installed_with_the_installed_torch_pinned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    fake = types.ModuleType("slicer")
    fake.util = types.SimpleNamespace(pip_install=lambda args: calls.append(("pip_install", args)))
    monkeypatch.setitem(sys.modules, "slicer", fake)
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)  # Slicer 5.10: no slicer.packaging
    monkeypatch.setattr(install, "installed_versions", lambda names: {n: "2.5.1+cu121" for n in names})
    install.install(install.REQUIREMENTS, ">=2.3", tmp_path)
    (kind, args), = calls
    assert kind == "pip_install" and args[-2] == "-c" and args[:-2] == install.requirement_lines(install.REQUIREMENTS)
    assert Path(args[-1]).read_text() == "torch==2.5.1+cu121\n"
    packaging = types.ModuleType("slicer.packaging")  # Slicer 5.12: pip_ensure takes the constraint
    packaging.load_requirements = lambda path: ["parsed", path]
    packaging.pip_ensure = lambda requirements, constraints=None, requester=None: calls.append(("pip_ensure", constraints, requester))
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    fake.packaging = packaging
    install.install(install.REQUIREMENTS, ">=2.3", tmp_path)
    assert calls[-1][0] == "pip_ensure" and Path(calls[-1][1]).read_text() == "torch==2.5.1+cu121\n"


# --- markups -> clicks, on a real oblique volume

def test_markups_points_become_the_workers_voxels_on_a_real_oblique_volume() -> None:
    image = sitk.ReadImage(str(shared("pretrain/msl_patient20_study2_FLAIR.nii.gz")))
    geometry = geometry_of(image)
    ijk_to_ras = slicergeometry.ijk_to_ras_from_geometry(geometry)
    voxels_ijk = np.array([[100.0, 120.0, 20.0], [3.0, 7.0, 1.0]])
    ras = (ijk_to_ras @ np.c_[voxels_ijk, np.ones(2)].T)[:3].T

    class PointList:  # what vtkMRMLMarkupsFiducialNode offers; the third point is still being placed
        statuses = [clicksession.POSITION_DEFINED, clicksession.POSITION_DEFINED, 1]
        positions = [*ras, [0.0, 0.0, 0.0]]

        def GetNumberOfControlPoints(self):
            return 3

        def GetNthControlPointPositionStatus(self, index):
            return self.statuses[index]

        def GetNthControlPointPositionWorld(self, index, out):
            out[:] = self.positions[index]

    points = clicksession.defined_points(PointList())
    assert len(points) == 2
    session = clicksession.ClickSession(types.SimpleNamespace(send=lambda r: False, poll=lambda: []), ["v.nii"], Path("."))
    session.set_points(points[:1], points[1:])
    request = json.loads(json.dumps(session.request()))  # as the worker reads it
    parsed = clicks.parse({"coordinateSystem": request["coordinateSystem"], "clicks": request["clicks"]}, "request")
    np.testing.assert_allclose(clicks.to_voxels(parsed, geometry), voxels_ijk[:, ::-1], atol=1e-6)
    assert [c.include for c in parsed] == [True, False]
