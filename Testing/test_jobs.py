"""The worker protocol exactly as the Slicer panel uses it: RubikSSLLib.jobs runs the real command line in its own
process group and parses its output; and the node <-> file geometry conversions the module relies on."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import shared
from RubikSSLLib import rundir
from RubikSSLLib.errors import BadInput
from RubikSSLLib.jobs import Job, JobState, command_line, worker_environment
from RubikSSLLib.slicergeometry import RAS_FROM_LPS, crop_to_ras_box, geometry_from_ijk_to_ras, ijk_to_ras_from_geometry
from RubikSSLLib.volumes import geometry_of

TINY = {"cube_size": 12, "jitter": 2, "spacing": "native", "widths": "8,16,32", "batch_size": 4, "val_puzzles": 8,
        "intensity": "none"}


def pretrain_job(data: Path, run: Path, steps: int, **kwargs) -> Job:
    args = command_line(sys.executable, "pretrain", {"data": [str(data)], "out": str(run), "steps": steps,
                                                     "eval_every": max(1, steps // 2), **TINY})
    return Job(args, run_dir=run, cwd=str(Path(__file__).resolve().parents[1]), **kwargs)


def wait_for_step(job: Job, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while job.running and job.state.step < step:
        job.poll()
        assert time.monotonic() < deadline, "no progress from the worker"
        time.sleep(0.05)


def test_command_line_spells_options_as_the_cli_reads_them() -> None:
    args = command_line("python", "pretrain", {"data": ["a.nii", "b.nii"], "steps": 5, "resume": True, "seed": None,
                                               "skip_unusable": False})
    assert args == ["python", "-m", "RubikSSLLib", "pretrain", "--data", "a.nii", "b.nii", "--steps", "5", "--resume",
                    "--progress", "json"]
    env = worker_environment({"PYTHONPATH": "/elsewhere"}, cpu_only=True)
    assert env["PYTHONPATH"].split(os.pathsep)[1] == "/elsewhere" and env["CUDA_VISIBLE_DEVICES"] == "-1"


def test_job_reports_monotone_progress_metrics_and_done(small_adrenal: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    job = pretrain_job(small_adrenal, run, steps=6)
    fractions = []
    events = []
    while job.running:
        new = job.poll()
        events += new
        fractions += [e["fraction"] for e in new if e["event"] == "progress"]
        time.sleep(0.05)
    assert job.state.exit_code == 0 and job.state.status == "ok", job.state.log[-5:]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert "val_ordering_acc" in job.state.metrics
    assert events[-1]["event"] == "done"
    assert Path(job.state.artifact("model")) == run / rundir.BEST_MODEL


@pytest.mark.slow
@pytest.mark.parametrize("stop_grace_s", [60.0, 0.0], ids=["stop_file", "sigterm_to_group"])
def test_cancel_checkpoints_exits_3_and_resumes(small_adrenal: Path, tmp_path: Path, stop_grace_s: float) -> None:
    run = tmp_path / "run"
    job = pretrain_job(small_adrenal, run, steps=100000, stop_grace_s=stop_grace_s)
    wait_for_step(job, 3)
    job.cancel()
    state = job.wait(timeout=120)
    assert state.exit_code == 3 and state.status == "cancelled", state.log[-5:]
    from test_training import load_state

    step = load_state(run)["step"]
    assert step >= 3
    resumed = Job(command_line(sys.executable, "pretrain", {"data": [str(small_adrenal)], "out": str(run),
                                                            "steps": step + 1, "resume": True, **TINY}), run_dir=run)
    assert resumed.wait(timeout=300).exit_code == 0, resumed.state.log[-5:]


def test_kill_ends_the_whole_process_group(small_adrenal: Path, tmp_path: Path) -> None:
    job = pretrain_job(small_adrenal, tmp_path / "run", steps=100000)
    wait_for_step(job, 1)
    job.kill()
    job.wait(timeout=30)
    assert job.state.status == "failed" and "signal" in job.state.error
    if sys.platform != "win32":
        with pytest.raises(ProcessLookupError):
            os.killpg(job.process.pid, 0)


def test_bad_input_gives_exit_2_and_an_error_event(tmp_path: Path) -> None:
    flat = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.Image(40, 40, 1, sitk.sitkFloat32), str(flat))
    job = pretrain_job(flat, tmp_path / "run", steps=3)
    state = job.wait(timeout=120)
    assert state.exit_code == 2 and state.status == "failed"
    assert "flat.nrrd" in state.error


def test_job_state_outcome_follows_the_exit_code_without_a_done_event() -> None:
    state = JobState()
    state.feed('@rubikssl {"event": "progress", "step": 4, "total": 8, "fraction": 0.5}')
    state.feed('@rubikssl {"event": "progress", "step": 2, "total": 8, "fraction": 0.25}')
    state.feed("Traceback: something broke")
    assert state.fraction == 0.5
    state.finish(-9)
    assert state.status == "failed" and "signal 9" in state.error


def test_the_workers_done_event_decides_and_a_requested_cancel_is_never_a_failure() -> None:
    launcher_killed = JobState()  # the real worker checkpointed and said so; its launcher died of the SIGTERM
    launcher_killed.feed('@rubikssl {"event": "done", "status": "cancelled", "exit_code": 3}')
    launcher_killed.finish(-15)
    assert launcher_killed.status == "cancelled"
    escalated = JobState(cancel_requested=True)  # the user cancelled and it had to be killed
    escalated.finish(-9)
    assert escalated.status == "cancelled"
    unasked = JobState()
    unasked.finish(-15)
    assert unasked.status == "failed"


STAND_IN_LAUNCHER = """
import subprocess, sys
# like PythonSlicer: start the real interpreter as a child in the same process group and wait for it
child = subprocess.Popen([sys.executable, *sys.argv[2:]])
open(sys.argv[1], "w").write(str(child.pid))
sys.exit(child.wait())
"""


def launched_job(tmp_path: Path, data: Path, run: Path, **kwargs) -> tuple[Job, Path]:
    launcher, child_pid = tmp_path / "launcher.py", tmp_path / "child.pid"
    launcher.write_text(STAND_IN_LAUNCHER)
    args = command_line(sys.executable, "pretrain", {"data": [str(data)], "out": str(run), "steps": 100000,
                                                     "eval_every": 50000, **TINY})
    job = Job([sys.executable, str(launcher), str(child_pid), *args[1:]], run_dir=run,
              cwd=str(Path(__file__).resolve().parents[1]), **kwargs)
    return job, child_pid


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="process groups and signals are POSIX")
def test_a_cancel_through_a_launcher_ends_cancelled_with_the_checkpoint(small_adrenal: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    job, _ = launched_job(tmp_path, small_adrenal, run, stop_grace_s=0.0)  # straight to SIGTERM of the group
    wait_for_step(job, 2)
    job.cancel()
    state = job.wait(timeout=120)
    assert state.status == "cancelled", (state.exit_code, state.log[-5:])
    assert (run / rundir.TRAINING_STATE).exists()


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="process groups and signals are POSIX")
def test_the_real_worker_dies_with_the_job_even_after_its_launcher_died(small_adrenal: Path, tmp_path: Path) -> None:
    job, child_pid = launched_job(tmp_path, small_adrenal, tmp_path / "run")
    wait_for_step(job, 1)
    worker = int(child_pid.read_text())
    os.kill(job.process.pid, 9)  # the launcher dies; the worker, its child, runs on
    job.process.wait()
    assert alive(worker)
    job.kill()
    deadline = time.monotonic() + 30
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(worker), "the worker outlived its killed launcher"


@pytest.mark.slow
def test_a_command_without_a_run_folder_is_cancelled_by_its_stop_file(tmp_path: Path) -> None:
    """Inference, puzzles, the serve worker: the STOP file (the Windows path too) ends them as cancelled, exit 3."""
    stroke, lesion = shared("seg/stroke_t2/T2.nii.gz"), shared("seg/stroke_t2/lesionT2.nii.gz")
    datalist = tmp_path / "stroke.json"
    datalist.write_text(f'{{"training": [{{"image": "{stroke}", "label": "{lesion}"}}], '
                        f'"validation": [{{"image": "{stroke}", "label": "{lesion}"}}]}}')
    model = tmp_path / "model"
    training = Job(command_line(sys.executable, "finetune", {
        "task": "segment", "train": str(datalist), "val": str(datalist), "out": str(model), "spacing": 4,
        "patch_size": 16, "batch_size": 1, "epochs": 1, "iterations_per_epoch": 1, "widths": "8,16", "device": "cpu"}),
        run_dir=model, cwd=str(Path(__file__).resolve().parents[1]))
    assert training.wait(timeout=300).status == "ok", training.state.log[-5:]
    worker = Job(command_line(sys.executable, "serve", {"model": str(model), "device": "cpu"}), requests=True,
                 cwd=str(Path(__file__).resolve().parents[1]))
    deadline = time.monotonic() + 120
    while not any(line.startswith("@rubikssl") for line in worker.state.log) and worker.state.fraction == 0:
        events = worker.poll()
        if any(e["event"] == "ready" for e in events):
            break
        assert time.monotonic() < deadline and worker.running, worker.state.log[-5:]
        time.sleep(0.05)
    worker.cancel()
    state = worker.wait(timeout=60)
    assert state.exit_code == 3 and state.status == "cancelled", state.log[-5:]
    assert not worker._signals_sent  # the STOP file did it: no signal was needed


# --- geometry between Slicer nodes (KJI array + IJKToRAS) and files (LPS) ---

def test_ijk_to_ras_round_trips_and_matches_the_nrrd_header_of_a_real_oblique_volume(tmp_path: Path) -> None:
    source = sitk.ReadImage(str(shared("pretrain/msl_patient20_study2_FLAIR.nii.gz")))  # oblique, 0.9 x 0.9 x 3 mm
    path = tmp_path / "flair.nrrd"
    sitk.WriteImage(source, str(path))
    geometry = geometry_of(source)
    ijk_to_ras = ijk_to_ras_from_geometry(geometry)
    assert geometry_from_ijk_to_ras(ijk_to_ras).matches(geometry, tolerance=1e-6)
    header = nrrd.read_header(str(path))
    assert header["space"] == "left-posterior-superior"
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.asarray(header["space directions"], dtype=float).T
    ijk_to_lps[:3, 3] = header["space origin"]
    np.testing.assert_allclose(RAS_FROM_LPS @ ijk_to_lps, ijk_to_ras, atol=1e-4)
    # KJI: the array Slicer hands over is indexed [k, j, i]
    array_kji = sitk.GetArrayViewFromImage(source)
    for i, j, k in [(0, 0, 0), (200, 31, 17), (255, 255, 43)]:
        assert array_kji[k, j, i] == source.GetPixel(i, j, k)
        lps = source.TransformIndexToPhysicalPoint((i, j, k))
        np.testing.assert_allclose((ijk_to_ras @ [i, j, k, 1])[:3], [-lps[0], -lps[1], lps[2]], atol=1e-4)


def test_crop_to_ras_box_keeps_voxels_in_place(tmp_path: Path) -> None:
    source = sitk.ReadImage(str(shared("pretrain/msl_patient20_study2_FLAIR.nii.gz")))
    array_kji = sitk.GetArrayFromImage(source)
    ijk_to_ras = ijk_to_ras_from_geometry(geometry_of(source))
    centre = (ijk_to_ras @ [128, 120, 20, 1])[:3]
    bounds = (centre[0] - 20, centre[0] + 20, centre[1] - 25, centre[1] + 25, centre[2] - 10, centre[2] + 10)
    cropped, moved = crop_to_ras_box(array_kji, ijk_to_ras, bounds)
    assert 0 < cropped.size < array_kji.size
    # voxel (0,0,0) of the crop sits where its source voxel sits, and holds the same value
    start_ijk = np.rint(np.linalg.inv(ijk_to_ras) @ moved[:, 3])[:3].astype(int)
    np.testing.assert_array_equal(cropped, array_kji[start_ijk[2]:start_ijk[2] + cropped.shape[0],
                                                     start_ijk[1]:start_ijk[1] + cropped.shape[1],
                                                     start_ijk[0]:start_ijk[0] + cropped.shape[2]])
    # every box corner lies inside the crop's index range
    corners = np.array([[x, y, z, 1] for x in bounds[0:2] for y in bounds[2:4] for z in bounds[4:6]])
    ijk = (np.linalg.inv(moved) @ corners.T)[:3].T
    assert np.all(ijk > -1) and np.all(ijk < np.array(cropped.shape[::-1]))
    with pytest.raises(BadInput, match="ROI"):
        crop_to_ras_box(array_kji, ijk_to_ras, (1e4, 1e4 + 1, 1e4, 1e4 + 1, 1e4, 1e4 + 1))


def test_the_windows_kill_opens_no_console_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """taskkill is a console program: started from Slicer (a GUI program) without CREATE_NO_WINDOW it flashes one."""
    from RubikSSLLib import jobs

    calls = []
    job = Job.__new__(Job)
    job._signals_sent, job.process = set(), type("Process", (), {"pid": 4242})()
    monkeypatch.setattr(jobs.sys, "platform", "win32")
    monkeypatch.setattr(jobs.subprocess, "CREATE_NO_WINDOW", 0x08000000, raising=False)
    monkeypatch.setattr(jobs.subprocess, "run", lambda args, **kwargs: calls.append((args, kwargs)))
    job._signal("kill")
    (args, kwargs), = calls
    assert args == ["taskkill", "/T", "/F", "/PID", "4242"] and kwargs["creationflags"] == 0x08000000
