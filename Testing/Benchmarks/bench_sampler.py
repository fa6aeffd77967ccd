"""The Rubik's cube sampler against Medical-SSL's generator and a plain numpy gather (issue 25, target 1); prints
Markdown tables. Not a test: the numbers depend on the machine.

    git clone https://github.com/EndoluminalSurgicalVision-IMR/Medical-SSL /tmp/medical-ssl   # the baseline
    python Testing/Benchmarks/bench_sampler.py --medical-ssl /tmp/medical-ssl [--repeats 7] [--batches 30]

One thread per process. Every row makes puzzles of 8 cubes of 64^3 (jitter 10, a 148^3 crop) from the same real
volume (BraTS 2013 pat0001 FLAIR, 155x240x240), so the rates compare in one run:
- Medical-SSL: its RKBBase.crop_cubes_3d, rearrange and rotate on a random 148^3 crop, then what its
  __getitem__ does to the cubes (stack, float32, torch) - run from its checkout, not part of RubikSSL. Its module
  imports torchio, which none of these methods use; an empty stand-in is put in its place when it is missing.
- plain gather: the 8 cubes copied out of the volume into one float32 array, no shuffle, no turn, no scaling.
- RubikSSL finished in the sampler: the cubes turned and scaled to [-1, 1] in numpy, as a CPU run makes them
  (and as every run made them before issue 25).
- RubikSSL for a GPU: the worker gathers the shuffled cubes and draws the labels; devicepuzzle.finish turns and
  scales them on the batch on the GPU (its cost on this CPU is a row of its own; on a GPU it is bench_gpu's).
Then the DataLoader with 0, 1 and 2 workers making the GPU's samples (batches of 8 puzzles, the main process only
takes them), and the memory copy rate that bounds a machine with more cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from RubikSSLLib import datasources, devicepuzzle, puzzle, sampling  # noqa: E402
from RubikSSLLib.config import PretrainConfig  # noqa: E402
from RubikSSLLib.intensity import IntensityRecipe  # noqa: E402
from RubikSSLLib.tasks.rubik import RubikTask  # noqa: E402
from bench_pretraining import median_rate  # noqa: E402  (this folder is on the path of a script run from it)

BRATS = REPO.parent / "shared/data/seg/brats2015_deepmedic/brats_2013_pat0001_1/Flair_subtrMeanDivStd.nii.gz"
CUBE, JITTER, CUBES = 64, 10, 8
BATCH = 8


def load_medical_ssl(checkout: Path):
    """Medical-SSL's RKBBase from its checkout (datasets_3D/Rubik_cube/base_rkb_pretask.py), built for our cube size."""
    path = checkout / "datasets_3D" / "Rubik_cube" / "base_rkb_pretask.py"
    if not path.exists():
        raise SystemExit(f"{path} not found: clone https://github.com/EndoluminalSurgicalVision-IMR/Medical-SSL and "
                         "pass the checkout as --medical-ssl")
    try:
        import torchio  # noqa: F401
    except ImportError:  # imported at its top, used by none of the methods measured here
        stand_in = types.ModuleType("torchio")
        stand_in.transforms = types.ModuleType("torchio.transforms")
        sys.modules.update({"torchio": stand_in, "torchio.transforms": stand_in.transforms})
    spec = importlib.util.spec_from_file_location("medical_ssl_rkb", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = types.SimpleNamespace(
        input_size=[CUBE] * 3, org_data_size=None, gaps=None, num_grids_per_axis=2, order_class_num=100,
        k_permutations_path=str(checkout / "datasets_3D" / "Rubik_cube" / "permutaions" / "permutations_hamming_max_100.npy"))
    return module.RKBBase(config, base_dir=str(checkout), flag="train")


def medical_ssl_puzzle(generator, volume: np.ndarray, crop: int, rng: np.random.Generator) -> tuple:
    """One puzzle as Medical-SSL's RKBLunaPretaskSet.__getitem__ makes it, from a random crop of `volume` (Z, Y, X)."""
    corner = [int(rng.integers(0, s - crop + 1)) for s in volume.shape]
    region = volume[corner[0]:corner[0] + crop, corner[1]:corner[1] + crop, corner[2]:corner[2] + crop]
    cubes = generator.crop_cubes_3d(region, flag="train", cubes_per_side=2, cube_jitter_xy=JITTER, cube_jitter_z=JITTER)
    cubes, order = generator.rearrange(cubes, generator.K_permutations)
    cubes, hor, ver = generator.rotate(cubes)
    final = np.expand_dims(np.array(cubes), axis=1)
    return (torch.from_numpy(final.astype(np.float32)), torch.from_numpy(np.array(order)),
            torch.from_numpy(np.array(hor)).float(), torch.from_numpy(np.array(ver)).float())


def plain_gather(volume: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """The 8 cubes at `corners` (8, 3) of `volume` (C, Z, Y, X) copied into one (8, C, 64, 64, 64) float32 array."""
    out = np.empty((len(corners), volume.shape[0], CUBE, CUBE, CUBE), dtype=np.float32)
    for slot, (z, y, x) in enumerate(corners):
        out[slot] = volume[:, z:z + CUBE, y:y + CUBE, x:x + CUBE]
    return out


def sampler_rows(case: sampling.PreparedCase, task: RubikTask, medical_ssl, repeats: int, count: int) -> list[tuple]:
    spec, table = task.config.puzzle, task.table
    rng = np.random.default_rng(0)
    corners = [sampling.crop_start(case, spec.crop_size, rng) + puzzle.cube_starts(spec, rng) for _ in range(count)]
    rows = []
    warm = sampling.to_sample(sampling.make_puzzle(case, spec, table, rng, True))  # page in the volume and the code
    del warm
    if medical_ssl is not None:
        random.seed(0)
        np.random.seed(0)
        rows.append(("Medical-SSL's generator (RKBBase)", median_rate(
            count, lambda: [medical_ssl_puzzle(medical_ssl, case.array[0], spec.crop_size[0], rng) for _ in range(count)],
            repeats)))
    rows.append(("plain numpy gather of 8 cubes", median_rate(
        count, lambda: [plain_gather(case.array, c) for c in corners], repeats)))
    task.finish_on_device = False
    rows.append(("RubikSSL finished in the sampler (CPU training; every run before)", median_rate(
        count, lambda: [task.sample(case, rng, True) for _ in range(count)], repeats)))
    task.finish_on_device = True  # as training on a GPU sets it
    rows.append(("RubikSSL for a GPU: the worker's sample (gather + labels)", median_rate(
        count, lambda: [task.sample(case, rng, True) for _ in range(count)], repeats)))
    batch = torch.utils.data.default_collate([task.sample(case, rng, True) for _ in range(BATCH)])
    rows.append((f"  its devicepuzzle.finish, run on this CPU (batches of {BATCH})", median_rate(
        BATCH * 4, lambda: [task.network_input(batch) for _ in range(4)], repeats)))
    return rows


def loader_rate(task: RubikTask, case: sampling.PreparedCase, workers: int, batches: int) -> float:
    """Puzzles/s of task.sample that a DataLoader with `workers` delivers to a main process that only takes them."""
    stream = sampling.SampleStream([case], task.sample, seed=0)
    loader = iter(torch.utils.data.DataLoader(stream, batch_size=BATCH, num_workers=workers,
                                              persistent_workers=workers > 0))
    for _ in range(2 * max(1, workers)):  # start-up and each worker's first batch
        next(loader)
    started = time.perf_counter()
    for _ in range(batches):
        next(loader)
    rate = batches * BATCH / (time.perf_counter() - started)
    del loader
    return rate


def copy_rate_gb_s(repeats: int) -> float:
    """One thread's memory copy rate (GB/s read + written) on 256 MiB, the bound of a gather-only sampler."""
    source = np.ones(64 * 2**20, dtype=np.float32)
    target = np.empty_like(source)
    return 2 * source.nbytes / 1e9 * median_rate(1, lambda: np.copyto(target, source), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--medical-ssl", type=Path, help="a checkout of Medical-SSL (the baseline row)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--puzzles", type=int, default=60, help="puzzles per measured repeat")
    parser.add_argument("--batches", type=int, default=30, help="batches per DataLoader measurement")
    args = parser.parse_args()
    torch.set_num_threads(1)
    medical_ssl = load_medical_ssl(args.medical_ssl) if args.medical_ssl else None
    config = PretrainConfig(data=["x"], out="y", puzzle=puzzle.PuzzleSpec(cube_size=(CUBE,) * 3, jitter=(JITTER,) * 3))
    task = RubikTask(config)
    volume = datasources.load(datasources.CaseSource((str(BRATS),)), spacing_mm=None)
    case = sampling.prepare(volume, config.puzzle, IntensityRecipe("mri"))

    rows = sampler_rows(case, task, medical_ssl, args.repeats, args.puzzles)
    rates = dict(rows)
    reference = {name: rates.get(name) for name in ("Medical-SSL's generator (RKBBase)", "plain numpy gather of 8 cubes")}
    print(f"One thread; {case.array.shape[1:]} voxels (z, y, x), 8 cubes of {CUBE}^3, jitter {JITTER}; median of "
          f"{args.repeats} x {args.puzzles} puzzles; torch {torch.__version__}, numpy {np.__version__}\n")
    print("| sampler | puzzles/s | vs Medical-SSL | vs plain gather |\n|---|---|---|---|")
    for name, rate in rows:
        ratios = [f"{rate / base:.2f}" if base else "–" for base in reference.values()]
        print(f"| {name} | {rate:.0f} | {' | '.join(ratios)} |")

    print(f"\n| DataLoader workers (batches of {BATCH}, the main process only takes them) | puzzles/s | per worker |")
    print("|---|---|---|")
    single = None
    for workers in (0, 1, 2):
        rate = loader_rate(task, case, workers, args.batches)
        single = rate if workers == 1 else single
        print(f"| {workers} | {rate:.0f} | {rate / max(1, workers):.0f} |")
    copy = copy_rate_gb_s(args.repeats)
    bytes_per_puzzle = 3 * 2 * CUBES * CUBE**3 * 4  # read + write of the gather, the sample into the batch, the batch out
    print(f"\nOne thread copies {copy:.1f} GB/s; a puzzle moves about {bytes_per_puzzle / 1e6:.0f} MB (read and write of the "
          f"gather, of the batch and of its hand-over), so one core's copy rate bounds a worker at "
          f"{copy * 1e9 / bytes_per_puzzle:.0f} puzzles/s; 16 workers at the measured 1-worker rate would make "
          f"{16 * single:.0f} puzzles/s while the machine's memory moves at least "
          f"{16 * single * bytes_per_puzzle / 1e9:.0f} GB/s for them.")


if __name__ == "__main__":
    main()
