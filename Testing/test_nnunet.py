"""Pretraining for nnU-Net: our pretext tasks on nnU-Net's own network, exported as nnU-Net loads it, and nnU-Net's
own trainer training from it, on a small BraTS dataset that nnU-Net itself planned and preprocessed.

Runs where the optional extra is installed (`bash run.sh test` installs it; tested with nnunetv2 2.8.1), in this
process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import nnunet_dataset
from conftest import SHARED_DATA, rubikssl

pytestmark = pytest.mark.slow  # nnU-Net plans and preprocesses first: not in the quick loop
TINY = "3d_tiny"  # the planned network with 4-8-16 features, a 32x48x48 patch: CPU-sized, nnU-Net's all the same
LARGE_PATCH = "3d_tiny_large_patch"  # a patch larger than every cropped case (about 52x75x60 voxels)


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """nnU-Net's folders in a temp folder, the dataset made, fingerprinted, planned and preprocessed by nnU-Net."""
    pytest.importorskip("nnunetv2", reason='the nnU-Net extra is not installed: pip install -e ".[nnunet]"')
    root = tmp_path_factory.mktemp("nnunet")
    folders = nnunet_dataset.use_folders(root)
    raw = nnunet_dataset.make_raw_dataset(SHARED_DATA, folders["nnUNet_raw"])
    plans = nnunet_dataset.plan_and_preprocess(901)
    os.environ["nnUNet_n_proc_DA"] = "0"  # the trainer's augmentation in this process (the planner needs >= 1)
    nnunet_dataset.add_configuration(plans, TINY, (4, 8, 16, 16, 16), patch_size=(32, 48, 48))
    nnunet_dataset.add_configuration(plans, LARGE_PATCH, (4, 8, 16, 16, 16), patch_size=(64, 112, 112))
    nnunet_dataset.write_splits(plans.parent)
    images = sorted((raw / "imagesTr").glob("*_0000.nii.gz"))
    cases = [{"image": [str(p), str(p).replace("_0000.", "_0001.")]} for p in images]
    datalist = root / "unlabelled.json"
    datalist.write_text(json.dumps({"training": cases[:3], "validation": cases[3:]}))
    return {"plans": plans, "datalist": datalist, "root": root, "raw": raw}


def pretrain(planned: dict, out: Path, task: str, *extra: str, configuration: str = TINY):
    return rubikssl("pretrain", "--data", str(planned["datalist"]), "--out", str(out), "--network", "nnunet",
                    "--plans", str(planned["plans"]), "--configuration", configuration, "--task", task, "--steps", "3",
                    "--eval-every", "3", "--batch-size", "2", "--val-puzzles", "2", "--shortcut-puzzles", "0",
                    "--progress", "none", *extra)


def test_the_plans_built_network_is_nnunets_own(planned: dict) -> None:
    """Parameter names and shapes equal to nnunetv2's get_network_from_plans for the planned configuration, and
    the encoder our tasks train is that network's encoder, under nnU-Net's names."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from RubikSSLLib import nnunet

    record = nnunet.read_plans(planned["plans"], "3d_fullres")
    ours = nnunet.build_network(nnunet.plan_of(record))
    manager = PlansManager(str(planned["plans"]))
    settings = manager.get_configuration("3d_fullres")
    dataset = json.loads((planned["plans"].parent / "dataset.json").read_text())
    theirs = get_network_from_plans(settings.network_arch_class_name, settings.network_arch_init_kwargs,
                                    settings.network_arch_init_kwargs_req_import, len(dataset["channel_names"]),
                                    manager.get_label_manager(dataset).num_segmentation_heads, allow_init=True,
                                    deep_supervision=True)
    shapes = lambda model: {k: tuple(v.shape) for k, v in model.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(theirs) and len(shapes(ours)) > 100
    encoder = nnunet.encoder(nnunet.plan_of(record))
    assert {f"encoder.{k}": tuple(v.shape) for k, v in encoder.state_dict().items()} == \
        {k: v for k, v in shapes(theirs).items() if k.startswith("encoder.")}
    assert record["plans"]["configurations"]["3d_fullres"]["architecture"]["network_class_name"].endswith("PlainConvUNet")


@pytest.mark.parametrize("task", ["rubik", "rotation", "mae", "rubik++"])
def test_each_fitting_task_trains_nnunets_network_on_real_data(planned: dict, tmp_path: Path, task: str) -> None:
    """The cube grid and rotation on nnU-Net's encoder, the restorations on its whole U-Net (its decoder saved under
    `head.decoder.`), a few steps on the BraTS cases through nnU-Net's preprocessing; weights change."""
    from RubikSSLLib import checkpoint, nnunet

    out = tmp_path / task
    result = pretrain(planned, out, task, "--cube-size", "16,32,32", "--jitter", "2")
    assert result.returncode == 0, result.stderr
    state, card = checkpoint.load_model(out / "model.safetensors")
    fresh = nnunet.build_network(nnunet.plan_of(card["config"]["nnunet"])).state_dict()
    changed = [k for k, v in state.items() if k.startswith("encoder.") and v.shape == fresh[k].shape
               and not torch.equal(v, fresh[k])]
    assert len(changed) > 10
    assert card["config"]["intensity"]["kind"] == "preprocessed"
    if task in nnunet.RESTORATION_TASKS:
        assert any(k.startswith("head.decoder.stages.") for k in state)


def test_a_case_smaller_than_the_plans_patch_is_padded_with_zeros_as_nnunet_pads_it(planned: dict, tmp_path: Path) -> None:
    """nnU-Net trains on cases smaller than its patch (padded with 0, the normalised mean); so does a restoration
    pretraining of its U-Net, on crops of the plan's patch size."""
    from RubikSSLLib import datasources, nnunet, sampling, tasks
    from RubikSSLLib.config import PretrainConfig
    from RubikSSLLib.training import load_volume

    result = pretrain(planned, tmp_path / "mae", "mae", configuration=LARGE_PATCH)
    assert result.returncode == 0, result.stderr
    config = PretrainConfig.read(tmp_path / "mae" / "config.json")
    first = json.loads(planned["datalist"].read_text())["training"][0]["image"]
    volume = load_volume(datasources.CaseSource(tuple(first)), config)
    patch = nnunet.plan_of(config.nnunet).patch_size
    assert patch == (64, 112, 112) and all(n < p for n, p in zip(volume.array.shape[1:], patch)), volume.array.shape
    prepared = sampling.prepare(volume, tasks.create(config).shape, config.intensity)
    assert prepared.array.shape[1:] == patch
    before_x = (patch[2] - volume.array.shape[3]) // 2
    assert before_x > 0 and np.all(prepared.array[..., :before_x] == 0)
    np.testing.assert_array_equal(prepared.array[..., before_x:before_x + volume.array.shape[3]][
        :, (64 - volume.array.shape[1]) // 2:][:, :volume.array.shape[1]][:, :, (112 - volume.array.shape[2]) // 2:][
        :, :, :volume.array.shape[2]], volume.array)


def test_a_plan_the_task_does_not_fit_is_refused_saying_what_fits(planned: dict, tmp_path: Path) -> None:
    result = pretrain(planned, tmp_path / "too small", "rubik", "--cube-size", "8", "--jitter", "2")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "16x32x32" in lines[-1] and "--cube-size 16,32,32" in lines[-1], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "too small" / "model.safetensors").exists()
    missing = rubikssl("pretrain", "--data", str(planned["datalist"]), "--out", str(tmp_path / "x"), "--network",
                       "nnunet", "--progress", "none")
    assert missing.returncode == 2 and "needs --plans" in missing.stderr.splitlines()[-1]
    flair = SHARED_DATA / "pretrain/msl_patient01_study1_FLAIR.nii.gz"  # its T1W was scanned on another grid
    unaligned = tmp_path / "unaligned.json"
    unaligned.write_text(json.dumps({"training": [{"image": [str(flair), str(flair).replace("_FLAIR.", "_T1W.")]}] * 2}))
    result = rubikssl("pretrain", "--data", str(unaligned), "--out", str(tmp_path / "y"), "--network", "nnunet",
                      "--plans", str(planned["plans"]), "--configuration", TINY, "--task", "mae", "--progress", "none")
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "_T1W.nii.gz: channel geometry differs" in last and "one grid" in last, result.stderr


def test_the_export_is_loaded_by_nnunets_loader_and_trained_from_by_its_trainer(planned: dict, tmp_path: Path) -> None:
    """nnunetv2's own load_pretrained_weights takes the export (every non-segmentation key, nnU-Net's shapes; the
    encoder of an encoder-only task with nnU-Net's fresh decoder), and nnUNetTrainer trains two iterations from
    it, with the pretrained encoder in its network at the start."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from RubikSSLLib import checkpoint

    run = tmp_path / "rubik"
    assert pretrain(planned, run, "rubik", "--cube-size", "16,32,32", "--jitter", "2").returncode == 0
    weights = tmp_path / "pretrained.pth"
    exported = rubikssl("export-nnunet", str(run), "--out", str(weights), "--progress", "none")
    assert exported.returncode == 0, exported.stderr
    state, _ = checkpoint.load_model(run / "model.safetensors")

    class FewIterations(nnUNetTrainer):  # nnU-Net reads its trainers' __init__ signature: spelled out as its own
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cpu")) -> None:
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 2, 1

    plans = json.loads(planned["plans"].read_text())
    plans["continue_training"] = False  # what nnunetv2.run.run_training adds before it builds a trainer
    dataset = json.loads((planned["plans"].parent / "dataset.json").read_text())
    trainer = FewIterations(plans, TINY, 0, dataset, device=torch.device("cpu"))
    trainer.initialize()
    load_pretrained_weights(trainer.network, str(weights))
    name = next(k for k in state if k.startswith("encoder.stages.1.") and k.endswith("conv.weight"))
    torch.testing.assert_close(trainer.network.state_dict()[name], state[name].to(torch.float32), rtol=0, atol=0)
    trainer.run_training()
    final = Path(trainer.output_folder) / "checkpoint_final.pth"
    logger = getattr(trainer.logger, "local_logger", trainer.logger)  # nnunetv2 2.8 wraps its logger
    assert final.exists() and np.isfinite(logger.my_fantastic_logging["train_losses"][-1])


def test_an_nnunet_pretraining_is_not_fine_tuned_by_us_but_pointed_to_nnunet(planned: dict, tmp_path: Path) -> None:
    run = tmp_path / "rubik"
    assert pretrain(planned, run, "rubik", "--cube-size", "16,32,32", "--jitter", "2").returncode == 0
    stroke = json.dumps({"training": [{"image": str(SHARED_DATA / "seg/stroke_t2/T2.nii.gz"),
                                       "label": str(SHARED_DATA / "seg/stroke_t2/lesionT2.nii.gz")}]})
    (tmp_path / "data.json").write_text(stroke)
    result = rubikssl("finetune", "--task", "segment", "--train", str(tmp_path / "data.json"), "--val",
                      str(tmp_path / "data.json"), "--out", str(tmp_path / "ft"), "--init", str(run), "--progress", "none")
    assert result.returncode == 2 and "export-nnunet" in result.stderr.splitlines()[-1]
    foreign = rubikssl("export-nnunet", str(tmp_path / "nothing"), "--out", str(tmp_path / "w.pth"), "--progress", "none")
    assert foreign.returncode == 2 and "no such file or folder" in foreign.stderr.splitlines()[-1]
