"""The run directory: its files, the lock against a second process, and the STOP request."""

from __future__ import annotations

import json
import os
from pathlib import Path

from RubikSSLLib.errors import BadInput
from RubikSSLLib.files import remove_stale_temp_files

CONFIG = "config.json"
TRAINING_STATE = "checkpoint.safetensors"
BEST_MODEL = "model.safetensors"
LAST_MODEL = "model_last.safetensors"
METRICS = "metrics.jsonl"
STOP = "STOP"
LOCK = ".lock"


class RunDir:
    """RUN_DIR of a pretraining or fine-tuning run. Use as a context manager to hold its lock."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = None  # a filelock.FileLock while held

    def file(self, name: str) -> Path:
        return self.path / name

    def create(self) -> None:
        """Make the folder and prove it is writable, so a bad --out fails before any work is done."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise BadInput(f"{self.path}: cannot write the run folder ({error.strerror}); choose a writable --out") from None

    def __enter__(self) -> RunDir:
        from filelock import FileLock, Timeout  # here, so the Slicer panel can import this module before installs

        self.create()
        self._lock = FileLock(str(self.file(LOCK)))
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise BadInput(f"{self.path}: another rubikssl process is using this run folder; wait for it or cancel it") from None
        remove_stale_temp_files(self.path)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._lock is not None:
            self._lock.release()

    def remove_if_empty(self) -> None:
        """Remove a folder this run created when it failed before writing anything but its lock."""
        if self.path.is_dir() and {p.name for p in self.path.iterdir()} <= {LOCK}:
            self.file(LOCK).unlink(missing_ok=True)
            self.path.rmdir()

    def append_metrics(self, metrics: dict) -> None:
        """One line of metrics.jsonl per evaluation; earlier lines are never rewritten."""
        with open(self.file(METRICS), "a", encoding="utf-8") as log:
            log.write(json.dumps(metrics) + "\n")

    def stop_requested(self) -> bool:
        return self.file(STOP).exists()

    def clear_stop(self) -> None:
        self.file(STOP).unlink(missing_ok=True)
