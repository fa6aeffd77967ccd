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

import numpy as np

from RubikSSLLib.linearprobe import fit_logistic


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
