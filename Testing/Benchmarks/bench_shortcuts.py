"""How far trivial cues (cube mean, spread, empty share, face means) solve the Rubik's cube puzzle on the shared
data, against chance: a pretext that is won from such cues says little about the encoder. Prints a table.

    python Testing/Benchmarks/bench_shortcuts.py [--puzzles 3000] [--adrenal-cube-sizes 28,20,16]

AdrenalMNIST3D is also checked at each of --adrenal-cube-sizes (jitter 2): smaller cubes leave the cues less.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from RubikSSLLib import datasources, shortcuts, tasks, training  # noqa: E402
from RubikSSLLib.config import PretrainConfig  # noqa: E402
from RubikSSLLib.progress import Reporter  # noqa: E402
from RubikSSLLib.puzzle import PuzzleSpec  # noqa: E402

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
DATASETS = {
    "AdrenalMNIST3D training images (300), cube 28, jitter 2": dict(
        data=[str(SHARED / "cls" / "adrenalmnist3d_64_trainval.npz")], spacing_mm=None,
        puzzle=PuzzleSpec(cube_size=(28, 28, 28), jitter=(2, 2, 2)), cases=300),
    "head MRI/CT of shared/data/pretrain at 2 mm, default puzzle": dict(
        data=sorted(str(p) for p in (SHARED / "pretrain").glob("*.nii.gz")), skip_unusable=True, cases=None),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--puzzles", type=int, default=3000)
    parser.add_argument("--adrenal-cube-sizes", default="20,16", help="further AdrenalMNIST3D rows, one per cube size")
    args = parser.parse_args()
    print("| data | cases | trivial ordering accuracy | chance |\n|---|---|---|---|")
    adrenal_name, adrenal = next(iter(DATASETS.items()))
    for size in filter(None, args.adrenal_cube_sizes.split(",")):
        DATASETS[adrenal_name.replace("cube 28", f"cube {size}")] = dict(
            adrenal, puzzle=dataclasses.replace(adrenal["puzzle"], cube_size=(int(size),) * 3))
    for name, settings in DATASETS.items():
        settings = dict(settings)
        count = settings.pop("cases")
        config = PretrainConfig(out="unused", **settings)
        task = tasks.create(config)
        sources = datasources.resolve(config.data).train[:count]
        cases = [case for _, case in training.load_cases(sources, config, Reporter("none"), task.shape)]
        result = shortcuts.trivial_ordering_accuracy(task, cases, puzzles=args.puzzles)
        print(f"| {name} | {len(cases)} | {result['trivial_ordering_acc']:.3f} | {result['chance_ordering']:.3f} |")


if __name__ == "__main__":
    main()
