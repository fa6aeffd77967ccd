"""Running a fine-tuned model: whole-volume segmentation to a Slicer .seg.nrrd, or class probabilities to JSON."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicerio
import torch
from monai.inferers import sliding_window_inference

from RubikSSLLib import checkpoint, models, rundir
from RubikSSLLib.errors import BadInput
from RubikSSLLib.files import atomic_path, write_json_atomic
from RubikSSLLib.config import settings_from_json
from RubikSSLLib.finetune import FinetuneConfig, fit_to_size, to_network_range
from RubikSSLLib.intensity import IntensityRecipe
from RubikSSLLib.networks import channels_last
from RubikSSLLib.volumes import geometry_of, image_from_array, load_case, read_image


def load_finetuned(run_or_file: str | Path, task: str) -> tuple[torch.nn.Module, dict]:
    """The best model of a fine-tuning run and its card; a model of the other task is refused."""
    path = Path(run_or_file)
    path = path / rundir.BEST_MODEL if path.is_dir() else path
    state, card = checkpoint.load_model(path)
    if card.get("task") != task:
        raise BadInput(f"{path}: is a {card.get('task')!r} model, not a {task!r} model; pick a model of the right task")
    config = FinetuneConfig.from_json(card["config"])
    model = models.build(task, config.decoder, config.encoder, len(card["classes"]))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise BadInput(f"{path}: weights do not match its card ({str(error).splitlines()[0][:100]}); the file is damaged") from None
    return channels_last(model).eval(), card


def _prepared_input(volumes: list[str], card: dict) -> tuple[np.ndarray, sitk.Image]:
    """The network input (C, Z, Y, X) in [-1, 1] on the model's grid, and the grid as an image (for resampling back)."""
    config = card["config"]
    if len(volumes) != config["encoder"]["in_channels"]:
        raise BadInput(f"the model needs {config['encoder']['in_channels']} channel files ({', '.join(card['channels'])}) "
                       f"but got {len(volumes)}; pass one file per channel in that order")
    volume = load_case(volumes, config["spacing_mm"], config["canonical_orientation"])
    recipe = settings_from_json(IntensityRecipe, config["intensity"])
    grid = image_from_array(np.zeros(volume.array.shape[1:], np.uint8), volume.geometry)
    return to_network_range(volume.array, recipe), grid


def segment(model_dir: str | Path, volumes: list[str], out: str | Path, roi_size: tuple[int, int, int] | None = None,
            overlap: float = 0.25) -> dict:
    """Segment a whole volume; write `out` (.seg.nrrd with named, coloured segments in the input's exact geometry)
    and a plain labelmap `<name>.labels.nrrd` beside it. Returns a summary with voxel counts per segment."""
    out = Path(out)
    if not out.name.endswith(".seg.nrrd"):
        raise BadInput(f"--out {out}: name the result <name>.seg.nrrd (Slicer's segmentation format)")
    model, card = load_finetuned(model_dir, "segment")
    image, grid = _prepared_input(volumes, card)
    roi = tuple(roi_size or card["config"]["patch_size"])
    with torch.inference_mode():
        logits = sliding_window_inference(torch.from_numpy(image)[None], roi, 1, model, overlap=overlap, mode="gaussian")
    indices = np.argmax(logits[0].numpy(), axis=0).astype(np.uint8)  # numpy's is 3x faster than torch's on one thread
    values = np.array([c["value"] for c in card["classes"]])
    on_grid = image_from_array(values[indices].astype(np.uint16), geometry_of(grid))
    reference = read_image(volumes[0])
    labels = sitk.GetArrayFromImage(sitk.Resample(on_grid, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    write_segmentation(out, labels, reference, card["classes"])
    labelmap_path = out.with_name(out.name[: -len(".seg.nrrd")] + ".labels.nrrd")
    with atomic_path(labelmap_path) as tmp:
        labelmap = sitk.GetImageFromArray(labels)
        labelmap.CopyInformation(reference)
        sitk.WriteImage(labelmap, str(tmp), useCompression=True)
    counts = {c["name"]: int((labels == c["value"]).sum()) for c in card["classes"][1:]}
    return {"segmentation": str(out), "labelmap": str(labelmap_path), "voxels": counts}


def write_segmentation(path: Path, labels_zyx: np.ndarray, reference: sitk.Image, classes: list[dict]) -> None:
    """A Slicer .seg.nrrd: one segment per foreground class (name, colour, label value), geometry of `reference`."""
    direction = np.reshape(reference.GetDirection(), (3, 3))
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction * np.array(reference.GetSpacing())
    ijk_to_lps[:3, 3] = reference.GetOrigin()
    voxels_ijk = np.transpose(labels_zyx, (2, 1, 0))
    segmentation = slicerio.create_segmentation(voxels_ijk.shape, ijk_to_lps)
    for entry in classes[1:]:
        slicerio.add_segment(segmentation, voxels_ijk == entry["value"],
                             {"id": f"Segment_{entry['value']}", "name": entry["name"], "color": entry["color"]})
    with atomic_path(path) as tmp:
        slicerio.write_segmentation(str(tmp), segmentation)


def classify(model_dir: str | Path, volumes: list[str], out: str | Path) -> dict:
    """Class probabilities of one case, written to `out` as JSON."""
    model, card = load_finetuned(model_dir, "classify")
    image, _ = _prepared_input(volumes, card)
    image = fit_to_size(image, tuple(card["config"]["patch_size"]), -1.0)
    with torch.no_grad():
        probabilities = torch.softmax(model(torch.from_numpy(image)[None]), dim=1)[0].tolist()
    names = [c["name"] for c in card["classes"]]
    result = {"volumes": volumes, "classes": names, "probabilities": dict(zip(names, probabilities)),
              "predicted": names[int(np.argmax(probabilities))]}
    write_json_atomic(out, result)
    return result
