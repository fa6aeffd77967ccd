"""Progress for people (a terminal bar) and for programs (one JSON object per line behind PREFIX).

Events: progress, metric, artifact, log, stopping, done, error. The Slicer panel reads them with `parse_line`.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

PREFIX = "@rubikssl "
MODES = ("bar", "json", "none")


def parse_line(line: str) -> dict[str, Any] | None:
    """The event carried by one output line, or None for any other line (logs, warnings)."""
    if not line.startswith(PREFIX):
        return None
    try:
        event = json.loads(line[len(PREFIX):])
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


class Reporter:
    """Emits events in one of MODES. A disabled reporter (non-zero DDP ranks) says nothing."""

    def __init__(self, mode: str = "bar", enabled: bool = True, stream: TextIO | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r}; use one of {', '.join(MODES)}")
        self.mode = mode if enabled else "none"
        self.stream = stream or sys.stdout
        self._bar = None
        self._started = time.monotonic()

    def _emit(self, event: str, **fields: Any) -> None:
        if self.mode == "json":
            self.stream.write(PREFIX + json.dumps({"event": event, **fields}) + "\n")
            self.stream.flush()

    def _say(self, text: str) -> None:
        if self.mode != "bar":
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def log(self, text: str) -> None:
        self._emit("log", message=text)
        self._say(text)

    def progress(self, step: int, total: int, **fields: Any) -> None:
        self._emit("progress", step=step, total=total, fraction=round(step / max(total, 1), 4),
                   elapsed_s=round(time.monotonic() - self._started, 1), **fields)
        if self.mode == "bar":
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=total, initial=step, file=sys.stderr, unit="step", dynamic_ncols=True,
                                 disable=not sys.stderr.isatty())
            self._bar.n = step
            self._bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in fields.items()}, refresh=False)
            self._bar.refresh()

    def metric(self, step: int, unit: str = "step", **values: Any) -> None:
        """Held-out metrics at `step` (a pretraining step, or with unit="epoch" a fine-tuning epoch, which the
        JSON event also carries as "epoch")."""
        self._emit("metric", step=step, **({"epoch": step} if unit == "epoch" else {}), **values)
        self._say(f"{unit} {step}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()))

    def stopping(self, **where: Any) -> None:
        """A cancel was seen: the run now saves what it has, then ends (the panel waits for it instead of killing)."""
        self._emit("stopping", **where)
        self._say("stopping: saving the checkpoint first")

    def artifact(self, path: str, kind: str) -> None:
        self._emit("artifact", path=str(path), kind=kind)

    def done(self, status: str, exit_code: int, **fields: Any) -> None:
        self.close()
        self._emit("done", status=status, exit_code=exit_code, **fields)

    def error(self, message: str, exit_code: int) -> None:
        self.close()
        self._emit("error", message=message, exit_code=exit_code)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
