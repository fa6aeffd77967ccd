"""Settings planned from the training data when the user gives none, in the spirit of nnU-Net's planning.

- spacing: the median over cases of each axis' spacing, then the median of those three (isotropic, like every
  grid here); archives (.npz) keep their voxel grid;
- patch: the median image at that spacing, each axis rounded down to a multiple of the encoder's downsampling; while
  it holds more voxels than the device's budget (CPU 96^3, CUDA 128^3), the largest axis (the later one on a tie)
  loses one multiple; a classification input is the whole median image;
- batch: as many samples as an estimate of their training memory fits in the budget (CPU 1 GiB, CUDA 60 % of the
  free memory), at least 2, at most 8 (more memory would allow larger classification batches, but measured they
  learnt less in the same epochs).

Only what the user left unset is planned; the plan is printed and stored in the config (and so the model card).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from RubikSSLLib import datasources, labeled
from RubikSSLLib.config import EncoderConfig

PATCH_BUDGET = {"cpu": 96**3, "cuda": 128**3}  # voxels per patch
CPU_MEMORY_BUDGET = 1 << 30  # bytes of training memory for one batch on a CPU
# Measured on AdrenalMNIST3D at 10 % labels (Testing/Benchmarks/bench_recipe.py): batch 8 gave AUC 0.780 against
# 0.763 with the 32 that memory allows, as it takes four times the steps per epoch; memory is not the limit there.
MAX_BATCH = {"segment": 8, "classify": 8}


def case_grid(source: labeled.LabeledSource) -> tuple[np.ndarray, np.ndarray | None]:
    """(size (z, y, x), spacing (z, y, x) mm or None for an archive) of a case's first channel, from its header."""
    image = source.image
    if image.npz_key:
        return np.array(datasources.open_npz(image.channels[0])[image.npz_key].shape[1:]), None
    from RubikSSLLib.volumes import read_header

    geometry, size_xyz = read_header(image.channels[0])
    return np.array(size_xyz[::-1]), np.array(geometry.spacing_xyz[::-1])


def planned_spacing(spacings: list[np.ndarray]) -> float:
    return float(np.median(np.median(np.stack(spacings), axis=0)))


def planned_patch(median_shape: np.ndarray, factor: int, budget: int, task: str) -> tuple[int, int, int]:
    patch = [max(factor, int(s) // factor * factor) for s in median_shape]
    if task == "classify":
        return tuple(patch)
    while math.prod(patch) > budget and max(patch) > factor:
        largest = max(range(3), key=lambda axis: (patch[axis], axis))
        patch[largest] -= factor
    return tuple(patch)


def sample_bytes(patch: tuple[int, int, int], encoder: EncoderConfig, task: str) -> int:
    """Rough training memory of one sample: activations of every stage (twice for the decoder of a segmentation
    network, whose last block runs at full resolution), kept for the backward pass and matched by gradients."""
    voxels = math.prod(patch)
    per_voxel = sum(2 * width / 8 ** (stage + 1) for stage, width in enumerate(encoder.widths))
    if task == "segment":
        per_voxel = 2 * per_voxel + 2 * encoder.widths[0] + encoder.in_channels
    return int(4 * voxels * per_voxel * 3)


def memory_budget(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device if ":" in device else "cuda"))
        return int(0.6 * free)
    return CPU_MEMORY_BUDGET


def plan(values: dict, sources: list[labeled.LabeledSource], encoder: EncoderConfig, device: str) -> dict:
    """Fill spacing_mm, patch_size and batch_size into `values` (option values) where the user gave none; return
    the plan (what was measured and decided) for the log and the config."""
    task = values["task"]
    kind = "cuda" if device.startswith("cuda") else "cpu"
    grids = [case_grid(s) for s in sources]
    sizes, spacings = [g[0] for g in grids], [g[1] for g in grids]
    native = any(s is None for s in spacings)
    record: dict = {"cases": len(sources), "device": kind}
    if "spacing_mm" not in values:
        values["spacing_mm"] = None if native else planned_spacing(spacings)
        record["spacing_mm"] = values["spacing_mm"]
    spacing = values["spacing_mm"]
    shapes = [size if spacing is None or native else size * sp / spacing for size, sp in zip(sizes, spacings)]
    median_shape = np.median(np.stack(shapes), axis=0)
    record["median_shape_zyx"] = [round(float(s), 1) for s in median_shape]
    if not native:
        record["median_spacing_zyx"] = [round(float(s), 3) for s in np.median(np.stack(spacings), axis=0)]
    if "patch_size" not in values:
        values["patch_size"] = planned_patch(median_shape, encoder.downsampling, PATCH_BUDGET[kind], task)
        record["patch_size"] = list(values["patch_size"])
    if "batch_size" not in values:
        per_sample = sample_bytes(tuple(values["patch_size"]), encoder, task)
        budget = memory_budget(device)
        values["batch_size"] = int(np.clip(budget // max(per_sample, 1), 2, MAX_BATCH[task]))
        record |= {"batch_size": values["batch_size"], "sample_mib": round(per_sample / 2**20, 1),
                   "budget_mib": round(budget / 2**20)}
    return record


def describe(record: dict) -> str:
    """One log line: what the plan decided and from what."""
    parts = [f"planned from {record['cases']} training cases on {record['device']}"]
    if "spacing_mm" in record:
        parts.append("spacing native (archive)" if record["spacing_mm"] is None else
                     f"spacing {record['spacing_mm']:g} mm (median {'x'.join(f'{s:g}' for s in record['median_spacing_zyx'])})")
    if "patch_size" in record:
        parts.append(f"patch {'x'.join(map(str, record['patch_size']))} "
                     f"(median image {'x'.join(f'{s:g}' for s in record['median_shape_zyx'])})")
    if "batch_size" in record:
        parts.append(f"batch {record['batch_size']} (~{record['sample_mib']} MiB a sample, "
                     f"budget {record['budget_mib']} MiB)")
    return ", ".join(parts) + "; any of them can be set with its option"
