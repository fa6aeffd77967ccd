"""The README's and the catalog's pictures, rendered by Slicer's own slice views without the desktop application.

    pip install -e ".[screenshots]"            # trame-slicer 2.0.0 on slicer-core 5.11.0.6 (Kitware, PyPI)
    python Screenshots/make_screenshots.py [--demo rubikssl-demo]

From the demo's outputs (`rubikssl demo`, run first if --demo holds none): 1.png is the puzzle montage
(`rubikssl puzzle`); 2.png the scrambled cube grid as the panel loads it (the scrambled volume, one segment per
cube in the colour of the network's answer) beside the network's solution, in Slicer's axial slice view; 3.png the
demo's segmentation (`rubikssl segment`, a stroke lesion) over its T2 scan in Slicer's three slice views. The files
are read by Slicer's own readers (vtkSlicerVolumesLogic, vtkSlicerSegmentationsModuleLogic) and drawn by Slicer's
slice logic and segmentation displayable manager, offscreen through VTK's EGL window (Mesa works, no X server).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from RubikSSLLib import visualize  # noqa: E402 - the montage's and the panel's cube colours

SIZE = 420  # pixels per view


def slicer_views(orientations: list[str]):
    """A trame-slicer application (Slicer's scene, application logic, module logics) with offscreen slice views."""
    from trame_slicer.core import SlicerApp
    from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition

    app = SlicerApp()
    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    colours = {"Axial": "Red", "Coronal": "Green", "Sagittal": "Yellow"}
    views = [app.view_manager.create_view(ViewLayoutDefinition.slice_view(o, label=f"{colours[o]}{i}", color="#808080"))
             for i, o in enumerate(orientations)]
    for view in views:
        view.render_window().SetSize(SIZE, SIZE)
    return app, views


def read_volume(app, path: Path, name: str):
    return app.volumes_logic.AddArchetypeVolume(str(path), name, 4)


def read_segmentation(app, path: Path, name: str, fill: bool = True):
    """A .seg.nrrd by Slicer's segmentation reader; drawn outlined (and filled, if `fill`) in the slice views."""
    node = app.segmentations_logic.LoadSegmentationFromFile(str(path), True, name)
    display = node.GetDisplayNode()
    display.SetVisibility2DFill(fill)
    display.SetOpacity2DFill(0.4)
    display.SetSliceIntersectionThickness(3)
    return node


def voxel_ras(volume, ijk) -> tuple[float, float, float]:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return tuple(matrix.MultiplyPoint((*[float(v) for v in ijk], 1.0))[:3])


def show(view, background, segmentation=None, through_ras=None) -> np.ndarray:
    """Render one slice view (background volume, the segmentation drawn by its displayable manager) to RGB, its
    slice through the RAS point `through_ras` (else the volume's centre)."""
    from vtkmodules.vtkRenderingCore import vtkWindowToImageFilter
    from vtkmodules.util.numpy_support import vtk_to_numpy

    view.set_background_volume_id(background.GetID())
    slice_node = background.GetScene().GetNodeByID(view.get_view_node_id())
    slice_node.RotateToVolumePlane(background)  # an oblique scan shown in its own planes, as Slicer does
    for node in [n for n in (segmentation,) if n is not None]:
        node.GetDisplayNode().SetVisibility(True)
        node.GetDisplayNode().SetVisibility2D(True)
    view.fit_view_to_content()
    if through_ras is not None:
        slice_node.JumpSliceByOffsetting(*through_ras)
    view.render()
    grab = vtkWindowToImageFilter()
    grab.SetInput(view.render_window())
    grab.ReadFrontBufferOff()
    grab.Update()
    image = grab.GetOutput()
    width, height, _ = image.GetDimensions()
    pixels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)[::-1, :, :3]
    return np.ascontiguousarray(pixels)


def titled(images: list[np.ndarray], titles: list[str], note: str) -> np.ndarray:
    """Views side by side under their titles, with a line saying how they were made."""
    from PIL import Image, ImageDraw

    strip, foot = 24, 22
    canvas = Image.new("RGB", (sum(i.shape[1] for i in images) + 4 * (len(images) - 1),
                               max(i.shape[0] for i in images) + strip + foot), "white")
    draw = ImageDraw.Draw(canvas)
    draw.font = visualize._font()
    left = 0
    for image, title in zip(images, titles):
        canvas.paste(Image.fromarray(image), (left, strip))
        draw.text((left + 4, 5), title, fill="black")
        left += image.shape[1] + 4
    draw.text((4, canvas.height - foot + 4), note, fill=(90, 90, 90))
    return np.asarray(canvas)


def puzzle_picture(puzzle: Path) -> np.ndarray:
    """The scrambled cube grid as the panel shows it, beside the network's solution."""
    record = json.loads((puzzle / "puzzle.json").read_text())
    app, views = slicer_views(["Axial", "Axial"])
    scrambled = read_volume(app, puzzle / "scrambled.nrrd", "scrambled")
    solved = read_volume(app, puzzle / "recovered.nrrd", "solved")
    cubes = read_segmentation(app, puzzle / "scrambled_labels.nrrd", "cubes", fill=False)
    prediction = record.get("prediction")
    for index in range(cubes.GetSegmentation().GetNumberOfSegments()):
        segment = cubes.GetSegmentation().GetNthSegment(index)
        segment.SetName(f"cube {index + 1}")
        if prediction:  # the panel's rule (RubikSSLModuleLib.results.nameCubes)
            slot = record["permutation"].index(index)
            status = visualize.cube_statuses([prediction["cube_placed_correctly"][slot]],
                                             [prediction["cube_oriented_correctly"][slot]])[0]
            segment.SetColor(*visualize.CUBE_COLOURS[status])
    centre_zyx = np.array(record["cube_starts_zyx"][0]) + np.array(record["cube_size_zyx"]) // 2
    through = voxel_ras(scrambled, centre_zyx[::-1])  # the first layer of cubes: mid-slices fall in the gap
    left = show(views[0], scrambled, cubes, through)
    cubes.GetDisplayNode().SetVisibility(False)
    right = show(views[1], solved, None, through)
    placed = sum(prediction["cube_placed_correctly"]) if prediction else 0
    return titled([left, right], ["scrambled cubes (segments coloured by the network's answer)",
                                  f"network's solution ({placed}/8 cubes placed)" if prediction else "solved"],
                  "Rendered by Slicer's slice views (slicer-core + trame-slicer, offscreen): "
                  "Screenshots/make_screenshots.py")


def segmentation_picture(volume: Path, segmentation: Path) -> np.ndarray:
    app, views = slicer_views(["Axial", "Coronal", "Sagittal"])
    background = read_volume(app, volume, "T2")
    segments = read_segmentation(app, segmentation, "RubikSSL")
    mask = np.argwhere(_labels(segmentation.with_name(segmentation.name.replace(".seg.nrrd", ".labels.nrrd"))) > 0)
    through = voxel_ras(background, mask.mean(axis=0)[::-1]) if len(mask) else None  # through the segment
    images = [show(view, background, segments, through) for view in views]
    names = [segments.GetSegmentation().GetNthSegment(i).GetName() for i in range(segments.GetSegmentation().GetNumberOfSegments())]
    return titled(images, [f"axial: {', '.join(names)}", "coronal", "sagittal"],
                  "rubikssl segment's .seg.nrrd over its input, read and drawn by Slicer's libraries: "
                  "Screenshots/make_screenshots.py")


def _labels(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=REPO / "rubikssl-demo", help="the demo's output folder")
    parser.add_argument("--out", type=Path, default=REPO / "Screenshots")
    args = parser.parse_args()
    if not (args.demo / "segment" / "M2265.seg.nrrd").exists():
        subprocess.run([sys.executable, "-m", "RubikSSLLib", "demo", "--out", str(args.demo)], check=True, cwd=REPO)
    from RubikSSLLib.cli import SAMPLE_DATA

    shutil.copyfile(args.demo / "puzzle" / "montage.png", args.out / "1.png")
    visualize.write_png(args.out / "2.png", puzzle_picture(args.demo / "puzzle"))
    visualize.write_png(args.out / "3.png", segmentation_picture(SAMPLE_DATA / "t2lesion_M2265_T2w.nii.gz",
                                                                 args.demo / "segment" / "M2265.seg.nrrd"))
    print(f"wrote {args.out / '1.png'}, {args.out / '2.png'}, {args.out / '3.png'}")


if __name__ == "__main__":
    main()
