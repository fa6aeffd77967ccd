"""`rubikssl puzzle`: scramble one case, optionally let a model solve it, and write viewable results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from RubikSSLLib import datasources, puzzle, sampling, visualize
from RubikSSLLib.config import PretrainConfig
from RubikSSLLib.errors import BadInput
from RubikSSLLib.files import write_json_atomic
from RubikSSLLib.volumes import write_volume

OUTPUTS = {
    "original": "original.nrrd",
    "scrambled": "scrambled.nrrd",
    "scrambled_labels": "scrambled_labels.nrrd",
    "recovered": "recovered.nrrd",
    "montage": "montage.png",
    "puzzle": "puzzle.json",
}


def solve(model: torch.nn.Module, cubes: np.ndarray) -> tuple[int, np.ndarray]:
    """The model's (permutation index, per-slot rotation classes) for scrambled cubes (M, C, cz, cy, cx)."""
    with torch.no_grad():
        logits = model(torch.from_numpy(puzzle.normalise_cubes(cubes))[None])
    if "hor" not in logits:  # a jigsaw model: no rotations
        return int(logits["order"].argmax(1)), np.zeros(len(cubes), dtype=np.int64)
    rotations = puzzle.rotation_classes(torch.sigmoid(logits["hor"])[0].numpy(), torch.sigmoid(logits["ver"])[0].numpy())
    return int(logits["order"].argmax(1)), rotations


def write_puzzle(volumes: list[str], out: Path, config: PretrainConfig, table: np.ndarray, seed: int,
                 model: torch.nn.Module | None = None) -> dict:
    """Scramble the foreground-centred crop of one case; write the OUTPUTS into `out`; return puzzle.json's content."""
    source = datasources.CaseSource(tuple(volumes))
    case = sampling.prepare(datasources.load(source, config.spacing_mm, config.canonical_orientation),
                            config.puzzle, config.intensity)
    spec = config.puzzle
    start = sampling.crop_start(case, spec.crop_size, None)
    z, y, x = start
    original = case.array[:, z : z + spec.crop_size[0], y : y + spec.crop_size[1], x : x + spec.crop_size[2]].astype(np.float32)
    scrambled = puzzle.scramble(original, spec, table, np.random.default_rng(seed), train=False, normalise=False,
                                rotate=config.task != "jigsaw")
    permutation_index, rotations = scrambled.permutation_index, scrambled.rotations
    record: dict = {
        "volumes": volumes, "seed": seed, "crop_start_zyx": start.tolist(), "crop_size_zyx": list(spec.crop_size),
        "cube_size_zyx": list(spec.cube_size), "cube_starts_zyx": scrambled.starts.tolist(),
        "permutation_index": permutation_index, "permutation": scrambled.permutation.tolist(),
        "rotations": scrambled.rotations.tolist(), "rotation_names": list(puzzle.ROTATION_NAMES),
        "labelmap": "scrambled_labels: slot p shows original cube permutation[p], labelled permutation[p] + 1",
    }
    if model is not None:
        permutation_index, rotations = solve(model, scrambled.cubes)
        predicted = table[permutation_index]
        record["prediction"] = {
            "permutation_index": permutation_index, "permutation": predicted.tolist(), "rotations": rotations.tolist(),
            "order_correct": bool(permutation_index == scrambled.permutation_index),
            "cube_placed_correctly": (predicted == scrambled.permutation).tolist(),
            "cube_oriented_correctly": (rotations == scrambled.rotations).tolist(),
        }
    recovered_cubes = puzzle.recover(scrambled.cubes, table[permutation_index], rotations)
    fill = float(original.min())
    geometry = case.geometry.shifted(tuple(start))
    views = {
        "original": puzzle.assemble(puzzle.extract_cubes(original, scrambled.starts, spec.cube_size), scrambled.starts, spec.crop_size, fill),
        "scrambled": puzzle.assemble(scrambled.cubes, scrambled.starts, spec.crop_size, fill),
        "recovered": puzzle.assemble(recovered_cubes, scrambled.starts, spec.crop_size, fill),
    }
    first_cube_centre = tuple(int(v) for v in scrambled.starts[0] + np.array(spec.cube_size) // 2)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, view in views.items():
            write_volume(out / OUTPUTS[name], view, geometry)
        labels = puzzle.cube_labelmap(scrambled.starts, spec.cube_size, spec.crop_size, scrambled.permutation + 1)
        write_volume(out / OUTPUTS["scrambled_labels"], labels, geometry)
        visualize.write_png(out / OUTPUTS["montage"], puzzle_montage(views, record, first_cube_centre))
        write_json_atomic(out / OUTPUTS["puzzle"], record)
    except PermissionError as error:
        raise BadInput(f"{out}: cannot write the puzzle outputs ({error.strerror}); choose a writable --out") from None
    return record


def puzzle_montage(views: dict[str, np.ndarray], record: dict, centre: tuple[int, int, int]) -> np.ndarray:
    """Original | scrambled | solution under their titles; with a model's answer, each cube outlined in the panel's
    colour for how the network did on it (in the scrambled column where it sits, in the solution where it was put)."""
    titles = ["original", "scrambled: network input", "network's solution" if "prediction" in record
              else "true solution"]
    boxes: list[list[visualize.Box]] = [[], [], []]
    if "prediction" in record:
        prediction, size = record["prediction"], tuple(record["cube_size_zyx"])
        statuses = visualize.cube_statuses(prediction["cube_placed_correctly"], prediction["cube_oriented_correctly"])
        starts = [tuple(start) for start in record["cube_starts_zyx"]]
        for slot, status in enumerate(statuses):
            boxes[1].append(visualize.Box(starts[slot], size, status))
            boxes[2].append(visualize.Box(starts[prediction["permutation"][slot]], size, status))
    return visualize.montage([v[0] for v in views.values()], centre, titles, boxes)


TASK_OUTPUTS = {"input": "input.nrrd", "target": "target.nrrd", "weight": "weight.nrrd", "montage": "montage.png",
                "sample": "sample.json"}


def write_task_sample(volumes: list[str], out: Path, config: PretrainConfig, seed: int) -> dict:
    """For the tasks without a cube-grid viewer: the network's input and its target as volumes in the crop's place
    (the task's `views`), the loss weight of restoration tasks, a montage and sample.json. The sample is a training
    sample (random gaps, disturbed patches), as the network sees it. Returns sample.json's content."""
    from RubikSSLLib import tasks

    task = tasks.create(config)
    source = datasources.CaseSource(tuple(volumes))
    case = sampling.prepare(datasources.load(source, config.spacing_mm, config.canonical_orientation), task.shape,
                            config.intensity)
    rng = np.random.default_rng(seed)
    # the task's sample() draws its crop corner first: the same draw on a copy of the Generator gives its place
    start = sampling.crop_start(case, task.shape.crop_size, np.random.default_rng(seed))
    sample = {k: v.numpy() for k, v in task.sample(case, rng, True).items()}
    size = task.shape.crop_size
    z, y, x = start
    original = case.mapping.to_network(case.array[:, z:z + size[0], y:y + size[1], x:x + size[2]])
    views = task.views(sample, original, start)
    record: dict = {"task": config.task, "volumes": volumes, "seed": seed, "crop_start_zyx": start.tolist(),
                    "crop_size_zyx": list(size)} | task.describe(sample)
    geometry = case.geometry.shifted(tuple(start))
    out.mkdir(parents=True, exist_ok=True)
    for name, view in views.items():
        write_volume(out / TASK_OUTPUTS[name], view.astype(np.float32), geometry)
    centre = tuple(s // 2 for s in size)
    visualize.write_png(out / TASK_OUTPUTS["montage"], visualize.montage([views["input"][0], views["target"][0]], centre,
                                                                         ["network input", "target"]))
    write_json_atomic(out / TASK_OUTPUTS["sample"], record)
    return record
