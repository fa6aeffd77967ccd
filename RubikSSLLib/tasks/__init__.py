"""Pretext tasks by name. Adding a task: one module with a PretextTask subclass, plus its line here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from RubikSSLLib.errors import BadInput

if TYPE_CHECKING:
    from RubikSSLLib.config import PretrainConfig
    from RubikSSLLib.tasks.base import PretextTask

# name -> "module:Class", imported on use so `--help` and the Slicer panel stay light
REGISTRY = {
    "rubik": "rubik:RubikTask",
    "rubik+": "rubikplus:RubikPlusTask",
    "rubik++": "rubikrestore:RubikRestorationTask",
    "jigsaw": "jigsaw:JigsawTask",
    "rotation": "rotation:RotationTask",
    "rpl": "rpl:RPLTask",
    "exemplar": "exemplar:ExemplarTask",
    "cpc": "cpc:CPCTask",
    "mae": "mae:MAETask",
    "genesis": "genesis:GenesisTask",
}
# Tasks whose sample is a scrambled cube grid with a permutation table: the puzzle viewer shows and solves them;
# the others show their input and target as volumes.
PUZZLE_TASKS = ("rubik", "rubik+", "jigsaw")


def names() -> list[str]:
    return list(REGISTRY)


def create(config: PretrainConfig) -> PretextTask:
    """The task named by config.task, ready to sample, build its model and score."""
    import importlib

    if config.task not in REGISTRY:
        raise BadInput(f"--task {config.task}: unknown pretext task; choose one of {', '.join(REGISTRY)}")
    module, cls = REGISTRY[config.task].split(":")
    return getattr(importlib.import_module(f"RubikSSLLib.tasks.{module}"), cls)(config)
