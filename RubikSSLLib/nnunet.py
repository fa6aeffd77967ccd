"""nnU-Net's own network as the pretraining target, and its weights out to nnU-Net's fine-tuning.

The optional extra (`pip install "rubikssl[nnunet]"`: nnunetv2 and dynamic_network_architectures from PyPI). With
`rubikssl pretrain --network nnunet --plans nnUNetPlans.json --configuration 3d_fullres`:
- the network is built from the plans exactly as nnU-Net builds it (nnunetv2's get_network_from_plans, its own
  initialisation), a plain-conv or residual-encoder U-Net;
- the encoder tasks (the cube grids, rotation, rpl, exemplar, cpc) train its encoder (`encoder.*`, nnU-Net's
  names), the restoration tasks (mae, genesis, rubik++) the whole U-Net: its decoder restores the input channels;
- the volumes are preprocessed by nnU-Net's own preprocessor with the plans (transpose, crop to the non-zero box,
  the configuration's spacing, its normalisation scheme per channel), so the encoder sees what nnU-Net will feed it.
  The cube-grid tasks keep those intensities instead of min-max scaling each cube (the paper's recipe): the
  encoder's first layers then learn on nnU-Net's input range;
- the plans and the dataset.json beside them are stored in the run's config (the run owns them).

`rubikssl export-nnunet RUN --out weights.pth` writes what `nnUNetv2_train ... -pretrained_weights weights.pth`
loads (nnunetv2.run.load_pretrained_weights): {"network_weights": state dict} with every key of the plan's network
and its shapes; what the pretraining did not train (the decoder of an encoder task) is nnU-Net's own fresh
initialisation. It is the one file we write with torch.save, because nnU-Net reads nothing else; we never load one.
Tested with nnunetv2 2.5.2 and dynamic_network_architectures 0.3.1 (the releases whose dependencies leave the
installed torch alone; 2.6+ pull torchvision through timm).
"""

from __future__ import annotations

import copy
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from RubikSSLLib import volumes
from RubikSSLLib.errors import BadInput

INSTALL = 'pip install "rubikssl[nnunet]"'
RESTORATION_TASKS = ("mae", "genesis", "rubik++")
EXPORT_KEY = "network_weights"  # what nnunetv2.run.load_pretrained_weights reads
SEGMENTATION_LAYERS = ".seg_layers."  # what it does not load


def require() -> None:
    """nnU-Net's packages, imported quietly (nnunetv2.paths prints three paragraphs when its folder variables are
    unset, which pretraining and exporting do not need)."""
    import contextlib
    import io

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import dynamic_network_architectures  # noqa: F401
            import nnunetv2.paths  # noqa: F401
    except ImportError:
        raise BadInput(f"--network nnunet needs nnU-Net's packages: {INSTALL}") from None


def read_plans(plans_file: str | Path, configuration: str) -> dict:
    """The record a run keeps of its plan: the plans, the dataset.json beside them (nnU-Net's preprocessed folder
    holds both) and the configuration's name, refused in one line if anything is missing."""
    path = Path(plans_file)
    try:
        plans = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise BadInput(f"--plans {path}: cannot be read as nnU-Net plans ({error}); give the nnUNetPlans.json that "
                       "nnUNetv2_plan_and_preprocess wrote") from None
    if not isinstance(plans, dict) or not isinstance(plans.get("configurations"), dict):
        raise BadInput(f"--plans {path}: has no 'configurations'; give the nnUNetPlans.json of nnU-Net's planning")
    if configuration not in plans["configurations"]:
        raise BadInput(f"--configuration {configuration}: not in {path}; it has {', '.join(plans['configurations'])}")
    dataset_file = path.parent / "dataset.json"
    try:
        dataset = json.loads(dataset_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise BadInput(f"{dataset_file}: missing or unreadable; nnU-Net's preprocessed folder keeps it beside the plans "
                       "(copy the dataset's dataset.json there)") from None
    return {"plans": plans, "dataset": dataset, "configuration": configuration, "plans_file": str(path)}


@dataclass(frozen=True)
class Plan:
    """A configuration of nnU-Net plans with its dataset: what the network and the preprocessing are built from."""

    plans: dict
    dataset: dict
    configuration: str

    @functools.cached_property
    def manager(self):
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        return PlansManager(copy.deepcopy(self.plans))

    @functools.cached_property
    def settings(self):
        """nnU-Net's ConfigurationManager of the configuration (spacing, patch size, network, normalisation)."""
        return self.manager.get_configuration(self.configuration)

    @property
    def input_channels(self) -> int:
        names = self.dataset.get("channel_names", self.dataset.get("modality", {}))
        return len(names)

    @property
    def output_channels(self) -> int:
        return self.manager.get_label_manager(self.dataset).num_segmentation_heads

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self.settings.patch_size)

    @property
    def strides(self) -> list[tuple[int, ...]]:
        """Per encoder stage, its stride along each axis of nnU-Net's (transposed) array order."""
        kwargs = self.settings.network_arch_init_kwargs
        return [tuple(s) if isinstance(s, (list, tuple)) else (int(s),) * 3 for s in kwargs["strides"]]

    @property
    def total_stride(self) -> tuple[int, ...]:
        return tuple(math.prod(axis) for axis in zip(*self.strides))


@functools.lru_cache(maxsize=4)
def _plan(record_json: str) -> Plan:
    record = json.loads(record_json)
    return Plan(record["plans"], record["dataset"], record["configuration"])


def plan_of(record: dict) -> Plan:
    """The Plan of a run's record (`read_plans`), built once per process."""
    require()
    return _plan(json.dumps({k: record[k] for k in ("plans", "dataset", "configuration")}, sort_keys=True))


def build_network(plan: Plan, output_channels: int | None = None, deep_supervision: bool = False) -> nn.Module:
    """The plan's network as nnU-Net builds it (nnunetv2's get_network_from_plans, He initialisation)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    settings = plan.settings
    return get_network_from_plans(settings.network_arch_class_name, settings.network_arch_init_kwargs,
                                  settings.network_arch_init_kwargs_req_import, plan.input_channels,
                                  output_channels or plan.output_channels, allow_init=True,
                                  deep_supervision=deep_supervision)


def encoder(plan: Plan) -> nn.Module:
    """The plan's encoder (nnU-Net's module and parameter names) for an encoder task: forward(x) -> the stage maps,
    finest first, as networks.Encoder; `out_channels` and `downsampling` as a head reads them."""
    module = build_network(plan).encoder
    module.out_channels = int(module.output_channels[-1])
    module.downsampling = plan.total_stride
    return module


class RestorationHead(nn.Module):
    """A restoration task's head on nnU-Net's encoder: the plan's own decoder (`decoder.*`, nnU-Net's names), its
    output layer giving back the input channels. The decoder does not register the encoder it reads (the model
    holds it once, as `encoder`); the export writes nnU-Net's `decoder.encoder.*` copies."""

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        network = build_network(plan, output_channels=plan.input_channels)
        decoder = network.decoder
        del decoder._modules["encoder"]  # read through the model's own encoder, never saved twice
        object.__setattr__(decoder, "encoder", network.encoder)
        self.decoder = decoder

    def forward(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(encoder(x))


def load_case(plan: Plan, files: list[str]) -> np.ndarray:
    """(C, *) float32: one case's channel files through nnU-Net's own preprocessor for the plan's configuration
    (transposed, cropped to the non-zero box, resampled, normalised), in nnU-Net's array order."""
    import warnings

    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    if len(files) != plan.input_channels:
        raise BadInput(f"{files[0]}: {len(files)} channel files, but the plan's dataset has {plan.input_channels} "
                       f"channels ({', '.join(plan.dataset.get('channel_names', {}).values())}); give them all, in order")
    volumes.check_one_grid(files, [volumes.read_header(path) for path in files])  # nnU-Net's reader only prints why
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            data, _, _ = DefaultPreprocessor(verbose=False).run_case(list(files), None, plan.manager, plan.settings,
                                                                   plan.dataset)
        except (RuntimeError, ValueError, OSError) as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
            raise BadInput(f"{files[0]}: nnU-Net's preprocessing refused it ({reason})") from None
    return np.ascontiguousarray(data, dtype=np.float32)


def check_fits(plan: Plan, task: str, model: nn.Module, forward) -> None:
    """Refuse (one line, with what fits) a task whose inputs are too small for the plan's encoder: its deepest map
    must keep at least 2 voxels per axis (instance norm over one voxel gives zero). `forward()` runs the model on
    one sample (a batch of one)."""
    stages: list[tuple[int, ...]] = []
    hooks = [stage.register_forward_hook(lambda module, args, out: stages.append(tuple(out.shape[2:])))
             for stage in model.encoder.stages]
    fits = ",".join(str(2 * s) for s in plan.total_stride)
    too_small = (f"inputs of at least {fits.replace(',', 'x')} voxels fit (--cube-size {fits}), or a plan with fewer "
                 "stages")
    try:
        with torch.no_grad():
            model.eval()
            forward()
    except ValueError as error:  # instance norm over a single voxel, in the stage the input shrank to
        raise BadInput(f"--task {task}: its inputs shrink to a single voxel inside the plan's encoder (total stride "
                       f"{'x'.join(map(str, plan.total_stride))}, nnU-Net's array order); {too_small}") from None
    except RuntimeError as error:
        raise BadInput(f"--task {task} does not fit the plan's network ({str(error).splitlines()[0][:120]}); "
                       f"{too_small}") from None
    finally:
        for hook in hooks:
            hook.remove()
        model.train()
    if stages and min(stages[-1]) < 2:
        raise BadInput(f"--task {task}: its inputs shrink to {'x'.join(map(str, stages[-1]))} voxels in the plan's "
                       f"deepest stage (total stride {'x'.join(map(str, plan.total_stride))}, nnU-Net's array order); "
                       f"{too_small}")


def export(model_state: dict[str, torch.Tensor], card: dict, out: str | Path) -> dict:
    """Write the nnU-Net checkpoint of a pretraining on the plan's network. Returns what came from where."""
    from RubikSSLLib.files import atomic_path

    record = card.get("config", {}).get("nnunet")
    if card.get("config", {}).get("network") != "nnunet" or not isinstance(record, dict):
        raise BadInput("export-nnunet takes a run of rubikssl pretrain --network nnunet: this model was pretrained on "
                       "RubikSSL's own encoder, which nnU-Net's network cannot load")
    plan = plan_of(record)
    network = build_network(plan)
    weights = network.state_dict()
    pretrained = {name[len("encoder."):]: t for name, t in model_state.items() if name.startswith("encoder.")}
    prefix = card.get("decoder_prefix", "head.") + "decoder."  # a restoration task's nnU-Net decoder (if any)
    decoder = {name[len(prefix):]: t for name, t in model_state.items() if name.startswith(prefix)}
    sources = {"pretrained": 0, "nnunet_init": 0, "segmentation_layers": 0}
    for name, tensor in weights.items():
        if name.startswith("encoder."):
            source = pretrained.get(name[len("encoder."):])
        elif name.startswith("decoder.encoder."):
            source = pretrained.get(name[len("decoder.encoder."):])
        elif name.startswith("decoder.") and SEGMENTATION_LAYERS not in name:
            source = decoder.get(name[len("decoder."):])
        else:
            sources["segmentation_layers"] += 1
            continue
        if source is None:
            sources["nnunet_init"] += 1
            continue
        if tuple(source.shape) != tuple(tensor.shape):
            raise BadInput(f"{name}: pretrained {tuple(source.shape)}, the plan's network {tuple(tensor.shape)}; "
                           "the run's weights do not fit its own plan (the file is damaged)")
        weights[name] = source.to(tensor.dtype)
        sources["pretrained"] += 1
    with atomic_path(out) as temporary:
        torch.save({EXPORT_KEY: {name: t.detach().cpu().contiguous() for name, t in weights.items()}}, temporary)
    return {"out": str(out), **sources, "keys": len(weights), "plans": record.get("plans_file", ""),
            "configuration": plan.configuration}
