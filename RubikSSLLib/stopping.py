"""Cancelling at any moment: SIGTERM, Ctrl-C (and CTRL_BREAK on Windows) end a command with Cancelled (exit 3).

Outside a training loop a signal raises Cancelled at once (loading, inference: nothing is half-written, because
every output is published atomically). Inside a loop `StopSignal` turns it into a flag checked between steps, so
the step in flight finishes and is checkpointed first.
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


def _raise_cancelled(signum: int, frame: object) -> None:
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
    """For a whole command: a stop signal raises Cancelled wherever the command is."""
    previous = _install(_raise_cancelled)
    try:
        yield
    finally:
        _restore(previous)


def watch_stop_file(path: str | os.PathLike, interval_s: float = 0.25) -> None:
    """Treat the appearance of `path` as Ctrl-C: the STOP request of a command without a run folder (the panel's
    cancel on every platform). The main thread gets the signal itself, so a blocking read is interrupted too."""
    stop = Path(path)

    def watch() -> None:
        while not stop.exists():
            time.sleep(interval_s)
        if hasattr(signal, "pthread_kill"):
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        else:  # Windows: the next Python instruction of the main thread raises
            _thread.interrupt_main()

    threading.Thread(target=watch, daemon=True, name="stop-file-watch").start()


class StopSignal:
    """Inside a training loop: a stop signal sets `received`, checked between steps."""

    def __init__(self) -> None:
        self.received = False
        self._previous: dict = {}

    def __enter__(self) -> StopSignal:
        self._previous = _install(self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.received = True

    def __exit__(self, *exc_info: object) -> None:
        _restore(self._previous)
