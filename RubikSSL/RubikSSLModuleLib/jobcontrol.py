"""The panel's job state machine, in plain Python (no Qt, no Slicer), so every transition is tested outside Slicer.

    idle --start--> running --cancel--> cancelling --(worker exits)--> cancelled | failed | done --finish--> idle
                    running --(worker exits)--> done | failed | cancelled --finish--> idle

One job at a time. The widget asks `view()` after every timer tick and every user action and draws it: which button
started the job (its text becomes "Cancel", or "Cancelling..." once asked; every other button is disabled; the
buttons' own texts are kept here, so no sequence of clicks can lose them), the progress bar (hidden, busy until the
first progress event, then 0..1000), the status line, and the log lines not yet shown (offset reset per job).

Scene close: a job whose inputs and results live in the scene (inference, puzzles) is cancelled and its result
dropped; pretraining and fine-tuning read their own copies of the data and write to their run folders, so they keep
running and the panel stays usable. Closing Slicer stops any job gracefully within a bound (jobs.Job.shutdown).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

IDLE, RUNNING, CANCELLING, FINISHED = "idle", "running", "cancelling", "finished"
JOB_NAMES = {"scramble": "puzzle", "solve": "puzzle", "pretrain": "pretraining", "resumePretrain": "pretraining",
             "finetune": "fine-tuning", "resumeFinetune": "fine-tuning", "continueFinetune": "fine-tuning",
             "run": "inference", "rank": "ranking"}
PROGRESS_HIDDEN, PROGRESS_BUSY = None, -1


@dataclass
class PanelView:
    """What the panel shows. progress: None hidden, -1 busy, else 0..1000. active: the key of the button that
    started the job and its text; enabled: whether a key's button may be pressed."""

    state: str
    active: str | None
    active_text: str
    progress: int | None
    status: str
    busy: bool


@dataclass
class JobControl:
    """One panel's job. `texts`: each button key's own label (from the .ui)."""

    texts: dict[str, str]
    state: str = IDLE
    job: Any = None  # a RubikSSLLib.jobs.Job (anything with poll(), cancel(), shutdown(), running, state)
    active: str | None = None
    needs_scene: bool = False
    on_finished: Callable[[Any], str] | None = None
    status: str = ""
    progress: int | None = PROGRESS_HIDDEN
    shown_lines: int = 0
    error_to_show: str = ""
    installing: bool = False  # an install runs (it pumps GUI events): no job, and no second install, may start

    # ---- user actions
    def start(self, key: str, job: Any, needs_scene: bool, on_finished: Callable[[Any], str] | None = None) -> None:
        """A job started by the button `key`. needs_scene: its result loads into the scene (inference, puzzles)."""
        if self.state != IDLE or self.installing:
            raise RuntimeError("a RubikSSL job or install is already running; wait for it or cancel it first")
        self.state, self.job, self.active = RUNNING, job, key
        self.needs_scene, self.on_finished = needs_scene, on_finished
        self.progress, self.shown_lines, self.status, self.error_to_show = PROGRESS_BUSY, 0, "", ""

    def begin_install(self) -> bool:
        """An install may start (True) when nothing runs; from then on every job button is disabled."""
        if self.installing or self.state != IDLE:
            return False
        self.installing, self.status = True, "Installing the dependencies (see the progress dialog)..."
        return True

    def end_install(self, status: str = "") -> None:
        self.installing, self.status = False, status

    def press(self, key: str) -> str:
        """The user pressed a job button: 'start' (idle), 'cancel' (its own job runs) or 'ignore'."""
        if self.installing:
            return "ignore"
        if self.state == IDLE:
            return "start"
        if key == self.active and self.state == RUNNING:
            self.cancel()
            return "cancel"
        return "ignore"

    def cancel(self) -> None:
        if self.state == RUNNING:
            self.state = CANCELLING
            self.status = "Cancelling: the worker saves what it has, then stops..."
            self.job.cancel()

    # ---- the scene and the application
    def scene_closing(self) -> None:
        """The scene closes: a job that loads into it is cancelled and will load nothing."""
        if self.state in (RUNNING, CANCELLING) and self.needs_scene:
            self.on_finished = None
            self.cancel()
            self.status = "The scene was closed: the job is cancelled and its result will not be loaded."

    def application_closing(self, timeout_s: float = 20.0, report: Callable[[str], None] | None = None) -> None:
        """Slicer closes: stop gracefully (STOP, then escalate), never a bare kill first; a worker that is saving
        its checkpoint gets a minute more. `report(text)` is told what is awaited while it waits."""
        if self.job is not None and self.job.running:
            what = JOB_NAMES.get(self.active or "", "RubikSSL job")
            self.job.shutdown(timeout_s, report=(lambda text: report(f"Stopping the {what}: {text}")) if report else None)
        self.reset()

    # ---- the timer
    def poll(self) -> list[dict]:
        """Drain the job's events into the view; when it has ended, load its result and go idle."""
        if self.job is None:
            return []
        events = self.job.poll()
        for event in events:
            if event.get("event") == "progress":
                self.progress = int(1000 * self.job.state.fraction)
            elif event.get("event") == "metric" and self.state == RUNNING:
                shown = {k: v for k, v in event.items() if k != "event"}
                self.status = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
        if not self.job.running:
            self._finish()
        return events

    def new_log_lines(self) -> list[str]:
        """Log lines of the current (or just finished) job not yet shown."""
        if self.job is None:
            return []
        lines = self.job.state.log[self.shown_lines:]
        self.shown_lines += len(lines)
        return lines

    def _finish(self) -> None:
        state = self.job.state
        self.state = FINISHED
        if state.status == "cancelled":
            self.status = self.status if self.on_finished is None and self.needs_scene else "Cancelled; a checkpoint, if any, is kept: Resume continues."
        elif state.status != "ok":
            self.status = f"Failed: {state.error}"
            self.error_to_show = state.error
        elif self.on_finished is not None:
            try:
                self.status = self.on_finished(state)
            except Exception as error:  # noqa: BLE001 - a result that cannot load must not leave the panel stuck
                self.status = f"The job finished but its result could not be loaded: {error}"
                self.error_to_show = self.status
        else:
            self.status = "Done."
        self.reset(keep_status=True)

    def reset(self, keep_status: bool = False) -> None:
        """Back to idle: no job, buttons with their own texts, progress hidden."""
        status = self.status if keep_status else ""
        self.state, self.active, self.needs_scene, self.on_finished = IDLE, None, False, None
        self.progress, self.status = PROGRESS_HIDDEN, status

    def take_error(self) -> str:
        """An error to show once in a dialog ('' if none)."""
        error, self.error_to_show = self.error_to_show, ""
        return error

    # ---- drawing
    def view(self) -> PanelView:
        text = ""
        if self.active is not None:
            text = "Cancelling..." if self.state == CANCELLING else "Cancel"
        return PanelView(self.state, self.active, text, self.progress, self.status,
                         self.state in (RUNNING, CANCELLING) or self.installing)

    def button_text(self, key: str) -> str:
        view = self.view()
        return view.active_text if key == view.active else self.texts[key]

    def button_enabled(self, key: str, ready: bool) -> bool:
        """A button may be pressed when its inputs are ready and nothing runs, or to cancel its own running job."""
        if self.installing:
            return False
        if self.state == IDLE:
            return ready
        return key == self.active and self.state == RUNNING
