"""Checkpoints and model files: safetensors only (never pickle), one file per save, written atomically.

Each file's header metadata carries {"format": FORMAT, "kind": ..., "card" or "state": JSON}, so a file is
self-describing and a kill between two writes can never pair weights with the wrong description.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from RubikSSLLib.errors import BadInput
from RubikSSLLib.files import atomic_path, write_json_atomic

FORMAT = "rubikssl"
FORMAT_VERSION = 1


def _save(path: Path, tensors: dict[str, torch.Tensor], kind: str, payload_key: str, payload: dict) -> None:
    tensors, aliases = _without_aliases(tensors)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "kind": kind, payload_key: json.dumps(payload)}
    if aliases:
        metadata[ALIASES] = json.dumps(aliases)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


ALIASES = "aliases"  # names under which a module is registered twice (nnU-Net's conv blocks: `conv` and `all_modules.0`)


def _without_aliases(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Each tensor once (safetensors refuses shared memory), and alias -> kept name for the others."""
    kept: dict[tuple, str] = {}
    unique, aliases = {}, {}
    for name in sorted(tensors):
        tensor = tensors[name]
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and key in kept:
            aliases[name] = kept[key]
        else:
            kept[key] = name
            unique[name] = tensor
    return {name: unique[name] for name in tensors if name in unique}, aliases


def _open(path: Path, kind: str, payload_key: str, written_by: str = "rubikssl") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a RubikSSL safetensors file of `kind`; anything else is refused with a one-line BadInput."""
    if not path.is_file():
        where = "no such file or folder" if not path.parent.is_dir() or not path.suffix else "no such file"
        raise BadInput(f"{path}: {where}; point to a run folder written by {written_by}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise BadInput(f"{path}: is not a RubikSSL checkpoint (no RubikSSL header); use a file written by rubikssl")
            if metadata.get("kind") != kind:
                raise BadInput(f"{path}: holds a RubikSSL {metadata.get('kind')!r}, not a {kind!r}; pick the right file")
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        for alias, name in json.loads(metadata.get(ALIASES, "{}")).items():
            tensors[alias] = tensors[name]
        return tensors, json.loads(metadata[payload_key])
    except (SafetensorError, OSError, ValueError, KeyError) as error:
        raise BadInput(f"{path}: corrupt or not a safetensors checkpoint ({str(error)[:120]}); restore it or start a new run") from None


def read_card(path: Path) -> dict:
    """The model card of a model file, read from the safetensors header alone (no weights are loaded)."""
    if not Path(path).is_file():
        raise BadInput(f"{path}: no such model file; point to a run folder written by rubikssl")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise BadInput(f"{path}: corrupt or not a safetensors model ({str(error)[:120]}); restore it or retrain") from None
    if metadata.get("format") != FORMAT or metadata.get("kind") != "model":
        raise BadInput(f"{path}: is not a RubikSSL model file; use a model.safetensors written by rubikssl")
    try:
        card = json.loads(metadata["card"])
    except (KeyError, ValueError) as error:
        raise BadInput(f"{path}: its model card is unreadable ({error}); restore the file or retrain") from None
    if not isinstance(card, dict):
        raise BadInput(f"{path}: its model card is not a JSON object; restore the file or retrain")
    return card


def save_model(path: Path, state: dict[str, torch.Tensor], card: dict) -> None:
    """Weights + model card in one file, and a readable copy of the card as `<name>.json` beside it."""
    _save(path, state, "model", "card", card)
    write_json_atomic(path.with_suffix(".json"), card)


def load_model(path: Path, written_by: str = "rubikssl") -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, model card) of a model file written by `save_model` (`written_by`: the command that writes
    such a model, for the message when it is missing)."""
    return _open(path, "model", "card", written_by)


def save_training_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Everything --resume needs: model weights and buffers, optimizer moments, and a JSON `state`."""
    tensors = {f"model.{name}": t for name, t in model.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    for index, moments in optimizer_state["state"].items():
        for key, value in moments.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
    state = {**state, "param_groups": optimizer_state["param_groups"]}
    _save(path, tensors, "training_state", "state", state)


def load_training_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model and optimizer from `save_training_state`; returns the JSON state."""
    tensors, state = _open(path, "training_state", "state")
    model_state = {name[len("model."):]: t for name, t in tensors.items() if name.startswith("model.")}
    try:
        model.load_state_dict(model_state, strict=True)
    except RuntimeError as error:
        raise BadInput(f"{path}: does not fit this network ({str(error).splitlines()[0][:120]}); resume with the run's own config") from None
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            moments.setdefault(int(index), {})[key] = tensor
    optimizer.load_state_dict({"state": moments, "param_groups": state.pop("param_groups")})
    return state

