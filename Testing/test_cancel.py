"""A cancel is never lost: SIGTERM, Ctrl-C or a STOP file at any moment of a command's life ends it with exit 3.

The start-up sweep sends the cancel at many delays after launch (while Python imports torch and MONAI, while the
data load, at the first steps), as a user pressing Cancel right after Start would; every one must end cancelled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, shared
from RubikSSLLib import rundir, stopping
from RubikSSLLib.errors import Cancelled
from RubikSSLLib.jobs import Job, command_line

STARTUP_DELAYS_S = (0.3, 1.0, 1.8, 2.5, 3.0, 3.5, 4.0, 5.0, 7.0)


def pretrain_options(run: Path) -> dict:
    """`rubikssl pretrain` on two real MS FLAIRs (cube 16, batch 2), long enough never to finish by itself."""
    flairs = [str(shared(f"pretrain/msl_patient{p}_FLAIR.nii.gz")) for p in ("01_study1", "20_study2")]
    return {"data": flairs, "out": str(run), "cube_size": 16, "batch_size": 2, "steps": 100000, "eval_every": 50000,
            "widths": "8,16", "shortcut_puzzles": 0}


def pretrain_command(run: Path) -> list[str]:
    """The command with the default progress bar (what a user at a terminal has), not the panel's JSON."""
    return command_line(sys.executable, "pretrain", pretrain_options(run))[:-2]


def test_the_stop_state_survives_an_exception_that_was_swallowed() -> None:
    """What MONAI's optional import and torch's CUDA preload do to an exception: catch it. The state stays."""
    stopping.reset()
    with stopping.cancel_on_signal():
        try:
            try:
                signal.raise_signal(signal.SIGTERM)
            except Exception:  # noqa: BLE001 - a library's broad except: Cancelled is not an Exception
                pytest.fail("Cancelled was caught by `except Exception`")
        except Cancelled:
            pass
        assert stopping.requested()
        with stopping.StopSignal() as stop:  # a loop entered later still sees it at its first check
            assert stop.received
            signal.raise_signal(signal.SIGTERM)  # inside a loop: recorded, not raised
    with pytest.raises(Cancelled):
        stopping.check()
    stopping.reset()
    assert not stopping.requested()


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("delay", STARTUP_DELAYS_S)
def test_sigterm_at_any_moment_of_start_up_ends_cancelled(tmp_path: Path, delay: float) -> None:
    run = tmp_path / "run"
    process = subprocess.Popen(pretrain_command(run), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    time.sleep(delay)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 3, f"SIGTERM at {delay} s: exit {process.returncode}: {stderr[-600:]}"
    assert "cancelled" in stderr
    assert not (run / rundir.STOP).exists()


@pytest.mark.slow
@pytest.mark.parametrize("delay", STARTUP_DELAYS_S[::2])
def test_a_stop_file_at_any_moment_of_start_up_ends_cancelled(tmp_path: Path, delay: float) -> None:
    """The panel's Cancel (a STOP file in the run folder), pressed right after Start: before the worker has even
    started Python, while it loads, or once it trains. A STOP written after the launch is this run's, never stale."""
    run = tmp_path / "run"
    job = Job(command_line(sys.executable, "pretrain", pretrain_options(run)), run_dir=run, cwd=str(REPO),
              stop_grace_s=600)  # no SIGTERM: the STOP file alone must do it
    time.sleep(delay)
    job.cancel()
    state = job.wait(timeout=240)
    assert state.exit_code == 3 and state.status == "cancelled", (delay, state.exit_code, state.log[-5:])
    assert not (run / rundir.STOP).exists()


def test_a_stop_file_written_between_launch_and_start_up_is_not_taken_for_a_stale_one(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    """jobs.Job tells the worker when it launched it: a STOP file from that moment on belongs to this run."""
    launched = time.time()
    run = tmp_path / "run"
    run.mkdir()
    time.sleep(0.05)
    (run / rundir.STOP).touch()  # the user pressed Cancel while Python was still starting
    monkeypatch.setenv("RUBIKSSL_LAUNCHED_AT", repr(launched))
    import RubikSSLLib

    monkeypatch.setattr(RubikSSLLib, "STARTED_AT", stopping.launch_time())
    rundir.RunDir(run).clear_stale_stop()
    assert (run / rundir.STOP).exists()
    monkeypatch.setattr(RubikSSLLib, "STARTED_AT", time.time() + 1)  # a command started after it: stale
    rundir.RunDir(run).clear_stale_stop()
    assert not (run / rundir.STOP).exists()
    os.environ.pop("RUBIKSSL_LAUNCHED_AT", None)
