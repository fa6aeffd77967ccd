"""Click-guided segmentation: clicks and their coordinates, guidance maps, simulated clicks, the interactive
network and its transfer, `segment --clicks`, the `serve` worker, `rank`, and continuing from a model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from conftest import REPO, rubikssl, shared
from RubikSSLLib import checkpoint, clicks, guidance, interactive, models, progress, slicergeometry, transfer
from RubikSSLLib.config import EncoderConfig
from RubikSSLLib.errors import BadInput
from RubikSSLLib.volumes import geometry_of

STROKE_IMAGE, STROKE_LABEL = "seg/stroke_t2/T2.nii.gz", "seg/stroke_t2/lesionT2.nii.gz"
OBLIQUE = "pretrain/msl_patient20_study2_FLAIR.nii.gz"  # 0.9 x 0.9 x 3 mm, oblique
BRATS = "seg/brats2015_deepmedic"
BRATS_CASES = ("brats_2013_pat0001_1", "brats_2013_pat0002_1", "brats_2013_pat0003_1", "brats_2013_pat0005_1")


def stroke_lesion() -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(shared(STROKE_LABEL)))) > 0


# ---- clicks and coordinates

def test_clicks_round_trip_between_lps_ras_markups_and_voxels_of_an_oblique_anisotropic_volume(tmp_path: Path) -> None:
    geometry = geometry_of(sitk.ReadImage(str(shared(OBLIQUE))))
    assert not np.allclose(np.reshape(geometry.direction, (3, 3)), np.eye(3))  # really oblique
    voxels = np.array([[3.0, 100.0, 17.0], [40.0, 5.0, 250.0], [0.0, 0.0, 0.0]])
    includes = [True, False, True]
    points = clicks.from_voxels(voxels, includes, geometry)
    clicks.write(tmp_path / "clicks.json", points)
    again = clicks.read(tmp_path / "clicks.json")
    assert [c.include for c in again] == includes
    np.testing.assert_allclose(clicks.to_voxels(again, geometry), voxels, atol=1e-6)
    # Slicer's markups file in RAS (what the panel and Slicer write), read as include or exclude clicks
    ras_to_ijk = np.linalg.inv(slicergeometry.ijk_to_ras_from_geometry(geometry))
    markups = {"markups": [{"type": "Fiducial", "coordinateSystem": "RAS",
                            "controlPoints": [{"label": f"F-{i}", "position": list(clicks.ras_of(c))}
                                              for i, c in enumerate(points)]}]}
    (tmp_path / "points.mrk.json").write_text(json.dumps(markups))
    from_markups = clicks.read(tmp_path / "points.mrk.json", include=False)
    assert [c.include for c in from_markups] == [False] * 3
    for original, read_back in zip(points, from_markups):
        np.testing.assert_allclose(read_back.position_lps, original.position_lps, atol=1e-6)
    # and Slicer's own RAS -> IJK matrix puts the markups on the same voxels (its IJK is our x, y, z)
    ras = np.array([[*clicks.ras_of(c), 1.0] for c in points])
    np.testing.assert_allclose((ras_to_ijk @ ras.T)[:3].T[:, ::-1], voxels, atol=1e-6)


def test_a_click_outside_the_volume_and_a_broken_clicks_file_are_one_line_errors(tmp_path: Path) -> None:
    geometry = geometry_of(sitk.ReadImage(str(shared(STROKE_IMAGE))))
    far = clicks.from_voxels(np.array([[500.0, 0.0, 0.0]]), [True], geometry)
    with pytest.raises(BadInput, match="outside the volume"):
        clicks.voxel_clicks(far, geometry, (146, 175, 156))
    (tmp_path / "bad.json").write_text('{"clicks": [{"include": true}]}')
    with pytest.raises(BadInput, match="position"):
        clicks.read(tmp_path / "bad.json")
    (tmp_path / "system.json").write_text('{"coordinateSystem": "IJK", "clicks": []}')
    with pytest.raises(BadInput, match="LPS or RAS"):
        clicks.read(tmp_path / "system.json")


# ---- guidance maps and simulated clicks

def test_guidance_maps_are_zero_without_a_click_and_peak_at_one_at_each_click() -> None:
    shape = (30, 40, 50)
    assert not guidance.guidance_maps(shape, []).any()
    maps = guidance.guidance_maps(shape, [((10, 20, 25), True), ((11, 20, 27), True), ((25, 5, 45), False)])
    assert maps.shape == (2, *shape) and maps.max() == 1.0
    assert maps[0, 10, 20, 25] == 1.0 and maps[0, 11, 20, 27] == 1.0 and maps[1, 25, 5, 45] == 1.0
    assert maps[1, 10, 20, 25] == 0.0 and maps[0, 25, 5, 45] == 0.0  # each sign in its own channel
    reach = int(np.ceil(3 * guidance.SIGMA_VOXELS))
    assert maps[0, 11 + reach + 1 :].max() == 0.0 and maps[0, :, :, : 25 - reach].max() == 0.0  # nothing far away
    edge = guidance.guidance_maps(shape, [((0, 0, 0), False), ((99, 0, 0), True)])  # at the edge / outside: no error
    assert edge[1, 0, 0, 0] == 1.0 and not edge[0].any()


def test_the_first_click_lies_inside_a_real_lesion_deterministically_and_when_drawn() -> None:
    lesion = stroke_lesion()
    point, include = guidance.first_click(lesion)
    assert include and lesion[point]
    depth = ndimage.distance_transform_edt(np.pad(lesion, 1))[1:-1, 1:-1, 1:-1]
    assert depth[point] == depth.max()  # the centre: the voxel farthest from the border
    rng = np.random.default_rng(0)
    for _ in range(20):
        drawn, _ = guidance.first_click(lesion, rng)
        assert lesion[drawn] and depth[drawn] > depth.max() / 2
    assert guidance.first_click(np.zeros_like(lesion)) is None


def test_a_corrective_click_lies_in_the_largest_error_with_the_right_sign() -> None:
    lesion = stroke_lesion()
    zs = np.nonzero(lesion.any(axis=(1, 2)))[0]
    missed = lesion.copy()
    missed[zs[len(zs) // 2] :] = False  # the upper half of the lesion is missed: a large false negative
    prediction = missed.copy()
    prediction[5:8, 5:8, 5:8] = True  # and a small false positive far away
    point, include = guidance.corrective_click(prediction, lesion)
    assert include and lesion[point] and not prediction[point]
    components, _ = ndimage.label(lesion & ~prediction)
    sizes = np.bincount(components.ravel())
    assert components[point] == int(np.argmax(sizes[1:])) + 1  # in the largest missed component
    grown = lesion.copy()  # now the error is a large false part outside the lesion
    grown[5:25, 5:25, 5:25] = True
    point, include = guidance.corrective_click(grown, lesion)
    assert not include and grown[point] and not lesion[point]
    assert guidance.corrective_click(lesion, lesion) is None


def test_the_region_of_interest_is_a_patch_on_one_click_and_holds_every_include_click() -> None:
    shape, patch = (60, 200, 200), (32, 64, 64)
    one = interactive.region_of_interest([((30, 100, 100), True)], shape, patch)
    assert [(s.start, s.stop) for s in one] == [(14, 46), (68, 132), (68, 132)]
    corner = interactive.region_of_interest([((1, 2, 199), True)], shape, patch)  # moved inside, not cut
    assert [s.stop - s.start for s in corner] == list(patch) and corner[2].stop == 200
    two = interactive.region_of_interest([((30, 20, 100), True), ((30, 180, 100), True), ((0, 0, 0), False)],
                                         shape, patch)
    assert two[1].start <= 20 - 32 + 32 and two[1].stop >= 180 and two[0] == one[0]  # exclude clicks do not grow it


# ---- the network and its pretrained start

def test_a_pretrained_encoder_loads_into_the_interactive_network_with_zero_click_weights(tmp_path: Path) -> None:
    config = EncoderConfig(in_channels=1, widths=(8, 16, 32), depths=(1, 1, 1))
    torch.manual_seed(0)
    pretrained = models.build("segment", "unet", config, 2)
    state = {f"encoder.{k}": v for k, v in pretrained.encoder.state_dict().items()}
    checkpoint.save_model(tmp_path / "model.safetensors", state, {"task": "rubik", "config": {"encoder": config.__dict__}})
    plain = models.build("segment", "unet", config, 2)
    clicking = models.build("segment", "unet", config, 2, guidance_channels=interactive.GUIDANCE_CHANNELS)
    transfer.load_encoder(plain, tmp_path / "model.safetensors")
    report, _ = transfer.load_encoder(clicking, tmp_path / "model.safetensors")
    stem = "stages.0.0.0.weight"
    assert stem in report.adapted
    weight = clicking.encoder.state_dict()[stem]
    assert weight.shape[1] == 3 and torch.equal(weight[:, :1], pretrained.encoder.state_dict()[stem])
    assert not weight[:, 1:].any()  # click channels start at zero
    plain.eval(), clicking.eval()
    image = torch.randn(1, 1, 32, 32, 32)
    clicked = torch.cat([image, torch.rand(1, 2, 32, 32, 32)], dim=1)
    with torch.no_grad():  # the encoder's response to the image is the pretrained one, whatever the clicks
        for ours, theirs in zip(clicking.encoder(clicked), plain.encoder(image)):
            torch.testing.assert_close(ours, theirs)


# ---- a model that learns to use clicks (real lesions, a held-out case)

@pytest.fixture(scope="module")
def brats_lists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("brats")
    def case(name: str) -> dict:
        return {"image": str(shared(f"{BRATS}/{name}/Flair_subtrMeanDivStd.nii.gz")),
                "label": str(shared(f"{BRATS}/{name}/OTMultiClass.nii.gz"))}
    path = folder / "brats.json"
    path.write_text(json.dumps({"training": [case(n) for n in BRATS_CASES[:3]], "validation": [case(BRATS_CASES[3])]}))
    return {"datalist": path, "folder": folder}


@pytest.fixture(scope="module")
def interactive_run(brats_lists: dict[str, Path]) -> Path:
    out = brats_lists["folder"] / "interactive"
    result = rubikssl("finetune", "--task", "segment", "--interactive", "--train", str(brats_lists["datalist"]),
                      "--val", str(brats_lists["datalist"]), "--out", str(out), "--spacing", "3", "--patch-size", "32",
                      "--batch-size", "4", "--epochs", "4", "--iterations-per-epoch", "15", "--seed", "0",
                      "--device", "cpu", "--progress", "none")
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
def test_clicks_raise_dice_on_a_held_out_brats_case(interactive_run: Path) -> None:
    """Trained 60 steps on 3 BraTS FLAIRs (whole tumour, 3 mm, seed 0), scored on the 4th by the simulated user:
    one click beats none, three corrective clicks beat one (measured 0.12 / 0.35 / 0.38; seeds 1, 2 the same order)."""
    last = json.loads((interactive_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["val_dice_1_click"] > last["val_dice_0_clicks"] + 0.1
    assert last["val_dice_3_clicks"] > last["val_dice_1_click"]
    card = checkpoint.read_card(interactive_run / "model.safetensors")
    assert card["config"]["interactive"] and card["interactive"]["channels"] == ["include", "exclude"]
    assert [c["value"] for c in card["classes"]] == [0, 1]


@pytest.mark.slow
def test_segment_with_a_markups_file_writes_the_clicked_object_in_the_input_geometry(interactive_run: Path,
                                                                                   tmp_path: Path) -> None:
    flair = shared(f"{BRATS}/{BRATS_CASES[3]}/Flair_subtrMeanDivStd.nii.gz")
    truth_image = sitk.ReadImage(str(shared(f"{BRATS}/{BRATS_CASES[3]}/OTMultiClass.nii.gz")))
    point, _ = guidance.first_click(sitk.GetArrayFromImage(truth_image) > 0)
    click = clicks.from_voxels(np.array([point]), [True], geometry_of(truth_image))[0]
    markups = {"markups": [{"type": "Fiducial", "coordinateSystem": "RAS",
                            "controlPoints": [{"label": "include-1", "position": list(clicks.ras_of(click))}]}]}
    (tmp_path / "include.mrk.json").write_text(json.dumps(markups))
    out = tmp_path / "tumour.seg.nrrd"
    result = rubikssl("segment", "--model", str(interactive_run), "--volume", str(flair), "--clicks",
                      str(tmp_path / "include.mrk.json"), "--out", str(out), "--device", "cpu", "--progress", "none")
    assert result.returncode == 0, result.stderr
    labels = sitk.ReadImage(str(tmp_path / "tumour.labels.nrrd"))
    assert labels.GetSize() == truth_image.GetSize()
    np.testing.assert_allclose(labels.GetOrigin(), truth_image.GetOrigin(), atol=1e-4)
    mask, truth = sitk.GetArrayFromImage(labels) > 0, sitk.GetArrayFromImage(truth_image) > 0
    assert mask[point] and 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) > 0.2
    # a non-interactive model refuses clicks
    plain = rubikssl("segment", "--model", str(interactive_run), "--volume", str(flair), "--out",
                     str(tmp_path / "auto.seg.nrrd"), "--device", "cpu", "--progress", "none")
    assert plain.returncode == 0, plain.stderr  # no clicks: the automatic mode on the whole volume


# ---- the worker

def serve_process(run: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "RubikSSLLib", "serve", "--model", str(run), "--device", "cpu"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            bufsize=1, **kwargs)


def next_event(process: subprocess.Popen) -> dict:
    while True:
        line = process.stdout.readline()
        assert line, process.stderr.read()
        event = progress.parse_line(line)
        if event is not None:
            return event


@pytest.mark.slow
def test_the_worker_answers_many_requests_with_one_model_load_and_survives_a_malformed_one(interactive_run: Path,
                                                                                           tmp_path: Path) -> None:
    flair = str(shared(f"{BRATS}/{BRATS_CASES[3]}/Flair_subtrMeanDivStd.nii.gz"))
    truth_image = sitk.ReadImage(str(shared(f"{BRATS}/{BRATS_CASES[3]}/OTMultiClass.nii.gz")))
    point, _ = guidance.first_click(sitk.GetArrayFromImage(truth_image) > 0)
    click = clicks.from_voxels(np.array([point]), [True], geometry_of(truth_image))[0]
    worker = serve_process(interactive_run)
    assert next_event(worker)["event"] == "ready"
    requests = [{"id": 1, "volume": flair, "clicks": [click.to_json()], "out": str(tmp_path / "a.nrrd")},
                "this is not JSON",
                {"id": 3, "volume": flair},  # no out
                {"id": 4, "volume": flair, "clicks": [{"position": list(clicks.ras_of(click)), "include": True}],
                 "coordinateSystem": "RAS", "out": str(tmp_path / "b.nrrd")},
                {"id": 5, "volume": flair, "out": str(tmp_path / "c.nrrd")}]
    replies = []
    for request in requests:
        worker.stdin.write((request if isinstance(request, str) else json.dumps(request)) + "\n")
        worker.stdin.flush()
        replies.append(next_event(worker))
    worker.stdin.close()
    assert worker.wait(timeout=60) == 0  # end of input: a clean exit
    assert [r["ok"] for r in replies] == [True, False, False, True, True]
    assert "not JSON" in replies[1]["error"] and "'out'" in replies[2]["error"] and replies[2]["id"] == 3
    assert {r["model_loads"] for r in replies if r["ok"]} == {1} and replies[-1]["case_loads"] == 1
    first = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a.nrrd")))
    assert first[point] == 1
    assert np.array_equal(first, sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "b.nrrd"))))  # LPS = RAS click


@pytest.mark.slow
def test_the_worker_ends_on_sigterm_with_exit_3_and_when_its_parent_dies(interactive_run: Path, tmp_path: Path) -> None:
    worker = serve_process(interactive_run)
    assert next_event(worker)["event"] == "ready"
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 3
    # a parent that starts the worker (holding its stdin open in a grandchild) and is killed
    pid_file = tmp_path / "worker.pid"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        f"w = subprocess.Popen([sys.executable, '-m', 'RubikSSLLib', 'serve', '--model', {str(interactive_run)!r}, "
        "'--device', 'cpu'], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)\n"
        f"open({str(pid_file)!r}, 'w').write(str(w.pid))\n"
        "time.sleep(600)\n")], cwd=REPO)
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    worker_pid = int(pid_file.read_text())
    time.sleep(3)  # the worker is up (loading its model)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(worker_pid, signal.SIGKILL)
        pytest.fail("the worker outlived its parent")


# ---- human in the loop and which case next

@pytest.mark.slow
def test_continuing_from_a_model_keeps_its_network_and_starts_from_its_weights(interactive_run: Path,
                                                                              brats_lists: dict[str, Path]) -> None:
    out = brats_lists["folder"] / "continued"
    result = rubikssl("finetune", "--task", "segment", "--resume-from", str(interactive_run), "--train",
                      str(brats_lists["datalist"]), "--val", str(brats_lists["datalist"]), "--out", str(out),
                      "--batch-size", "4", "--epochs", "1", "--iterations-per-epoch", "2", "--device", "cpu",
                      "--progress", "none")
    assert result.returncode == 0, result.stderr
    card = checkpoint.read_card(out / "model.safetensors")
    before = checkpoint.read_card(interactive_run / "model.safetensors")
    assert card["config"]["interactive"] and card["config"]["spacing_mm"] == 3.0
    assert card["config"]["patch_size"] == before["config"]["patch_size"]
    assert card["init"]["resumed_from"].endswith("model.safetensors")
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["val_dice_1_click"] > 0.2  # 2 steps from scratch reach nothing like this
    both = rubikssl("finetune", "--task", "segment", "--resume-from", str(interactive_run), "--init", str(interactive_run),
                    "--train", str(brats_lists["datalist"]), "--val", str(brats_lists["datalist"]), "--out",
                    str(out) + "2", "--progress", "none")
    assert both.returncode == 2 and "give one of them" in both.stderr


@pytest.mark.slow
def test_rank_lists_the_cases_by_uncertainty_and_writes_the_ranking(interactive_run: Path, tmp_path: Path) -> None:
    volumes = [str(shared(f"{BRATS}/{name}/Flair_subtrMeanDivStd.nii.gz")) for name in BRATS_CASES]
    result = rubikssl("rank", "--model", str(interactive_run), "--data", *volumes, "--out", str(tmp_path / "rank.json"),
                      "--device", "cpu", "--progress", "none")
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "rank.json").read_text())["cases"]
    assert sorted(r["case"] for r in rows) == sorted(volumes)
    found = [r["uncertainty"] for r in rows if r["found"]]
    assert found == sorted(found, reverse=True) and all(0 < u <= np.log(2) for u in found)
    assert [r["found"] for r in rows] == sorted(r["found"] for r in rows)  # nothing-found cases first


def test_uncertainty_is_the_mean_entropy_over_the_predicted_foreground() -> None:
    from RubikSSLLib.ranking import uncertainty

    probabilities = np.zeros((2, 1, 1, 4))
    probabilities[1] = [[[0.9, 0.6, 0.2, 0.5]]]
    probabilities[0] = 1 - probabilities[1]
    entropy = lambda p: -(p * np.log(p) + (1 - p) * np.log(1 - p))  # noqa: E731
    score, voxels = uncertainty(probabilities)
    assert voxels == 2 and score == pytest.approx((entropy(0.9) + entropy(0.6)) / 2)
    assert uncertainty(np.stack([np.ones((1, 1, 3)), np.zeros((1, 1, 3))])) == (0.0, 0)


# ---- the panel's session with the worker (no Slicer: RAS points in, labelmap files out)

def test_click_session_orders_points_for_undo_and_forgets_removed_ones() -> None:
    from RubikSSLLib.clicksession import ClickSession

    class Offline:
        def send(self, request):
            return False

        def poll(self):
            return []

    session = ClickSession(Offline(), ["volume.nii.gz"], Path("."))
    session.set_points([(1, 2, 3)], [])
    session.set_points([(1, 2, 3)], [(4, 5, 6)])
    session.set_points([(1, 2, 3), (7, 8, 9)], [(4, 5, 6)])
    assert session.order == ["include", "exclude", "include"] and session.undo_target() == "include"
    session.set_points([(1, 2, 3)], [(4, 5, 6)])  # the panel removed the last include point
    assert session.undo_target() == "exclude"
    request = session.request()
    assert request["coordinateSystem"] == "RAS" and [c["include"] for c in request["clicks"]] == [True, False]
    assert request["out"].endswith(".npy")
    session.clear("Segment_2")
    assert session.undo_target() is None and not session.dirty and session.target == "Segment_2"
    session.set_points([(1, 2, 3)], [])
    session.set_points([], [])  # the last point removed: an empty segment, with no request
    [cleared] = session.poll()
    assert cleared.cleared and cleared.target == "Segment_2" and session.settled


@pytest.mark.slow
def test_click_session_coalesces_fast_clicks_into_one_request_at_a_time(interactive_run: Path, tmp_path: Path) -> None:
    from RubikSSLLib.clicksession import ClickSession
    from RubikSSLLib.jobs import Job, command_line

    flair = str(shared(f"{BRATS}/{BRATS_CASES[3]}/Flair_subtrMeanDivStd.nii.gz"))
    truth_image = sitk.ReadImage(str(shared(f"{BRATS}/{BRATS_CASES[3]}/OTMultiClass.nii.gz")))
    truth = sitk.GetArrayFromImage(truth_image) > 0
    point, _ = guidance.first_click(truth)
    inside = clicks.ras_of(clicks.from_voxels(np.array([point]), [True], geometry_of(truth_image))[0])
    job = Job(command_line(sys.executable, "serve", {"model": str(interactive_run), "device": "cpu"}), requests=True,
              cwd=str(REPO))
    session = ClickSession(job, [flair], tmp_path)
    session.set_points([inside], [])  # placed before the worker is ready: sent once it is
    results, deadline = [], time.monotonic() + 120
    while not results:
        results += session.poll()
        assert time.monotonic() < deadline and job.running, job.state.log[-3:]
        if session.busy and session.sent == 1:
            moved = tuple(v + 2.0 for v in inside)  # three quick changes while the first request runs
            session.set_points([inside, moved], [])
            session.set_points([inside, moved], [(0.0, 0.0, 0.0)])
            session.set_points([inside], [(0.0, 0.0, 0.0)])
        time.sleep(0.02)
    region = np.load(results[0].path, allow_pickle=False)  # only the predicted region, placed on the input grid
    assert results[0].target == "" and region.size < truth.size
    assert region[tuple(np.array(point) - results[0].start_kji)] == 1
    while session.busy or session.dirty:
        session.poll()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert session.sent == 2  # the three changes became one request: the newest points
    job.close_requests()
    assert job.wait(timeout=60).exit_code == 0
