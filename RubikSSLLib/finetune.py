"""Fine-tuning a (pretrained or random) encoder for classification or segmentation.

Same run folder, checkpoint format, progress events, cancel/resume and exit codes as pretraining. Inputs are the
recipe-mapped intensities rescaled to [-1, 1], the range the encoder saw on its pretraining cubes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric, MeanIoU, compute_roc_auc
from torch import nn

from RubikSSLLib import checkpoint, labeled, models, preprocess, rundir, transfer
from RubikSSLLib.config import FinetuneConfig
from RubikSSLLib.errors import BadInput, Cancelled
from RubikSSLLib.files import write_json_atomic
from RubikSSLLib.networks import channels_last
from RubikSSLLib.preprocess import fit_to_size, to_network_range
from RubikSSLLib.progress import Reporter
from RubikSSLLib.volumes import Grid
from RubikSSLLib.devices import select_device
from RubikSSLLib.stopping import StopSignal
from RubikSSLLib.training import recalibrate_batchnorm, versions

PALETTE = [(0.90, 0.30, 0.24), (0.18, 0.55, 0.34), (0.20, 0.44, 0.80), (0.95, 0.77, 0.06), (0.56, 0.27, 0.68),
           (0.10, 0.74, 0.74), (0.90, 0.49, 0.13), (0.61, 0.35, 0.71), (0.36, 0.68, 0.89), (0.83, 0.33, 0.55)]


@dataclass
class Case:
    """A loaded labelled case: image (C, Z, Y, X) float32 in [-1, 1]; target a class index or a (Z, Y, X) map of
    class indices; foreground: (N, 3) voxel indices of non-background (segmentation)."""

    name: str
    image: np.ndarray
    target: int | np.ndarray
    foreground: np.ndarray | None = None


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


class Finetuning:
    """One fine-tuning run; `run()` returns the final validation metrics or raises Cancelled after checkpointing."""

    def __init__(self, config: FinetuneConfig, reporter: Reporter, resume: bool = False) -> None:
        self.config, self.reporter, self.resume = config, reporter, resume
        self.device = select_device(config.device)
        self.run_dir = rundir.RunDir(config.out)
        self.rng = np.random.default_rng(config.seed)
        self.epoch, self.best, self.history = 0, {}, []
        self.load_report: dict = {}

    # ---- data
    def _load(self, sources: list[labeled.LabeledSource], values: dict[int, int] | None) -> list[Case]:
        config, cases = self.config, []
        for source in sources:
            volume = labeled.load_image(source.image, config.spacing_mm, config.canonical_orientation)
            if volume.array.shape[0] != config.encoder.in_channels:
                raise BadInput(f"{source.name}: has {volume.array.shape[0]} channels, expected {config.encoder.in_channels}; "
                               "give every case the same channels")
            image = to_network_range(volume.array, config.intensity)
            if config.task == "classify":
                cases.append(Case(source.name, fit_to_size(image, config.patch_size, -1.0), int(source.label)))
                continue
            if not isinstance(source.label, str):
                raise BadInput(f"{source.name}: segmentation needs a label map file as 'label'")
            grid = Grid(image.shape[1:], volume.geometry)
            label = labeled.load_label_map(source.label, source.image.channels[0], grid, set(values))
            lookup = np.zeros(max(values) + 1, dtype=np.int64)
            lookup[list(values)] = list(values.values())
            indices = lookup[label]
            image, indices = self._pad_to_patch(image, indices)
            foreground = np.argwhere(indices > 0)
            if len(foreground) > 20000:
                foreground = foreground[self.rng.choice(len(foreground), 20000, replace=False)]
            cases.append(Case(source.name, image, indices, foreground))
        return cases

    def _pad_to_patch(self, image: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        size = tuple(max(s, p) for s, p in zip(target.shape, self.config.patch_size))
        return fit_to_size(image, size, -1.0), fit_to_size(target, size, 0)

    def _class_values(self, train: labeled.LabeledSet) -> tuple[dict[int, int], list[str]]:
        """Label value -> class index, and class names (index 0 = background for segmentation)."""
        if self.config.task == "classify":
            values = sorted({int(c.label) for c in train.cases} | set(train.class_names))
        elif train.class_names:
            values = sorted(set(train.class_names) | {0})
        else:
            seen: set[int] = set()
            for case in train.cases:
                seen |= set(np.unique(labeled.load_label_map(case.label, case.image.channels[0])).tolist())
            values = sorted(seen | {0})
        default = "background" if self.config.task == "segment" else "class"
        names = [train.class_names.get(v, default if v == 0 and self.config.task == "segment" else f"{default} {v}")
                 for v in values]
        return {v: i for i, v in enumerate(values)}, names

    # ---- model
    def _build(self, num_classes: int) -> nn.Module:
        config = self.config
        torch.manual_seed(config.seed)
        network = models.build(config.task, config.decoder, config.encoder, num_classes)
        if config.init != "scratch":
            report, card = transfer.load_encoder(network, config.init)
            self.load_report = {"loaded": len(report.loaded), "missing": report.missing, "unexpected": report.unexpected,
                                "adapted": report.adapted, "decoder_loaded": len(report.decoder),
                                "pretraining_task": card.get("task"), "pretraining_step": card.get("step")}
            self.reporter.log(f"initialised from {config.init}: {report.summary()}")
        return channels_last(network.to(self.device))

    # ---- loop
    def run(self) -> dict[str, float]:
        with self.run_dir.session(self.resume):
            return self._train()

    def _train(self) -> dict[str, float]:
        config = self.config
        train_set = labeled.LabeledSet([], {})
        for item in config.train:
            found = labeled.resolve(item, "train")
            train_set.cases += found.cases
            train_set.class_names.update(found.class_names)
        val_sources = [c for item in config.val for c in labeled.resolve(item, "val").cases]
        if not train_set.cases or not val_sources:
            raise BadInput("no labelled cases found in --train or --val; check the data")
        check_label_kinds(train_set.cases + val_sources, config.task)
        self.values, self.names = self._class_values(train_set)
        if config.task == "classify":
            if len(self.values) < 2:
                raise BadInput(f"the training cases hold one class only ({self.names[0]}); classification needs "
                               "examples of at least two classes in --train")
            unknown = sorted({int(c.label) for c in val_sources} - set(self.values))
            if unknown:
                raise BadInput(f"validation classes {unknown} do not occur in training; check --val")
        chosen = choose_fraction(train_set.cases, config.label_fraction, config.seed)
        self.reporter.log(f"{len(chosen)} of {len(train_set.cases)} training cases (fraction {config.label_fraction}), "
                          f"{len(val_sources)} validation cases, classes {self.names}")
        self.chosen_names = [c.name for c in chosen]
        self.train_cases = self._load(chosen, self.values)
        self.val_cases = self._load(val_sources, self.values)
        if config.task == "classify":
            self.train_cases = [Case(c.name, c.image, self.values[c.target]) for c in self.train_cases]
            self.val_cases = [Case(c.name, c.image, self.values[c.target]) for c in self.val_cases]
        self.model = self._build(len(self.names))
        self.optimizer = torch.optim.Adam(self._parameter_groups(), lr=config.learning_rate)
        state_path = self.run_dir.file(rundir.TRAINING_STATE)
        if self.resume and state_path.exists():
            state = checkpoint.load_training_state(state_path, self.model, self.optimizer)
            self.epoch, self.best, self.history = state["epoch"], state["best"], state["history"]
            self.run_dir.truncate_metrics("epoch", self.epoch)
            self.reporter.log(f"resumed {self.run_dir.path} at epoch {self.epoch}")
        elif config.init != "scratch" and config.recalibrate_bn:
            recalibrate_batchnorm(self.model.encoder, self._batches(), 8, self.device, key="image")
        write_json_atomic(self.run_dir.file(rundir.CONFIG), config.to_json())
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True) if config.task == "segment" else nn.CrossEntropyLoss()
        iterations = config.iterations_per_epoch or math.ceil(
            len(self.train_cases) * (4 if config.task == "segment" else 1) / config.batch_size)
        total, metrics = config.epochs * iterations, {}
        with StopSignal() as stop:
            batches = self._batches()
            while self.epoch < config.epochs:
                frozen = self.epoch < config.freeze_epochs
                self.model.train()
                self.model.encoder.requires_grad_(not frozen)
                if frozen:
                    self.model.encoder.eval()  # keep pretrained BN statistics while the head warms up
                for iteration in range(iterations):
                    if stop.received or self.run_dir.stop_requested():
                        self._save({})
                        self.run_dir.clear_stop()  # honoured: it must not cancel the resumed run
                        raise Cancelled(f"stopped in epoch {self.epoch + 1}; continue with --resume (the epoch restarts)")
                    step = self.epoch * iterations + iteration + 1
                    self._set_learning_rate(step, total)
                    loss = self._step(next(batches))
                    if step % 5 == 0 or iteration == iterations - 1:
                        self.reporter.progress(step, total, epoch=self.epoch + 1, loss=round(loss, 4))
                self.epoch += 1
                metrics = {"epoch": self.epoch, **self.validate()}
                self.history.append(metrics)
                self.reporter.metric(self.epoch, **{k: v for k, v in metrics.items() if k != "epoch"})
                self._save(metrics)
        return metrics

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
        or a cosine decay to 0 at `total`. Computed from the step alone, so a resumed run continues the schedule."""
        warmup = self.config.warmup_epochs * total / self.config.epochs
        if step <= warmup:
            scale = step / warmup
        elif self.config.lr_schedule == "cosine":
            scale = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
        else:
            scale = 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * scale

    def _batches(self):
        """Endless training batches {"image": (B, C, ...), "target": ...} drawn with the run's Generator."""
        config = self.config
        while True:
            if config.task == "classify":
                order = self.rng.permutation(len(self.train_cases))
                for first in range(0, len(order) - config.batch_size + 1 or 1, config.batch_size):
                    chunk = [self.train_cases[i] for i in order[first : first + config.batch_size]]
                    yield {"image": torch.from_numpy(np.stack([c.image for c in chunk])),
                           "target": torch.tensor([c.target for c in chunk])}
            else:
                patches = [self._patch(self.train_cases[int(self.rng.integers(len(self.train_cases)))])
                           for _ in range(config.batch_size)]
                yield {"image": torch.from_numpy(np.stack([p[0] for p in patches])),
                       "target": torch.from_numpy(np.stack([p[1] for p in patches]))[:, None]}

    def _patch(self, case: Case) -> tuple[np.ndarray, np.ndarray]:
        """A training patch; half of them centred on a random foreground voxel (lesions are small)."""
        size = np.array(self.config.patch_size)
        shape = np.array(case.target.shape)
        if len(case.foreground) and self.rng.random() < 0.5:
            centre = case.foreground[int(self.rng.integers(len(case.foreground)))]
            start = np.clip(centre - size // 2, 0, shape - size)
        else:
            start = self.rng.integers(0, shape - size + 1)
        region = tuple(slice(s, s + p) for s, p in zip(start, size))
        return case.image[(slice(None), *region)], case.target[region]

    def _step(self, batch: dict[str, torch.Tensor]) -> float:
        image, target = batch["image"].to(self.device), batch["target"].to(self.device)
        loss = self.loss(self.model(image), target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.model.eval()
        result = self._validate_classify() if self.config.task == "classify" else self._validate_segment()
        self.model.train()
        return result

    def _validate_classify(self) -> dict[str, float]:
        probabilities = []
        for first in range(0, len(self.val_cases), 16):
            images = torch.from_numpy(np.stack([c.image for c in self.val_cases[first : first + 16]])).to(self.device)
            probabilities.append(torch.softmax(self.model(images), dim=1).cpu())
        probs = torch.cat(probabilities)
        truth = torch.tensor([c.target for c in self.val_cases])
        accuracy = float((probs.argmax(1) == truth).float().mean())
        onehot = nn.functional.one_hot(truth, probs.shape[1])
        auc = float(compute_roc_auc(probs if probs.shape[1] > 2 else probs[:, 1], onehot if probs.shape[1] > 2 else truth))
        return {"val_auc": round(auc, 4), "val_acc": round(accuracy, 4)}

    def _validate_segment(self) -> dict[str, float]:
        dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
        iou = MeanIoU(include_background=False, reduction="none", ignore_empty=True)
        classes = len(self.names)
        for case in self.val_cases:
            logits = sliding_window_inference(torch.from_numpy(case.image)[None].to(self.device), self.config.patch_size,
                                              4, self.model, overlap=0.25, mode="gaussian")
            prediction = nn.functional.one_hot(logits.argmax(1), classes).permute(0, 4, 1, 2, 3)
            truth = nn.functional.one_hot(torch.from_numpy(case.target)[None], classes).permute(0, 4, 1, 2, 3)
            dice(prediction, truth)
            iou(prediction, truth)
        per_class_dice = torch.nanmean(dice.aggregate(), dim=0)
        per_class_iou = torch.nanmean(iou.aggregate(), dim=0)
        metrics = {"val_mean_dice": round(float(torch.nanmean(per_class_dice)), 4),
                   "val_mean_iou": round(float(torch.nanmean(per_class_iou)), 4)}
        for name, d, j in zip(self.names[1:], per_class_dice.tolist(), per_class_iou.tolist()):
            metrics[f"dice_{name}"], metrics[f"iou_{name}"] = round(d, 4), round(j, 4)
        return metrics

    def _key(self) -> str:
        return "val_auc" if self.config.task == "classify" else "val_mean_dice"

    def _save(self, metrics: dict) -> None:
        key = self._key()
        is_best = bool(metrics) and not math.isnan(metrics[key]) and metrics[key] >= self.best.get(key, -1.0)
        if is_best:
            self.best = dict(metrics)
        if metrics:
            self.run_dir.append_metrics(metrics)
        # The model file first, the training state last: the state is the commit point a resume starts from.
        if is_best or not self.run_dir.file(rundir.BEST_MODEL).exists():
            checkpoint.save_model(self.run_dir.file(rundir.BEST_MODEL), self.model.state_dict(), self.card(metrics))
            self.reporter.artifact(str(self.run_dir.file(rundir.BEST_MODEL)), "model")
        state = {"epoch": self.epoch, "best": self.best, "history": self.history}
        checkpoint.save_training_state(self.run_dir.file(rundir.TRAINING_STATE), self.model, self.optimizer, state)

    def card(self, metrics: dict) -> dict:
        config = self.config
        first_source = self.train_cases[0].name if self.train_cases else ""
        return {
            "format": checkpoint.FORMAT,
            "task": config.task,
            "epoch": self.epoch,
            "config": config.to_json(),
            "classes": [{"index": i, "value": v, "name": n, "color": list(PALETTE[(i - 1) % len(PALETTE)]) if i else [0, 0, 0]}
                        for (v, i), n in zip(self.values.items(), self.names)],
            "channels": [f"channel {i}" for i in range(config.encoder.in_channels)],
            "normalisation": preprocess.recipe_card(config.to_json(), config.task),
            "postprocessing": {"largest_component": []},  # label values; `segment --largest-component` overrides
            "init": {"source": config.init, **self.load_report},
            "data": {"train": self.chosen_names, "example": first_source},
            "metrics": metrics,
            "best": self.best,
            "versions": versions(),
        }
