"""Which case to correct next: unlabelled volumes ranked by the model's uncertainty (MONAI Label's active learning).

A case's score is the mean predictive entropy (natural log, 0 .. ln K) of the model's softmax over the voxels it
predicts as foreground: a confident, clean segment scores low, a doubtful one high. A case where the model finds
no foreground at all cannot be scored that way; it is listed first with `found: false` (the model may be missing
the object entirely there, which is the most informative correction of all), then the others by falling score.
An interactive model is scored in its automatic mode (no clicks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from RubikSSLLib import datasources, predict, preprocess
from RubikSSLLib.devices import model_device
from RubikSSLLib.errors import BadInput
from RubikSSLLib.files import write_json_atomic
from RubikSSLLib.interactive import GUIDANCE_CHANNELS
from RubikSSLLib.progress import Reporter


def uncertainty(probabilities: np.ndarray) -> tuple[float, int]:
    """(mean entropy over the predicted foreground, foreground voxels) of (K, Z, Y, X) softmax outputs."""
    foreground = probabilities.argmax(axis=0) > 0
    if not foreground.any():
        return 0.0, 0
    p = np.clip(probabilities[:, foreground], 1e-7, 1.0)
    return float((-(p * np.log(p)).sum(axis=0)).mean()), int(foreground.sum())


def case_probabilities(model: torch.nn.Module, card: dict, image: np.ndarray) -> np.ndarray:
    """(K, Z, Y, X) softmax of a whole case; an interactive model gets empty click maps."""
    if predict.is_interactive(card):
        image = np.concatenate([image, np.zeros((GUIDANCE_CHANNELS, *image.shape[1:]), np.float32)])
    with torch.inference_mode():
        logits = sliding_window_inference(torch.from_numpy(image)[None], tuple(card["config"]["patch_size"]), 1, model,
                                          overlap=0.25, mode="gaussian", sw_device=model_device(model), device="cpu")
    return torch.softmax(logits[0].float(), dim=0).numpy()


def rank(model_dir: str, data: list[str], out: str | Path, device: str = "cpu", reporter: Reporter | None = None) -> list[dict]:
    """Score every case of `data` (unlabelled: files, folders, datalists), write the ranking to `out` and return it."""
    model, card = predict.load_finetuned(model_dir, "segment", device)
    pools = datasources.resolve(list(data))
    cases = pools.train + pools.validation
    if not cases:
        raise BadInput(f"{' '.join(data)}: no volumes found to rank; give volume files, folders or a datalist")
    rows = []
    for number, case in enumerate(cases, start=1):
        if case.npz_key:
            raise BadInput(f"{case.name}: rank reads volume files, not .npz archives; give the volumes")
        image, _ = preprocess.network_input(list(case.channels), card["config"], card["channels"])
        score, voxels = uncertainty(case_probabilities(model, card, image))
        rows.append({"case": case.name, "channels": list(case.channels), "uncertainty": round(score, 4),
                     "foreground_voxels": voxels, "found": voxels > 0})
        if reporter is not None:
            reporter.progress(number, len(cases))
    rows.sort(key=lambda row: (row["found"], -row["uncertainty"]))
    write_json_atomic(out, {"model": str(model_dir), "score": "mean predictive entropy over the predicted foreground",
                            "cases": rows})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["rank | uncertainty | foreground voxels | case", "---|---|---|---"]
    lines += [f"{i} | {r['uncertainty']:.4f}{'' if r['found'] else ' (nothing found)'} | {r['foreground_voxels']} | {r['case']}"
              for i, r in enumerate(rows, start=1)]
    return "\n".join(lines)
