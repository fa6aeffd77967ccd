"""Pretext task names, how a --task text is read, and each task's default crop: light (no torch), so configs, the
command line and the Slicer panel share it. The task classes themselves live in RubikSSLLib.tasks."""

from __future__ import annotations

from RubikSSLLib.errors import BadInput
from RubikSSLLib.puzzle import PuzzleSpec

# name -> "module:Class" under RubikSSLLib.tasks, imported on use so `--help` and the Slicer panel stay light
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
# A 3x3x3 grid of the default 32^3 cubes needs 96^3 voxels, more than a brain at the default 2 mm (91x109x91):
# tasks on a 3x3x3 grid default to 24^3 cubes (72^3 voxels at least).
THREE_BY_THREE_CUBE = (24, 24, 24)


def names() -> list[str]:
    return list(REGISTRY)


def parse(spec: str) -> list[tuple[str, float]]:
    """'rubik' -> [('rubik', 1.0)]; 'rubik,mae=0.5' -> [('rubik', 1.0), ('mae', 0.5)]: tasks and loss weights."""
    parts = []
    for entry in str(spec).split(","):
        name, _, weight = entry.strip().partition("=")
        if name not in REGISTRY:
            raise BadInput(f"--task {spec}: unknown pretext task {name!r}; choose from {', '.join(REGISTRY)}, "
                           "or combine them as rubik,mae (or rubik=1,mae=0.5)")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            value = -1.0
        if not 0 < value < float("inf"):
            raise BadInput(f"--task {spec}: the loss weight of {name} must be a positive number, as in {name}=0.5")
        parts.append((name, value))
    if len({name for name, _ in parts}) != len(parts):
        raise BadInput(f"--task {spec}: each task may appear once")
    return parts


def default_puzzle(task: str, grid: int | None = None) -> PuzzleSpec:
    """The crop settings a task runs with when the user names none: 2x2x2 grids of 32^3 cubes, and 24^3 cubes for
    the tasks on a 3x3x3 grid (rpl always, jigsaw with --grid 3), so the defaults fit a brain MRI at 2 mm."""
    names_in_task = [name for name, _ in parse(task)]
    three = "rpl" in names_in_task or grid == 3
    spec = PuzzleSpec(grid=grid or 2)
    return PuzzleSpec(spec.grid, THREE_BY_THREE_CUBE, spec.jitter, spec.num_permutations) if three else spec
