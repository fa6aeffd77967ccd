"""Exact invariants of the Rubik's cube puzzle."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from RubikSSLLib import puzzle
from RubikSSLLib.errors import BadInput

SPEC = puzzle.PuzzleSpec(grid=2, cube_size=(6, 8, 10), jitter=(2, 3, 1), num_permutations=100)


@pytest.fixture(scope="module")
def table() -> np.ndarray:
    return puzzle.permutation_table(SPEC.num_cubes, SPEC.num_permutations, seed=0)


def random_crop(spec: puzzle.PuzzleSpec, channels: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(channels, *spec.crop_size)).astype(np.float32)


def test_cubes_are_disjoint_and_inside_the_crop() -> None:
    rng = np.random.default_rng(1)
    for spec in (SPEC, puzzle.PuzzleSpec(grid=3, cube_size=(5, 5, 5), jitter=(3, 3, 3))):
        for generator in (rng, None):
            starts = puzzle.cube_starts(spec, generator)
            coverage = np.zeros(spec.crop_size, dtype=int)
            for z, y, x in starts:
                assert (starts >= 0).all()
                assert z + spec.cube_size[0] <= spec.crop_size[0]
                assert y + spec.cube_size[1] <= spec.crop_size[1]
                assert x + spec.cube_size[2] <= spec.crop_size[2]
                coverage[z : z + spec.cube_size[0], y : y + spec.cube_size[1], x : x + spec.cube_size[2]] += 1
            assert coverage.max() == 1
            assert coverage.sum() == spec.num_cubes * np.prod(spec.cube_size)


def test_gaps_are_random_in_training_and_centred_in_evaluation() -> None:
    rng = np.random.default_rng(2)
    offsets = np.stack([puzzle.cube_starts(SPEC, rng) % np.array(SPEC.cell_size) for _ in range(300)])
    for axis, jitter in enumerate(SPEC.jitter):
        assert set(np.unique(offsets[..., axis])) == set(range(jitter + 1))
    centred = puzzle.cube_starts(SPEC, None) % np.array(SPEC.cell_size)
    assert (centred == np.array(SPEC.jitter) // 2).all()


def test_extract_matches_plain_slicing() -> None:
    crop = random_crop(SPEC)
    starts = puzzle.cube_starts(SPEC, np.random.default_rng(3))
    cubes = puzzle.extract_cubes(crop, starts, SPEC.cube_size)
    for cube, (z, y, x) in zip(cubes, starts):
        np.testing.assert_array_equal(cube, crop[:, z : z + 6, y : y + 8, x : x + 10])


def test_recover_inverts_scramble_bit_for_bit_for_every_permutation_and_rotation(table: np.ndarray) -> None:
    crop = random_crop(SPEC)
    starts = puzzle.cube_starts(SPEC, None)
    original = puzzle.extract_cubes(crop, starts, SPEC.cube_size)
    rng = np.random.default_rng(4)
    for permutation in table:
        for rotations in [np.full(8, r) for r in range(3)] + [rng.integers(0, 3, 8) for _ in range(3)]:
            scrambled = puzzle.rotate(original[permutation], rotations)
            np.testing.assert_array_equal(puzzle.recover(scrambled, permutation, rotations), original)


def test_scramble_then_recover_is_identity(table: np.ndarray) -> None:
    rng = np.random.default_rng(5)
    crop = random_crop(SPEC)
    for _ in range(50):
        item = puzzle.scramble(crop, SPEC, table, rng, train=True, normalise=False)
        recovered = puzzle.recover(item.cubes, item.permutation, item.rotations)
        np.testing.assert_array_equal(recovered, puzzle.extract_cubes(crop, item.starts, SPEC.cube_size))
        np.testing.assert_array_equal(item.permutation, table[item.permutation_index])


def test_each_rotation_flips_exactly_two_axes_and_is_a_proper_rotation() -> None:
    cube = np.random.default_rng(6).normal(size=(1, 1, 4, 5, 6))
    for label, names in ((1, "yx"), (2, "zx")):
        rotated = puzzle.rotate(cube, np.array([label]))[0, 0]
        axes = tuple("zyx".index(n) for n in names)
        np.testing.assert_array_equal(rotated, np.flip(cube[0, 0], axis=axes))
        for single in range(3):  # never a single flip (a mirror image)
            assert not np.array_equal(rotated, np.flip(cube[0, 0], axis=single))
        # 180 degrees about the remaining axis: rot90 twice in the plane of the two flipped axes
        np.testing.assert_array_equal(rotated, np.rot90(cube[0, 0], k=2, axes=axes))
        np.testing.assert_array_equal(puzzle.rotate(puzzle.rotate(cube, np.array([label])), np.array([label])), cube)
    assert not np.array_equal(puzzle.rotate(cube, np.array([1])), puzzle.rotate(cube, np.array([2])))


def test_labels_are_uniform_over_all_permutations_and_rotations(table: np.ndarray) -> None:
    rng = np.random.default_rng(7)
    crop = random_crop(SPEC, channels=1)
    draws = 20000
    indices = np.empty(draws, dtype=int)
    rotations = np.empty((draws, 8), dtype=int)
    for i in range(draws):
        item = puzzle.scramble(crop, SPEC, table, rng, normalise=False)
        indices[i], rotations[i] = item.permutation_index, item.rotations
    counts = np.bincount(indices, minlength=len(table))
    assert counts[-1] > 0 and counts[0] > 0  # the last row is drawn (no randint(0, K-1) off-by-one)
    assert len(counts) == len(table)
    chi2 = ((counts - draws / len(table)) ** 2 / (draws / len(table))).sum()
    assert chi2 < 170  # 99.99th percentile of chi2 with 99 degrees of freedom is about 163
    rotation_share = np.bincount(rotations.ravel(), minlength=3) / rotations.size
    np.testing.assert_allclose(rotation_share, 1 / 3, atol=0.01)


def test_targets_encode_rotations_as_two_multi_hot_vectors(table: np.ndarray) -> None:
    item = puzzle.scramble(random_crop(SPEC), SPEC, table, np.random.default_rng(8))
    targets = item.targets()
    np.testing.assert_array_equal(targets["hor"], item.rotations == 1)
    np.testing.assert_array_equal(targets["ver"], item.rotations == 2)
    assert targets["order"] == item.permutation_index
    assert not (targets["hor"] * targets["ver"]).any()


def test_table_is_deterministic_for_a_seed_and_keeps_its_promised_distance() -> None:
    first = puzzle.permutation_table(8, 100, seed=3)
    np.testing.assert_array_equal(first, puzzle.permutation_table(8, 100, seed=3))
    assert not np.array_equal(first, puzzle.permutation_table(8, 100, seed=4))
    assert first.shape == (100, 8)
    assert all(sorted(row) == list(range(8)) for row in first)
    assert len({tuple(row) for row in first}) == 100
    np.testing.assert_array_equal(first[0], np.arange(8))
    # greedy max-min selection: 5 for K = 100 of 8 cubes (Medical-SSL's max-mean table: 2)
    assert puzzle.min_pairwise_hamming(first) >= 5
    # brute force check of min_pairwise_hamming itself on a small table
    small = first[:6]
    brute = min(int(np.sum(a != b)) for a, b in itertools.combinations(small, 2))
    assert puzzle.min_pairwise_hamming(small) == brute


def test_three_by_three_grid_table() -> None:
    table = puzzle.permutation_table(27, 100, seed=0)
    assert table.shape == (100, 27)
    assert puzzle.min_pairwise_hamming(table) >= 20


def test_visualization_puts_each_cube_where_the_labelmap_says(table: np.ndarray) -> None:
    crop = random_crop(SPEC, channels=1, seed=9)
    item = puzzle.scramble(crop, SPEC, table, np.random.default_rng(10), train=True, normalise=False)
    view = puzzle.assemble(item.cubes, item.starts, SPEC.crop_size, fill=np.nan)
    labels = puzzle.cube_labelmap(item.starts, SPEC.cube_size, SPEC.crop_size, item.permutation + 1)
    original = puzzle.extract_cubes(crop, item.starts, SPEC.cube_size)
    assert np.isnan(view[0][labels == 0]).all()
    assert set(np.unique(labels)) == set(range(9))
    for cube_index in range(8):
        slot = int(np.flatnonzero(item.permutation == cube_index)[0])
        shown = view[0][labels == cube_index + 1].reshape(SPEC.cube_size)
        expected = puzzle.rotate(original[cube_index : cube_index + 1], item.rotations[slot : slot + 1])[0, 0]
        np.testing.assert_array_equal(shown, expected)


def test_normalise_cubes_maps_to_minus_one_one_and_constant_cubes_to_zero() -> None:
    cubes = np.random.default_rng(11).uniform(3, 9, size=(3, 2, 4, 4, 4)).astype(np.float32)
    cubes[1] = 5.0
    normalised = puzzle.normalise_cubes(cubes)
    for cube in (0, 2):
        for channel in range(2):
            assert normalised[cube, channel].min() == pytest.approx(-1) and normalised[cube, channel].max() == pytest.approx(1)
    assert (normalised[1] == 0).all() and np.isfinite(normalised).all()
    # min-max scaling is invariant to flips, so normalising before or after scrambling gives the same cubes
    rotations = np.array([1, 0, 2])
    np.testing.assert_array_equal(puzzle.normalise_cubes(puzzle.rotate(cubes, rotations)), puzzle.rotate(normalised, rotations))


def test_rotation_classes_from_probabilities() -> None:
    hor = np.array([0.9, 0.2, 0.7, 0.3])
    ver = np.array([0.1, 0.8, 0.9, 0.4])
    np.testing.assert_array_equal(puzzle.rotation_classes(hor, ver), [1, 2, 2, 0])


def test_spec_refuses_bad_shapes() -> None:
    with pytest.raises(BadInput, match="grid 4"):
        puzzle.PuzzleSpec(grid=4)
    with pytest.raises(BadInput, match="cube size"):
        puzzle.PuzzleSpec(cube_size=(2, 32, 32))
    assert puzzle.PuzzleSpec(cube_size=(16, 32, 32), jitter=(5, 10, 10)).crop_size == (42, 84, 84)


def test_windowed_normalisation_equals_mapping_the_volume_first(table: np.ndarray) -> None:
    """The sampler clips cubes to the intensity window instead of mapping the whole crop: same cubes."""
    from RubikSSLLib.intensity import IntensityMap

    volume = np.random.default_rng(12).normal(100, 50, size=(2, 40, 44, 46)).astype(np.float32)
    volume[1, :20] = 500.0  # a region above the window: some cubes become constant after clipping
    window = IntensityMap(np.array([60.0, 80.0], np.float32), np.array([140.0, 200.0], np.float32))
    start = (1, 2, 3)
    crop = window.apply(volume[:, 1 : 1 + SPEC.crop_size[0], 2 : 2 + SPEC.crop_size[1], 3 : 3 + SPEC.crop_size[2]])
    fused = puzzle.scramble(volume, SPEC, table, np.random.default_rng(13), crop_start=start, window=(window.low, window.high))
    plain = puzzle.scramble(crop, SPEC, table, np.random.default_rng(13))
    np.testing.assert_array_equal(fused.permutation, plain.permutation)
    np.testing.assert_allclose(fused.cubes, plain.cubes, atol=2e-5)
    assert (plain.cubes[:, 1] == 0).all(axis=(1, 2, 3)).any()  # the constant case is exercised


def test_crop_outside_the_volume_is_refused(table: np.ndarray) -> None:
    volume = np.zeros((1, *SPEC.crop_size), np.float32)
    with pytest.raises(ValueError, match="exceeds"):
        puzzle.scramble(volume, SPEC, table, np.random.default_rng(0), crop_start=(1, 0, 0))


def test_the_shortcut_solver_finds_an_order_written_in_the_cues_and_none_in_noise() -> None:
    """Puzzles of noise volumes cannot be ordered from trivial cues (about chance); puzzles of volumes with empty
    octants, as binary masks have, can (where the empty cubes sit gives the permutation away). (Of one volume only,
    even noise cubes are recognised by their cues, which the solver then learns: a shortcut too.)"""
    from RubikSSLLib import sampling, shortcuts
    from RubikSSLLib.config import EncoderConfig, PretrainConfig
    from RubikSSLLib.intensity import IntensityMap
    from RubikSSLLib.tasks.jigsaw import JigsawTask
    from RubikSSLLib.volumes import Geometry

    config = PretrainConfig(data=["x"], out="y", task="jigsaw", puzzle=puzzle.PuzzleSpec(cube_size=(8, 8, 8),
                            jitter=(1, 1, 1), num_permutations=10), encoder=EncoderConfig(1, (4,), (1,)))
    task = JigsawTask(config)
    rng = np.random.default_rng(0)

    def case(array: np.ndarray) -> sampling.PreparedCase:
        return sampling.PreparedCase("c", array[None].astype(np.float32), Geometry(),
                                     IntensityMap(np.zeros(1, np.float32), np.ones(1, np.float32)),
                                     np.zeros(3, int), np.array(array.shape))

    noise = shortcuts.trivial_ordering_accuracy(task, [case(rng.random((18, 18, 18))) for _ in range(100)], puzzles=600)


    def masks() -> np.ndarray:  # like a centred binary mask: some octants empty, one half empty, the rest texture
        volume = rng.random((18, 18, 18))
        volume[:9, :9, :9] = volume[:9, 9:, 9:] = volume[9:, :9, 9:] = 0
        volume[9:, 9:, :4] = 0
        return volume

    shaped = shortcuts.trivial_ordering_accuracy(task, [case(masks()) for _ in range(100)], puzzles=600)
    assert noise["chance_ordering"] == 0.1
    assert noise["trivial_ordering_acc"] < 0.25 and shaped["trivial_ordering_acc"] > 0.6, (noise, shaped)


def test_smaller_cube_sizes_are_multiples_of_four_and_fit_the_encoder() -> None:
    from RubikSSLLib.shortcuts import smaller_cube_sizes

    assert smaller_cube_sizes(28, 8) == [20, 16]
    assert smaller_cube_sizes(32, 8) == [24, 16]
    assert smaller_cube_sizes(12, 4) == [8]
    assert smaller_cube_sizes(8, 8) == []  # nothing smaller fits a 4-stage encoder


def test_pretraining_check_flags_the_adrenal_shortcut_and_finds_cube_sizes_with_fewer_cues(small_adrenal) -> None:
    """AdrenalMNIST3D (real centred masks) at 28^3 cubes: the trivial solver orders far more puzzles than chance
    (RESULTS.md §7), and each smaller cube size leaves it less; the log line gives both."""
    from RubikSSLLib import datasources, shortcuts, tasks, training
    from RubikSSLLib.config import PretrainConfig
    from RubikSSLLib.progress import Reporter

    config = PretrainConfig(data=[str(small_adrenal)], out="unused", spacing_mm=None,
                            puzzle=puzzle.PuzzleSpec(cube_size=(28, 28, 28), jitter=(2, 2, 2)))
    shape = tasks.create(config).shape
    cases = [case for _, case in training.load_cases(datasources.resolve(config.data).train, config, Reporter("none"), shape)]
    result = shortcuts.pretraining_check(config, cases, puzzles=1500)
    assert result["trivial_ordering_acc"] > 10 * result["chance_ordering"], result
    smaller = result["smaller_cubes"]
    assert list(smaller) == ["20", "16"]
    assert result["trivial_ordering_acc"] > smaller["20"] > smaller["16"], result
    line = shortcuts.describe(result, 28)
    assert "far above chance" in line and f"20: {smaller['20']:.3f}, 16: {smaller['16']:.3f}" in line, line
    assert shortcuts.pretraining_check(config, cases, puzzles=0) == {}
    assert shortcuts.pretraining_check(PretrainConfig(data=["x"], out="y", task="rotation"), cases, 100) == {}


def test_the_puzzle_montage_titles_its_columns_and_colours_each_cube_by_how_the_network_did() -> None:
    """A newcomer reads the picture alone: the three columns are titled, the rows named, each cube outlined in the
    panel's colour (green: placed and turned right, orange: placed only, red: wrong place) where it sits in the
    scrambled grid and where the network put it, with a legend of the colours used."""
    from RubikSSLLib import puzzleview, visualize

    size, starts = (8, 8, 8), [(z, y, x) for z in (1, 11) for y in (1, 11) for x in (1, 11)]
    views = {name: np.random.default_rng(0).random((1, 20, 20, 20)).astype(np.float32)
             for name in ("original", "scrambled", "recovered")}
    placed = [True, True, False, True, False, True, True, True]
    oriented = [True, False, True, True, True, True, True, False]
    record = {"cube_size_zyx": list(size), "cube_starts_zyx": [list(s) for s in starts],
              "prediction": {"cube_placed_correctly": placed, "cube_oriented_correctly": oriented,
                             "permutation": [0, 1, 3, 2, 5, 4, 6, 7]}}
    image = puzzleview.puzzle_montage(views, record, (5, 5, 5))
    assert image.ndim == 3 and image.shape[2] == 3
    colour = {name: np.all(image == (np.array(rgb) * 255).astype(np.uint8), axis=-1)
              for name, rgb in visualize.CUBE_COLOURS.items()}
    assert all(mask.sum() > 50 for mask in colour.values())
    grid_left = visualize.LABEL_WIDTH
    original_column = (slice(visualize.TITLE_HEIGHT, -visualize.LEGEND_HEIGHT), slice(grid_left, grid_left + image.shape[1] // 4))
    assert not any(mask[original_column].any() for mask in colour.values())  # the original has no cubes to judge
    title_strip, label_strip = image[:visualize.TITLE_HEIGHT, grid_left:], image[visualize.TITLE_HEIGHT:, :grid_left]
    assert (title_strip < 128).any() and (label_strip < 128).any()  # text drawn above the columns and beside the rows
    legend = image[-visualize.LEGEND_HEIGHT:]
    assert all(np.all(legend == (np.array(rgb) * 255).astype(np.uint8), axis=-1).any() for rgb in visualize.CUBE_COLOURS.values())
    without_model = puzzleview.puzzle_montage(views, {k: v for k, v in record.items() if k != "prediction"}, (5, 5, 5))
    assert not any(np.all(without_model == (np.array(rgb) * 255).astype(np.uint8), axis=-1).any()
                   for rgb in visualize.CUBE_COLOURS.values())
    assert without_model.shape[0] == image.shape[0] - visualize.LEGEND_HEIGHT  # no legend without colours


def _one_stage_encoder():
    from RubikSSLLib.networks import EncoderConfig

    return EncoderConfig(1, (4,), (1,))


def _real_case(identity: bool = False):
    """HeadMR (real MRI, 2 channels: itself and a copy saturated above its window, whose cubes go constant), or its
    nnU-Net-style twin (identity mapping: the values are the network's)."""
    from conftest import HEAD_MR

    from RubikSSLLib import datasources, sampling
    from RubikSSLLib.intensity import IntensityRecipe

    volume = datasources.load(datasources.CaseSource((str(HEAD_MR),)), spacing_mm=None)
    volume.array = np.concatenate([volume.array, np.maximum(volume.array, np.percentile(volume.array, 60))])
    return sampling.prepare(volume, SPEC, IntensityRecipe("none" if identity else "mri"))


@pytest.mark.parametrize("task_name, identity", [("rubik", False), ("jigsaw", False), ("rubik", True)])
def test_puzzles_finished_on_the_device_equal_the_samplers_bit_for_bit(task_name: str, identity: bool) -> None:
    """The GPU path (the worker gathers, devicepuzzle.finish turns and scales the batch) gives the very cubes and
    labels of the CPU path (the sampler finishes each puzzle in numpy), for the same draws; the batch is untouched."""
    import dataclasses

    import torch

    from RubikSSLLib import tasks
    from RubikSSLLib.config import PretrainConfig

    case = _real_case(identity)
    if identity:
        case = dataclasses.replace(case, mapping=dataclasses.replace(case.mapping, identity=True))
    task = tasks.create(PretrainConfig(data=["x"], out="y", task=task_name, puzzle=SPEC, encoder=_one_stage_encoder()))
    finished = [task.sample(case, np.random.default_rng(seed), True) for seed in range(12)]
    task.place_finishing(torch.device("cuda"))  # only sets where to finish: nothing runs on a GPU here
    assert task.finish_on_device
    raw = [task.sample(case, np.random.default_rng(seed), True) for seed in range(12)]
    batch = torch.utils.data.default_collate(raw)
    before = batch["cubes"].clone()
    on_device = task.network_input(batch)
    assert torch.equal(on_device, torch.stack([s["cubes"] for s in finished]))
    assert torch.equal(batch["cubes"], before)
    for key in ("order", "hor", "ver", "rotations"):
        assert torch.equal(batch[key], torch.stack([s[key] for s in finished]))
    assert ("window" in batch) is not identity
    if not identity:
        assert (on_device[:, :, 1] == 0).all(dim=(-3, -2, -1)).any()  # the constant-cube rule is exercised
        assert on_device.min() == -1 and on_device.max() == 1
    if task_name == "rubik":
        assert (batch["rotations"] > 0).any() and not torch.equal(batch["cubes"], on_device)


def test_rubik_plus_keeps_finishing_in_its_sampler_on_a_gpu() -> None:
    import torch

    from RubikSSLLib import tasks
    from RubikSSLLib.config import PretrainConfig

    task = tasks.create(PretrainConfig(data=["x"], out="y", task="rubik+", puzzle=SPEC, encoder=_one_stage_encoder()))
    task.place_finishing(torch.device("cuda"))
    assert not task.finish_on_device  # it masks voxels of the scaled cubes


@pytest.mark.parametrize("dtype", ["float32", "float64", "int16", "uint16"])
def test_gather_copies_each_cube_exactly_from_any_dtype(dtype: str) -> None:
    """Unturned cubes are plain copies, turned ones copies of numpy's flipped views, from any volume dtype: all equal
    plain slicing, in float32."""
    volume = (np.random.default_rng(3).normal(size=(2, 30, 31, 32)) * 1000).astype(dtype)
    corners = np.array([[0, 0, 0], [10, 11, 12], [20, 3, 5], [1, 20, 22]])
    order, rotations = np.array([2, 0, 3, 1]), np.array([0, 1, 2, 0])
    cubes = puzzle.gather_cubes(volume, corners, (7, 8, 9), order, rotations)
    for slot, (source, rotation) in enumerate(zip(order, rotations)):
        z, y, x = corners[source]
        expected = volume[:, z:z + 7, y:y + 8, x:x + 9].astype(np.float32)
        if rotation:
            expected = np.flip(expected, puzzle.ROTATION_FLIP_AXES[rotation])
        np.testing.assert_array_equal(cubes[slot], expected)
    assert cubes.dtype == np.float32
