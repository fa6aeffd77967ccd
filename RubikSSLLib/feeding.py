"""How many DataLoader workers keep a device fed: from the machine's cores and two measured rates, the time one
worker takes to make one sample and the time a training step takes to consume a batch.

On CPU the samples are made in the training process (workers would take cores from the step's own threads); on
CUDA the step is fast and the sampler is the bottleneck, so the number of workers follows the measurement."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import numpy as np
import torch

HEADROOM = 1.25  # workers' rates vary (crop positions, page cache): a quarter more than the mean demand


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a cluster job's share), not the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def workers_needed(cores: int, sample_s: float, step_s: float, batch_size: int, processes: int = 1) -> int:
    """Workers that make batch_size samples (sample_s seconds each, on one core) in the step_s seconds a step takes,
    with HEADROOM; at most the cores left to each of `processes` training processes after its own, at least 1."""
    demand = math.ceil(HEADROOM * batch_size * sample_s / max(step_s, 1e-6))
    spare = max(1, cores // max(1, processes) - 1)
    return max(1, min(demand, spare))


def seconds_per_sample(sample: Callable[[np.random.Generator], object], count: int = 8) -> float:
    """Median wall time (s) of `sample(rng)` after one warm-up call; a separate seeded rng, so the training
    stream's draws are not touched."""
    rng = np.random.default_rng(12345)
    sample(rng)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        sample(rng)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def seconds_per_step(model: torch.nn.Module, step: Callable[[], torch.Tensor], device: torch.device,
                     repeats: int = 3) -> float:
    """Median wall time (s) of a forward + backward (`step()` returns the loss) after one warm-up; the model's
    gradients and buffers (BatchNorm statistics) are left as they were."""
    buffers = {name: value.clone() for name, value in model.named_buffers()}
    times = []
    for index in range(repeats + 1):
        synchronize(device)
        started = time.perf_counter()
        step().backward()
        synchronize(device)
        if index:
            times.append(time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, value in model.named_buffers():
            value.copy_(buffers[name])
    return float(np.median(times))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
