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
Then 0, 1 and 2 workers making the GPU's samples in batches of 8 puzzles: torch's DataLoader (a fresh shared-memory
segment per batch; the main process only takes it) beside the product's SlotLoader (batchslots.py: reused slots,
each batch copied out), and the memory copy rate that bounds a machine with more cores.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import random
import statistics
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from RubikSSLLib import hugepages  # noqa: E402

hugepages.request()  # as the command line's processes run

import numpy as np  # noqa: E402
import torch  # noqa: E402

from RubikSSLLib import batchslots, datasources, devicepuzzle, puzzle, sampling  # noqa: E402
from RubikSSLLib.config import PretrainConfig  # noqa: E402
from RubikSSLLib.intensity import IntensityRecipe  # noqa: E402
from RubikSSLLib.tasks.rubik import RubikTask  # noqa: E402

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


def interleaved_rates(actions: dict[str, tuple[int, object]], repeats: int) -> dict[str, list[float]]:
    """name -> its rates (items/s) over `repeats` rounds; each round times every action once, one after the other,
    so that the rows of one round share the machine's state (another process's memory traffic, say)."""
    for _, action in actions.values():
        action()  # page in the code and the volume
    rates: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(repeats):
        for name, (count, action) in actions.items():
            started = time.perf_counter()
            action()
            rates[name].append(count / (time.perf_counter() - started))
    return rates


MEDICAL_SSL, PLAIN = "Medical-SSL's generator (RKBBase)", "plain numpy gather of 8 cubes"


def sampler_rows(case: sampling.PreparedCase, task: RubikTask, medical_ssl, repeats: int, count: int) -> list[tuple]:
    """(name, median puzzles/s, median ratio to Medical-SSL's, median ratio to the plain gather) per sampler, the
    ratios taken within each round."""
    spec = task.config.puzzle
    rng = np.random.default_rng(0)
    corners = [sampling.crop_start(case, spec.crop_size, rng) + puzzle.cube_starts(spec, rng) for _ in range(count)]
    on_cpu, for_gpu = copy.copy(task), copy.copy(task)
    on_cpu.finish_on_device, for_gpu.finish_on_device = False, True  # as training on a CPU / a GPU sets it
    batch = torch.utils.data.default_collate([for_gpu.sample(case, rng, True) for _ in range(BATCH)])
    def each(make):  # one puzzle after another, each dropped once made (as a worker hands it on)
        def run() -> None:
            for index in range(count):
                make(index)
        return run

    actions = {}
    if medical_ssl is not None:
        random.seed(0)
        np.random.seed(0)
        actions[MEDICAL_SSL] = (count, each(lambda _: medical_ssl_puzzle(medical_ssl, case.array[0], spec.crop_size[0],
                                                                         rng)))
    actions[PLAIN] = (count, each(lambda index: plain_gather(case.array, corners[index])))
    actions["RubikSSL finished in the sampler (CPU training; every run before)"] = (
        count, each(lambda _: on_cpu.sample(case, rng, True)))
    actions["RubikSSL for a GPU: the worker's sample (gather + labels)"] = (
        count, each(lambda _: for_gpu.sample(case, rng, True)))
    actions[f"  its devicepuzzle.finish, run on this CPU (batches of {BATCH})"] = (
        BATCH * 4, lambda: [for_gpu.network_input(batch).shape for _ in range(4)])
    rates = interleaved_rates(actions, repeats)

    def ratio(name: str, reference: str) -> float:
        if reference not in rates:
            return float("nan")
        return statistics.median(a / b for a, b in zip(rates[name], rates[reference]))

    return [(name, statistics.median(values), ratio(name, MEDICAL_SSL), ratio(name, PLAIN))
            for name, values in rates.items()]


def loader_rate(task: RubikTask, case: sampling.PreparedCase, workers: int, batches: int, slots: bool) -> float:
    """Puzzles/s of task.sample delivered in batches of BATCH to a main process: torch's DataLoader (a fresh shared
    segment per batch, which the main process only takes, never reads) or, slots=True, the product's SlotLoader
    (reused shared-memory slots, each batch copied out into the main process's memory, as a CPU run gets it)."""
    stream = sampling.SampleStream([case], task.sample, seed=0)
    if slots:
        loader = batchslots.SlotLoader(stream, BATCH, workers, torch.device("cpu"))
    else:
        loader = iter(torch.utils.data.DataLoader(stream, batch_size=BATCH, num_workers=workers,
                                                  persistent_workers=workers > 0))
    for _ in range(2 * max(1, workers) * batchslots.SLOTS):  # start-up, and every slot of every worker once
        next(loader)
    started = time.perf_counter()
    for _ in range(batches):
        next(loader)
    rate = batches * BATCH / (time.perf_counter() - started)
    if slots:
        loader.close()
    return rate


def copy_rate_gb_s(repeats: int) -> float:
    """One thread's memory copy rate (GB/s read + written) on 256 MiB, the bound of a gather-only sampler."""
    source = np.ones(64 * 2**20, dtype=np.float32)
    target = np.empty_like(source)
    return 2 * source.nbytes / 1e9 * statistics.median(interleaved_rates({"copy": (1, lambda: np.copyto(target, source))}, repeats)["copy"])


def copy_out_rate(repeats: int) -> float:
    """Puzzles/s of SlotLoader's copy-out on a CPU: one batch of BATCH puzzles copied out of a (reused) slot."""
    slot, cpu = torch.ones(BATCH, CUBES, 1, CUBE, CUBE, CUBE), torch.device("cpu")
    return BATCH * statistics.median(interleaved_rates({"out": (1, lambda: batchslots.copy_out(slot, cpu))}, repeats)["out"])


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
    print(f"One thread; {case.array.shape[1:]} voxels (z, y, x), 8 cubes of {CUBE}^3, jitter {JITTER}; median of "
          f"{args.repeats} rounds of {args.puzzles} puzzles, the rows of a round run one after the other (ratios "
          f"within a round); torch {torch.__version__}, numpy {np.__version__}\n")
    print("| sampler | puzzles/s | vs Medical-SSL | vs plain gather |\n|---|---|---|---|")
    for name, rate, *ratios in rows:
        print(f"| {name} | {rate:.0f} | {' | '.join('–' if r != r else f'{r:.2f}' for r in ratios)} |")

    gpu_task = copy.copy(task)
    gpu_task.finish_on_device = True  # the workers make what a GPU run asks of them
    print(f"\n| workers making the GPU's samples (batches of {BATCH}) | torch DataLoader, puzzles/s | "
          "RubikSSL's slot loader (batchslots), puzzles/s |\n|---|---|---|")
    single = None
    for workers in (0, 1, 2):
        torch_rate = loader_rate(gpu_task, case, workers, args.batches, slots=False)
        slot_rate = f"{loader_rate(gpu_task, case, workers, args.batches, slots=True):.0f}" if workers else "–"
        single = float(slot_rate) if workers == 1 else single
        print(f"| {workers} | {torch_rate:.0f} | {slot_rate} |")
    copy_gb_s = copy_rate_gb_s(args.repeats)
    copy_out = copy_out_rate(args.repeats)
    bytes_per_puzzle = 2 * CUBES * CUBE**3 * 4  # read + write of the worker's gather into its slot
    print(f"\nOne thread copies {copy_gb_s:.1f} GB/s; a worker's gather into its slot moves {bytes_per_puzzle / 1e6:.0f} MB a "
          f"puzzle, so one core's copy rate bounds a worker at {copy_gb_s * 1e9 / bytes_per_puzzle:.0f} puzzles/s. The "
          f"training process copies each batch out of its slot (into fresh memory, as a CPU run does) at "
          f"{copy_out:.0f} puzzles/s: with 16 cores, 15 workers at the measured 1-worker rate would make "
          f"{15 * single:.0f} puzzles/s, and that one copy-out bounds the training process at {copy_out:.0f}.")


if __name__ == "__main__":
    main()
