"""Running a fine-tuned model: whole-volume segmentation to a Slicer .seg.nrrd, or class probabilities to JSON."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import slicerio
import torch
from monai.inferers import sliding_window_inference

from RubikSSLLib import checkpoint, clicks, interactive, models, postprocess, preprocess, rundir, taskspec
from RubikSSLLib.config import FinetuneConfig
from RubikSSLLib.devices import model_device, select_device
from RubikSSLLib.errors import BadInput
from RubikSSLLib.files import atomic_path, write_json_atomic
from RubikSSLLib.networks import channels_last
from RubikSSLLib.volumes import Geometry, write_volume


def load_finetuned(run_or_file: str | Path, task: str, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """The best model of a fine-tuning run and its card, on `device`; a model of the other task is refused."""
    path = Path(run_or_file)
    path = path / rundir.BEST_MODEL if path.is_dir() else path
    state, card = checkpoint.load_model(path, "rubikssl finetune")
    if card.get("task") != task:
        kind = "a pretraining" if card.get("task") in taskspec.REGISTRY or "puzzle" in card else f"a {card.get('task')!r}"
        raise BadInput(f"{path}: is {kind} model, not a {task!r} model; pick a fine-tuning run of the right task")
    config = FinetuneConfig.from_card(card, path, "finetune")
    if not isinstance(card.get("classes"), list) or not card["classes"]:
        raise BadInput(f"{path}: its model card lacks classes; give a model written by rubikssl finetune")
    model = models.build_for(config, len(card["classes"]))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise BadInput(f"{path}: weights do not match its card ({str(error).splitlines()[0][:100]}); the file is damaged") from None
    return channels_last(model.to(select_device(device))).eval(), card


def is_interactive(card: dict) -> bool:
    return bool(card.get("config", {}).get("interactive"))


def segment(model_dir: str | Path, volumes: list[str], out: str | Path, roi_size: tuple[int, int, int] | None = None,
            overlap: float = 0.25, device: str = "cpu", largest_component: str = "card",
            given_clicks: list[clicks.Click] | None = None) -> dict:
    """Segment a volume; write `out` (.seg.nrrd with named, coloured segments in the input's exact geometry)
    and a plain labelmap `<name>.labels.nrrd` beside it. largest_component: which classes keep only their largest
    connected part (postprocess.parse_classes). given_clicks (interactive models): segment the clicked object in
    a region around the clicks; without clicks an interactive model segments the whole volume on its own.
    Returns a summary with voxel counts per segment."""
    out = Path(out)
    if not out.name.endswith(".seg.nrrd"):
        raise BadInput(f"--out {out}: name the result <name>.seg.nrrd (Slicer's segmentation format)")
    model, card = load_finetuned(model_dir, "segment", device)
    if given_clicks and not is_interactive(card):
        raise BadInput(f"{model_dir}: is not an interactive model; fine-tune one with --interactive, or leave out "
                       "--clicks")
    cleaned = postprocess.parse_classes(largest_component, card)
    image, volume = preprocess.network_input(volumes, card["config"], card["channels"])
    roi = tuple(roi_size or card["config"]["patch_size"])
    labels = case_labels(model, card, image, volume, given_clicks or [], roi, cleaned, overlap)
    labelmap_path = out.with_name(out.name[: -len(".seg.nrrd")] + ".labels.nrrd")
    write_results(out, labelmap_path, labels, volume.native.geometry, card["classes"])
    counts = {c["name"]: int((labels == c["value"]).sum()) for c in card["classes"][1:]}
    return {"segmentation": str(out), "labelmap": str(labelmap_path), "voxels": counts, "largest_component": cleaned,
            "clicks": len(given_clicks or [])}


def case_labels(model: torch.nn.Module, card: dict, image: np.ndarray, volume, points: list[clicks.Click],
                roi: tuple[int, ...], cleaned: list[int], overlap: float = 0.25) -> np.ndarray:
    """The card's label values (Z, Y, X) on the input file's own grid for one preprocessed case: an interactive
    model segments the clicked object around `points` (the whole volume without any), any other the whole volume."""
    labels, _ = network_labels(model, card, image, volume, points, roi, cleaned, overlap)
    return preprocess.to_native_grid(labels, volume)


def region_labels(model: torch.nn.Module, card: dict, image: np.ndarray, volume, points: list[clicks.Click],
                  roi: tuple[int, ...], cleaned: list[int]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Like case_labels, but only the part of the file's grid the model predicted (the region of interest of the
    clicks; everything without clicks): (labels (Z', Y', X'), start (z, y, x) of that part on the file's grid).
    Outside it every label is 0. A click's answer is then the size of its region, not of the volume."""
    labels, region = network_labels(model, card, image, volume, points, roi, cleaned)
    start, grid = preprocess.native_region(volume, region)
    placed = volume.geometry.shifted(tuple(s.start for s in region))
    return preprocess.onto_grid(labels[region], placed, grid), start


def network_labels(model: torch.nn.Module, card: dict, image: np.ndarray, volume, points: list[clicks.Click],
                   roi: tuple[int, ...], cleaned: list[int],
                   overlap: float = 0.25) -> tuple[np.ndarray, tuple[slice, ...]]:
    """The card's label values (Z, Y, X) on the model's grid, and the region (array slices) that was predicted:
    around the clicks for an interactive model given points, else the whole grid."""
    region = tuple(slice(0, s) for s in image.shape[1:])
    if is_interactive(card):
        voxels = clicks.voxel_clicks(points, volume.geometry, image.shape[1:])
        foreground, region = interactive.probabilities(model, image, voxels, roi, model_device(model))
        indices = np.zeros(image.shape[1:], dtype=np.uint8)
        indices[region] = foreground > 0.5
    else:
        indices = whole_volume_classes(model, image, roi, overlap)
    values = np.array([c["value"] for c in card["classes"]])
    return postprocess.keep_largest_component(values[indices].astype(np.uint16), cleaned), region


def whole_volume_classes(model: torch.nn.Module, image: np.ndarray, roi: tuple[int, ...], overlap: float = 0.25) -> np.ndarray:
    """(Z, Y, X) uint8 class indices of a whole (C, Z, Y, X) image: MONAI's Gaussian-blended sliding window."""
    with torch.inference_mode():
        logits = sliding_window_inference(torch.from_numpy(image)[None], roi, 1, model, overlap=overlap, mode="gaussian",
                                          sw_device=model_device(model), device="cpu")
    return np.argmax(logits[0].numpy(), axis=0).astype(np.uint8)  # numpy's is 3x faster than torch's on one thread


def write_results(segmentation_path: Path, labelmap_path: Path, labels_zyx: np.ndarray, geometry: Geometry,
                  classes: list[dict]) -> None:
    """The .seg.nrrd and its .labels.nrrd as a set: both are written first, then the labelmap is published and
    the segmentation last, so a .seg.nrrd never stands without its labelmap."""
    with atomic_path(segmentation_path) as segmentation_tmp, atomic_path(labelmap_path) as labelmap_tmp:
        write_volume(labelmap_tmp, labels_zyx, geometry, compress=True, atomic=False)
        write_segmentation(segmentation_tmp, labels_zyx, geometry, classes)


def write_segmentation(path: Path, labels_zyx: np.ndarray, geometry: Geometry, classes: list[dict]) -> None:
    """A Slicer .seg.nrrd at `path`: one segment per foreground class (name, colour, label value) on `geometry`."""
    voxels_ijk = np.transpose(labels_zyx, (2, 1, 0))
    segmentation = slicerio.create_segmentation(voxels_ijk.shape, geometry.ijk_to_lps())
    for entry in classes[1:]:
        slicerio.add_segment(segmentation, voxels_ijk == entry["value"],
                             {"id": f"Segment_{entry['value']}", "name": entry["name"], "color": entry["color"]})
    slicerio.write_segmentation(str(path), segmentation)


def classify(model_dir: str | Path, volumes: list[str], out: str | Path, device: str = "cpu") -> dict:
    """Class probabilities of one case, written to `out` as JSON."""
    model, card = load_finetuned(model_dir, "classify", device)
    image, _ = preprocess.network_input(volumes, card["config"], card["channels"])
    image = preprocess.fit_to_size(image, tuple(card["config"]["patch_size"]), -1.0)
    with torch.inference_mode():
        batch = torch.from_numpy(image)[None].to(model_device(model))
        logits = model(batch).float().cpu()[0]
        if card.get("class_prior"):  # trained class-balanced: answer for the training prevalence (downstream.py)
            logits = logits + torch.log(torch.tensor(card["class_prior"], dtype=torch.float32))
        probabilities = torch.softmax(logits, dim=0).tolist()
    names = [c["name"] for c in card["classes"]]
    result = {"volumes": volumes, "classes": names, "probabilities": dict(zip(names, probabilities)),
              "predicted": names[int(np.argmax(probabilities))]}
    write_json_atomic(out, result)
    return result
