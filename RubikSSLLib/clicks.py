"""Clicks for interactive segmentation: points in physical space, their files, and their voxels.

A click is a point in LPS millimetres (the world of ITK files and of this library) with a sign: include (inside
the object: "add") or exclude (outside: "remove"). Our clicks file says its coordinate system:

    {"coordinateSystem": "LPS", "units": "mm",
     "clicks": [{"position": [x, y, z], "include": true}, {"position": [...], "include": false}]}

A Slicer markups file (.mrk.json, one point list, "coordinateSystem" LPS or RAS) is read too: every point of it
is an include click (or an exclude click when read with include=False), so Slicer's "include" and "exclude" point
lists map to two files. Voxel indices are of a given grid, in array order (z, y, x). Imports neither torch nor MONAI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from RubikSSLLib.errors import BadInput
from RubikSSLLib.files import write_json_atomic
from RubikSSLLib.geometry import nearest_index
from RubikSSLLib.volumes import Geometry

LPS_FROM_RAS = np.array([-1.0, -1.0, 1.0])  # RAS and LPS differ by the sign of the first two axes
SYSTEMS = ("LPS", "RAS")


@dataclass(frozen=True)
class Click:
    """position_lps: (x, y, z) LPS mm; include: True inside the object, False outside."""

    position_lps: tuple[float, float, float]
    include: bool = True

    def to_json(self) -> dict:
        return {"position": list(self.position_lps), "include": self.include}


def lps_from(position: list[float], system: str) -> tuple[float, float, float]:
    """A point given in `system` (LPS or RAS) as LPS mm."""
    point = np.asarray(position, dtype=float)
    if point.shape != (3,) or not np.all(np.isfinite(point)):
        raise BadInput(f"click position {position!r}: give three finite numbers (x, y, z in mm)")
    return tuple(float(v) for v in (point * LPS_FROM_RAS if system == "RAS" else point))


def ras_of(click: Click) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.asarray(click.position_lps) * LPS_FROM_RAS)


def _system(data: dict, where: str) -> str:
    system = str(data.get("coordinateSystem", "LPS")).upper()
    if system not in SYSTEMS:
        raise BadInput(f"{where}: coordinateSystem {system!r}; use LPS or RAS")
    return system


def parse(data: object, where: str, include: bool = True) -> list[Click]:
    """Clicks of one JSON document: our clicks format, or a Slicer markups file whose points all get `include`."""
    if not isinstance(data, dict):
        raise BadInput(f"{where}: not a clicks file (a JSON object with 'clicks', or a Slicer .mrk.json)")
    try:
        if "markups" in data:
            clicks = []
            for markup in data["markups"]:
                system = _system(markup, where)
                clicks += [Click(lps_from(p["position"], system), include) for p in markup.get("controlPoints", [])
                           if p.get("positionStatus", "defined") == "defined"]
            return clicks
        system = _system(data, where)
        return [Click(lps_from(c["position"], system), bool(c.get("include", True)) if include else False)
                for c in data["clicks"]]
    except (KeyError, TypeError) as error:
        raise BadInput(f"{where}: a click lacks {error}; each click needs a 'position' [x, y, z]") from None


def read(path: str | Path, include: bool = True) -> list[Click]:
    """The clicks of a file (ours or a Slicer .mrk.json); include=False makes every click of it an exclude click."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadInput(f"{path}: cannot read clicks ({error}); give a clicks .json or a Slicer .mrk.json") from None
    return parse(data, str(path), include)


def write(path: str | Path, clicks: list[Click]) -> None:
    write_json_atomic(path, {"coordinateSystem": "LPS", "units": "mm", "clicks": [c.to_json() for c in clicks]})


def to_voxels(clicks: list[Click], geometry: Geometry) -> np.ndarray:
    """(N, 3) continuous voxel indices (z, y, x) of the clicks on a grid with `geometry` (voxel centres at integers)."""
    if not clicks:
        return np.zeros((0, 3))
    lps = np.array([[*c.position_lps, 1.0] for c in clicks])
    ijk = (np.linalg.inv(geometry.ijk_to_lps()) @ lps.T)[:3].T
    return ijk[:, ::-1]


def from_voxels(voxels_zyx: np.ndarray, includes: list[bool], geometry: Geometry) -> list[Click]:
    """Clicks at voxel indices (N, 3) (z, y, x) of a grid with `geometry`."""
    ijk = np.asarray(voxels_zyx, dtype=float).reshape(-1, 3)[:, ::-1]
    lps = (geometry.ijk_to_lps() @ np.c_[ijk, np.ones(len(ijk))].T)[:3].T
    return [Click(tuple(float(v) for v in p), bool(s)) for p, s in zip(lps, includes)]


def voxel_clicks(clicks: list[Click], geometry: Geometry, shape_zyx: tuple[int, ...]) -> list[tuple[tuple[int, int, int], bool]]:
    """The clicks as whole voxels (z, y, x) of the grid with their signs; a click outside the grid is refused."""
    voxels = nearest_index(to_voxels(clicks, geometry))  # the rounding rule labels go back to the file by
    for click, voxel in zip(clicks, voxels):
        if np.any(voxel < 0) or np.any(voxel >= np.asarray(shape_zyx)):
            raise BadInput(f"click at LPS {tuple(round(v, 1) for v in click.position_lps)} mm lies outside the volume; "
                           "place the points on the volume (Slicer markups are in RAS: say so in the file)")
    return [(tuple(int(v) for v in voxel), click.include) for click, voxel in zip(clicks, voxels)]
