"""Where a Rubik pretraining step's time goes on CPU: torch.profiler's self-CPU table of one forward + backward +
Adam step of RubikNet (default encoder, channels-last), batch 8 puzzles of 8 cubes, one thread. Prints the table.

    python Testing/Benchmarks/profile_step.py [--cube 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from RubikSSLLib.networks import Encoder, EncoderConfig, RubikNet, channels_last, rubik_loss  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cube", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = channels_last(RubikNet(Encoder(EncoderConfig()), 8, 100))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    cubes = torch.randn(args.batch, 8, 1, args.cube, args.cube, args.cube)
    targets = {"order": torch.randint(0, 100, (args.batch,)), "hor": torch.zeros(args.batch, 8),
               "ver": torch.zeros(args.batch, 8)}

    def step() -> None:
        loss = rubik_loss(model(cubes), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()
    step()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step()
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
