"""Benchmarks for pretraining; prints Markdown tables. Not a test: numbers depend on the machine.

    python Testing/Benchmarks/bench_pretraining.py [--repeats 5] [--threads 1]
    THP_MEM_ALLOC_ENABLE=0 python Testing/Benchmarks/bench_pretraining.py    # 4 KiB pages, as before hugepages.py
    python Testing/Benchmarks/bench_pretraining.py --profile 32     # where one step's time goes (torch.profiler)

The network (channels-last, as training runs it): training steps/s and puzzles/s (the consumption rate), FLOPs per
step, and the achieved FLOP rate as a fraction of this machine's oneDNN conv3d rate (64 -> 64 channels, 3x3x3,
batch 8, 32^3) measured in the same run. The sampler's rates (against Medical-SSL's generator and a plain gather)
are bench_sampler.py's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from RubikSSLLib import hugepages  # noqa: E402

hugepages.request()  # as the command line runs (THP_MEM_ALLOC_ENABLE=0 in the environment: the 4 KiB pages before it)

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from RubikSSLLib.networks import Encoder, EncoderConfig, RubikNet, channels_last, rubik_loss  # noqa: E402


def median_rate(count: int, action, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        rates.append(count / (time.perf_counter() - started))
    return statistics.median(rates)


def training_step(cube: int, batch: int):
    """One Rubik pretraining step (forward + backward + Adam) of the default encoder on `batch` puzzles of 8 random
    cubes of cube^3, laid out as training lays it out (channels-last)."""
    model = channels_last(RubikNet(Encoder(EncoderConfig()), 8, 100))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    cubes = torch.randn(batch, 8, 1, cube, cube, cube)
    targets = {"order": torch.randint(0, 100, (batch,)), "hor": torch.zeros(batch, 8), "ver": torch.zeros(batch, 8)}

    def step() -> None:
        loss = rubik_loss(model(cubes), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def profile_table(cube: int, batch: int) -> str:
    """torch.profiler's self-CPU table of one training step, after two warm-up steps."""
    from torch.profiler import ProfilerActivity, profile

    step = training_step(cube, batch)
    step()
    step()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step()
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def bench_network(repeats: int, cube: int, batch: int) -> list[tuple[str, float]]:
    """Each round times 3 training steps, then 3 forward passes of the reference conv3d: the ratio is taken within a
    round (the rows share the machine's state), the median over rounds."""
    step = training_step(cube, batch)
    step()
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    conv = torch.nn.Conv3d(64, 64, 3, padding=1)
    x = torch.randn(8, 64, 32, 32, 32)
    conv_flops = 2 * 8 * 64 * 64 * 27 * 32**3

    def convolutions() -> None:
        with torch.no_grad():
            for _ in range(3):
                conv(x)

    convolutions()
    steps_per_s, conv_rates, ratios = [], [], []
    for _ in range(repeats):
        steps_per_s.append(median_rate(3, lambda: [step() for _ in range(3)], 1))
        conv_rates.append(median_rate(3, convolutions, 1) * conv_flops)
        ratios.append(steps_per_s[-1] * flops / conv_rates[-1])
    rate = statistics.median(steps_per_s)
    return [
        (f"train step, batch {batch} puzzles of 8 x {cube}^3 cubes: steps/s", rate),
        ("  puzzles/s consumed", rate * batch),
        ("  GFLOP per step (forward + backward)", flops / 1e9),
        ("  achieved GFLOP/s", rate * flops / 1e9),
        ("conv3d 64->64 3^3, batch 8, 32^3: GFLOP/s", statistics.median(conv_rates) / 1e9),
        ("  step rate as a fraction of the conv3d rate (median of the rounds' ratios)", statistics.median(ratios)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", type=int, metavar="CUBE", help="instead: where one step's time goes, cubes of CUBE^3")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.profile:
        print(profile_table(args.profile, 8))
        return
    rows = bench_network(args.repeats, 32, 8) + bench_network(args.repeats, 64, 8)
    pages = "huge pages" if os.environ.get(hugepages.VARIABLE) == "1" else "4 KiB pages"
    print(f"threads: {args.threads}; median of {args.repeats} rounds; {pages} ({hugepages.VARIABLE}="
          f"{os.environ.get(hugepages.VARIABLE, 'unset')}); torch {torch.__version__}\n")
    print("| measurement | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.3g} |")


if __name__ == "__main__":
    main()
