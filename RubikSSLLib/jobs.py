"""A background `rubikssl` process as the Slicer panel runs it: launch, read progress without blocking, cancel.

The panel never imports torch: it starts the library's command line with `--progress json` in its own process
group, a reader thread moves output lines into a queue, and the panel drains that queue from a Qt timer with
`poll()`. Cancel is cooperative first, on every platform and for every command: a STOP file (the run folder's,
or for commands without one a file named to the worker in RUBIKSSL_STOP_FILE); the worker checkpoints if it has
something to keep and exits 3. Then, after bounded waits, SIGTERM to the whole process group (not on Windows,
where a group without a console cannot receive CTRL_BREAK) and a hard kill of the whole group or tree, so no
child is orphaned even when the leader (PythonSlicer is a launcher that starts the real interpreter as its child)
is already gone. The worker's own `done` event decides the outcome; a cancel the user asked for ends as
"cancelled" even when the launcher itself was killed. Pure Python: tested here against the real command line.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from RubikSSLLib import rundir
from RubikSSLLib.errors import EXIT_CANCELLED, EXIT_OK
from RubikSSLLib.progress import parse_line

LIBRARY_PARENT = Path(__file__).resolve().parent.parent
STOP_FILE_VARIABLE = "RUBIKSSL_STOP_FILE"  # commands without a run folder stop when this file appears
STOP_GRACE_S, TERM_GRACE_S = 30.0, 10.0  # STOP file -> SIGTERM -> kill
# A worker that has said it is stopping ("stopping" event: it is writing its checkpoint) is not killed for this
# long: under load a checkpoint can take longer than TERM_GRACE_S, and killing it then loses the step it stopped at.
SAVING_GRACE_S = 300.0
LAUNCHED_AT_VARIABLE = "RUBIKSSL_LAUNCHED_AT"  # the worker keeps a STOP file written after this (stopping.launch_time)


def command_line(python: str, command: str, options: dict[str, Any]) -> list[str]:
    """`python -m RubikSSLLib COMMAND --option value ...` with JSON progress.

    options: option name without dashes (underscores become dashes) -> value; True adds a bare flag, False/None
    leaves the option out, a list gives several values.
    """
    args = [python, "-m", "RubikSSLLib", command]
    for name, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif isinstance(value, (list, tuple)):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args + ["--progress", "json"]


def worker_environment(base: dict[str, str] | None = None, cpu_only: bool = False) -> dict[str, str]:
    """The worker's environment: `base` (Slicer's startup environment) with this library importable,
    unbuffered output and, for CPU runs, CUDA hidden."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(LIBRARY_PARENT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = "-1"
    return env


@dataclass
class JobState:
    """What the panel shows: fed every output line, it keeps the latest progress, metrics, artifacts and outcome."""

    fraction: float = 0.0
    step: int = 0
    total: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: list[dict[str, str]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    status: str = "running"  # running, ok, cancelled, failed
    error: str = ""
    exit_code: int | None = None

    reported: str = ""  # the status of the worker's own done event, if it sent one
    cancel_requested: bool = False
    stopping: bool = False  # the worker said it saw the cancel and is saving

    def feed(self, line: str) -> dict[str, Any] | None:
        """Take one output line; return its event (None for a plain log line)."""
        event = parse_line(line)
        if event is None:
            if line.strip():
                self.log.append(line)
            return None
        kind = event["event"]
        if kind == "progress":
            self.step, self.total = int(event.get("step", 0)), int(event.get("total", 0))
            self.fraction = max(self.fraction, float(event.get("fraction", 0.0)))  # a resumed stage never moves it back
        elif kind == "metric":
            self.metrics.update({k: v for k, v in event.items() if k != "event"})
        elif kind == "artifact":
            self.artifacts.append({"path": event["path"], "kind": event["kind"]})
        elif kind == "log":
            self.log.append(event.get("message", ""))
        elif kind == "error":
            self.error = event.get("message", "")
        elif kind == "stopping":
            self.stopping = True
        elif kind == "done":
            self.reported = event.get("status", "ok")
        return event

    def finish(self, exit_code: int) -> None:
        """Record the exit code. The worker's done event decides the outcome (the exit code may be a launcher's,
        killed after its child finished); without one the exit code does, and a process that ended by a signal or
        with exit 3 after the user asked to cancel is cancelled, not failed."""
        self.exit_code = exit_code
        if self.reported in ("ok", "cancelled"):
            self.status = self.reported
        elif exit_code == EXIT_OK:
            self.status = "ok"
        elif exit_code == EXIT_CANCELLED or (self.cancel_requested and exit_code < 0):
            self.status = "cancelled"
        else:
            self.status = "failed"
            if not self.error:
                tail = [line for line in self.log[-5:] if line.strip()]
                self.error = (tail[-1] if tail else f"the worker stopped with exit code {exit_code}")
                if exit_code < 0:
                    self.error = f"the worker was killed by signal {-exit_code}"

    def artifact(self, kind: str) -> str | None:
        return next((a["path"] for a in reversed(self.artifacts) if a["kind"] == kind), None)


class Job:
    """One worker process. Call `poll()` regularly (a Qt timer); it returns the events seen since the last call."""

    def __init__(self, args: list[str], run_dir: str | os.PathLike | None = None, env: dict[str, str] | None = None,
                 cwd: str | None = None, stop_grace_s: float = STOP_GRACE_S, term_grace_s: float = TERM_GRACE_S,
                 requests: bool = False, saving_grace_s: float = SAVING_GRACE_S) -> None:
        """run_dir: the run folder whose STOP file cancels it (training); without one the job gets a STOP file of
        its own. requests: keep the worker's stdin open for `send` (the `serve` worker); else it reads nothing."""
        self.args = args
        self.run_dir = Path(run_dir) if run_dir else None
        self.state = JobState()
        self.stop_grace_s, self.term_grace_s, self.saving_grace_s = stop_grace_s, term_grace_s, saving_grace_s
        self._cancel_started: float | None = None
        self._saving_since: float | None = None
        self._signals_sent: set[str] = set()
        self._lines: queue.Queue[str | None] = queue.Queue()
        env = dict(env or worker_environment())
        self._own_stop_folder: Path | None = None
        if self.run_dir is not None:
            self.stop_file = self.run_dir / rundir.STOP
        else:
            self._own_stop_folder = Path(tempfile.mkdtemp(prefix="rubikssl-job-"))
            self.stop_file = self._own_stop_folder / rundir.STOP
            env[STOP_FILE_VARIABLE] = str(self.stop_file)
        self.stop_file.unlink(missing_ok=True)  # an old request must not stop the new job
        env[LAUNCHED_AT_VARIABLE] = repr(time.time())  # a cancel from now on is this job's, even during start-up
        self.process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.PIPE if requests else subprocess.DEVNULL,
            env=env,
            cwd=cwd, text=True, encoding="utf-8", errors="replace", bufsize=1, **_own_process_group())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\r\n"))
        self._lines.put(None)

    def send(self, request: dict[str, Any]) -> bool:
        """One request line to a `serve` worker; False when the worker is gone (its outcome comes with `poll`)."""
        if not self.running or self.process.stdin is None:
            return False
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def close_requests(self) -> None:
        """End of input: a `serve` worker finishes cleanly (exit 0)."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except OSError:
                pass

    @property
    def running(self) -> bool:
        return self.state.exit_code is None

    def poll(self) -> list[dict[str, Any]]:
        """Drain the output so far into `state`; escalate a pending cancel; notice the exit. Never blocks."""
        events = []
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self.state.finish(self.process.wait())
                if self._own_stop_folder is not None:
                    shutil.rmtree(self._own_stop_folder, ignore_errors=True)
                break
            event = self.state.feed(line)
            if event is not None:
                events.append(event)
        if self.running and self._cancel_started is not None:
            self._escalate()
        return events

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> JobState:
        """Poll until the job ends (for scripts and tests; the panel uses its timer instead)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running:
            self.poll()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"rubikssl job still running after {timeout} s: {' '.join(self.args[:4])}")
            time.sleep(interval)
        return self.state

    def cancel(self) -> None:
        """Ask the worker to stop: its STOP file now, SIGTERM to the group after `stop_grace_s`, a kill of the
        group `term_grace_s` later. The outcome is "cancelled" however far it has to go."""
        if not self.running or self._cancel_started is not None:
            return
        self._cancel_started = time.monotonic()
        self.state.cancel_requested = True
        try:
            self.stop_file.parent.mkdir(parents=True, exist_ok=True)
            self.stop_file.touch()
        except OSError:
            self._signal("term")  # an unwritable folder: the signal is the only way left
        self.poll()

    def shutdown(self, timeout_s: float = 20.0, saving_s: float = 60.0,
                 report: Callable[[str], None] | None = None) -> None:
        """Stop gracefully within a bound (closing Slicer): STOP, SIGTERM, and a kill only at the end. A worker
        that has said it is saving gets `saving_s` more. `report(text)` is told what is awaited, every poll."""
        if not self.running:
            return
        self.stop_grace_s, self.term_grace_s = min(self.stop_grace_s, timeout_s / 2), min(self.term_grace_s, timeout_s / 2)
        self.saving_grace_s = min(self.saving_grace_s, saving_s)
        self.cancel()
        started = time.monotonic()
        while self.running:
            self.poll()
            waited = time.monotonic() - started
            if waited > timeout_s + 5 + (saving_s if self.state.stopping else 0):
                break
            if report is not None:
                report(f"{'saving its checkpoint' if self.state.stopping else 'asked to stop'}, "
                       f"{waited:.0f} s of at most {timeout_s + (saving_s if self.state.stopping else 0):.0f} s")
            time.sleep(0.05)
        self.kill()

    def kill(self) -> None:
        """End the whole process group or tree now, leader alive or not (no worker outlives the panel)."""
        self._signal("kill", force=True)
        if self.running:
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def _escalate(self) -> None:
        now = time.monotonic()
        if self.state.stopping:  # it is saving: wait for it (bounded), do not kill the checkpoint half-way
            self._saving_since = self._saving_since or now
            if now - self._saving_since > self.saving_grace_s:
                self._signal("kill")
            return
        waited = now - self._cancel_started
        if waited > self.stop_grace_s:
            self._signal("term")
        if waited > self.stop_grace_s + self.term_grace_s:
            self._signal("kill")

    def _signal(self, which: str, force: bool = False) -> None:
        """Signal the whole group, whether or not its leader has exited (the launcher may be gone while the real
        worker, its child, still runs)."""
        if which in self._signals_sent and not force:
            return
        self._signals_sent.add(which)
        try:
            if sys.platform == "win32":
                if which == "kill":  # no "term" step: CTRL_BREAK cannot reach a group without a console
                    subprocess.run(["taskkill", "/T", "/F", "/PID", str(self.process.pid)], capture_output=True,
                                   creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))  # no console flash
            else:
                os.killpg(self.process.pid, signal.SIGTERM if which == "term" else signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            pass


def _own_process_group() -> dict[str, Any]:
    """Start the worker as the leader of a new process group, so a signal reaches its children too."""
    if sys.platform == "win32":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)}
    return {"start_new_session": True}

