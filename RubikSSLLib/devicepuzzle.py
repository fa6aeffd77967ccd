"""The last two steps of a Rubik's cube puzzle, done on a batch where the network runs (a GPU): turning each cube and
scaling it to [-1, 1].

A sampler that only copies the scrambled cubes out of the volume runs at the rate of a plain gather (flipped views
copy slower, and the per-cube scaling took about 60 % of a puzzle's time on one core); a GPU does these passes over
the batch at memory speed. On a CPU the sampler finishes the puzzle itself (puzzle.scramble): there the flips fused
into the gather and numpy's in-cache passes are cheaper than whole-batch tensor operations, which the CPU allocator
maps and page-faults afresh for every result. These are the exact counterparts of puzzle.rotate and puzzle.normalise_cubes: the same
float32 operations in the same order, so a finished batch equals, value for value, the numpy puzzle it replaces.
"""

from __future__ import annotations

import torch

from RubikSSLLib.puzzle import ROTATION_FLIP_AXES


def turn(cubes: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """cubes (B, M, C, cz, cy, cx) with cube [b, p] rotated by class rotations[b, p] (B, M) of
    puzzle.ROTATION_FLIP_AXES (0 none, 1 about z, 2 about y). Whole-batch selects, no host synchronisation."""
    out = cubes
    for label, axes in ROTATION_FLIP_AXES.items():
        chosen = (rotations == label).reshape(*rotations.shape, 1, 1, 1, 1)
        out = torch.where(chosen, cubes.flip(axes), out)
    return out


def normalise(cubes: torch.Tensor, window: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each cube and channel of cubes (B, M, C, cz, cy, cx) clipped to its case's window (B, 2, C) (low, high per
    channel) and scaled to [-1, 1]; a constant cube becomes 0. A new tensor, as puzzle.normalise_cubes computes it."""
    batch, channels = cubes.shape[0], cubes.shape[2]
    shape = (batch, 1, channels, 1, 1, 1)
    window_low = window[:, 0].to(torch.float32).reshape(shape)
    window_high = window[:, 1].to(torch.float32).reshape(shape)
    cube_low = cubes.amin(dim=(-3, -2, -1), keepdim=True).clamp(window_low, window_high)
    cube_high = cubes.amax(dim=(-3, -2, -1), keepdim=True).clamp(window_low, window_high)
    tolerance = eps * torch.clamp(window_high - window_low, min=eps)
    span = cube_high - cube_low
    flat = span < tolerance
    scale = torch.where(flat, 0.0, 2.0 / torch.where(flat, 1.0, span))
    out = cubes.clamp(cube_low, cube_high).sub_(cube_low)
    return out.mul_(scale).sub_(torch.where(flat, 0.0, 1.0))


def finish(cubes: torch.Tensor, rotations: torch.Tensor, window: torch.Tensor | None) -> torch.Tensor:
    """The batch of puzzles as the network reads it, from the sampler's raw cubes (B, M, C, cz, cy, cx) float32:
    turned by rotations (B, M), then scaled with window (B, 2, C); window None: the values are the network's input
    already (nnU-Net-normalised cases) and are only turned. The inputs are left as they are."""
    turned = turn(cubes, rotations)
    return turned if window is None else normalise(turned, window)
