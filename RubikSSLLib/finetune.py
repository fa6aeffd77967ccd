"""Fine-tuning a (pretrained or random) encoder for classification or segmentation.

Same run folder, checkpoint format, progress events, cancel/resume and exit codes as pretraining (runloop.RunLoop).
The data part (labelled cases, classes, the label fraction) is here, what differs per task is a
downstream.Downstream, and inputs go through preprocess: recipe-mapped intensities rescaled to [-1, 1], the range
the encoder saw on its pretraining cubes.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from RubikSSLLib import datasources, downstream, labeled, models, preprocess, rundir, transfer
from RubikSSLLib.config import FinetuneConfig
from RubikSSLLib.downstream import Case
from RubikSSLLib.errors import BadInput
from RubikSSLLib.files import write_json_atomic
from RubikSSLLib.networks import channels_last
from RubikSSLLib.preprocess import to_network_range
from RubikSSLLib.progress import Reporter
from RubikSSLLib.runloop import RunLoop, learning_rate_scale, recalibrate_batchnorm
from RubikSSLLib.stopping import StopSignal

__all__ = ["Case", "FinetuneConfig", "Finetuning", "check_label_kinds", "choose_fraction"]

VALIDATION_CASES = "val_cases.json"  # the last validation, case by case (per-class and BraTS region Dice)
PALETTE = [(0.90, 0.30, 0.24), (0.18, 0.55, 0.34), (0.20, 0.44, 0.80), (0.95, 0.77, 0.06), (0.56, 0.27, 0.68),
           (0.10, 0.74, 0.74), (0.90, 0.49, 0.13), (0.61, 0.35, 0.71), (0.36, 0.68, 0.89), (0.83, 0.33, 0.55)]


def check_label_kinds(cases: list[labeled.LabeledSource], task: str) -> None:
    """Classification needs a class number per case, segmentation a label map file: say which data was given."""
    for case in cases:
        if task == "classify" and isinstance(case.label, str):
            raise BadInput(f"{case.name}: its label is a label map file ({case.label}), which is segmentation data; "
                           "use --task segment, or give class numbers as labels")
        if task == "segment" and not isinstance(case.label, str):
            raise BadInput(f"{case.name}: its label is the class number {case.label}, which is classification data; "
                           "use --task classify, or give a label map file as 'label'")


def choose_fraction(cases: list[labeled.LabeledSource], fraction: float, seed: int) -> list[labeled.LabeledSource]:
    """A reproducible subset: the same seed gives the same cases to every initialisation (paired comparisons)."""
    count = round(fraction * len(cases))
    if count < 1:
        raise BadInput(f"--label-fraction {fraction} of {len(cases)} training cases leaves no case; use a larger fraction")
    order = np.random.default_rng([seed, 104729]).permutation(len(cases))
    return [cases[i] for i in sorted(order[:count])]


def gather(items: list[str], split: str) -> labeled.LabeledSet:
    """The labelled cases (and declared class names) of every DATA item of one split."""
    found = labeled.LabeledSet([], {})
    for item in items:
        part = labeled.resolve(item, split)
        found.cases += part.cases
        found.class_names.update(part.class_names)
    return found


def load_cases(sources: list[labeled.LabeledSource], config: FinetuneConfig, task: downstream.Downstream,
               values: dict[int, int]) -> list[Case]:
    """The labelled cases through the preprocessing path, as `task` needs them (class values -> indices)."""
    cases = []
    for source in sources:
        volume = labeled.load_image(source.image, config.spacing_mm, config.canonical_orientation)
        if volume.array.shape[0] != config.encoder.in_channels:
            raise BadInput(f"{source.name}: has {volume.array.shape[0]} channels, expected {config.encoder.in_channels}; "
                           "give every case the same channels")
        cases.append(task.case(source, to_network_range(volume.array, config.intensity), volume, values))
    return cases


class Finetuning(RunLoop):
    """One fine-tuning run; `run()` returns the final validation metrics or raises Cancelled after checkpointing."""

    position_key = "epoch"

    def __init__(self, config: FinetuneConfig, reporter: Reporter, resume: bool = False) -> None:
        super().__init__(config, reporter, resume)
        self.rng = np.random.default_rng(config.seed)
        self.task: downstream.Downstream = downstream.for_config(config, self.rng)
        self.primary_metric = self.task.primary_metric
        self.load_report: dict = {}

    @property
    def epoch(self) -> int:
        return self.position

    # ---- data
    def _select(self) -> tuple[list[labeled.LabeledSource], list[labeled.LabeledSource]]:
        """The labelled training subset (label fraction) and the validation cases; classes into self.values/names."""
        config = self.config
        train_set = gather(config.train, "train")
        val_sources = gather(config.val, "val").cases
        if not train_set.cases or not val_sources:
            raise BadInput("no labelled cases found in --train or --val; check the data")
        check_label_kinds(train_set.cases + val_sources, config.task)
        self.values, self.names = self.task.class_values(train_set)
        self.task.check_classes(self.values, self.names, val_sources)
        self.task.set_classes(self.values)
        chosen = choose_fraction(train_set.cases, config.label_fraction, config.seed)
        self.reporter.log(f"{len(chosen)} of {len(train_set.cases)} training cases (fraction {config.label_fraction}), "
                          f"{len(val_sources)} validation cases, classes {self.names}")
        self.chosen_names = [c.name for c in chosen]
        files = sorted({f for case in chosen + val_sources for f in (*case.image.channels, *([case.label] if isinstance(case.label, str) else []))})
        if self.resume and self.run_dir.file(rundir.TRAINING_STATE).exists():
            recorded = self.recorded_card().get("data", {}).get("files")
            if recorded is not None:  # runs from before data hashes were recorded resume unchecked
                datasources.check_unchanged(datasources.recorded_files(recorded), set(files), self.run_dir.path)
        self.data_files = [{"path": f, "sha256": datasources.file_digest(f)} for f in files]
        return chosen, val_sources

    def _load(self, sources: list[labeled.LabeledSource]) -> list[Case]:
        return load_cases(sources, self.config, self.task, self.values)

    # ---- model
    def _build(self, num_classes: int) -> nn.Module:
        config = self.config
        torch.manual_seed(config.seed)
        network = models.build_for(config, num_classes)
        if config.resume_from is not None:
            self.load_report = transfer.load_finetuned_weights(network, config.resume_from, self.card_classes(),
                                                               values_only=config.interactive)
            self.names = self.load_report.pop("class_names")  # the model's names go on
            self.reporter.log(f"continuing from the fine-tuned model {config.resume_from}")
        elif config.init != "scratch":
            report, card = transfer.load_encoder(network, config.init, config.init_stages)
            self.load_report = {"loaded": len(report.loaded), "missing": report.missing, "unexpected": report.unexpected,
                                "adapted": report.adapted, "decoder_loaded": len(report.decoder),
                                "decoder_unused": report.decoder_unused, "fresh": report.fresh,
                                "pretraining_task": card.get("task"), "pretraining_step": card.get("step")}
            self.reporter.log(f"initialised from {config.init}: {report.summary()}")
        return channels_last(network.to(self.device))

    def _parameter_groups(self) -> list[dict]:
        """One group, or the encoder at learning_rate x encoder_lr_factor beside the new layers at learning_rate."""
        if self.config.encoder_lr_factor == 1:
            return [{"params": list(self.model.parameters()), "base_lr": self.config.learning_rate}]
        encoder = {id(p) for p in self.model.encoder.parameters()}
        rest = [p for p in self.model.parameters() if id(p) not in encoder]
        return [{"params": list(self.model.encoder.parameters()),
                 "base_lr": self.config.learning_rate * self.config.encoder_lr_factor},
                {"params": rest, "base_lr": self.config.learning_rate}]

    def _set_learning_rate(self, step: int, total: int) -> None:
        """Linear warm-up over the first warmup_epochs worth of the `total` steps (`step` is 1-based), then constant
        or a cosine decay to 0 at `total` (runloop.learning_rate_scale: resumed runs continue the schedule)."""
        warmup = self.config.warmup_epochs * total / self.config.epochs
        scale = learning_rate_scale(step, total, warmup, self.config.lr_schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * scale

    # ---- loop
    def _train(self) -> dict[str, float]:
        config = self.config
        chosen, val_sources = self._select()
        self.train_cases, self.val_cases = self._load(chosen), self._load(val_sources)
        if isinstance(self.task, downstream.Classification):
            self.task.set_prior(self.task.training_shares(self.train_cases, len(self.names)))
        self.model = self._build(len(self.names))
        self.optimizer = torch.optim.Adam(self._parameter_groups(), lr=config.learning_rate)
        if not self.restore() and config.init != "scratch" and config.recalibrate_bn:
            recalibrate_batchnorm(self.model.encoder, self.task.batches(self.train_cases), 8, self.device, key="image")
        self.write_config()
        self.loss = self.task.loss()
        iterations = config.iterations_per_epoch or self.task.default_iterations(len(self.train_cases))
        total, metrics = config.epochs * iterations, {}
        trained = False  # has this process taken a step (else a cancel has nothing new to keep)
        with StopSignal() as stop:
            batches = self.task.batches(self.train_cases)
            while self.epoch < config.epochs:
                started = time.monotonic()
                self._set_trainable(self.epoch < config.freeze_epochs)
                for iteration in range(iterations):
                    if self.stop_asked(stop):
                        if trained:
                            self.reporter.stopping(epoch=self.epoch)
                            self.checkpoint({})
                        self.cancel(f"in epoch {self.epoch + 1} (it restarts on --resume)", trained=trained)
                    step = self.epoch * iterations + iteration + 1
                    self._set_learning_rate(step, total)
                    loss = self._step(next(batches))
                    trained = True
                    if step % 5 == 0 or iteration == iterations - 1:
                        self.reporter.progress(step, total, epoch=self.epoch + 1, loss=round(loss, 4))
                self.position += 1
                metrics = {"epoch": self.epoch, **self.validate()}
                self.history.append(metrics)
                seconds = round(time.monotonic() - started, 1)  # training and validation: what a user plans with
                self.reporter.metric(self.epoch, unit="epoch", **{k: v for k, v in metrics.items() if k != "epoch"},
                                     epoch_s=seconds)
                self.checkpoint(metrics, keep_last=True)  # the last model scores a paired comparison on val
        return metrics

    def _set_trainable(self, frozen: bool) -> None:
        self.model.train()
        self.model.encoder.requires_grad_(not frozen)
        if frozen:
            self.model.encoder.eval()  # keep pretrained BN statistics while the head warms up

    def _step(self, batch: dict[str, torch.Tensor]) -> float:
        image, target = batch["image"].to(self.device), batch["target"].to(self.device)
        loss = self.loss(self.model(self.task.prepare(self.model, image, target)), target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """The validation metrics; segmentation also writes them case by case to val_cases.json."""
        self.model.eval()
        result = self.task.validate(self.model, self.val_cases, self.device, self.names)
        self.model.train()
        if getattr(self.task, "per_case", None) and self.is_main:
            write_json_atomic(self.run_dir.file(VALIDATION_CASES), {"epoch": self.epoch, "cases": self.task.per_case})
        return result

    def card_classes(self) -> list[dict]:
        """The model card's classes: index, label value, name and segment colour of every network output."""
        return [{"index": i, "value": v, "name": n, "color": list(PALETTE[(i - 1) % len(PALETTE)]) if i else [0, 0, 0]}
                for v, i, n in self.task.output_classes(self.values, self.names)]

    def card(self, metrics: dict) -> dict:
        config = self.config
        first_source = self.train_cases[0].name if self.train_cases else ""
        return {
            **self.base_card(config.task, metrics),
            "classes": self.card_classes(),
            "channels": [f"channel {i}" for i in range(config.encoder.in_channels)],
            "normalisation": preprocess.recipe_card(config.to_json(), config.task),
            "postprocessing": {"largest_component": []},  # label values; `segment --largest-component` overrides
            **self.task.card(),
            "init": {"source": config.init, **self.load_report},
            "data": {"train": self.chosen_names, "example": first_source, "files": self.data_files},
        }
