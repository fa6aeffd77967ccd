"""Pretraining the Rubik's cube task: the loop, evaluation, checkpoints, cancel and resume, DistributedDataParallel."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from RubikSSLLib import batchslots, checkpoint, datasources, feeding, rundir, sampling, shortcuts, stopping, tasks
from RubikSSLLib.config import PretrainConfig
from RubikSSLLib.devices import autocast_dtype
from RubikSSLLib.errors import BadInput
from RubikSSLLib.networks import channels_last
from RubikSSLLib.tasks.base import PretextTask
from RubikSSLLib.progress import Reporter
from RubikSSLLib.runloop import RunLoop, learning_rate_scale, move_batch, recalibrate_batchnorm  # noqa: F401 - shared
from RubikSSLLib.stopping import StopSignal


@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: torch.device) -> Distributed:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend)
        return cls(torch.distributed.get_rank(), world_size)

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank (so all ranks stop at the same step)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([float(flag)])
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())


def learning_rate_at(step: int, config: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_learning_rate_factor x the base rate (a pure function of step)."""
    scale = learning_rate_scale(step + 1 if step < config.warmup_steps else step, config.steps, config.warmup_steps,
                                "cosine", config.min_learning_rate_factor)
    return config.learning_rate * scale


def build_model(config: PretrainConfig) -> nn.Module:
    """The pretext task's network (its encoder under `.encoder`)."""
    return tasks.create(config).build_model()


Loaded = tuple[datasources.CaseSource, sampling.PreparedCase]


def load_cases(sources: list[datasources.CaseSource], config: PretrainConfig, reporter: Reporter,
               shape: sampling.CropShape | None = None, skipped: list[str] | None = None) -> list[Loaded]:
    """Load and prepare every case for crops of `shape` (default: the puzzle's). A bad case stops the run, or with
    skip_unusable is reported, left out and its name added to `skipped`."""
    if sources:
        reporter.log(f"loading {len(sources)} volumes")
    cases = []
    for source in sources:
        stopping.check()  # a cancel while loading many volumes ends here, between two of them
        try:
            volume = load_volume(source, config)
            if volume.array.shape[0] != config.encoder.in_channels:
                raise BadInput(
                    f"{source.name}: has {volume.array.shape[0]} channels but the first case has "
                    f"{config.encoder.in_channels}; give every case the same channels"
                )
            cases.append((source, sampling.prepare(volume, shape or config.puzzle, config.intensity)))
        except BadInput as error:
            if not config.skip_unusable:
                raise
            reporter.log(f"skipped: {error}")
            if skipped is not None:
                skipped += list(source.channels)
    return cases


def load_volume(source: datasources.CaseSource, config: PretrainConfig):
    """One case as the config's network reads it: resampled and reoriented for RubikSSL's encoder, or through
    nnU-Net's own preprocessing with the plan for nnU-Net's network."""
    if config.network != "nnunet":
        return datasources.load(source, config.spacing_mm, config.canonical_orientation)
    from RubikSSLLib import nnunet
    from RubikSSLLib.tasks.base import nnunet_plan
    from RubikSSLLib.volumes import Geometry, Volume

    if source.npz_key:
        raise BadInput(f"{source.name}: --network nnunet reads image files (nnU-Net preprocesses them with its plan), "
                       "not arrays of an .npz archive")
    plan = nnunet_plan(config)
    array = nnunet.load_case(plan, list(source.channels))
    spacing = tuple(float(v) for v in plan.settings.spacing[::-1])  # nnU-Net's (transposed) array order
    return Volume(array, Geometry(spacing), list(source.channels))


def split_cases(train: list[Loaded], validation: list[Loaded], config: PretrainConfig,
                reporter: Reporter) -> tuple[list[Loaded], list[Loaded]]:
    """Training and held-out validation cases: the data's own validation list, else a seeded fraction of cases."""
    if not train:
        raise BadInput("no usable training volume (see the skipped lines); check the data")
    if validation:
        return train, validation
    if len(train) == 1 or config.val_fraction == 0:
        reporter.log("warning: no held-out volume; validation puzzles come from the training volumes")
        return train, train
    order = np.random.default_rng(config.seed).permutation(len(train))
    held_out = max(1, round(config.val_fraction * len(train)))
    return [train[i] for i in order[held_out:]], [train[i] for i in order[:held_out]]


@torch.no_grad()
def evaluate(model: nn.Module, samples: list[dict[str, torch.Tensor]], device: torch.device, task: PretextTask,
             batch_size: int = 16) -> dict[str, float]:
    """The task's validation scores averaged over the fixed held-out samples (for Rubik: ordering accuracy,
    chance 1/K, per-cube orientation accuracy, chance 1/3, and loss)."""
    model.eval()
    totals: dict[str, float] = {}
    for first in range(0, len(samples), batch_size):
        chunk = samples[first : first + batch_size]
        batch = move_batch({k: torch.stack([p[k] for p in chunk]) for k in chunk[0]}, device)
        for name, value in task.scores(task.forward(model, batch), batch).items():
            totals[name] = totals.get(name, 0.0) + value
    model.train()
    return task.summarise({name: total / len(samples) for name, total in totals.items()})


class Pretraining(RunLoop):
    """One pretraining run. `run()` returns the final metrics, or raises Cancelled after checkpointing."""

    position_key = "step"

    def __init__(self, config: PretrainConfig, reporter: Reporter, resume: bool = False) -> None:
        super().__init__(config, reporter, resume)
        self.distributed = Distributed.from_environment(self.device)
        self.is_main = self.distributed.is_main

    @property
    def step(self) -> int:
        return self.position

    def run(self) -> dict[str, float]:
        try:
            return super().run()
        finally:
            if self.distributed.world_size > 1:
                torch.distributed.destroy_process_group()

    def _setup(self) -> None:
        config = self.config
        self.task = tasks.create(config)
        self.task.place_finishing(self.device)
        self.primary_metric, self.higher_is_better = self.task.primary_metric, self.task.higher_is_better
        pools = datasources.resolve(config.data)
        shape = self.task.shape
        self._check_resumed_data(pools.train + pools.validation)
        self.skipped: list[str] = []
        train, validation = split_cases(load_cases(pools.train, config, self.reporter, shape, self.skipped),
                                        load_cases(pools.validation, config, self.reporter, shape, self.skipped),
                                        config, self.reporter)
        self.reporter.log(f"{len(train)} training and {len(validation)} validation volumes")
        self.train_sources, self.train_cases = [s for s, _ in train], [c for _, c in train]
        self.val_sources, self.val_cases = [s for s, _ in validation], [c for _, c in validation]
        self.data_record = {"train": datasources.describe(self.train_sources),
                            "validation": datasources.describe(self.val_sources), "skipped": self.skipped}
        self.shortcut = self._shortcut_check() if self.is_main else {}
        torch.manual_seed(config.seed)
        self.model = channels_last(self.task.build_model().to(self.device))
        if config.network == "nnunet":
            self._check_fits()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        self.restore()
        self.val_samples = sampling.fixed_samples(self.val_cases, self.task.sample, config.val_puzzles, config.seed)
        self.write_config()

    def _check_fits(self) -> None:
        """nnU-Net's network: one sample through it, refused in one line (with what fits) if too small."""
        from RubikSSLLib import nnunet
        from RubikSSLLib.tasks.base import nnunet_plan

        sample = self.task.sample(self.train_cases[0], np.random.default_rng(self.config.seed), False)
        batch = move_batch({k: v[None] for k, v in sample.items()}, self.device)
        nnunet.check_fits(nnunet_plan(self.config), self.config.task, self.model,
                          lambda: self.task.forward(self.model, batch))

    def _check_resumed_data(self, sources: list[datasources.CaseSource]) -> None:
        """A resume trains on the data its run recorded (sha256 of every file), or says why it cannot."""
        if not self.resume or not self.run_dir.file(rundir.TRAINING_STATE).exists():
            return
        recorded = self.recorded_card().get("data", {})
        files = datasources.recorded_files(recorded.get("train", []) + recorded.get("validation", []))
        current = {channel for source in sources for channel in source.channels}
        datasources.check_unchanged(files, current, self.run_dir.path, set(recorded.get("skipped", [])))

    def _shortcut_check(self) -> dict:
        """The puzzle shortcut check (shortcuts.py), once per run: a resumed run reads it back from its last card."""
        last = self.run_dir.file(rundir.LAST_MODEL)
        if self.resume and last.exists():
            return checkpoint.read_card(last).get("puzzle_shortcut", {})
        result = shortcuts.pretraining_check(self.config, self.train_cases, self.config.shortcut_puzzles)
        if result:
            self.reporter.log(shortcuts.describe(result, min(self.config.puzzle.cube_size)))
        return result

    def _loader(self) -> Iterator[dict[str, torch.Tensor]]:
        workers = self.config.workers
        if workers < 0:  # CPU: samples made between steps; CUDA: as many workers as the step consumes
            workers = 0 if self.device.type == "cpu" else self.measured_workers()
        stream = sampling.SampleStream(self.train_cases, self.task.sample, self.config.seed, self.distributed.rank, self.step)
        if workers > 0:  # workers write into reused shared memory, copied to the device (batchslots.py)
            return batchslots.SlotLoader(stream, self.config.batch_size, workers, self.device)
        return iter(torch.utils.data.DataLoader(stream, batch_size=self.config.batch_size,
                                                pin_memory=self.device.type == "cuda"))

    def measured_workers(self) -> int:
        """The DataLoader workers this run's device needs (feeding.workers_needed), from the measured time to make
        one sample of its first training case and a training step's forward + backward on a batch of them."""
        config, case = self.config, self.train_cases[0]
        sample_s = feeding.seconds_per_sample(lambda rng: self.task.sample(case, rng, True))
        samples = [self.task.sample(case, np.random.default_rng(i), True) for i in range(config.batch_size)]
        batch = move_batch(torch.utils.data.default_collate(samples), self.device)
        dtype = autocast_dtype(config.precision, self.device)

        def step() -> torch.Tensor:
            with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                return self.task.loss(self.task.forward(self.model, batch), batch)

        step_s = feeding.seconds_per_step(self.model, step, self.device)
        cores = feeding.usable_cores()
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", self.distributed.world_size))
        workers = feeding.workers_needed(cores, sample_s, step_s, config.batch_size, processes)
        self.reporter.log(f"data: {workers} DataLoader workers (a sample takes {sample_s * 1e3:.0f} ms on one core, a "
                          f"step of {config.batch_size} {step_s * 1e3:.0f} ms; {cores} cores for {processes} "
                          f"process{'es' * (processes > 1)}); --workers N overrides")
        return workers

    def _train(self) -> dict[str, float]:
        self._setup()
        model: nn.Module = self.model
        if self.distributed.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        batches = self._loader()
        try:
            return self._steps(model, batches)
        finally:
            if isinstance(batches, batchslots.SlotLoader):
                batches.close()  # its workers end with the run, whatever ended it

    def _steps(self, model: nn.Module, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, float]:
        config, device = self.config, self.device
        dtype = autocast_dtype(config.precision, device)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        model.train()
        started, start_step = time.monotonic(), self.step
        waited, reported = 0.0, started  # seconds waiting for batches since the last progress event, and its time
        with StopSignal() as stop:
            while self.step < config.steps:
                if self.distributed.any(self.stop_asked(stop)):  # every rank stops at the same step
                    if self.step > start_step:
                        self.reporter.stopping(step=self.step)
                        self._checkpoint(batches, evaluate_now=False)
                    self.cancel(trained=self.step > start_step)
                for group in self.optimizer.param_groups:
                    group["lr"] = learning_rate_at(self.step, config)
                asked = time.monotonic()
                batch = move_batch(next(batches), device)
                waited += time.monotonic() - asked
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    loss = self.task.loss(self.task.forward(model, batch), batch)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"loss became {float(loss)} at step {self.step}; lower --learning-rate or use --precision fp32")
                self.optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(self.optimizer)
                scaler.update()
                self.position += 1
                if self.step % config.progress_every == 0 or self.step == config.steps:
                    now = time.monotonic()
                    rate = (self.step - start_step) * config.batch_size * self.distributed.world_size / (now - started)
                    # since the last event: the loss check waits for the device, so time in next() is time without data
                    data_wait = round(waited / max(now - reported, 1e-9), 3)
                    self.reporter.progress(self.step, config.steps, loss=round(loss.item(), 4), puzzles_per_s=round(rate, 1),
                                           data_wait=data_wait)
                    waited, reported = 0.0, now
                if self.step % config.eval_every == 0 and self.step < config.steps:
                    self._checkpoint(batches, evaluate_now=True)
        return self._checkpoint(batches, evaluate_now=True)

    def _checkpoint(self, batches: Iterator[dict[str, torch.Tensor]], evaluate_now: bool) -> dict[str, float]:
        """Re-estimate BN statistics, evaluate, then (rank 0) commit the checkpoint, keeping the last model too."""
        recalibrate_batchnorm(self.model, batches, self.config.bn_recalibration_batches, self.device,
                              forward=lambda batch: self.task.forward(self.model, batch))
        metrics = {}
        if evaluate_now:
            metrics = evaluate(self.model, self.val_samples, self.device, self.task)
            metrics["step"] = self.step
            self.history.append(metrics)
            self.reporter.metric(self.step, **{k: round(v, 4) for k, v in metrics.items() if k != "step"}, **self.task.chance())
        self.checkpoint(metrics, keep_last=True)
        return metrics

    def card(self, metrics: dict[str, float]) -> dict:
        return {
            **self.base_card(self.config.task, metrics),
            **self.task.card(),
            "normalisation": {
                "intensity": self.config.to_json()["intensity"],
                "spacing_mm": self.config.spacing_mm,
                "canonical_orientation": "LPS" if self.config.canonical_orientation else None,
                "cube": "each cube and channel min-max scaled to [-1, 1]; constant cubes -> 0",
            },
            "data": self.data_record,
            "chance": self.task.chance(),
            **({"puzzle_shortcut": self.shortcut} if self.shortcut else {}),
            "primary_metric": self.task.primary_metric,
            "pretrains_decoder": self.task.has_decoder,
            **({"decoder_prefix": self.task.decoder_prefix()} if self.task.has_decoder else {}),
        }


def load_pretrained(run_or_file: str | Path) -> tuple[nn.Module, dict]:
    """The best model of a run folder (or a model file) with its card, ready for evaluation on CPU."""
    path = Path(run_or_file)
    if path.is_dir():
        path = path / rundir.BEST_MODEL
    state, card = checkpoint.load_model(path, "rubikssl pretrain")
    if card.get("task") in ("classify", "segment"):
        raise BadInput(f"{path}: is a fine-tuned {card['task']} model; give a pretraining run folder "
                       "(written by rubikssl pretrain)")
    config = PretrainConfig.from_card(card, path, "pretrain")
    model = build_model(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise BadInput(f"{path}: weights do not match its own card ({str(error).splitlines()[0][:120]}); the file is damaged") from None
    model.eval()
    return model, card
