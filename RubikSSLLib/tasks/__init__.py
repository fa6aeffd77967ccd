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


def parse(spec: str) -> list[tuple[str, float]]:
    """'rubik' -> [('rubik', 1.0)]; 'rubik,mae=0.5' -> [('rubik', 1.0), ('mae', 0.5)]: tasks and loss weights."""
    parts = []
    for entry in spec.split(","):
        name, _, weight = entry.strip().partition("=")
        if name not in REGISTRY:
            raise BadInput(f"--task {spec}: unknown pretext task {name!r}; choose from {', '.join(REGISTRY)}, "
                           "or combine them as rubik,mae (or rubik=1,mae=0.5)")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            value = -1.0
        if not value > 0:
            raise BadInput(f"--task {spec}: the loss weight of {name} must be a positive number, as in {name}=0.5")
        parts.append((name, value))
    if len({name for name, _ in parts}) != len(parts):
        raise BadInput(f"--task {spec}: each task may appear once")
    return parts


def create(config: PretrainConfig) -> PretextTask:
    """The task named by config.task (or the combination it lists), ready to sample, build its model and score."""
    import importlib

    parts = parse(config.task)
    if len(parts) > 1 or parts[0][1] != 1.0:
        from RubikSSLLib.tasks.combined import CombinedTask

        return CombinedTask(config, parts)
    module, cls = REGISTRY[config.task].split(":")
    return getattr(importlib.import_module(f"RubikSSLLib.tasks.{module}"), cls)(config)
