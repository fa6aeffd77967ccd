"""What every training run shares, pretraining and fine-tuning alike: the run folder session (lock, "already holds
a run", stale STOP, cleanup of a failed new run), cancel checks, resume from the training state, best-by-metric,
and the checkpoint as one commit: metrics line, model files, then the training state a resume starts from."""

from __future__ import annotations

import math
import platform
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from RubikSSLLib import __version__, checkpoint, rundir, stopping
from RubikSSLLib.devices import select_device
from RubikSSLLib.errors import Cancelled
from RubikSSLLib.progress import Reporter
from RubikSSLLib.stopping import StopSignal


def versions() -> dict[str, str]:
    import SimpleITK

    return {"rubikssl": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "SimpleITK": SimpleITK.Version_VersionString()}


def learning_rate_scale(step: float, total: float, warmup: float, schedule: str, floor: float = 0.0) -> float:
    """The learning-rate multiplier at `step` of `total`: linear warm-up over `warmup` steps, then constant or a
    cosine decay from 1 to `floor` at `total`. A pure function of the step (unlike torch's stateful schedulers),
    so a resumed run continues the schedule exactly without a scheduler state in the checkpoint."""
    if step < warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def move_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: value.to(device, non_blocking=True) for name, value in batch.items()}



class _Through(nn.Module):
    """`model` seen through a batch-level forward function, so torch's update_bn can feed it whole batches."""

    def __init__(self, model: nn.Module, forward: Callable[[dict[str, torch.Tensor]], object]) -> None:
        super().__init__()
        self.model, self.run = model, forward

    def forward(self, batch: dict[str, torch.Tensor]) -> object:
        return self.run(batch)


def recalibrate_batchnorm(model: nn.Module, batches: Iterator[dict[str, torch.Tensor]], count: int,
                          device: torch.device, key: str = "cubes",
                          forward: Callable[[dict[str, torch.Tensor]], object] | None = None) -> None:
    """Re-estimate BatchNorm running statistics as a plain average over `count` training batches
    (torch.optim.swa_utils.update_bn), fed as `model(batch[key])` or through `forward(batch)`.

    Running statistics trail fast-moving weights under Adam; evaluating with stale ones made a prototype's
    held-out ordering swing 0.89 -> 0.41 while the same weights scored 0.99 once re-estimated."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return  # and draw no batch
    inputs = (move_batch(next(batches), device) for _ in range(count))
    if forward is None:
        torch.optim.swa_utils.update_bn((batch[key] for batch in inputs), model)
    else:
        torch.optim.swa_utils.update_bn(inputs, _Through(model, forward))


class RunLoop:
    """Base of Pretraining and Finetuning. A subclass sets `position_key` ("step" or "epoch"), builds
    self.model / self.optimizer, and implements `_train()` and `card(metrics)`; `primary_metric` and
    `higher_is_better` pick the best checkpoint."""

    position_key = "step"
    primary_metric = ""
    higher_is_better = True

    def __init__(self, config, reporter: Reporter, resume: bool = False) -> None:
        self.config, self.reporter, self.resume = config, reporter, resume
        self.device = select_device(config.device)
        self.run_dir = rundir.RunDir(config.out)
        self.position = 0  # steps or epochs done
        self.best: dict[str, float] = {}
        self.history: list[dict] = []
        self.is_main = True  # the process that writes (rank 0 of a distributed job)

    def run(self) -> dict[str, float]:
        """Train to the end and return the final metrics, or raise Cancelled after a checkpoint."""
        with self.run_dir.session(self.resume, holds_lock=self.is_main):
            watch = stopping.watch_stop_file(self.run_dir.file(rundir.STOP))  # a STOP while loading stops it too
            try:
                return self._train()
            finally:
                watch.stop()

    def _train(self) -> dict[str, float]:
        raise NotImplementedError

    def card(self, metrics: dict) -> dict:
        raise NotImplementedError

    def restore(self) -> bool:
        """Load model, optimizer and progress from the run's training state when resuming; False if none."""
        path = self.run_dir.file(rundir.TRAINING_STATE)
        if not (self.resume and path.exists()):
            return False
        state = checkpoint.load_training_state(path, self.model, self.optimizer)
        self.position, self.best, self.history = state[self.position_key], state.get("best", {}), state.get("history", [])
        if self.is_main:
            self.run_dir.truncate_metrics(self.position_key, self.position)
        self.reporter.log(f"resumed {self.run_dir.path} at {self.position_key} {self.position}")
        return True

    def recorded_card(self) -> dict:
        """The card of the run's last checkpoint (its last model, else its best), {} if it has none."""
        for name in (rundir.LAST_MODEL, rundir.BEST_MODEL):
            if self.run_dir.file(name).exists():
                return checkpoint.read_card(self.run_dir.file(name))
        return {}

    def stop_asked(self, stop: StopSignal) -> bool:
        """SIGTERM/Ctrl-C or a STOP file (the process's stop state, `stop`), or a STOP file in the run folder."""
        return stop.received or self.run_dir.stop_requested()

    def cancel(self, where: str = "", trained: bool = True) -> None:
        """After the cancel's checkpoint (`trained`), or with nothing to keep (a stop before this process trained a
        step): the STOP request is honoured (removed, so it cannot cancel the resumed run) and the run ends with
        Cancelled."""
        if self.is_main:
            self.run_dir.clear_stop()
        if not trained:
            raise Cancelled("stopped before the first step; nothing new was written")
        raise Cancelled(f"stopped {where or f'at {self.position_key} {self.position}'}; continue with --resume")

    def is_better(self, metrics: dict[str, float]) -> bool:
        value = metrics.get(self.primary_metric, float("nan"))
        if isinstance(value, float) and math.isnan(value):
            return False
        if self.primary_metric not in self.best:
            return True
        best = self.best[self.primary_metric]
        return value >= best if self.higher_is_better else value <= best

    def checkpoint(self, metrics: dict, keep_last: bool = False) -> None:
        """One commit (rank 0): the metrics line, the best model (and with `keep_last` the last one), then the
        training state. A kill between them leaves the previous state, which a resume starts from; the metrics
        line it repeats is dropped then (rundir.truncate_metrics)."""
        if not self.is_main:
            return
        is_best = bool(metrics) and self.is_better(metrics)
        if is_best:
            self.best = dict(metrics)
        if metrics:
            self.run_dir.append_metrics(metrics)
        weights = self.model.state_dict()
        card = self.card(metrics)
        if keep_last:
            checkpoint.save_model(self.run_dir.file(rundir.LAST_MODEL), weights, card)
        if is_best or not self.run_dir.file(rundir.BEST_MODEL).exists():
            checkpoint.save_model(self.run_dir.file(rundir.BEST_MODEL), weights, card)
            self.reporter.artifact(str(self.run_dir.file(rundir.BEST_MODEL)), "model")
        state = {self.position_key: self.position, "best": self.best, "history": self.history}
        checkpoint.save_training_state(self.run_dir.file(rundir.TRAINING_STATE), self.model, self.optimizer, state)

    def base_card(self, task: str, metrics: dict) -> dict:
        """The fields every model card has."""
        return {"format": checkpoint.FORMAT, "task": task, self.position_key: self.position,
                "config": self.config.to_json(), "metrics": metrics, "best": self.best, "versions": versions()}

    def write_config(self) -> None:
        from RubikSSLLib.files import write_json_atomic

        if self.is_main:
            write_json_atomic(self.run_dir.file(rundir.CONFIG), self.config.to_json())
