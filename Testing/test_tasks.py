"""The pretext-task family behind one interface: exact invariants per task, short learning runs on real data,
the decoder transfer of restoration tasks, and `puzzle --task`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ADRENAL, rubikssl, shared
from RubikSSLLib import cli, puzzle, sampling, tasks, training, transfer
from RubikSSLLib.config import PretrainConfig
from RubikSSLLib.intensity import IntensityMap
from RubikSSLLib.models import UNet
from RubikSSLLib.networks import Encoder, EncoderConfig
from RubikSSLLib.progress import Reporter
from RubikSSLLib.puzzle import PuzzleSpec
from RubikSSLLib.tasks.genesis import GenesisTask
from RubikSSLLib.tasks.mae import MASK_RATIO, MAETask, block_mask
from RubikSSLLib.tasks.rotation import rotated_views
from RubikSSLLib.volumes import Geometry

SMALL_ENCODER = EncoderConfig(1, (8, 16, 32), (1, 2, 2))


def config_for(task: str, tmp_path: Path, **kwargs) -> PretrainConfig:
    settings = dict(data=[str(ADRENAL)], out=str(tmp_path / task), task=task, encoder=SMALL_ENCODER,
                    puzzle=PuzzleSpec(cube_size=(12, 12, 12), jitter=(2, 2, 2)), spacing_mm=None, batch_size=8,
                    val_puzzles=64, warmup_steps=10)
    return PretrainConfig(**(settings | kwargs))


def synthetic_case(size: int = 40, seed: int = 0) -> sampling.PreparedCase:
    array = np.random.default_rng(seed).random((1, size, size, size)).astype(np.float32)
    return sampling.PreparedCase("synthetic", array, Geometry(), IntensityMap(np.zeros(1, np.float32), np.ones(1, np.float32)),
                                 np.zeros(3, int), np.full(3, size))


def test_registry_and_command_line_name_the_same_tasks() -> None:
    assert tuple(tasks.names()) == cli.TASKS
    with pytest.raises(Exception, match="unknown pretext task"):
        PretrainConfig(data=["x"], out="y", task="nonsense")


def test_rotation_classes_are_ten_distinct_proper_rotations() -> None:
    size = 6
    centred = np.indices((size,) * 3).astype(float) - (size - 1) / 2  # channel c holds coordinate c of each voxel
    matrices = []
    for view in rotated_views(centred):
        target = (np.indices((size,) * 3).astype(float) - (size - 1) / 2).reshape(3, -1).T
        source = view.reshape(3, -1).T
        matrix, *_ = np.linalg.lstsq(target, source, rcond=None)  # source position = target position @ matrix
        np.testing.assert_allclose(matrix, np.round(matrix), atol=1e-9)
        np.testing.assert_allclose(matrix @ matrix.T, np.eye(3), atol=1e-9)
        assert round(np.linalg.det(matrix)) == 1  # proper: no mirror image
        matrices.append(tuple(np.round(matrix).astype(int).ravel()))
    assert len(set(matrices)) == 10 and matrices[0] == tuple(np.eye(3, dtype=int).ravel())


@pytest.mark.parametrize("grid", [2, 3])
def test_jigsaw_recover_of_scramble_is_the_identity(grid: int) -> None:
    spec = PuzzleSpec(grid=grid, cube_size=(5, 6, 7), jitter=(2, 2, 2), num_permutations=30)
    table = puzzle.permutation_table(spec.num_cubes, spec.num_permutations)
    volume = np.random.default_rng(1).random((1,) + spec.crop_size).astype(np.float32)
    for seed in range(5):
        item = puzzle.scramble(volume, spec, table, np.random.default_rng(seed), normalise=False, rotate=False)
        assert not item.rotations.any()
        np.testing.assert_array_equal(puzzle.recover(item.cubes, item.permutation, item.rotations),
                                      puzzle.extract_cubes(volume, item.starts, spec.cube_size))


def test_mae_masks_the_promised_share_and_its_loss_ignores_unmasked_voxels(tmp_path: Path) -> None:
    mask = block_mask((32, 32, 32), (8, 8, 8), MASK_RATIO, np.random.default_rng(0))
    assert mask.mean() == 48 / 64  # exactly 75% of the 64 blocks
    task = MAETask(config_for("mae", tmp_path))
    sample = task.sample(synthetic_case(), np.random.default_rng(3), train=True)
    weight = sample["weight"].bool()
    assert torch.all(sample["input"][weight.expand_as(sample["input"])] == 0)
    assert torch.equal(sample["input"][~weight], sample["target"][~weight])
    batch = {k: v[None] for k, v in sample.items()}
    prediction = torch.randn_like(batch["target"])
    changed_outside = prediction.clone()
    changed_outside[~batch["weight"].bool().expand_as(prediction)] += 5.0
    assert torch.equal(task.loss(prediction, batch), task.loss(changed_outside, batch))
    changed_inside = prediction.clone()
    changed_inside[batch["weight"].bool().expand_as(prediction)] += 5.0
    assert task.loss(changed_inside, batch) > task.loss(prediction, batch)


def test_genesis_corruption_is_seeded_and_the_target_is_the_untouched_crop(tmp_path: Path) -> None:
    task = GenesisTask(config_for("genesis", tmp_path))
    case = synthetic_case()
    first = task.sample(case, np.random.default_rng(5), train=True)
    again = task.sample(case, np.random.default_rng(5), train=True)
    other = task.sample(case, np.random.default_rng(6), train=True)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["input"], other["input"])
    untouched = sampling.crop(case, task.shape.crop_size, np.random.default_rng(5))  # the same first draw
    np.testing.assert_array_equal(first["target"].numpy(), untouched)
    corrupted = [task.sample(case, np.random.default_rng(s), True) for s in range(8)]
    assert sum(not torch.equal(c["input"], c["target"]) for c in corrupted) >= 6  # nearly always corrupted


# (task, metric, chance, steps): short runs on real AdrenalMNIST3D volumes must beat a trivial predictor
LEARNING = [("rotation", "val_rotation_acc", 0.1, 400), ("jigsaw", "val_ordering_acc", 0.1, 150),
            ("mae", "val_restoration_gain", 0.0, 60), ("genesis", "val_restoration_gain", 0.0, 60)]


@pytest.mark.parametrize("task, metric, chance, steps", LEARNING, ids=[t[0] for t in LEARNING])
def test_each_task_learns_on_real_data(small_adrenal: Path, tmp_path: Path, task: str, metric: str, chance: float,
                                       steps: int) -> None:
    extra = {"puzzle": PuzzleSpec(cube_size=(12, 12, 12), jitter=(2, 2, 2), num_permutations=10)} if task == "jigsaw" else {}
    config = config_for(task, tmp_path, steps=steps, eval_every=steps, data=[str(small_adrenal)], **extra)
    metrics = training.Pretraining(config, Reporter("none")).run()
    assert metrics[metric] > chance + 0.1, metrics
    card = json.loads((tmp_path / task / "model.json").read_text())
    assert card["task"] == task and card["primary_metric"] == metric
    model, _ = training.load_pretrained(tmp_path / task)
    assert isinstance(model.encoder, Encoder)


def test_restoration_pretraining_hands_its_decoder_to_the_unet(small_adrenal: Path, tmp_path: Path) -> None:
    config = config_for("mae", tmp_path, steps=2, eval_every=2, val_puzzles=4, data=[str(small_adrenal)])
    training.Pretraining(config, Reporter("none")).run()
    pretrained, _ = training.load_pretrained(tmp_path / "mae")
    network = UNet(Encoder(SMALL_ENCODER), num_classes=3)
    report, _ = transfer.load_encoder(network, tmp_path / "mae")
    assert report.decoder and not any(name.startswith("head.") for name in report.decoder)
    mine, theirs = network.state_dict(), pretrained.state_dict()
    for name in report.decoder + ["encoder." + n for n in report.loaded]:
        assert torch.equal(mine[name], theirs[name]), name


@pytest.mark.parametrize("task", ["rotation", "mae", "genesis"])
def test_puzzle_task_writes_input_and_target_volumes(tmp_path: Path, task: str) -> None:
    import SimpleITK as sitk

    result = rubikssl("puzzle", "--task", task, "--volume", str(shared("pretrain/niivue_M2208_T2w.nii.gz")),
                      "--out", str(tmp_path), "--progress", "json")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "sample.json").read_text())
    size = tuple(record["crop_size_zyx"])
    volumes = {name: sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{name}.nrrd"))) for name in ("input", "target")}
    assert volumes["input"].shape == volumes["target"].shape == size
    assert not np.array_equal(volumes["input"], volumes["target"]) or record.get("rotation_class") == 0
    if task == "rotation":
        np.testing.assert_array_equal(volumes["input"][None], rotated_views(volumes["target"][None])[record["rotation_class"]])
