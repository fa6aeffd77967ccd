"""The run directory: its files, the lock against a second process, and the STOP request."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import RubikSSLLib
from RubikSSLLib import stopping
from RubikSSLLib.errors import BadInput
from RubikSSLLib.files import remove_stale_temp_files, write_json_atomic

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
            self._lock = None

    @contextmanager
    def session(self, resume: bool, holds_lock: bool = True) -> Iterator[RunDir]:
        """One run in this folder, for pretraining and fine-tuning alike: take the lock (`holds_lock`: rank 0 of a
        distributed job), refuse a second run over a checkpoint unless `resume`, drop a stale STOP request, bring
        the readable card copies in line with their model files. A run that fails or is cancelled before its first
        checkpoint removes the folder it created, so a failure leaves nothing half-written behind."""
        created = not self.path.exists()
        try:
            if holds_lock:
                self.__enter__()
            if self.file(TRAINING_STATE).exists() and not resume:
                raise BadInput(f"{self.path}: already holds a run; add --resume to continue it or choose another --out")
            if holds_lock:
                self.clear_stale_stop()
                self.sync_card_copies()
            yield self
        except BaseException:
            if created and holds_lock and self.path.is_dir() and not self.file(TRAINING_STATE).exists():
                self.__exit__()
                shutil.rmtree(self.path, ignore_errors=True)
            elif holds_lock and stopping.requested():
                self.clear_stop()  # honoured: it must not cancel the next resume
            raise
        finally:
            if holds_lock:
                self.__exit__()

    def sync_card_copies(self) -> None:
        """A kill between writing a model file and its `<name>.json` copy leaves the copy one save behind:
        rewrite it from the card inside the model file (the file is the truth)."""
        from RubikSSLLib import checkpoint

        for name in (BEST_MODEL, LAST_MODEL):
            model = self.file(name)
            if model.is_file():
                card = checkpoint.read_card(model)
                copy = model.with_suffix(".json")
                try:
                    current = json.loads(copy.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    current = None
                if current != card:
                    write_json_atomic(copy, card)

    def append_metrics(self, metrics: dict) -> None:
        """One line of metrics.jsonl per evaluation, written before the checkpoint that covers it."""
        with open(self.file(METRICS), "a", encoding="utf-8") as log:
            log.write(json.dumps(metrics) + "\n")

    def truncate_metrics(self, key: str, last: int) -> None:
        """On resume: drop the lines past the checkpoint (`key` <= `last` stay), which a kill between the metrics
        line and the checkpoint left behind and the resumed run will write again."""
        path = self.file(METRICS)
        if not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if _position(line, key) <= last]
        if len(kept) != len(lines):
            from RubikSSLLib.files import write_text_atomic

            write_text_atomic(path, "".join(line + "\n" for line in kept))

    def stop_requested(self) -> bool:
        return self.file(STOP).exists()

    def clear_stop(self) -> None:
        self.file(STOP).unlink(missing_ok=True)

    def clear_stale_stop(self) -> None:
        """Remove a STOP file left from an earlier cancel; one written since this process started is a cancel of
        this run (say, while it was still loading) and stays, so the loop's first check honours it."""
        stop = self.file(STOP)
        try:
            if stop.stat().st_mtime < RubikSSLLib.STARTED_AT:
                stop.unlink(missing_ok=True)
        except FileNotFoundError:
            pass


def _position(line: str, key: str) -> float:
    """The step or epoch of one metrics line (a broken line, from a kill mid-write, sorts last)."""
    try:
        return float(json.loads(line)[key])
    except (ValueError, KeyError, TypeError):
        return float("inf")
