"""Loading a pretrained encoder into a downstream network, with a report of what was loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from RubikSSLLib import checkpoint, models, rundir
from RubikSSLLib.errors import BadInput

ENCODER_PREFIX = "encoder."
DECODER_PREFIX = "decoder."
STEM_BLOCK_WEIGHT = "stem_block.0.weight"  # its input is (upsampled features, the image): channels adapt


@dataclass
class LoadReport:
    """Which encoder tensors were loaded, which the network has that the checkpoint lacks, and the reverse."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    decoder: list[str] = field(default_factory=list)  # decoder tensors loaded too (restoration pretraining)
    decoder_unused: int = 0  # pretrained decoder tensors this network has no place for (a DUC decoder)
    fresh: list[str] = field(default_factory=list)  # encoder tensors left random on purpose (--init-stages)

    def summary(self) -> str:
        text = f"loaded {len(self.loaded)} encoder tensors, missing {len(self.missing)}, unexpected {len(self.unexpected)}"
        text += f"; and {len(self.decoder)} decoder tensors" if self.decoder else ""
        text += (f"; the pretrained U-Net decoder ({self.decoder_unused} tensors) is not used by this decoder"
                 if self.decoder_unused else "")
        text += f"; {len(self.fresh)} tensors of the later stages left random (--init-stages)" if self.fresh else ""
        return text + (f"; input channels adapted in {', '.join(self.adapted)}" if self.adapted else "")


def pretrained_model_file(run_or_file: str | Path) -> Path:
    path = Path(run_or_file)
    return path / rundir.BEST_MODEL if path.is_dir() else path


def adapt_input_channels(weight: torch.Tensor, channels: int, guidance: int = 0) -> torch.Tensor:
    """Stem weights (out, c, k, k, k) pretrained on c = 1 channel for `channels` image inputs: repeat and divide by
    the count (as nnssl does), so that the first layer's response to identical channels is unchanged. `guidance`
    extra inputs (interactive click maps) get zero weights: the pretrained response to the image is unchanged at
    the start, and training teaches the network to read the clicks."""
    image = weight if weight.shape[1] == channels else weight.repeat(1, channels, 1, 1, 1) / channels
    return torch.cat([image, image.new_zeros((image.shape[0], guidance, *image.shape[2:]))], dim=1)


def _adaptable(tensor: torch.Tensor, wanted: torch.Size, guidance: int) -> bool:
    """A stem weight pretrained on one channel (or on the image channels alone) that needs more inputs."""
    return (tensor.shape != wanted and tensor.ndim == 5 and tensor.shape[0] == wanted[0]
            and tensor.shape[1] in (1, wanted[1] - guidance))


def load_encoder(network: nn.Module, run_or_file: str | Path, stages: int | None = None) -> tuple[LoadReport, dict]:
    """Copy the pretrained encoder of a RubikSSL run into `network.encoder`. A shape mismatch is refused.
    stages: load only the first K encoder stages (partial transfer); the others, and a pretrained decoder that was
    trained on top of them, stay random and are reported as fresh.

    Returns the report and the pretraining model card."""
    path = pretrained_model_file(run_or_file)
    state, card = checkpoint.load_model(path, "rubikssl pretrain")
    pretrained = {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    if not pretrained:
        raise BadInput(f"{path}: holds no encoder weights; point --init to a run of `rubikssl pretrain`")
    depth = len(network.encoder.config.widths)
    if stages is not None and not 1 <= stages <= depth:
        raise BadInput(f"--init-stages {stages}: this encoder has {depth} stages; give 1 to {depth}")
    report = LoadReport()
    if stages is not None and stages < depth:
        report.fresh = sorted(k for k in pretrained if int(k.split(".")[1]) >= stages)
        pretrained = {k: v for k, v in pretrained.items() if int(k.split(".")[1]) < stages}
    target = network.encoder.state_dict()
    guidance = getattr(network, "guidance_channels", 0)
    for name, tensor in pretrained.items():
        if name not in target:
            report.unexpected.append(name)
            continue
        wanted = target[name].shape
        if _adaptable(tensor, wanted, guidance):
            tensor = adapt_input_channels(tensor, wanted[1] - guidance, guidance)
            report.adapted.append(name)
        if tensor.shape != wanted:
            raise BadInput(
                f"{path}: encoder tensor {name} has shape {tuple(tensor.shape)} but the network needs {tuple(wanted)}; "
                "fine-tune with the encoder settings of the pretraining run (its config.json)"
            )
        target[name] = tensor
        report.loaded.append(name)
    report.missing = [name for name in target if name not in pretrained and name not in report.fresh]
    network.encoder.load_state_dict(target, strict=True)
    if card.get("pretrains_decoder") and not report.fresh:
        prefix = card.get("decoder_prefix", "")  # head. (heads.<task>. when combined); "" before 0.2
        state = models.upgrade_unet_names(state, prefix)
        decoder = {k[len(prefix) + len(DECODER_PREFIX):]: v for k, v in state.items()
                   if k.startswith(prefix + DECODER_PREFIX)}
        load_decoder(network, decoder, path, report)
    return report, card


def adapt_skip_input(weight: torch.Tensor, features: int, channels: int, guidance: int = 0) -> torch.Tensor:
    """The decoder's last block reads (upsampled features, input image) concatenated: (out, features + c, k, k, k)
    pretrained on c = 1 image channel, for `channels` image channels (the image part repeated and divided) and
    `guidance` click maps (zero)."""
    return torch.cat([weight[:, :features], adapt_input_channels(weight[:, features:], channels, guidance)], dim=1)


def load_decoder(network: nn.Module, pretrained: dict[str, torch.Tensor], path: Path, report: LoadReport) -> None:
    """Copy a restoration task's U-Net decoder into `network.decoder`, strictly: every tensor is loaded, adapted to
    more input channels (reported), or refused. The output head stays random (its classes differ). A network
    without a U-Net decoder (DUC) uses none of it, which the report says."""
    if not isinstance(getattr(network, "decoder", None), models.UNetDecoder):
        report.decoder_unused = len(pretrained)
        return
    target = network.decoder.state_dict()
    missing, unexpected = sorted(set(target) - set(pretrained)), sorted(set(pretrained) - set(target))
    if missing or unexpected:
        raise BadInput(f"{path}: its U-Net decoder does not match this network (missing {missing[:3]}, unexpected "
                       f"{unexpected[:3]}); fine-tune with the encoder settings of the pretraining run")
    features = network.encoder.config.widths[0]
    guidance = getattr(network, "guidance_channels", 0)
    for name, tensor in pretrained.items():
        wanted = target[name].shape
        if (tensor.shape != wanted and name == STEM_BLOCK_WEIGHT
                and tensor.shape[1] - features in (1, wanted[1] - features - guidance)):
            tensor = adapt_skip_input(tensor, features, wanted[1] - features - guidance, guidance)
            report.adapted.append(DECODER_PREFIX + name)
        if tensor.shape != wanted:
            raise BadInput(f"{path}: decoder tensor {name} has shape {tuple(tensor.shape)} but the network needs "
                           f"{tuple(wanted)}; fine-tune with the encoder settings of the pretraining run")
        target[name] = tensor
    network.decoder.load_state_dict(target, strict=True)
    report.decoder = sorted(DECODER_PREFIX + name for name in target)


def load_finetuned_weights(network: nn.Module, run_or_file: str | Path, classes: list[dict],
                           values_only: bool = False) -> dict:
    """Every weight of a fine-tuned model into `network` (continuing its training on more cases): the model must
    have the same classes (label values and names; values only for an interactive model, whose one object a user
    may name anyhow) and the same network, else it is refused with the reason. Returns the model-card report
    ("init") with the model's own class names."""
    path = pretrained_model_file(run_or_file)
    state, card = checkpoint.load_model(path, "rubikssl finetune")
    if "classes" not in card or card.get("task") not in ("segment", "classify"):
        raise BadInput(f"{path}: is not a fine-tuned model; --resume-from takes a run of rubikssl finetune")
    theirs = [(c["value"],) if values_only else (c["value"], c["name"]) for c in card["classes"]]
    ours = [(c["value"],) if values_only else (c["value"], c["name"]) for c in classes]
    if theirs != ours:
        raise BadInput(f"{path}: its classes {theirs} differ from the new data's {ours}; label the new cases with the "
                       "model's classes")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise BadInput(f"{path}: its network differs from this one ({str(error).splitlines()[0][:100]}); continue it "
                       "with its own settings (they are read from its card)") from None
    return {"resumed_from": str(path), "previous_step": card.get("step"), "previous_data": card.get("data", {}).get("train"),
            "class_names": [c["name"] for c in card["classes"]]}
