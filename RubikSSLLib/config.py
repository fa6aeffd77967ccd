"""The typed configuration of every command: pretrain, finetune, evaluate, puzzle, segment, classify.

The command line derives its options from these fields (RubikSSLLib.options), and the Slicer panel can build the
same objects, so both meet the same checks and the same one-line messages. Training configs are saved as
RUN_DIR/config.json and inside every model card. Imports neither torch nor MONAI.
Sizes are voxels (z, y, x); spacings are isotropic millimetres (None = the file's own grid).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from RubikSSLLib import taskspec
from RubikSSLLib.errors import BadInput
from RubikSSLLib.files import check_output_file, check_output_folder
from RubikSSLLib.intensity import IntensityRecipe
from RubikSSLLib.options import DERIVED, build, check_range, float_list, int_list, option, spacing, voxel_triple
from RubikSSLLib.puzzle import PuzzleSpec

DEVICES = "auto, cpu, cuda or cuda:N"
MAX_LEARNING_RATE = 1.0  # Adam and SGD diverge far below this on every network here
MAX_SIZE = 1024  # voxels per axis of a patch, and channels per encoder stage


def settings_from_json(cls: type, data: dict):
    """A settings dataclass (PuzzleSpec, EncoderConfig, IntensityRecipe) from its JSON form, where tuples became lists."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known})


def check_device(device: str) -> None:
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise BadInput(f"--device {device}: use {DEVICES}")


def check_sizes(flag: str, values: tuple[int, ...], low: int = 1, high: int = MAX_SIZE) -> None:
    if not values or any(not isinstance(v, int) or not low <= v <= high for v in values):
        raise BadInput(f"{flag} {','.join(map(str, values))}: each value must be a whole number from {low} to {high}")


@dataclass(frozen=True)
class EncoderConfig:
    """VGG-style 3D encoder: stage 0 is a stride-2 stem (3x faster on CPU than a full-resolution first conv),
    later stages max-pool by 2 then run `depths[s]` 3x3x3 conv + norm + ReLU blocks (default: 1, then 2 each)."""

    in_channels: int = 1
    widths: tuple[int, ...] = field(default=(16, 32, 64, 128), metadata=option(
        "encoder channels per stage; a pretrained --init brings its own", parse=int_list, metavar="W,W,..."))
    depths: tuple[int, ...] | None = field(default=None, metadata={DERIVED: True})
    norm: str = field(default="batch", metadata=option("encoder normalisation", choices=("batch", "instance", "group")))

    def __post_init__(self) -> None:
        check_sizes("--widths", tuple(self.widths))
        if not 1 <= len(self.widths) <= 6:
            raise BadInput(f"--widths {','.join(map(str, self.widths))}: give 1 to 6 stages")
        if self.depths is None:
            object.__setattr__(self, "depths", (1,) + (2,) * (len(self.widths) - 1))
        if len(self.widths) != len(self.depths) or min(self.depths) < 1:
            raise BadInput(f"encoder widths {self.widths} and depths {self.depths} need one positive depth per stage")
        if not isinstance(self.in_channels, int) or not 1 <= self.in_channels <= 64:
            raise BadInput(f"encoder input channels {self.in_channels}: give 1 to 64 channel files per case")
        if self.norm not in ("batch", "instance", "group"):
            raise BadInput(f"--norm {self.norm}: use batch, instance or group")

    @property
    def downsampling(self) -> int:
        """The stem and every later stage halve the input: sizes must be multiples of this."""
        return 2 ** len(self.widths)


class JsonConfig:
    """to_json / from_json / read for the configs saved in run folders and model cards."""

    NESTED: dict[str, type] = {}

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict):
        if not isinstance(data, dict):
            raise BadInput(f"a {cls.__name__} must be a JSON object")
        data = {**data, **{name: settings_from_json(kind, data[name]) for name, kind in cls.NESTED.items() if name in data}}
        known = {f.name: f for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) and "tuple" in str(known[k].type) else v
                      for k, v in data.items() if k in known})

    @classmethod
    def from_card(cls, card: dict, path: Path, command: str):
        """The config inside a model card; a card without one, or with a broken one, is one line naming `path`."""
        if not isinstance(card.get("config"), dict):
            raise BadInput(f"{path}: its model card lacks config; give a model written by rubikssl {command}")
        try:
            return cls.from_json(card["config"])
        except BadInput as error:  # a value no command line gave: say it is the card's
            raise BadInput(f"{path}: its model card holds an invalid setting ({str(error).replace('--', '')}); the file "
                           f"is damaged or not RubikSSL's: give a model written by rubikssl {command}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise BadInput(f"{path}: its model card's config is incomplete ({type(error).__name__}: {error}); "
                           f"give a model written by rubikssl {command}") from None

    @classmethod
    def read(cls, path: Path):
        """The config stored in a run folder; a broken or foreign file is one line naming it."""
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except BadInput as error:
            raise BadInput(f"{path}: {error}; start a new run instead of --resume") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise BadInput(f"{path}: unreadable or foreign run config ({type(error).__name__}: {str(error)[:100]}); "
                           "start a new run instead of --resume") from None


@dataclass
class PretrainConfig(JsonConfig):
    """All settings of `rubikssl pretrain`."""

    NESTED = {"puzzle": PuzzleSpec, "encoder": EncoderConfig, "intensity": IntensityRecipe}

    data: list[str] = field(metadata=option("volume files, folders, datalist .json, nnU-Net folder, .npz"))
    out: str = field(metadata=option("run folder (checkpoints, model, metrics)"))
    task: str = field(default="rubik", metadata=option(
        f"pretext task: {', '.join(taskspec.names())}, or several on one encoder as rubik,mae or with loss weights "
        "rubik=1,mae=0.5; jigsaw takes --grid 2|3", metavar="TASK[,TASK...]"))
    puzzle: PuzzleSpec = field(default_factory=PuzzleSpec)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    intensity: IntensityRecipe = field(default_factory=IntensityRecipe)
    spacing_mm: float | None = field(default=2.0, metadata=option(
        "resample to this isotropic mm, or 'native'", flag="--spacing", parse=spacing))
    canonical_orientation: bool = True
    skip_unusable: bool = field(default=False, metadata=option(
        "leave out (and report) volumes that cannot be used instead of stopping"))
    steps: int = field(default=2000, metadata=option("training steps"))
    batch_size: int = field(default=8, metadata=option("puzzles per step"))
    learning_rate: float = field(default=1e-3, metadata=option("peak learning rate (Adam)"))
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_learning_rate_factor: float = 0.01
    val_fraction: float = 0.2
    val_puzzles: int = field(default=128, metadata=option("fixed held-out samples per evaluation"))
    eval_every: int = field(default=250, metadata=option("steps between validation + checkpoint"))
    progress_every: int = 5
    bn_recalibration_batches: int = 16
    seed: int = field(default=0, metadata=option("random seed"))
    device: str = field(default="auto", metadata=option(DEVICES))
    precision: str = field(default="auto", metadata=option("autocast precision", choices=("auto", "fp32", "bf16", "fp16")))
    workers: int = field(default=-1, metadata=option("DataLoader workers (-1: 0 on CPU; on CUDA as many as the "
                                                              "measured sample and step times need, within the cores)"))
    shortcut_puzzles: int = field(default=2000, metadata=option(
        "puzzles of the trivial-cue shortcut check before a cube-grid pretraining (0: skip it)"))
    network: str = field(default="rubikssl", metadata=option(
        "rubikssl (our VGG-style encoder) or nnunet (nnU-Net's own network, built from --plans; the optional extra "
        "rubikssl[nnunet])", choices=("rubikssl", "nnunet")))
    plans: str | None = field(default=None, metadata=option(
        "--network nnunet: the nnUNetPlans.json of nnU-Net's planning (its dataset.json beside it)", default_note="none"))
    configuration: str = field(default="3d_fullres", metadata=option("--network nnunet: the plans' configuration"))
    nnunet: dict | None = None  # the plans and dataset.json read at the start (nnunet.read_plans): the run keeps them

    def __post_init__(self) -> None:
        check_range("steps", self.steps, 1, 1e9)
        check_range("shortcut_puzzles", self.shortcut_puzzles, 0, 1e6)
        check_range("batch_size", self.batch_size, 2, 4096)
        check_range("learning_rate", self.learning_rate, 0, MAX_LEARNING_RATE, low_open=True)
        check_range("weight_decay", self.weight_decay, 0, 1)
        check_range("warmup_steps", self.warmup_steps, 0, 1e9)
        check_range("val_fraction", self.val_fraction, 0, 0.9)
        check_range("val_puzzles", self.val_puzzles, 1, 1e6)
        check_range("eval_every", self.eval_every, 1, 1e9)
        check_range("spacing", self.spacing_mm, 0.05, 50)
        check_range("workers", self.workers, -1, 256)
        check_range("seed", self.seed, 0, 2**63 - 1)
        check_device(self.device)
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise BadInput(f"--precision {self.precision}: use auto, fp32, bf16 or fp16")
        if not isinstance(self.data, list) or not all(isinstance(item, str) for item in self.data):
            raise BadInput("--data: give volume files, folders, a datalist .json, an nnU-Net folder or an .npz")
        taskspec.parse(self.task)  # refuses unknown names and bad weights
        if self.network not in ("rubikssl", "nnunet"):
            raise BadInput(f"--network {self.network}: use rubikssl or nnunet")
        if self.network == "nnunet":
            if self.nnunet is None and not self.plans:
                raise BadInput("--network nnunet needs --plans nnUNetPlans.json (nnU-Net's planning writes it into "
                               "nnUNet_preprocessed/DatasetXXX_Name/)")
            return  # the plan's encoder decides what fits (nnunet.check_fits)
        if self.plans:
            raise BadInput("--plans is for --network nnunet; add --network nnunet to pretrain nnU-Net's network")
        smallest = self.encoder.downsampling
        if min(self.puzzle.cube_size) < smallest:
            raise BadInput(f"--cube-size {min(self.puzzle.cube_size)} is too small for a {len(self.encoder.widths)}-stage "
                           f"encoder: use at least {smallest}, or fewer --widths")

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> PretrainConfig:
        """From nested option values (what `options.given` returns, or what the panel sets): the task's own
        default crop (taskspec.default_puzzle) unless cube settings are given."""
        task = values.get("task", "rubik")
        puzzle = taskspec.default_puzzle(task, values.get("puzzle", {}).get("grid"))
        return build(cls, values, cls(data=list(values.get("data", [])), out=str(values.get("out", "")), task=task,
                                      puzzle=puzzle))


@dataclass
class FinetuneConfig(JsonConfig):
    """Settings of `rubikssl finetune`."""

    NESTED = {"encoder": EncoderConfig, "intensity": IntensityRecipe}

    task: str = field(metadata=option("what the model predicts", choices=("classify", "segment")))
    train: list[str] = field(metadata=option("datalist .json, .npz archive or nnU-Net folder"))
    val: list[str] = field(metadata=option("the same kinds; a datalist gives its 'validation' list"))
    out: str = field(metadata=option("run folder"))
    init: str = field(default="scratch", metadata=option("a pretraining run folder, or 'scratch'"))
    init_stages: int | None = field(default=None, metadata=option(
        "load only the first K pretrained encoder stages, the rest start random (which layers carry what helps)",
        parse=int, default_note="all"))
    resume_from: str | None = field(default=None, metadata=option(
        "a fine-tuning run (or its model.safetensors) to continue from with new cases, e.g. the ones a user "
        "accepted; brings its own network, classes and preprocessing", default_note="none"))
    interactive: bool = field(default=False, metadata=option(
        "segmentation: a click-guided model (image + include / exclude click maps, trained with simulated clicks)"))
    label_fraction: float = field(default=1.0, metadata=option("use this fraction of the training cases"))
    decoder: str = field(default="unet", metadata=option("segmentation decoder", choices=("unet", "duc")))
    freeze_epochs: int = field(default=0, metadata=option("epochs with a frozen encoder before full fine-tuning"))
    warmup_epochs: float | None = field(default=None, metadata=option(
        "linear learning-rate warm-up, in epochs", parse=float, default_note="a tenth of the epochs, at most 1"))
    encoder_lr_factor: float = field(default=1.0, metadata=option(
        "the encoder's learning rate relative to --learning-rate (e.g. 0.1)"))
    lr_schedule: str = field(default="cosine", metadata=option(
        "after the warm-up: constant, or a cosine decay to 0 at the last epoch", choices=("constant", "cosine")))
    augment: str = field(default="default", metadata=option(
        "training augmentation (RubikSSLLib/augment.py): none, light (flips, intensity) or default (also axial 90-degree "
        "turns, a small affine, noise); the same for scratch and pretrained", choices=("none", "light", "default")))
    class_balance: str = field(default="sampling", metadata=option(
        "classification: draw every class equally often (sampling) or the cases as they come (none)",
        choices=("sampling", "none")))
    epochs: int = field(default=20, metadata=option("epochs"))
    batch_size: int = field(default=8, metadata=option(
        "cases or patches per step", default_note="planned from memory"))
    learning_rate: float = field(default=3e-4, metadata=option("learning rate (Adam)"))
    patch_size: tuple[int, int, int] = field(default=(64, 64, 64), metadata=option(
        "segmentation patch / classification input, N or z,y,x", parse=voxel_triple,
        default_note="planned: the median image, within the device's budget"))
    iterations_per_epoch: int | None = field(default=None, metadata=option(
        "steps per epoch", parse=int, default_note="one pass over the cases; 4 patches a case for segmentation"))
    spacing_mm: float | None = field(default=None, metadata=option(
        "isotropic mm, or native", flag="--spacing", parse=spacing,
        default_note="planned: the training cases' median spacing"))
    canonical_orientation: bool = True
    intensity: IntensityRecipe = field(default_factory=IntensityRecipe)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    recalibrate_bn: bool = field(default=True, metadata=option(
        "keep the pretrained BatchNorm statistics instead of re-estimating them on the target data",
        flag="--no-bn-recalibration"))
    seed: int = field(default=0, metadata=option("random seed"))
    device: str = field(default="auto", metadata=option(DEVICES))
    plan: dict = field(default_factory=dict)  # what planning.plan measured and decided (empty: nothing planned)

    def __post_init__(self) -> None:
        if self.task not in ("classify", "segment"):
            raise BadInput(f"--task {self.task}: use classify or segment")
        if self.interactive and self.task != "segment":
            raise BadInput("--interactive: click-guided models segment; use --task segment")
        if self.resume_from is not None and self.init != "scratch":
            raise BadInput("--resume-from and --init both give starting weights; give one of them")
        if self.decoder not in ("unet", "duc"):
            raise BadInput(f"--decoder {self.decoder}: use unet or duc")
        if self.lr_schedule not in ("constant", "cosine"):
            raise BadInput(f"--lr-schedule {self.lr_schedule}: use constant or cosine")
        if self.augment not in ("none", "light", "default") or self.class_balance not in ("sampling", "none"):
            raise BadInput(f"--augment {self.augment} / --class-balance {self.class_balance}: use none, light or "
                           "default / sampling or none")
        if self.warmup_epochs is None:
            self.warmup_epochs = min(1.0, 0.1 * self.epochs)
        check_range("epochs", self.epochs, 1, 1e6)
        check_range("iterations_per_epoch", self.iterations_per_epoch, 1, 1e7)
        check_range("batch_size", self.batch_size, 1, 4096)
        check_range("learning_rate", self.learning_rate, 0, MAX_LEARNING_RATE, low_open=True)
        check_range("freeze_epochs", self.freeze_epochs, 0, 1e6)
        check_range("warmup_epochs", self.warmup_epochs, 0, 1e6)
        check_range("encoder_lr_factor", self.encoder_lr_factor, 0, 1000, low_open=True)
        check_range("label_fraction", self.label_fraction, 0, 1, low_open=True)
        check_range("spacing", self.spacing_mm, 0.05, 50)
        check_range("seed", self.seed, 0, 2**63 - 1)
        check_device(self.device)
        self.patch_size = tuple(self.patch_size)
        factor = self.encoder.downsampling
        check_sizes("--patch-size", self.patch_size, low=factor)
        if self.task == "segment" and any(p % factor for p in self.patch_size):
            raise BadInput(f"--patch-size {self.patch_size}: each size must be a multiple of {factor} for this encoder")
        for name in ("train", "val"):
            items = getattr(self, name)
            if not isinstance(items, list) or not items or not all(isinstance(item, str) for item in items):
                raise BadInput(f"--{name}: give a datalist .json, an .npz archive or an nnU-Net dataset folder")


    @classmethod
    def from_json(cls, data: dict) -> FinetuneConfig:
        if isinstance(data, dict):
            if data.get("iterations_per_epoch") == 0:
                data = {**data, "iterations_per_epoch": None}  # configs written before 0.2 say 0 for "automatic"
            # runs written before augmentation and class balancing existed resume (and describe) the recipe they ran
            data = {"augment": "none", "class_balance": "none", **data}
        return super().from_json(data)


@dataclass
class EvaluateConfig:
    """What `rubikssl evaluate` adds to the fine-tuning settings it runs for each init, fraction and seed."""

    fractions: list[float] = field(default_factory=lambda: [0.1, 0.25, 1.0], metadata=option(
        "label fractions", parse=float_list, metavar="F,F,..."))
    seeds: int = field(default=5, metadata=option("paired seeds 0 .. N-1 (5 or more for any claim)"))
    last_epochs: int = field(default=3, metadata=option("a run's score: mean of its last N epochs"))
    test: list[str] | None = field(default=None, metadata=option(
        "held-out test data that only the final score touches (the model picked on --val scores it); without it the "
        "last model is scored on --val", default_note="none"))
    resamples: int = field(default=2000, metadata=option("bootstrap resamples for the 95 % interval"))

    def __post_init__(self) -> None:
        for fraction in self.fractions:
            check_range("fractions", fraction, 0, 1, low_open=True)
        check_range("seeds", self.seeds, 1, 1000)
        check_range("last_epochs", self.last_epochs, 1, 1e6)
        check_range("resamples", self.resamples, 100, 1e6)


@dataclass
class PuzzleConfig:
    """Settings of `rubikssl puzzle`: scramble one case (and solve it with a model) for viewing."""

    volume: list[str] = field(metadata=option("the channel files of one case"))
    out: str = field(metadata=option("output folder"))
    model: str | None = field(default=None, metadata=option("a pretraining run folder: also record its solution"))
    task: str = field(default="rubik", metadata=option(
        "show this pretext task's sample (tasks other than rubik, rubik+, jigsaw: input and target volumes)",
        choices=tuple(taskspec.names())))
    puzzle: PuzzleSpec = field(default_factory=PuzzleSpec)
    intensity: IntensityRecipe = field(default_factory=IntensityRecipe)
    spacing_mm: float | None = field(default=2.0, metadata=option(
        "resample to this isotropic mm, or 'native'", flag="--spacing", parse=spacing))
    seed: int = field(default=0, metadata=option("random seed"))

    def __post_init__(self) -> None:
        check_range("spacing", self.spacing_mm, 0.05, 50)
        check_range("seed", self.seed, 0, 2**63 - 1)
        check_output_folder(self.out)

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> PuzzleConfig:
        task = values.get("task", "rubik")
        puzzle = taskspec.default_puzzle(task, values.get("puzzle", {}).get("grid"))
        return build(cls, values, cls(volume=list(values.get("volume", [])), out=str(values.get("out", "")),
                                      task=task, puzzle=puzzle))

    def pretraining(self) -> PretrainConfig:
        """The pretraining settings that cut this puzzle (the data is the one case)."""
        return PretrainConfig(data=list(self.volume), out=self.out, task=self.task, puzzle=self.puzzle,
                              intensity=self.intensity, spacing_mm=self.spacing_mm)


def check_result_file(out: str, suffix: str, why: str) -> None:
    """A result file named <name><suffix> that can be written."""
    if not out.endswith(suffix):
        raise BadInput(f"--out {out}: name the result <name>{suffix} ({why})")
    check_output_file(out)


@dataclass
class InferenceConfig:
    """Settings of `rubikssl segment` and `rubikssl classify`."""

    model: str = field(metadata=option("a fine-tuning run folder (or its model.safetensors)"))
    volume: list[str] = field(metadata=option("the channel files of one case"))
    out: str = field(metadata=option("result file"))
    device: str = field(default="auto", metadata=option(DEVICES))

    SUFFIX: ClassVar[tuple[str, str]] = ("", "")  # what the result's name must end with, and why

    def __post_init__(self) -> None:
        check_device(self.device)
        check_result_file(self.out, *self.SUFFIX)


@dataclass
class SegmentConfig(InferenceConfig):
    SUFFIX = (".seg.nrrd", "Slicer's segmentation format; a .labels.nrrd labelmap is written beside it")

    clicks: str | None = field(default=None, metadata=option(
        "interactive models: a clicks .json (LPS or RAS mm, include / exclude points) or a Slicer .mrk.json (its "
        "points are include clicks)", default_note="none: the whole volume"))
    exclude_clicks: str | None = field(default=None, metadata=option(
        "interactive models: a .json or .mrk.json whose points are all exclude clicks", default_note="none"))

    largest_component: str = field(default="card", metadata=option(
        "keep only the largest connected part of these classes: card (the model card's choice), none, all, or "
        "label values as 1,2"))


@dataclass
class ClassifyConfig(InferenceConfig):
    pass


@dataclass
class ServeConfig:
    """Settings of `rubikssl serve` (requests and replies: RubikSSLLib/serve.py)."""

    model: str = field(metadata=option("a segmentation fine-tuning run folder (interactive or not)"))
    device: str = field(default="auto", metadata=option(DEVICES))

    def __post_init__(self) -> None:
        check_device(self.device)


@dataclass
class RankConfig:
    """Settings of `rubikssl rank`: which unlabelled case to correct first."""

    model: str = field(metadata=option("a segmentation fine-tuning run folder"))
    data: list[str] = field(metadata=option("unlabelled volumes: files, folders, a datalist .json"))
    out: str = field(metadata=option("ranking .json"))
    device: str = field(default="auto", metadata=option(DEVICES))

    def __post_init__(self) -> None:
        check_device(self.device)
        check_result_file(self.out, ".json", "a JSON ranking")
