"""What differs between the two fine-tuning tasks, behind one interface: how a labelled case becomes a target, how
training batches are drawn, the loss, and the validation metrics. The fine-tuning loop (finetune.Finetuning)
holds one of these and never asks which task it runs."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric, MeanIoU, compute_roc_auc
from torch import nn

from RubikSSLLib import augment, guidance, interactive, labeled, regions
from RubikSSLLib.config import FinetuneConfig
from RubikSSLLib.errors import BadInput
from RubikSSLLib.preprocess import fit_to_size
from RubikSSLLib.volumes import Grid, Volume

FOREGROUND_SAMPLE = 20000  # foreground voxel indices kept per case to centre patches on


@dataclass
class Case:
    """A loaded labelled case: image (C, Z, Y, X) float32 in [-1, 1]; target a class index or a (Z, Y, X) map of
    class indices; foreground: (N, 3) voxel indices of non-background (segmentation)."""

    name: str
    image: np.ndarray
    target: int | np.ndarray
    foreground: np.ndarray | None = None


class Downstream:
    """One fine-tuning task. `rng` is the run's Generator (patch and batch draws, foreground subsampling)."""

    primary_metric: str

    with_label = False  # whether augmentation carries a label map along

    def __init__(self, config: FinetuneConfig, rng: np.random.Generator) -> None:
        self.config, self.rng = config, rng
        self.augment = augment.build(config.augment, config.patch_size, self.with_label, config.seed)

    def class_values(self, train: labeled.LabeledSet) -> tuple[dict[int, int], list[str]]:
        """Label value -> class index, and the class names."""
        raise NotImplementedError

    def set_classes(self, values: dict[int, int]) -> None:
        """The run's label value -> class index map (before validation)."""
        self.values = dict(values)
        self.per_case: list[dict] = []  # the last validation, case by case

    def check_classes(self, values: dict[int, int], names: list[str], val: list[labeled.LabeledSource]) -> None:
        pass

    def case(self, source: labeled.LabeledSource, image: np.ndarray, volume: Volume, values: dict[int, int]) -> Case:
        """A Case from the network-range image of `source` (`volume`: its loaded grid)."""
        raise NotImplementedError

    def default_iterations(self, cases: int) -> int:
        raise NotImplementedError

    def batches(self, cases: list[Case]) -> Iterator[dict[str, torch.Tensor]]:
        """Endless training batches {"image": (B, C, ...), "target": ...} drawn with the run's Generator."""
        raise NotImplementedError

    def loss(self) -> nn.Module:
        raise NotImplementedError

    def prepare(self, model: nn.Module, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The network input of a training batch (on the device); interactive segmentation adds its clicks here."""
        return image

    def output_classes(self, values: dict[int, int], names: list[str]) -> list[tuple[int, int, str]]:
        """(label value, class index, name) of each network output, for the model card."""
        return [(v, i, n) for (v, i), n in zip(values.items(), names)]

    def validate(self, model: nn.Module, cases: list[Case], device: torch.device, names: list[str]) -> dict[str, float]:
        raise NotImplementedError

    def case_outputs(self, model: nn.Module, cases: list[Case], device: torch.device, classes: int) -> dict:
        """Per-case results for the paired statistics (statistics.py): JSON-ready lists, one entry per case."""
        raise NotImplementedError

    def card(self) -> dict:
        """What inference needs to know about how this task was trained (model-card fields)."""
        return {}


class Classification(Downstream):
    """Classification. Trained with balanced sampling, the network learns as if every class were equally common;
    its logits are shifted back by the log of the training set's class shares (logit adjustment, Menon et al.,
    ICLR 2021), so probabilities and the argmax answer for the real prevalence. Measured on AdrenalMNIST3D at 10 %
    labels: accuracy 0.69 without the shift against 0.80 with the cases as they come, at the same AUC."""

    primary_metric = "val_auc"
    log_prior: torch.Tensor | None = None

    def set_prior(self, shares: list[float] | None) -> None:
        """The training set's class shares (K,), applied as a logit shift; None: no shift."""
        self.shares = shares
        self.log_prior = None if shares is None else torch.log(torch.tensor(shares, dtype=torch.float32))

    def training_shares(self, cases: list[Case], classes: int) -> list[float] | None:
        """The class shares to shift by: those of `cases` when they were drawn class-balanced, else none."""
        if self.config.class_balance != "sampling":
            return None
        counts = np.bincount([int(c.target) for c in cases], minlength=classes).astype(float)
        return (np.maximum(counts, 0.5) / counts.sum()).tolist()

    def card(self) -> dict:
        return {"class_prior": getattr(self, "shares", None)}

    def class_values(self, train: labeled.LabeledSet) -> tuple[dict[int, int], list[str]]:
        values = sorted({int(c.label) for c in train.cases} | set(train.class_names))
        return {v: i for i, v in enumerate(values)}, [train.class_names.get(v, f"class {v}") for v in values]

    def check_classes(self, values: dict[int, int], names: list[str], val: list[labeled.LabeledSource]) -> None:
        if len(values) < 2:
            raise BadInput(f"the training cases hold one class only ({names[0]}); classification needs "
                           "examples of at least two classes in --train")
        unknown = sorted({int(c.label) for c in val} - set(values))
        if unknown:
            raise BadInput(f"validation classes {unknown} do not occur in training; check --val")

    def case(self, source: labeled.LabeledSource, image: np.ndarray, volume: Volume, values: dict[int, int]) -> Case:
        return Case(source.name, fit_to_size(image, self.config.patch_size, -1.0), values[int(source.label)])

    def default_iterations(self, cases: int) -> int:
        return math.ceil(cases / self.config.batch_size)  # one pass over the cases

    def batches(self, cases: list[Case]) -> Iterator[dict[str, torch.Tensor]]:
        """With class_balance "sampling" each example's class is drawn uniformly, then a case of it (so a 10 %
        minority class fills half of a two-class batch); else epochs of shuffled cases."""
        order = self._balanced(cases) if self.config.class_balance == "sampling" else self._shuffled(cases)
        size = self.config.batch_size
        while True:
            chunk = [cases[next(order)] for _ in range(min(size, len(cases)))]
            yield {"image": torch.from_numpy(np.stack([augment.apply(self.augment, c.image)[0] for c in chunk])),
                   "target": torch.tensor([c.target for c in chunk])}

    def _balanced(self, cases: list[Case]) -> Iterator[int]:
        by_class: dict[int, list[int]] = {}
        for index, case in enumerate(cases):
            by_class.setdefault(int(case.target), []).append(index)
        members = [by_class[c] for c in sorted(by_class)]
        while True:
            chosen = members[int(self.rng.integers(len(members)))]
            yield chosen[int(self.rng.integers(len(chosen)))]

    def _shuffled(self, cases: list[Case]) -> Iterator[int]:
        while True:
            yield from (int(i) for i in self.rng.permutation(len(cases)))

    def loss(self) -> nn.Module:
        return nn.CrossEntropyLoss()

    def probabilities(self, model: nn.Module, cases: list[Case], device: torch.device) -> torch.Tensor:
        """(N, K) softmax outputs (prior-shifted, see the class), 16 cases at a time."""
        probabilities = []
        for first in range(0, len(cases), 16):
            images = torch.from_numpy(np.stack([c.image for c in cases[first : first + 16]])).to(device)
            logits = model(images).float().cpu()
            probabilities.append(torch.softmax(logits if self.log_prior is None else logits + self.log_prior, dim=1))
        return torch.cat(probabilities)

    def case_outputs(self, model: nn.Module, cases: list[Case], device: torch.device, classes: int) -> dict:
        return {"cases": [c.name for c in cases], "truth": [int(c.target) for c in cases],
                "probabilities": self.probabilities(model, cases, device).tolist()}

    def validate(self, model: nn.Module, cases: list[Case], device: torch.device, names: list[str]) -> dict[str, float]:
        probs = self.probabilities(model, cases, device)
        truth = torch.tensor([c.target for c in cases])
        accuracy = float((probs.argmax(1) == truth).float().mean())
        onehot = nn.functional.one_hot(truth, probs.shape[1])
        auc = float(compute_roc_auc(probs if probs.shape[1] > 2 else probs[:, 1], onehot if probs.shape[1] > 2 else truth))
        return {"val_auc": round(auc, 4), "val_acc": round(accuracy, 4)}


class Segmentation(Downstream):
    primary_metric = "val_mean_dice"
    with_label = True

    def class_values(self, train: labeled.LabeledSet) -> tuple[dict[int, int], list[str]]:
        """Index 0 is background; the values are the declared ones, else those found in the training label maps."""
        if train.class_names:
            values = sorted(set(train.class_names) | {0})
        else:
            seen: set[int] = set()
            for case in train.cases:
                seen |= set(np.unique(labeled.load_label_map(case.label, case.image.channels[0])).tolist())
            values = sorted(seen | {0})
        names = [train.class_names.get(v, "background" if v == 0 else f"class {v}") for v in values]
        return {v: i for i, v in enumerate(values)}, names

    def case(self, source: labeled.LabeledSource, image: np.ndarray, volume: Volume, values: dict[int, int]) -> Case:
        label = labeled.load_label_map(source.label, source.image.channels[0], Grid(image.shape[1:], volume.geometry),
                                       set(values))
        lookup = np.zeros(max(values) + 1, dtype=np.int64)
        lookup[list(values)] = list(values.values())
        indices = lookup[label]
        size = tuple(max(s, p) for s, p in zip(indices.shape, self.config.patch_size))  # at least one patch
        image, indices = fit_to_size(image, size, -1.0), fit_to_size(indices, size, 0)
        foreground = np.argwhere(indices > 0)
        if len(foreground) > FOREGROUND_SAMPLE:
            foreground = foreground[self.rng.choice(len(foreground), FOREGROUND_SAMPLE, replace=False)]
        return Case(source.name, image, indices, foreground)

    def default_iterations(self, cases: int) -> int:
        return math.ceil(cases * 4 / self.config.batch_size)  # 4 patches per case

    def batches(self, cases: list[Case]) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            patches = [self.patch(cases[int(self.rng.integers(len(cases)))]) for _ in range(self.config.batch_size)]
            yield {"image": torch.from_numpy(np.stack([p[0] for p in patches])),
                   "target": torch.from_numpy(np.stack([p[1] for p in patches]))[:, None]}

    def patch(self, case: Case) -> tuple[np.ndarray, np.ndarray]:
        """A training patch; half of them centred on a random foreground voxel (lesions are small). MONAI's
        RandCropByPosNegLabel would need every background voxel's index (~10^7 per case at 1 mm) or find them
        again on every draw; this is nnU-Net's scheme (forced foreground, else uniform) on a kept sample."""
        size = np.array(self.config.patch_size)
        shape = np.array(case.target.shape)
        if len(case.foreground) and self.rng.random() < 0.5:
            centre = case.foreground[int(self.rng.integers(len(case.foreground)))]
            start = np.clip(centre - size // 2, 0, shape - size)
        else:
            start = self.rng.integers(0, shape - size + 1)
        region = tuple(slice(s, s + p) for s, p in zip(start, size))
        return augment.apply(self.augment, case.image[(slice(None), *region)], case.target[region])

    def loss(self) -> nn.Module:
        return DiceCELoss(to_onehot_y=True, softmax=True)

    def overlaps(self, model: nn.Module, cases: list[Case], device: torch.device,
                 classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, classes - 1) foreground Dice and IoU per case (MONAI; NaN where a class is in neither map). With BraTS
        label values, each case's region Dice (regions.py) goes into `per_case` too."""
        dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
        iou = MeanIoU(include_background=False, reduction="none", ignore_empty=True)
        values = getattr(self, "values", {})
        brats = regions.regions_for(set(values))
        value_of = np.zeros(max(values.values(), default=0) + 1, dtype=np.int64)
        for value, index in values.items():
            value_of[index] = value
        self.per_case = []
        for case in cases:
            logits = sliding_window_inference(torch.from_numpy(case.image)[None].to(device), self.config.patch_size,
                                              4, model, overlap=0.25, mode="gaussian")
            indices = logits.argmax(1)
            prediction = nn.functional.one_hot(indices, classes).permute(0, 4, 1, 2, 3)
            truth = nn.functional.one_hot(torch.from_numpy(case.target)[None].to(device), classes).permute(0, 4, 1, 2, 3)
            dice(prediction, truth)
            iou(prediction, truth)
            row = {"case": case.name}
            if brats:
                row |= regions.region_dice(value_of[indices[0].cpu().numpy()], value_of[case.target], brats)
            self.per_case.append(row)
        per_class = dice.aggregate().cpu()
        for row, scores in zip(self.per_case, per_class.tolist()):
            row |= {f"dice_class_{i + 1}": score for i, score in enumerate(scores)}
        return per_class, iou.aggregate().cpu()

    def case_outputs(self, model: nn.Module, cases: list[Case], device: torch.device, classes: int) -> dict:
        dice, _ = self.overlaps(model, cases, device, classes)
        return {"cases": [c.name for c in cases], "dice": [[None if np.isnan(v) else v for v in row] for row in dice.tolist()]}

    def validate(self, model: nn.Module, cases: list[Case], device: torch.device, names: list[str]) -> dict[str, float]:
        dice, iou = self.overlaps(model, cases, device, len(names))
        per_class_dice = torch.nanmean(dice, dim=0)
        per_class_iou = torch.nanmean(iou, dim=0)
        metrics = {"val_mean_dice": round(float(torch.nanmean(per_class_dice)), 4),
                   "val_mean_iou": round(float(torch.nanmean(per_class_iou)), 4)}
        for name, d, j in zip(names[1:], per_class_dice.tolist(), per_class_iou.tolist()):
            metrics[f"dice_{name}"], metrics[f"iou_{name}"] = round(d, 4), round(j, 4)
        for region in regions.regions_for(set(getattr(self, "values", {}))):  # BraTS: the challenge's own scores
            scores = [row[region] for row in self.per_case if not np.isnan(row[region])]
            metrics[f"dice_{region}"] = round(float(np.mean(scores)), 4) if scores else float("nan")
        return metrics


class InteractiveSegmentation(Segmentation):
    """Click-guided segmentation of one object: every foreground label value is the object (BraTS: the whole
    tumour). Batches carry zero click maps after the image channels (so BatchNorm re-estimation sees the network's
    real input); `prepare` fills them with simulated clicks (interactive.ClickSimulator). Validation is a simulated
    user per case: Dice with 0, 1 and 3 clicks; the 1-click Dice is the primary metric."""

    VALIDATION_CLICKS = 3

    def __init__(self, config: FinetuneConfig, rng: np.random.Generator) -> None:
        super().__init__(config, rng)
        self.simulator = interactive.ClickSimulator(rng)

    def class_values(self, train: labeled.LabeledSet) -> tuple[dict[int, int], list[str]]:
        values, names = super().class_values(train)
        objects = [n for v, n in zip(values, names) if v != 0]
        return {v: int(v != 0) for v in values}, ["background", objects[0] if len(objects) == 1 else " + ".join(objects)]

    def output_classes(self, values: dict[int, int], names: list[str]) -> list[tuple[int, int, str]]:
        return [(0, 0, names[0]), (1, 1, names[1])]

    def batches(self, cases: list[Case]) -> Iterator[dict[str, torch.Tensor]]:
        for batch in super().batches(cases):
            image = batch["image"]
            no_clicks = image.new_zeros((image.shape[0], interactive.GUIDANCE_CHANNELS, *image.shape[2:]))
            yield {"image": torch.cat([image, no_clicks], dim=1), "target": batch["target"]}

    def prepare(self, model: nn.Module, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.simulator(model, image[:, : -interactive.GUIDANCE_CHANNELS], target)

    def sessions(self, model: nn.Module, cases: list[Case], device: torch.device) -> list[list[float]]:
        """Per case, Dice after 0 .. VALIDATION_CLICKS simulated clicks (interactive.simulated_session)."""
        self.per_case = []
        scores = []
        for case in cases:
            dice = interactive.simulated_session(model, case.image, case.target > 0, self.VALIDATION_CLICKS,
                                                 self.config.patch_size, device)
            self.per_case.append({"case": case.name, **{f"dice_{n}_clicks": round(d, 4) for n, d in enumerate(dice)}})
            scores.append(dice)
        return scores

    def case_outputs(self, model: nn.Module, cases: list[Case], device: torch.device, classes: int) -> dict:
        return {"cases": [c.name for c in cases], "dice": [[s[1]] for s in self.sessions(model, cases, device)]}

    def validate(self, model: nn.Module, cases: list[Case], device: torch.device, names: list[str]) -> dict[str, float]:
        mean = np.mean(self.sessions(model, cases, device), axis=0)
        return {"val_mean_dice": round(float(mean[1]), 4), "val_dice_0_clicks": round(float(mean[0]), 4),
                "val_dice_1_click": round(float(mean[1]), 4), f"val_dice_{self.VALIDATION_CLICKS}_clicks": round(float(mean[-1]), 4)}

    def card(self) -> dict:
        return {"interactive": {"guidance": "gaussian", "sigma_voxels": guidance.SIGMA_VOXELS,
                                "channels": list(guidance.CHANNELS), "roi_size": list(self.config.patch_size),
                                "no_click_share": interactive.NO_CLICK_SHARE,
                                "corrective_rounds": interactive.MAX_CORRECTIVE_ROUNDS}}


TASKS = {"classify": Classification, "segment": Segmentation}


def for_config(config: FinetuneConfig, rng: np.random.Generator) -> Downstream:
    """The Downstream of a fine-tuning config."""
    return InteractiveSegmentation(config, rng) if config.interactive else TASKS[config.task](config, rng)
