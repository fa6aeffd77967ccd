"""Can the puzzle be solved without learning anatomy? A trivial solver on cheap cues, against the network.

Each cube of a puzzle, as the network sees it (scaled to [-1, 1] on its own), is described by a handful of
numbers that carry no anatomy: its mean and spread, the share of its voxels at either end of the range (an empty
or saturated cube) and the mean of each of its six faces (what border continuity could use). A multinomial
logistic regression on those numbers (the cubes in slot order) is fitted on puzzles from the data and scored on
held-out puzzles. When it orders the cubes far above chance (1/K), the pretext can be won from these cues alone,
and solving it says little about what the encoder learnt; AdrenalMNIST3D's volumes, centred binary masks with many
empty cubes, are the example this was written for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from RubikSSLLib.linearprobe import fit_logistic

if TYPE_CHECKING:
    from RubikSSLLib.config import PretrainConfig
    from RubikSSLLib.sampling import PreparedCase


def cube_cues(cubes: np.ndarray) -> np.ndarray:
    """(M, C, z, y, x) cubes in [-1, 1] -> (M * 10 * C,) trivial cues: mean, sd, share below -0.9, share above 0.9,
    and the means of the six faces, per cube and channel."""
    flat = cubes.reshape(*cubes.shape[:2], -1)
    faces = [cubes[:, :, 0], cubes[:, :, -1], cubes[:, :, :, 0], cubes[:, :, :, -1], cubes[:, :, :, :, 0],
             cubes[:, :, :, :, -1]]
    cues = [flat.mean(-1), flat.std(-1), (flat < -0.9).mean(-1), (flat > 0.9).mean(-1)]
    cues += [face.reshape(*cubes.shape[:2], -1).mean(-1) for face in faces]
    return np.stack(cues, axis=-1).ravel()


def trivial_ordering_accuracy(task, cases: list, puzzles: int = 2000, seed: int = 0) -> dict[str, float]:
    """Held-out ordering accuracy of the trivial solver on `puzzles` puzzles of `task` (a cube-grid pretext task)
    drawn from `cases` (sampling.PreparedCase), 80 % to fit and 20 % to score; chance is 1/K."""
    rng = np.random.default_rng([seed, 31337])
    samples = [task.sample(cases[int(rng.integers(len(cases)))], rng, True) for _ in range(puzzles)]
    cues = np.stack([cube_cues(s["cubes"].numpy()) for s in samples])
    order = np.array([int(s["order"]) for s in samples])
    split = int(0.8 * puzzles)
    classes = task.config.puzzle.num_permutations
    predict = fit_logistic(cues[:split], order[:split], classes)
    accuracy = float((predict(cues[split:]).argmax(1) == order[split:]).mean())
    return {"trivial_ordering_acc": round(accuracy, 4), "chance_ordering": round(1 / classes, 4),
            "puzzles": puzzles}


FAR_ABOVE_CHANCE = 5  # trivial accuracy above this many times chance: the puzzle is partly won without anatomy
CHECK_CASES = 200  # volumes the pretraining check draws its puzzles from


def far_above_chance(result: dict[str, float]) -> bool:
    return result["trivial_ordering_acc"] > FAR_ABOVE_CHANCE * result["chance_ordering"]


def smaller_cube_sizes(cube_size: int, smallest: int) -> list[int]:
    """Cube edges (voxels) to try against a shortcut: 3/4 and 1/2 of `cube_size`, multiples of 4, >= `smallest`
    (the encoder's downsampling)."""
    sizes = {max(smallest, 4 * round(cube_size * share / 4)) for share in (0.75, 0.5)}
    return sorted((size for size in sizes if size < cube_size), reverse=True)


def pretraining_check(config: PretrainConfig, cases: list[PreparedCase], puzzles: int) -> dict:
    """Before pretraining `config` (a PretrainConfig of a cube-grid task) on `cases` (sampling.PreparedCase):
    the trivial solver's held-out ordering accuracy, and, when it is far above chance, the same at smaller cube
    sizes (the same prepared cases: a smaller crop fits in them). Returns {} for other tasks or puzzles == 0."""
    import dataclasses

    from RubikSSLLib import taskspec, tasks

    if puzzles == 0 or config.task not in taskspec.PUZZLE_TASKS or not cases:
        return {}
    cases = cases[:CHECK_CASES]
    result = trivial_ordering_accuracy(tasks.create(config), cases, puzzles, config.seed)
    if far_above_chance(result):
        result["smaller_cubes"] = {}
        for size in smaller_cube_sizes(min(config.puzzle.cube_size), tasks.smallest_cube(config)):
            smaller = dataclasses.replace(config, puzzle=dataclasses.replace(config.puzzle, cube_size=(size,) * 3))
            accuracy = trivial_ordering_accuracy(tasks.create(smaller), cases, puzzles, config.seed)
            result["smaller_cubes"][str(size)] = accuracy["trivial_ordering_acc"]
    return result


def describe(result: dict, cube_size: int) -> str:
    """One line for the pretraining log: the check's numbers, its verdict and what the benchmarks say to do."""
    line = (f"puzzle shortcut check: trivial cues (cube mean, spread, empty share, face means) order "
            f"{result['trivial_ordering_acc']:.3f} of held-out puzzles at --cube-size {cube_size} "
            f"(chance {result['chance_ordering']:.3f})")
    if not far_above_chance(result):
        return line + ": near chance, the puzzle cannot be won from these cues"
    smaller = result.get("smaller_cubes", {})
    tried = f", smaller cubes leave less to them ({', '.join(f'{s}: {a:.3f}' for s, a in smaller.items())})" if smaller else ""
    return (line + ": far above chance. The puzzle is partly won without anatomy and training long on it can make the "
            f"encoder worse than random{tried}. On AdrenalMNIST3D smaller cubes kept a long run from ruining the "
            "encoder but did not make it transfer better (RESULTS.md §12, §15): keep the run short and measure the "
            "transfer with rubikssl evaluate")
