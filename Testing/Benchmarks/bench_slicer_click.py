"""Slicer-side time per interactive click on a 512x512x300 CT, with Slicer's own Segmentations logic (slicer-core):
the former path (the worker writes a full-volume uint16 labelmap, the panel reads it into a labelmap node and
imports it into the segment) against the current one (the worker writes the predicted region as .npy, the panel
replaces the segment in memory from it). Prints a Markdown table.

    python Testing/Benchmarks/bench_slicer_click.py [--clicks 5] [--region 240,240,128]

The CT is the real TotalSegmentator example CT (3 mm) resampled to 512x512x300 voxels (0.78 x 0.78 x 1.5 mm), so
the files have a CT's size and content; the region is what a 96^3 patch at 2 mm covers on that grid (192 mm:
246 x 246 x 128 voxels). Both paths put the same object in the segment (checked). Not a test: timings only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
CT = REPO.parent / "shared/data/pretrain/totalseg_example_ct_3mm.nii.gz"
sys.path[:0] = [str(REPO / "Testing"), str(REPO / "RubikSSL"), str(REPO)]


def ct_like(folder: Path) -> Path:
    """The example CT on a 512 x 512 x 300 grid (linear), as an uncompressed NRRD."""
    image = sitk.ReadImage(str(CT))
    size = (512, 512, 300)
    spacing = [e / n for e, n in zip(np.array(image.GetSize()) * np.array(image.GetSpacing()), size)]
    resampled = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing,
                              image.GetDirection(), -1024, sitk.sitkInt16)
    path = folder / "ct.nrrd"
    sitk.WriteImage(resampled, str(path), useCompression=False)
    return path


def old_click(labelmap_path: Path, segmentation, segment_id: str) -> float:
    """Read the full-volume labelmap the worker wrote and import it into the segment (the former panel)."""
    import slicer
    import vtk

    started = time.perf_counter()
    labelmap = slicer.modules.volumes.logic().AddArchetypeVolume(str(labelmap_path), "click result", 1 | 4)
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    assert slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentation, ids)
    slicer.mrmlScene.RemoveNode(labelmap)
    return time.perf_counter() - started


def new_click(region_path: Path, start_kji, segmentation, segment_id: str, volume) -> float:
    from RubikSSLModuleLib import results

    started = time.perf_counter()
    region = np.load(region_path, allow_pickle=False)
    results.updateSegmentFromRegion(segmentation, segment_id, volume, region, start_kji)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--region", default="128,246,246", help="region k,j,i in voxels of the CT grid")
    args = parser.parse_args()
    import slicerstandin

    with tempfile.TemporaryDirectory() as temporary, pytest.MonkeyPatch.context() as patch:
        folder = Path(temporary)
        standin = slicerstandin.install(patch, folder / "slicer")
        import slicer

        from RubikSSLModuleLib import results

        volume = results.readVolume(ct_like(folder), "CT")
        shape = slicer.util.arrayFromVolume(volume).shape
        region_shape = tuple(int(v) for v in args.region.split(","))
        start = tuple((s - r) // 2 for s, r in zip(shape, region_shape))
        rng = np.random.default_rng(0)
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "clicks")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segment_id = segmentation.GetSegmentation().AddEmptySegment("", "clicked")
        timings = {"former": [], "current": []}
        sizes = {}
        image = sitk.ReadImage(str(folder / "ct.nrrd"))
        for click in range(args.clicks):
            region = np.zeros(region_shape, np.uint16)
            centre, radius = np.array(region_shape) // 2 + rng.integers(-5, 6, 3), 30 + click
            k, j, i = np.ogrid[:region_shape[0], :region_shape[1], :region_shape[2]]
            region[(k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 <= radius**2] = 1
            full = np.zeros(shape, np.uint16)
            full[tuple(slice(s, s + r) for s, r in zip(start, region_shape))] = region
            labelmap = sitk.GetImageFromArray(full)
            labelmap.CopyInformation(image)
            sitk.WriteImage(labelmap, str(folder / "click.nrrd"), useCompression=False)  # what the worker wrote
            np.save(folder / "click.npy", region, allow_pickle=False)
            sizes = {"former": (folder / "click.nrrd").stat().st_size, "current": (folder / "click.npy").stat().st_size}
            timings["former"].append(old_click(folder / "click.nrrd", segmentation, segment_id))
            former = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume).copy()
            timings["current"].append(new_click(folder / "click.npy", start, segmentation, segment_id, volume))
            current = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)
            assert np.array_equal(former > 0, current > 0), "the two paths must give the same segment"
        standin.close()

    print(f"Slicer-side time per click, {args.clicks} clicks, CT {shape[2]}x{shape[1]}x{shape[0]} voxels, region "
          f"{region_shape[2]}x{region_shape[1]}x{region_shape[0]} (slicer-core, one thread)\n")
    print("| path | file per click | median s | max s |")
    print("|---|---|---|---|")
    for name, label in (("former", "full labelmap file -> labelmap node -> ImportLabelmapToSegmentationNode"),
                        ("current", "region .npy -> SetBinaryLabelmapToSegment in memory")):
        print(f"| {label} | {sizes[name] / 2**20:.1f} MB | {statistics.median(timings[name]):.3f} | "
              f"{max(timings[name]):.3f} |")


if __name__ == "__main__":
    main()
