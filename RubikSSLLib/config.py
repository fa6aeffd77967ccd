"""The typed configuration of a pretraining run. The command line and the Slicer panel both build it;
it is saved as RUN_DIR/config.json and inside every model card."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from RubikSSLLib.errors import BadInput
from RubikSSLLib.intensity import IntensityRecipe
from RubikSSLLib.networks import EncoderConfig
from RubikSSLLib.puzzle import PuzzleSpec


def settings_from_json(cls: type, data: dict):
    """A settings dataclass (PuzzleSpec, EncoderConfig, IntensityRecipe) from its JSON form, where tuples became lists."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass
class PretrainConfig:
    """All settings of `rubikssl pretrain`. Sizes are voxels (z, y, x); spacing_mm is isotropic, None = native."""

    data: list[str]
    out: str
    task: str = "rubik"
    puzzle: PuzzleSpec = field(default_factory=PuzzleSpec)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    intensity: IntensityRecipe = field(default_factory=IntensityRecipe)
    spacing_mm: float | None = 2.0
    canonical_orientation: bool = True
    skip_unusable: bool = False
    steps: int = 2000
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_learning_rate_factor: float = 0.01
    val_fraction: float = 0.2
    val_puzzles: int = 128
    eval_every: int = 250
    progress_every: int = 5
    bn_recalibration_batches: int = 16
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    workers: int = -1

    def __post_init__(self) -> None:
        checks = {
            "steps": self.steps >= 1, "batch_size": self.batch_size >= 2, "learning_rate": self.learning_rate > 0,
            "val_fraction": 0 <= self.val_fraction < 1, "val_puzzles": self.val_puzzles >= 1,
            "eval_every": self.eval_every >= 1, "spacing_mm": self.spacing_mm is None or self.spacing_mm > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise BadInput(f"--{name.replace('_', '-')} {getattr(self, name)} is out of range; see rubikssl pretrain --help")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise BadInput(f"--device {self.device}: use auto, cpu or cuda")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise BadInput(f"--precision {self.precision}: use auto, fp32, bf16 or fp16")
        from RubikSSLLib import tasks

        tasks.parse(self.task)  # refuses unknown names and bad weights
        smallest = 2 ** len(self.encoder.widths)  # the stem and every later stage halve the cube
        if min(self.puzzle.cube_size) < smallest:
            raise BadInput(f"--cube-size {min(self.puzzle.cube_size)} is too small for a {len(self.encoder.widths)}-stage "
                           f"encoder: use at least {smallest}, or fewer --widths")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> PretrainConfig:
        data = dict(data)
        data["puzzle"] = settings_from_json(PuzzleSpec, data["puzzle"])
        data["encoder"] = settings_from_json(EncoderConfig, data["encoder"])
        data["intensity"] = settings_from_json(IntensityRecipe, data["intensity"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def read(cls, path: Path) -> PretrainConfig:
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise BadInput(f"{path}: unreadable run config ({error}); start a new run instead of --resume") from None
