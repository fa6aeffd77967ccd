"""Volume -> network input -> back to the input's grid: the one preprocessing path of fine-tuning and inference.

A case's channel files are read once (volumes.load_case: checked, reoriented to LPS, resampled to the recipe's
spacing), mapped by the intensity recipe to [0, 1] and rescaled to [-1, 1], the range the encoder saw on its
pretraining cubes. Results go back to the first file's own grid (`Volume.native`) by nearest neighbour. The recipe
is data in the model card (`recipe_card`), and inference reads it from there.
"""

from __future__ import annotations

import numpy as np

from RubikSSLLib import intensity
from RubikSSLLib.config import settings_from_json
from RubikSSLLib.errors import BadInput
from RubikSSLLib.intensity import IntensityRecipe
from RubikSSLLib.volumes import Geometry, Grid, Volume, image_from_array, load_case, resample_onto

NETWORK_RANGE = (-1.0, 1.0)


def to_network_range(image: np.ndarray, recipe: IntensityRecipe) -> np.ndarray:
    """(C, Z, Y, X) raw -> float32 in [-1, 1] with the case's own fitted intensity map."""
    low, high = NETWORK_RANGE
    return intensity.fit(image, recipe).apply(image) * (high - low) + low


def fit_to_size(array: np.ndarray, size: tuple[int, ...], fill: float) -> np.ndarray:
    """Centre-crop or pad the last three axes of (C, Z, Y, X) or (Z, Y, X) `array` to `size` (z, y, x) with
    MONAI's ResizeWithPadOrCrop: padding splits evenly (the extra voxel after), a crop keeps the centre voxel."""
    from monai.transforms import ResizeWithPadOrCrop

    channels_first = array if array.ndim == 4 else array[None]
    fitted = np.asarray(ResizeWithPadOrCrop(tuple(size), mode="constant", value=fill)(channels_first),
                        dtype=array.dtype)
    return fitted if array.ndim == 4 else fitted[0]


def recipe_card(config: dict, task: str) -> dict:
    """The preprocessing recipe as data, for the model card ("normalisation")."""
    return {"intensity": config["intensity"], "spacing_mm": config["spacing_mm"],
            "canonical_orientation": "LPS" if config["canonical_orientation"] else None,
            "output_range": list(NETWORK_RANGE),
            "input_size" if task == "classify" else "patch_size": list(config["patch_size"])}


def network_input(volumes: list[str], config: dict, channel_names: list[str]) -> tuple[np.ndarray, Volume]:
    """The network input (C, Z, Y, X) in [-1, 1] on the model's grid, and the loaded case (its `geometry` is that
    grid, its `native` the first file's own grid). `config` is a fine-tuning config as saved in a model card."""
    wanted = config["encoder"]["in_channels"]
    if len(volumes) != wanted:
        raise BadInput(f"the model needs {wanted} channel files ({', '.join(channel_names)}) but got {len(volumes)}; "
                       "pass one file per channel in that order")
    volume = load_case(volumes, config["spacing_mm"], config["canonical_orientation"])
    return to_network_range(volume.array, settings_from_json(IntensityRecipe, config["intensity"])), volume


def native_region(volume: Volume, region: tuple[slice, ...]) -> tuple[tuple[int, int, int], Grid]:
    """The part of the input file's own grid (`volume.native`) whose voxel centres lie inside `region` (array
    slices of the network grid `volume.geometry`): (its start (z, y, x) on the file's grid, its Grid)."""
    native: Grid = volume.native
    faces = [(s.start - 0.5, s.stop - 0.5) for s in region][::-1]  # i, j, k of the region's outer faces
    corners = np.array([[i, j, k, 1.0] for i in faces[0] for j in faces[1] for k in faces[2]]).T
    on_file = (np.linalg.inv(native.geometry.ijk_to_lps()) @ volume.geometry.ijk_to_lps() @ corners)[:3]
    size_ijk = np.array(native.size_zyx[::-1])
    low = np.clip(np.ceil(on_file.min(axis=1) - 1e-6), 0, size_ijk - 1).astype(int)
    high = np.clip(np.floor(on_file.max(axis=1) + 1e-6), low, size_ijk - 1).astype(int)
    start = tuple(int(v) for v in low[::-1])
    size = tuple(int(v) for v in (high - low + 1)[::-1])
    return start, Grid(size, native.geometry.shifted(start))


def to_native_grid(labels_zyx: np.ndarray, volume: Volume) -> np.ndarray:
    """A label map (Z, Y, X) on the network's grid (`volume.geometry`) put back on the input file's own grid."""
    return onto_grid(labels_zyx, volume.geometry, volume.native)


def onto_grid(labels_zyx: np.ndarray, geometry: Geometry, target: Grid) -> np.ndarray:
    """A label map (Z, Y, X) placed by `geometry` put on `target` (the file's grid or a part of it), each target voxel
    taking the label voxel nearest its centre (geometry.nearest_index: the face-aligned network grid puts no file
    voxel centre half-way between two network voxels)."""
    return resample_onto(image_from_array(labels_zyx, geometry), target, nearest=True)
