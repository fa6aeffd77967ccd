"""Cancelling at any moment: SIGTERM, Ctrl-C (CTRL_BREAK on Windows) or a STOP file end a command with exit 3.

A cancel is a state of the process first (`requested()`), and an exception second. The signal handler, and the
watcher of a STOP file, set the state; outside a training loop the handler also raises Cancelled at once, so
loading or inference stops where it is (every output is published atomically, so nothing is half-written).
Cancelled is a BaseException, like KeyboardInterrupt: the `except Exception` of a library importing its optional
parts (MONAI's optional imports, torch's CUDA preload) cannot swallow it. And should anything swallow it, the
state stays: the training loop honours it before its first step and at every step, and the command line ends
as cancelled whatever the handler returned. Inside a loop (`StopSignal`) the handler only sets the state, so the
step in flight finishes and is checkpointed first.
"""

from __future__ import annotations

import _thread
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from RubikSSLLib.errors import Cancelled

SIGNALS = (signal.SIGTERM, signal.SIGINT) + ((signal.SIGBREAK,) if hasattr(signal, "SIGBREAK") else ())

_reason: str = ""  # why this command was asked to stop ("" while it was not)
_deferred = 0  # > 0 inside a training loop (or before the command began): the handler only records the request
_from_start = False  # the request so far was recorded before the command began: `begin` keeps it


def request(reason: str) -> None:
    """Record a stop request (the first reason is kept)."""
    global _reason
    _reason = _reason or reason


def requested() -> bool:
    return bool(_reason)


def reason() -> str:
    return _reason


def reset() -> None:
    """No request and no deferral (commands run one after the other in one process: tests, the demo)."""
    global _reason, _deferred, _from_start
    _reason, _deferred, _from_start = "", 0, False


def record_from_start() -> None:
    """Record a stop signal from now on, before the command line is even imported (`python -m RubikSSLLib`):
    the request is kept for the command that then begins."""
    global _deferred, _from_start
    _deferred, _from_start = 1, True
    _install(_handle)


def begin() -> None:
    """A command begins: a request recorded since `record_from_start` stands, an older one is forgotten."""
    global _reason, _deferred, _from_start
    if not _from_start:
        _reason = ""
    _deferred, _from_start = 0, False


def check() -> None:
    """A safe point: raise Cancelled if a stop was requested."""
    if _reason:
        raise Cancelled(f"{_reason}; nothing more was written")


def _handle(signum: int, frame: object) -> None:
    request(f"stopped by signal {signum}")
    if not _deferred:
        raise Cancelled(f"stopped by signal {signum} before any checkpoint; nothing was written")


def _install(handler) -> dict:
    """Install `handler` for SIGNALS; returns the previous handlers (none off the main thread, where only the
    STOP file works)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {number: signal.signal(number, handler) for number in SIGNALS}


def _restore(previous: dict) -> None:
    for number, handler in previous.items():
        signal.signal(number, handler)


@contextmanager
def cancel_on_signal() -> Iterator[None]:
    """For a whole command: a stop signal is recorded, and raises Cancelled outside training loops."""
    previous = _install(_handle)
    try:
        yield
    finally:
        _restore(previous)


class StopFileWatch:
    """Treat the appearance of `path` as a stop request: the STOP file of a run folder, or the one a command without
    a run folder is given (RUBIKSSL_STOP_FILE: the panel's cancel on every platform). The main thread is then
    interrupted too, so a blocking read or a long load ends at once (inside a training loop the interrupt only
    records the request). `stop()` ends the watch."""

    def __init__(self, path: str | os.PathLike, interval_s: float = 0.2) -> None:
        self.path, self.interval_s = Path(path), interval_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="stop-file-watch")
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.wait(self.interval_s):
            if self.path.exists():
                request(f"stopped by {self.path}")
                _interrupt_main_thread()
                return

    def stop(self) -> None:
        self._done.set()


def _interrupt_main_thread() -> None:
    if hasattr(signal, "pthread_kill"):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    else:  # Windows: the next Python instruction of the main thread raises
        _thread.interrupt_main()


def watch_stop_file(path: str | os.PathLike, interval_s: float = 0.2) -> StopFileWatch:
    return StopFileWatch(path, interval_s)


class StopSignal:
    """Inside a training loop: a stop signal (or STOP file) only records the request, checked between steps.
    `received` is the process's stop state, so a request made before the loop began (and swallowed by whatever
    was running then) is honoured at the first check."""

    def __enter__(self) -> StopSignal:
        global _deferred
        _deferred += 1
        self._previous = _install(_handle)
        return self

    @property
    def received(self) -> bool:
        return requested()

    def __exit__(self, *exc_info: object) -> None:
        global _deferred
        _restore(self._previous)
        _deferred = max(0, _deferred - 1)


def launch_time() -> float:
    """When the command was launched: the launcher's clock (RUBIKSSL_LAUNCHED_AT, set by jobs.Job just before it
    starts the process) if it is earlier than now, else now. A STOP file written after that is this run's."""
    now = time.time()
    try:
        return min(now, float(os.environ.get("RUBIKSSL_LAUNCHED_AT", now)))
    except ValueError:
        return now
