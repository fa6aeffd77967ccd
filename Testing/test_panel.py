"""What the Slicer panel decides, in plain Python: the job state machine (every transition, scene close, application
close, a killed launcher, an install), the file-name helpers and the dependency install. What it does to MRML runs
on Slicer's own libraries in test_slicer_core.py."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "RubikSSL"))

from RubikSSLLib.jobs import JobState  # noqa: E402
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

    def shutdown(self, timeout_s: float, saving_s: float = 60.0, report=None) -> None:
        self.shut_down += 1
        if report is not None:
            report("saving its checkpoint, 3 s of at most 80 s")
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


def test_closing_slicer_stops_the_job_gracefully_says_what_it_waits_for_and_refuses_a_second_start() -> None:
    control, job = started()
    with pytest.raises(RuntimeError):
        control.start("run", FakeJob(), needs_scene=True)
    said = []
    control.application_closing(report=said.append)
    assert job.shut_down == 1 and control.state == jobcontrol.IDLE  # shutdown: STOP, then escalate; never a kill first
    assert said == ["Stopping the pretraining: saving its checkpoint, 3 s of at most 80 s"]


def test_while_an_install_runs_no_job_and_no_second_install_can_start() -> None:
    control = jobcontrol.JobControl(dict(TEXTS))
    assert control.begin_install() and not control.begin_install()  # one at a time
    assert control.view().busy and not any(control.button_enabled(key, ready=True) for key in TEXTS)
    assert control.press("pretrain") == "ignore"
    with pytest.raises(RuntimeError):
        control.start("pretrain", FakeJob(), needs_scene=False)
    control.end_install("Installed.")
    assert control.button_enabled("pretrain", ready=True) and control.view().status == "Installed."
    control, job = started()
    assert not control.begin_install()  # nor during a job


# --- nodes and files

def test_work_folders_are_reused_and_emptied_and_file_names_are_fixed(tmp_path: Path) -> None:
    first = nodeio.work_folder(tmp_path, "inference")
    (first / "old.nrrd").write_text("x")
    again = nodeio.work_folder(tmp_path, "inference")
    assert again == first and not list(again.iterdir())
    (again / "keep.nrrd").write_text("x")
    assert (nodeio.work_folder(tmp_path, "inference", keep=True) / "keep.nrrd").exists()
    assert nodeio.pretraining_volume(3) == "volume_003.nrrd" and nodeio.SEGMENTATION_RESULT == "result.seg.nrrd"


def test_accepted_cases_gather_into_one_datalist_under_stable_unique_names(tmp_path: Path) -> None:
    voxels = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    matrix = np.diag([-1.0, -1.0, 2.0, 1.0])
    name = nodeio.case_name("3: T1 / axial", nodeio.volume_digest(voxels, matrix))
    assert name.startswith("3_T1_axial-") and len(name) == len("3_T1_axial-") + 12
    assert name == nodeio.case_name("3: T1 / axial", nodeio.volume_digest(voxels.copy(), matrix))  # stable
    assert name != nodeio.case_name("3: T1 / axial", nodeio.volume_digest(voxels + 1, matrix))  # another patient
    for case, image in (("a-0", "a.nrrd"), ("b-1", "b.nrrd")):
        folder = tmp_path / nodeio.ACCEPTED_CASES / case
        folder.mkdir(parents=True)
        entry = {"image": image, "label": "label.nrrd"}
        (folder / nodeio.DATALIST).write_text(json.dumps({"training": [entry], "validation": [entry]}))
    datalist = json.loads(nodeio.write_accepted_datalist(tmp_path).read_text())
    assert [c["image"] for c in datalist["training"]] == ["a.nrrd", "b.nrrd"] == [c["image"] for c in datalist["validation"]]
    nodeio.remove_accepted_case(tmp_path, "a-0")
    assert [p.name for p in nodeio.accepted_cases(tmp_path)] == ["b-1"]
    with pytest.raises(ValueError):
        nodeio.remove_accepted_case(tmp_path, "../b-1")
    assert nodeio.next_round(tmp_path).name == "round_001"
    (tmp_path / nodeio.INTERACTIVE_ROUNDS / "round_007").mkdir(parents=True)
    assert nodeio.next_round(tmp_path).name == "round_008"


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
    packaging.pip_ensure = lambda requirements, constraints=None, prompt_install=True, requester=None: calls.append(
        ("pip_ensure", constraints, prompt_install))
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    fake.packaging = packaging
    install.install(install.REQUIREMENTS, ">=2.3", tmp_path)
    assert calls[-1][0] == "pip_ensure" and Path(calls[-1][1]).read_text() == "torch==2.5.1+cu121\n"
    assert calls[-1][2] is False  # the panel asked once: pip_ensure does not ask again


def test_a_missing_torch_is_installed_without_a_second_question(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = []
    fake = types.ModuleType("slicer")
    fake.util = types.SimpleNamespace(pip_install=lambda args: None)
    utils = types.ModuleType("PyTorchUtils")
    utils.PyTorchUtilsLogic = lambda: types.SimpleNamespace(
        installTorch=lambda askConfirmation, torchVersionRequirement: asked.append((askConfirmation, torchVersionRequirement)) or "torch")
    monkeypatch.setitem(sys.modules, "slicer", fake)
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", utils)
    versions = iter([{"torch": None}, {"torch": "2.9.0"}])
    monkeypatch.setattr(install, "installed_versions", lambda names: next(versions))
    install.install(install.REQUIREMENTS, ">=2.3", tmp_path)
    assert asked == [(False, ">=2.3")]


def test_an_older_torch_from_another_extension_is_named_with_what_to_do() -> None:
    assert install.torch_too_old("2.1.2+cu118", ">=2.3").startswith("PyTorch 2.1.2+cu118 is installed but RubikSSL needs torch>=2.3")
    assert "uninstall PyTorch" in install.torch_too_old("1.13.0", ">=2.3")
    assert install.torch_too_old("2.3.0", ">=2.3") == install.torch_too_old("2.10.1+cpu", ">=2.3") == ""
    assert install.torch_too_old(None, ">=2.3") == ""  # missing is another problem: installed on request
