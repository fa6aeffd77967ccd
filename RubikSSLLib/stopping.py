"""Cancelling at any moment: SIGTERM, Ctrl-C (and CTRL_BREAK on Windows) end a command with Cancelled (exit 3).

Outside a training loop a signal raises Cancelled at once (loading, inference: nothing is half-written, because
every output is published atomically). Inside a loop `StopSignal` turns it into a flag checked between steps, so
the step in flight finishes and is checkpointed first.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

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
