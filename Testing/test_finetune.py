"""Fine-tuning, weight transfer and inference outputs on real labelled data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import torch

from conftest import rubikssl, shared
from RubikSSLLib import checkpoint, models, transfer
from RubikSSLLib.config import settings_from_json
from RubikSSLLib.errors import BadInput
from RubikSSLLib.networks import EncoderConfig

TINY = ["--widths", "8,16", "--progress", "json", "--batch-size", "2"]


@pytest.fixture(scope="module")
def pretrained_run(small_adrenal: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("pretrain") / "run"
    result = rubikssl("pretrain", "--data", str(small_adrenal), "--out", str(run), "--steps", "3", "--cube-size", "12",
                      "--jitter", "2", "--spacing", "native", "--widths", "8,16", "--batch-size", "4", "--val-puzzles", "4",
                      "--progress", "none")
    assert result.returncode == 0, result.stderr
    return run


@pytest.fixture(scope="module")
def stroke_list(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("stroke")
    image, label = shared("seg/stroke_t2/T2.nii.gz"), shared("seg/stroke_t2/lesionT2.nii.gz")
    entry = {"image": str(image), "label": str(label)}
    path = folder / "stroke.json"
    path.write_text(json.dumps({"labels": {"1": "lesion"}, "training": [entry], "validation": [entry]}))
    return path


@pytest.fixture(scope="module")
def segmentation_run(stroke_list: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("segment") / "run"
    result = rubikssl("finetune", "--task", "segment", "--train", str(stroke_list), "--val", str(stroke_list), "--out",
                      str(run), "--epochs", "1", "--iterations-per-epoch", "2", "--patch-size", "16", "--spacing", "4", *TINY)
    assert result.returncode == 0, result.stderr
    return run


def test_every_encoder_tensor_equals_the_pretrained_one(pretrained_run: Path) -> None:
    state, card = checkpoint.load_model(pretrained_run / "model.safetensors")
    encoder_config = settings_from_json(EncoderConfig, card["config"]["encoder"])
    for network in (models.build("segment", "unet", encoder_config, 3), models.build("segment", "duc", encoder_config, 2),
                    models.build("classify", "", encoder_config, 2)):
        report, _ = transfer.load_encoder(network, pretrained_run)
        assert not report.missing and not report.unexpected
        encoder_state = network.encoder.state_dict()
        assert set(report.loaded) == set(encoder_state)
        for name, tensor in encoder_state.items():
            torch.testing.assert_close(tensor, state[f"encoder.{name}"], rtol=0, atol=0)


def test_more_input_channels_repeat_the_stem_and_divide(pretrained_run: Path) -> None:
    state, _ = checkpoint.load_model(pretrained_run / "model.safetensors")
    network = models.build("segment", "unet", EncoderConfig(3, (8, 16), (1, 2)), 2)
    report, _ = transfer.load_encoder(network, pretrained_run)
    stem = "stages.0.0.0.weight"
    assert report.adapted == [stem]
    expected = state[f"encoder.{stem}"].repeat(1, 3, 1, 1, 1) / 3
    torch.testing.assert_close(network.encoder.state_dict()[stem], expected)


def test_a_mismatched_checkpoint_is_refused_with_its_message(pretrained_run: Path) -> None:
    network = models.build("classify", "", EncoderConfig(1, (16, 32), (1, 2)), 2)
    with pytest.raises(BadInput, match=r"stages\.0\.0\.0\.weight has shape \(8, 1, 3, 3, 3\) but the network needs \(16, 1, 3, 3, 3\)"):
        transfer.load_encoder(network, pretrained_run)


def test_segmentation_result_reads_back_in_slicer_format_with_the_input_geometry(segmentation_run: Path,
                                                                                   tmp_path: Path) -> None:
    volume = shared("pretrain/msl_patient20_study2_FLAIR.nii.gz")  # anisotropic 0.9 x 0.9 x 3 mm, oblique
    out = tmp_path / "result.seg.nrrd"
    result = rubikssl("segment", "--model", str(segmentation_run), "--volume", str(volume), "--out", str(out),
                      "--progress", "none")
    assert result.returncode == 0, result.stderr
    segmentation = slicerio.read_segmentation(str(out))
    assert [s["name"] for s in segmentation["segments"]] == ["lesion"]
    card = json.loads((segmentation_run / "model.json").read_text())
    assert segmentation["segments"][0]["color"] == pytest.approx(card["classes"][1]["color"])
    source = sitk.ReadImage(str(volume))
    assert segmentation["voxels"].shape == source.GetSize()
    ijk_to_lps = np.asarray(segmentation["ijkToLPS"])
    np.testing.assert_allclose(ijk_to_lps[:3, 3], source.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(ijk_to_lps[:3, :3], np.reshape(source.GetDirection(), (3, 3)) * source.GetSpacing(), atol=1e-4)
    assert set(np.unique(segmentation["voxels"])) <= {0, 1}
    labelmap = sitk.ReadImage(str(tmp_path / "result.labels.nrrd"))
    assert labelmap.GetSize() == source.GetSize() and np.allclose(labelmap.GetOrigin(), source.GetOrigin())


@pytest.mark.slow
def test_segmentation_fine_tune_on_real_glioma_beats_the_empty_prediction(tmp_path: Path) -> None:
    """BraTS 2015 (tests only: non-commercial licence), FLAIR + T1c, whole tumour; 3 training cases, 1 held out."""
    entries = []
    for case in ("brats_2013_pat0001_1", "brats_2013_pat0002_1", "brats_2013_pat0003_1", "brats_2013_pat0005_1"):
        folder = shared(f"seg/brats2015_deepmedic/{case}")
        whole_tumour = tmp_path / f"{case}_wt.nii.gz"
        sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(folder / "OTMultiClass.nii.gz")) > 0, sitk.sitkUInt8), str(whole_tumour))
        entries.append({"image": [str(folder / "Flair_subtrMeanDivStd.nii.gz"), str(folder / "T1c_subtrMeanDivStd.nii.gz")],
                        "label": str(whole_tumour)})
    datalist = tmp_path / "brats.json"
    datalist.write_text(json.dumps({"labels": {"1": "tumour"}, "training": entries[:3], "validation": entries[3:]}))
    result = rubikssl("finetune", "--task", "segment", "--train", str(datalist), "--val", str(datalist),
                      "--out", str(tmp_path / "run"), "--epochs", "4", "--iterations-per-epoch", "15", "--patch-size", "32",
                      "--spacing", "3", "--widths", "8,16,32", "--batch-size", "2", "--intensity", "none", "--progress", "json")
    assert result.returncode == 0, result.stderr
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # an empty prediction scores Dice 0 on the held-out tumour (57,000 voxels at 1 mm)
    assert max(h["dice_tumour"] for h in history) > 0.2, history
    assert all(0 <= h["iou_tumour"] <= h["dice_tumour"] <= 1 for h in history)


@pytest.mark.slow
def test_classification_fine_tune_beats_chance_and_classify_writes_probabilities(small_adrenal_labeled: Path,
                                                                                 pretrained_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = rubikssl("finetune", "--task", "classify", "--train", str(small_adrenal_labeled), "--val",
                      str(small_adrenal_labeled), "--out", str(run), "--init", str(pretrained_run), "--epochs", "4",
                      "--intensity", "none", "--progress", "json", "--batch-size", "8")
    assert result.returncode == 0, result.stderr
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(h["val_auc"] for h in history) > 0.6, history  # chance: 0.5
    card = json.loads((run / "model.json").read_text())
    assert card["init"]["loaded"] > 0 and card["init"]["missing"] == []
    volume = tmp_path / "case.nrrd"
    with np.load(small_adrenal_labeled) as archive:
        sitk.WriteImage(sitk.GetImageFromArray(archive["val_images"][0]), str(volume))
    out = tmp_path / "result.json"
    assert rubikssl("classify", "--model", str(run), "--volume", str(volume), "--out", str(out)).returncode == 0
    answer = json.loads(out.read_text())
    assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert answer["predicted"] in answer["classes"]


@pytest.fixture(scope="module")
def small_adrenal_labeled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with np.load(shared("cls/adrenalmnist3d_64_trainval.npz")) as archive:
        data = {"train_images": archive["train_images"][:200], "train_labels": archive["train_labels"][:200],
                "val_images": archive["val_images"], "val_labels": archive["val_labels"]}
    path = tmp_path_factory.mktemp("adrenal_labeled") / "adrenal.npz"
    np.savez(path, **data)
    return path


def test_bad_fine_tuning_input_is_refused(stroke_list: Path, segmentation_run: Path, small_adrenal_labeled: Path,
                                          tmp_path: Path) -> None:
    def assert_refused(result, fragment: str) -> None:
        assert result.returncode == 2, result.stderr
        assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr

    entry = json.loads(stroke_list.read_text())["training"][0]
    shifted = tmp_path / "shifted.nii.gz"
    label = sitk.ReadImage(entry["label"])
    label.SetOrigin(tuple(o + 5 for o in label.GetOrigin()))
    sitk.WriteImage(label, str(shifted))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"labels": {"1": "lesion"}, "training": [{"image": entry["image"], "label": str(shifted)}]}))
    common = ["--epochs", "1", "--iterations-per-epoch", "1", "--patch-size", "16", "--spacing", "4", *TINY]
    assert_refused(rubikssl("finetune", "--task", "segment", "--train", str(bad), "--val", str(stroke_list),
                            "--out", str(tmp_path / "a"), *common), "geometry differs")
    outside = tmp_path / "outside.nii.gz"
    sitk.WriteImage(sitk.ReadImage(entry["label"]) * 7, str(outside))
    bad.write_text(json.dumps({"labels": {"1": "lesion"}, "training": [{"image": entry["image"], "label": str(outside)}]}))
    assert_refused(rubikssl("finetune", "--task", "segment", "--train", str(bad), "--val", str(stroke_list),
                            "--out", str(tmp_path / "b"), *common), "outside the classes")
    assert_refused(rubikssl("finetune", "--task", "segment", "--train", str(stroke_list), "--val", str(stroke_list),
                            "--out", str(tmp_path / "c"), "--label-fraction", "0.1", *common), "leaves no case")
    assert_refused(rubikssl("segment", "--model", str(segmentation_run), "--volume", entry["image"], entry["image"],
                            "--out", str(tmp_path / "x.seg.nrrd")), "needs 1 channel files")
    assert_refused(rubikssl("classify", "--model", str(segmentation_run), "--volume", entry["image"],
                            "--out", str(tmp_path / "x.json")), "is a 'segment' model")
    for name in ("a", "b", "c"):
        assert not (tmp_path / name).exists()
    assert not (tmp_path / "x.seg.nrrd").exists() and not (tmp_path / "x.json").exists()


def test_evaluate_pairs_seeds_and_writes_table_and_plot(small_adrenal_labeled: Path, pretrained_run: Path,
                                                         tmp_path: Path) -> None:
    from PIL import Image

    from RubikSSLLib import evaluate

    out = tmp_path / "evaluation"
    result = rubikssl("evaluate", "--task", "classify", "--train", str(small_adrenal_labeled), "--val",
                      str(small_adrenal_labeled), "--init", str(pretrained_run), "--out", str(out), "--fractions", "0.2",
                      "--seeds", "2", "--epochs", "1", "--last-epochs", "1", "--intensity", "none", "--progress", "none")
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    scores = results["scores"]["0.2"]
    assert len(scores["scratch"]) == len(scores["pretrained"]) == 2
    for seed in (0, 1):  # both inits of a seed saw the same labelled cases
        cards = [json.loads((out / f"fraction0.2_seed{seed}_{init}" / "model.json").read_text()) for init in ("scratch", "pretrained")]
        assert cards[0]["data"]["train"] == cards[1]["data"]["train"] and len(cards[0]["data"]["train"]) == 40
        assert cards[0]["init"]["source"] == "scratch" and cards[1]["init"]["loaded"] > 0
    row = results["summary"]["0.2"]
    assert row["difference_mean"] == pytest.approx(np.mean(np.subtract(scores["pretrained"], scores["scratch"])))
    table = (out / "results.md").read_text()
    assert "| 0.2 |" in table and table.startswith("val_auc") and "\nval_acc" in table
    accuracy = results["other_metrics"]["val_acc"]  # the accuracy of the same runs, read from their metrics files
    last_accuracy = json.loads((out / "fraction0.2_seed1_pretrained/metrics.jsonl").read_text().splitlines()[-1])["val_acc"]
    assert accuracy["scores"]["0.2"]["pretrained"][1] == pytest.approx(last_accuracy)
    assert evaluate.summarise(accuracy["scores"]) == accuracy["summary"]
    paired = results["paired"]
    assert paired["split"] == "val" and paired["metric"] == "AUC"
    row = paired["by_fraction"]["0.2"]
    assert row["cases"] == 98 and row["low"] <= row["difference"] <= row["high"] and 0 <= row["p_value"] <= 1
    from RubikSSLLib import statistics

    cached = [json.loads((out / f"fraction0.2_seed{s}_{init}" / "cases_val.json").read_text())
              for s in (0, 1) for init in ("scratch", "pretrained")]
    assert all(c["model"] == "model_last.safetensors" and len(c["truth"]) == 98 for c in cached)
    everything = np.arange(98)
    recomputed = np.mean([statistics.classification_metric(cached[2 * s + 1], everything)
                          - statistics.classification_metric(cached[2 * s], everything) for s in (0, 1)])
    assert row["difference"] == pytest.approx(recomputed)
    assert "95 % bootstrap interval" in table
    probe = results["diagnostics"]["linear_probe_auc"]
    assert set(probe) == {"pretrained", "random"} and all(0.5 < v <= 1 for v in probe.values()), probe
    assert "linear probe" in table
    shortcut = results["diagnostics"]["puzzle_shortcut"]  # the fixture's pretraining is a Rubik's cube run
    assert shortcut["chance_ordering"] == 0.01 and 0 <= shortcut["trivial_ordering_acc"] <= 1
    assert "Puzzle shortcut" in table
    picture = np.asarray(Image.open(out / "results.png").convert("RGB"))
    assert picture.shape == (420, 640, 3)
    for colour in evaluate.SERIES.values():  # both series are drawn, not just a frame
        rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(picture.astype(int) - rgb).sum(axis=2) < 30).sum() > 50, colour
    # a finished evaluation is reused, not recomputed
    before = (out / "fraction0.2_seed0_scratch" / "model.safetensors").stat().st_mtime_ns
    assert evaluate.summarise(results["scores"]) == results["summary"]
    again = rubikssl("evaluate", "--task", "classify", "--train", str(small_adrenal_labeled), "--val",
                     str(small_adrenal_labeled), "--init", str(pretrained_run), "--out", str(out), "--fractions", "0.2",
                     "--seeds", "2", "--epochs", "1", "--last-epochs", "1", "--intensity", "none", "--progress", "none")
    assert again.returncode == 0
    assert (out / "fraction0.2_seed0_scratch" / "model.safetensors").stat().st_mtime_ns == before


def test_evaluate_scores_a_test_set_that_training_never_touches(small_adrenal_labeled: Path, pretrained_run: Path,
                                                               tmp_path: Path) -> None:
    with np.load(shared("cls/adrenalmnist3d_64_trainval.npz")) as archive:  # cases the 200 training ones are not
        held_out = {"test_images": archive["train_images"][200:260], "test_labels": archive["train_labels"][200:260]}
    test = tmp_path / "test.npz"
    np.savez(test, **held_out)
    out = tmp_path / "evaluation"
    result = rubikssl("evaluate", "--task", "classify", "--train", str(small_adrenal_labeled), "--val",
                      str(small_adrenal_labeled), "--test", str(test), "--init", str(pretrained_run), "--out", str(out),
                      "--fractions", "0.2", "--seeds", "2", "--epochs", "1", "--last-epochs", "1", "--intensity", "none",
                      "--resamples", "200", "--progress", "none")
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["paired"]["split"] == "test" and results["paired"]["by_fraction"]["0.2"]["cases"] == 60
    for seed in (0, 1):
        run = out / f"fraction0.2_seed{seed}_pretrained"
        cases = json.loads((run / "cases_test.json").read_text())
        assert cases["model"] == "model.safetensors" and all(str(test) in name for name in cases["cases"])
        trained_on = json.loads((run / "model.json").read_text())["data"]["train"]
        assert not any(str(test) in name for name in trained_on)
    assert "the test set (models picked on --val)" in (out / "results.md").read_text()


def test_label_map_lands_on_the_processed_image_grid() -> None:
    from RubikSSLLib import labeled
    from RubikSSLLib.volumes import Grid, load_case

    image, label = shared("seg/stroke_t2/T2.nii.gz"), shared("seg/stroke_t2/lesionT2.nii.gz")
    volume = load_case([str(image)], spacing_mm=3.0, canonical=True)
    grid = Grid(volume.array.shape[1:], volume.geometry)
    labels = labeled.load_label_map(str(label), str(image), grid)
    assert labels.shape == volume.array.shape[1:]
    assert set(np.unique(labels)) == {0, 1}
    assert labels.sum() * 27 == pytest.approx(37855, rel=0.1)  # the 1 mm lesion volume, now in 3 mm voxels
    # the lesion is bright on T2: its mean intensity on the processed grid exceeds the brain's
    brain = volume.array[0] > np.percentile(volume.array[0], 50)
    assert volume.array[0][labels == 1].mean() > volume.array[0][brain & (labels == 0)].mean()


def test_warm_up_and_encoder_learning_rate_follow_the_step_and_resume(small_adrenal_labeled: Path, pretrained_run: Path,
                                                                     tmp_path: Path) -> None:
    from RubikSSLLib.finetune import FinetuneConfig, Finetuning
    from RubikSSLLib.progress import Reporter

    data = [str(small_adrenal_labeled)]
    card = checkpoint.load_model(pretrained_run / "model.safetensors")[1]
    config = FinetuneConfig(task="classify", train=data, val=data, out=str(tmp_path / "run"), init=str(pretrained_run),
                            epochs=1, iterations_per_epoch=2, batch_size=2, warmup_epochs=2, encoder_lr_factor=0.1,
                            encoder=settings_from_json(EncoderConfig, card["config"]["encoder"]))
    first = Finetuning(config, Reporter("none"))
    first.run()
    encoder_group, head_group = first.optimizer.param_groups
    assert {id(p) for p in encoder_group["params"]} == {id(p) for p in first.model.encoder.parameters()}
    assert len(head_group["params"]) == len(list(first.model.parameters())) - len(encoder_group["params"]) > 0
    # step 2 of a 4-step warm-up: half the learning rate, the encoder's a tenth of that
    assert head_group["lr"] == pytest.approx(0.5 * 3e-4) and encoder_group["lr"] == pytest.approx(0.05 * 3e-4)
    resumed = Finetuning(FinetuneConfig(**{**config.__dict__, "epochs": 2}), Reporter("none"), resume=True)
    resumed.run()
    assert [g["lr"] for g in resumed.optimizer.param_groups] == pytest.approx([0.1 * 3e-4, 3e-4])
    # cosine after a 1-epoch warm-up of 4 epochs x 2 steps: peak at step 2, half-way at step 5, zero at the last step
    resumed.config = dataclasses.replace(config, epochs=4, warmup_epochs=1, lr_schedule="cosine")
    for step, scale in ((1, 0.5), (2, 1.0), (5, 0.5), (8, 0.0)):
        resumed._set_learning_rate(step, total=8)
        assert resumed.optimizer.param_groups[1]["lr"] == pytest.approx(scale * 3e-4, abs=1e-12)


class OracleModel(torch.nn.Module):
    """Returns one-hot logits of a known label map (on the network's grid) for a whole-volume window."""

    def __init__(self, indices_zyx: np.ndarray, classes: int) -> None:
        super().__init__()
        self.register_buffer("logits", torch.nn.functional.one_hot(torch.from_numpy(indices_zyx), classes)
                             .permute(3, 0, 1, 2)[None].float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[2:] == self.logits.shape[2:], "one window covers the whole volume"
        return self.logits


def test_a_known_label_map_comes_back_voxel_identical_on_an_oblique_anisotropic_grid(tmp_path: Path,
                                                                                      monkeypatch) -> None:
    """The invariant of the whole inference path: whatever the network says on its grid (here: exactly a known
    label map) lands on the input file's own voxels, through LPS reorientation and back."""
    from RubikSSLLib import predict, preprocess
    from RubikSSLLib.config import FinetuneConfig

    source_path = shared("pretrain/msl_patient20_study2_FLAIR.nii.gz")  # 0.9 x 0.9 x 3 mm, oblique
    source = sitk.ReadImage(str(source_path))
    assert not np.allclose(source.GetDirection(), np.eye(3).ravel()) and len(set(source.GetSpacing())) > 1
    intensity = sitk.GetArrayFromImage(source)
    known = np.digitize(intensity, np.percentile(intensity, [60, 90])).astype(np.uint16) * 2  # values 0, 2, 4
    config = FinetuneConfig(task="segment", train=["x"], val=["x"], out="y", spacing_mm=None, patch_size=(16, 16, 16))
    _, volume = preprocess.network_input([str(source_path)], config.to_json(), ["FLAIR"])
    on_network_grid = sitk.Resample(_with_geometry(known, source),
                                    tuple(int(s) for s in volume.array.shape[1:][::-1]), sitk.Transform(),
                                    sitk.sitkNearestNeighbor, volume.geometry.origin_xyz, volume.geometry.spacing_xyz,
                                    volume.geometry.direction, 0, sitk.sitkUInt16)
    indices = sitk.GetArrayFromImage(on_network_grid) // 2
    classes = [{"index": i, "value": 2 * i, "name": n, "color": [0.1 * i, 0.5, 0.5]}
               for i, n in enumerate(("background", "bright", "brightest"))]
    card = {"task": "segment", "config": {**config.to_json(), "patch_size": list(indices.shape)}, "classes": classes,
            "channels": ["FLAIR"], "postprocessing": {"largest_component": []}}
    monkeypatch.setattr(predict, "load_finetuned", lambda *args, **kwargs: (OracleModel(indices.astype(np.int64), 3), card))
    summary = predict.segment("oracle", [str(source_path)], tmp_path / "known.seg.nrrd")
    labelmap = sitk.ReadImage(str(tmp_path / "known.labels.nrrd"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labelmap), known)
    assert labelmap.GetSize() == source.GetSize()
    np.testing.assert_allclose(labelmap.GetDirection(), source.GetDirection(), atol=1e-9)
    segmentation = slicerio.read_segmentation(str(tmp_path / "known.seg.nrrd"))
    voxels = np.transpose(segmentation["voxels"], (2, 1, 0))
    for entry in classes[1:]:
        segment = next(s for s in segmentation["segments"] if s["name"] == entry["name"])
        mask = voxels == segment["labelValue"] if voxels.ndim == 3 else voxels[..., segment["layer"]] == segment["labelValue"]
        np.testing.assert_array_equal(mask, known == entry["value"])
        assert summary["voxels"][entry["name"]] == int((known == entry["value"]).sum()) > 1000


def _with_geometry(array_zyx: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array_zyx)
    image.CopyInformation(reference)
    return image


def test_largest_component_clean_up_keeps_the_biggest_part_of_the_chosen_classes() -> None:
    from RubikSSLLib import postprocess

    labels = np.zeros((20, 20, 20), np.uint16)
    labels[2:8, 2:8, 2:8] = 1      # 216 voxels
    labels[12:14, 12:14, 12:14] = 1  # 8 voxels, apart
    labels[15:18, 2:4, 2:4] = 2    # class 2 in two parts, not chosen
    labels[2:4, 15:18, 15:18] = 2
    cleaned = postprocess.keep_largest_component(labels, [1])
    assert (cleaned == 1).sum() == 216 and (cleaned[12:14, 12:14, 12:14] == 0).all()
    np.testing.assert_array_equal(cleaned == 2, labels == 2)
    card = {"classes": [{"value": 0}, {"value": 1}, {"value": 2}], "postprocessing": {"largest_component": [2]}}
    assert postprocess.parse_classes("card", card) == [2] and postprocess.parse_classes("all", card) == [1, 2]
    with pytest.raises(BadInput, match="no class with value 5"):
        postprocess.parse_classes("1,5", card)


def test_init_stages_loads_only_the_first_stages_and_reports_the_rest(pretrained_run: Path) -> None:
    state, card = checkpoint.load_model(pretrained_run / "model.safetensors")
    encoder_config = settings_from_json(EncoderConfig, card["config"]["encoder"])  # two stages
    network = models.build("classify", "", encoder_config, 2)
    random_start = {k: v.clone() for k, v in network.encoder.state_dict().items()}
    report, _ = transfer.load_encoder(network, pretrained_run, stages=1)
    assert report.fresh and all(name.startswith("stages.1.") for name in report.fresh)
    assert report.loaded and all(name.startswith("stages.0.") for name in report.loaded) and not report.missing
    for name, tensor in network.encoder.state_dict().items():
        expected = state[f"encoder.{name}"] if name.startswith("stages.0.") else random_start[name]
        torch.testing.assert_close(tensor, expected, rtol=0, atol=0)
    assert "left random" in report.summary()
    with pytest.raises(BadInput, match="--init-stages 3: this encoder has 2 stages"):
        transfer.load_encoder(models.build("classify", "", encoder_config, 2), pretrained_run, stages=3)


def _sphere_case(folder: Path, rotation_deg: float) -> tuple[Path, Path, np.ndarray]:
    """A real MRI's voxels (1 mm, 60^3 of the stroke T2) with a known lesion (a ball of radius 9.3 mm off any voxel
    centre), written with the same voxels under a header rotated by `rotation_deg` about z."""
    image = sitk.ReadImage(str(shared("seg/stroke_t2/T2.nii.gz")))
    voxels = sitk.GetArrayFromImage(image)[:60, :60, :60].astype(np.float32)
    z, y, x = np.mgrid[:60, :60, :60]
    ball = ((z - 29.3) ** 2 + (y - 31.6) ** 2 + (x - 27.2) ** 2 <= 9.3**2).astype(np.uint8)
    angle = np.deg2rad(rotation_deg)
    direction = (np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, 1.0)
    paths = []
    for name, array in (("image.nii.gz", voxels), ("lesion.nii.gz", ball)):
        written = sitk.GetImageFromArray(array)
        written.SetSpacing((1.0, 1.0, 1.0))
        written.SetOrigin((10.3, -5.2, 7.7))
        written.SetDirection(direction)
        sitk.WriteImage(written, str(folder / name))
        paths.append(folder / name)
    return paths[0], paths[1], ball


def test_a_known_object_crosses_a_coarser_model_grid_and_back_without_a_shift(tmp_path: Path, monkeypatch) -> None:
    """1 mm file -> 2 mm network grid (the label as training resamples it, and as a perfect network answers) ->
    back to the file: the lesion's centroid stays within 0.1 mm, and a header rotation that leaves the voxels alone
    changes no voxel of the result (no tie between two network voxels for floating-point noise to break)."""
    from RubikSSLLib import labeled, predict, preprocess
    from RubikSSLLib.config import FinetuneConfig
    from RubikSSLLib.volumes import Grid

    results = {}
    for rotation in (0.0, 20.0):
        folder = tmp_path / f"rotated_{rotation:g}"
        folder.mkdir()
        image_path, label_path, ball = _sphere_case(folder, rotation)
        config = FinetuneConfig(task="segment", train=["x"], val=["x"], out="y", spacing_mm=2.0, patch_size=(16, 16, 16))
        _, volume = preprocess.network_input([str(image_path)], config.to_json(), ["T2"])
        on_network = labeled.load_label_map(str(label_path), str(image_path), Grid(volume.array.shape[1:], volume.geometry))
        classes = [{"index": 0, "value": 0, "name": "background", "color": [0, 0, 0]},
                   {"index": 1, "value": 1, "name": "lesion", "color": [1, 0, 0]}]
        card = {"task": "segment", "config": {**config.to_json(), "patch_size": list(on_network.shape)},
                "classes": classes, "channels": ["T2"], "postprocessing": {"largest_component": []}}
        monkeypatch.setattr(predict, "load_finetuned", lambda *a, card=card, labels=on_network, **k: (OracleModel(labels, 2), card))
        predict.segment("oracle", [str(image_path)], folder / "ball.seg.nrrd")
        returned = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "ball.labels.nrrd")))
        results[rotation] = returned
        centroid = lambda mask: np.argwhere(mask).mean(axis=0)  # noqa: E731 - voxel units = mm (1 mm grid)
        shift = np.linalg.norm(centroid(returned == 1) - centroid(ball == 1))
        assert shift < 0.1, f"rotation {rotation}: the lesion came back {shift:.2f} mm from where it was"
        assert abs(int((returned == 1).sum()) - int(ball.sum())) < 0.1 * ball.sum()
    np.testing.assert_array_equal(results[0.0], results[20.0])


def test_clicks_and_labels_round_the_same_way_at_a_tie() -> None:
    """A click exactly half-way between two voxel centres lands on the voxel whose label the file voxel there gets
    (up, as labels do), not by numpy's half-to-even."""
    from RubikSSLLib import clicks
    from RubikSSLLib.volumes import Geometry

    geometry = Geometry((2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    half_way = [clicks.Click((1.0, 3.0, 5.0))]  # voxel indices 0.5, 1.5, 2.5 on every axis
    assert clicks.voxel_clicks(half_way, geometry, (8, 8, 8))[0][0] == (3, 2, 1)  # np.rint gave (2, 2, 0)
    from RubikSSLLib.geometry import nearest_index

    np.testing.assert_array_equal(nearest_index([0.5 - 1e-12, 1.5 + 1e-12, 2.5]), [1, 2, 3])
