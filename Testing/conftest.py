"""Shared fixtures: the real data in ../shared/data (RUBIKSSL_SHARED_DATA overrides) and small derived cases."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

SHARED_DATA = Path(os.environ.get("RUBIKSSL_SHARED_DATA", REPO.parent / "shared" / "data"))
ADRENAL = SHARED_DATA / "cls" / "adrenalmnist3d_64_trainval.npz"
HEAD_MR = SHARED_DATA / "pretrain" / "HeadMRVolume.mhd"


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# Under pytest-xdist (run.sh runs one worker per core) each worker, and every process it starts, gets its share of
# the cores: torch's default of one thread per core in each worker would oversubscribe the machine.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the marks into the groups it schedules by
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that share a module-scoped fixture (a trained model, a planned dataset) run in one xdist worker
    (run.sh's --dist loadgroup), so that it is built once; the others spread over the workers one by one."""
    for item in items:
        definitions = getattr(item, "_fixtureinfo", None)
        if definitions and any(d.scope == "module" for defs in definitions.name2fixturedefs.values() for d in defs):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


def shared(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.fail(f"real test data missing: {path} (set RUBIKSSL_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def small_adrenal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 training and 16 validation volumes of AdrenalMNIST3D (real, 64^3) in the archive layout."""
    with np.load(shared("cls/adrenalmnist3d_64_trainval.npz")) as archive:
        train, val = archive["train_images"][:48], archive["val_images"][:16]
    path = tmp_path_factory.mktemp("adrenal") / "adrenal_small.npz"
    np.savez(path, train_images=train, val_images=val)
    return path


def rubikssl(*args: str, timeout: float = 600, in_process: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run the real command line as a user (or the Slicer panel) would: its main function with the output captured
    (fast: torch and MONAI are imported once per test session), or with in_process=False (or any subprocess
    keyword) in a subprocess of its own, for what needs a real process (signals, locks held elsewhere)."""
    if not in_process or kwargs:
        return subprocess.run([sys.executable, "-m", "RubikSSLLib", *args], capture_output=True, text=True,
                              timeout=timeout, cwd=REPO, **kwargs)
    from RubikSSLLib import cli

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = cli.main(list(args))
        except SystemExit as exit:  # argparse refusing an option
            code = exit.code if isinstance(exit.code, int) else 2
    return subprocess.CompletedProcess(["rubikssl", *args], code, stdout.getvalue(), stderr.getvalue())


# Fast settings for runs in tests: small cubes and encoder, few steps.
TINY_RUN = ["--cube-size", "12", "--jitter", "2", "--spacing", "native", "--widths", "8,16,32",
            "--batch-size", "4", "--val-puzzles", "8", "--progress", "json", "--intensity", "none"]


@pytest.fixture()
def slicer_standin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Slicer's own libraries (slicer-core) with the stand-ins of slicerstandin.py for what they lack (Qt, slicer.app,
    the scripted-module base), and the module's own package importable: a fresh real scene per test."""
    import slicerstandin

    standin = slicerstandin.install(monkeypatch, tmp_path / "slicer-temp")
    monkeypatch.syspath_prepend(str(REPO / "RubikSSL"))
    _forget_module()
    yield standin
    standin.close()
    _forget_module()


def _forget_module() -> None:
    for name in [n for n in sys.modules if n == "RubikSSL" or n.startswith("RubikSSLModuleLib")]:
        sys.modules.pop(name)
