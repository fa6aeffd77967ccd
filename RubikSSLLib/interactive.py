"""Click-guided segmentation with a network that reads the image plus two guidance channels (guidance.py).

Used alike by training (simulated clicks on patches), validation and the benchmark (a simulated user on whole
cases), `segment --clicks` and the `serve` worker: predictions with clicks are made only in a region of interest
around them (at least one training patch, centred on the clicks, grown to hold them all), without clicks on the
whole volume (the model's automatic mode). Arrays: image (C, Z, Y, X) float32 in [-1, 1] on the model's grid.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from RubikSSLLib import guidance
from RubikSSLLib.guidance import VoxelClick

GUIDANCE_CHANNELS = len(guidance.CHANNELS)
NO_CLICK_SHARE = 0.2  # training samples with no click at all, so the model also segments without one
MAX_CORRECTIVE_ROUNDS = 3  # simulated corrective rounds (no gradients) before a training step: 0 .. this


def region_of_interest(clicks: list[VoxelClick], shape_zyx: tuple[int, ...], patch: tuple[int, ...]) -> tuple[slice, ...]:
    """Array slices of the region predicted for `clicks`: half a patch around the include clicks' bounding box on
    every side (one patch centred on a single click), moved inside the volume rather than cut at its edge (so it
    keeps a patch's size where the volume has it: no padding inside the network's view). Exclude clicks do not
    grow it: they correct what the region holds, and growing it would add unclicked windows of new errors."""
    included = [p for p, include in clicks if include]
    points, shape = np.array(included or [p for p, _ in clicks]), np.asarray(shape_zyx)
    half = np.asarray(patch) // 2
    low, high = points.min(axis=0) - half, points.max(axis=0) + (np.asarray(patch) - half)
    shift = np.maximum(-low, 0) - np.maximum(high - shape, 0)
    low, high = np.maximum(low + shift, 0), np.minimum(high + shift, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))


def with_guidance(image: np.ndarray, clicks: list[VoxelClick], sigma: float = guidance.SIGMA_VOXELS) -> np.ndarray:
    """(C + 2, Z, Y, X): the image and its include / exclude maps."""
    return np.concatenate([image, guidance.guidance_maps(image.shape[1:], clicks, sigma)]).astype(np.float32)


def probabilities(model: nn.Module, image: np.ndarray, clicks: list[VoxelClick], patch: tuple[int, ...],
                  device: torch.device | str = "cpu") -> tuple[np.ndarray, tuple[slice, ...]]:
    """Foreground probability (Z', Y', X') in the region of interest of `clicks` (the whole volume without any)
    and that region's slices. `model`: interactive, in eval mode."""
    region = region_of_interest(clicks, image.shape[1:], patch) if clicks else tuple(slice(0, s) for s in image.shape[1:])
    start = [s.start for s in region]
    local = [(tuple(int(v) - o for v, o in zip(point, start)), include) for point, include in clicks]
    network_input = torch.from_numpy(with_guidance(image[(slice(None), *region)], local))[None]
    with torch.inference_mode():
        logits = sliding_window_inference(network_input.to(device), tuple(patch), 2, model, overlap=0.25,
                                          mode="gaussian")
    return torch.softmax(logits.float(), dim=1)[0, 1].cpu().numpy(), region


def segment(model: nn.Module, image: np.ndarray, clicks: list[VoxelClick], patch: tuple[int, ...],
            device: torch.device | str = "cpu") -> np.ndarray:
    """(Z, Y, X) bool mask on the image's grid: the object where the clicks put it (nothing outside the region)."""
    foreground, region = probabilities(model, image, clicks, patch, device)
    mask = np.zeros(image.shape[1:], dtype=bool)
    mask[region] = foreground > 0.5
    return mask


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    total = int(prediction.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((prediction & truth).sum()) / total


def simulated_session(model: nn.Module, image: np.ndarray, truth: np.ndarray, max_clicks: int,
                      patch: tuple[int, ...], device: torch.device | str = "cpu") -> list[float]:
    """A deterministic simulated user on one case: Dice of the automatic result (0 clicks), then after each of
    1 .. max_clicks clicks (first inside the object, then at the centre of the largest error). truth: (Z, Y, X)
    bool. A case segmented perfectly keeps its Dice for the remaining clicks."""
    prediction = segment(model, image, [], patch, device)
    scores, clicks = [dice(prediction, truth)], []
    for count in range(max_clicks):
        click = guidance.first_click(truth) if count == 0 else guidance.corrective_click(prediction, truth)
        if click is None:
            scores.append(scores[-1])
            continue
        clicks.append(click)
        prediction = segment(model, image, clicks, patch, device)
        scores.append(dice(prediction, truth))
    return scores


def clicks_to_reach(scores: list[float], target: float = 0.85) -> int:
    """NoC@target: the first click count whose Dice reaches `target` (1 or more), capped at len(scores) - 1."""
    for count, score in enumerate(scores[1:], start=1):
        if score >= target:
            return count
    return len(scores) - 1


class ClickSimulator:
    """Guidance for a training batch: per sample no click (NO_CLICK_SHARE) or a first click inside the object,
    then 0 .. MAX_CORRECTIVE_ROUNDS rounds of corrective clicks on the model's own current predictions (forward
    passes in eval mode without gradients, as DeepEdit's Interaction does)."""

    def __init__(self, rng: np.random.Generator, sigma: float = guidance.SIGMA_VOXELS) -> None:
        self.rng, self.sigma = rng, sigma

    def __call__(self, model: nn.Module, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """image (B, C, Z, Y, X), target (B, 1, Z, Y, X) in {0, 1} -> (B, C + 2, Z, Y, X) on image's device."""
        truth = target[:, 0].cpu().numpy() > 0
        clicks: list[list[VoxelClick]] = []
        for sample in truth:
            first = None if self.rng.random() < NO_CLICK_SHARE else guidance.first_click(sample, self.rng)
            clicks.append([first] if first else [])
        rounds = int(self.rng.integers(0, MAX_CORRECTIVE_ROUNDS + 1))
        for _ in range(rounds):
            if not any(clicks):
                break
            predictions = self._predict(model, image, clicks)
            for sample, (prediction, truth_sample) in enumerate(zip(predictions, truth)):
                if clicks[sample]:  # a sample without clicks stays one (the automatic mode)
                    click = guidance.corrective_click(prediction, truth_sample, self.rng)
                    if click is not None:
                        clicks[sample].append(click)
        return self._batch(image, clicks)

    def _batch(self, image: torch.Tensor, clicks: list[list[VoxelClick]]) -> torch.Tensor:
        maps = np.stack([guidance.guidance_maps(tuple(image.shape[2:]), c, self.sigma) for c in clicks])
        return torch.cat([image, torch.from_numpy(maps).to(image.device, image.dtype)], dim=1)

    def _predict(self, model: nn.Module, image: torch.Tensor, clicks: list[list[VoxelClick]]) -> np.ndarray:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            logits = model(self._batch(image, clicks))
        model.train(was_training)
        return (logits.argmax(1) == 1).cpu().numpy()
