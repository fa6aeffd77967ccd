"""`rubikssl serve`: a long-lived worker that loads a model once and answers segmentation requests, one per line.

So that a click costs one network forward on a crop, not a process start and an import of torch (the Slicer
panel's interactive mode talks to it through `jobs.Job`). Requests on stdin, one JSON object per line:

    {"id": 7, "volume": ["flair.nii.gz", "t1c.nii.gz"], "clicks": [{"position": [x, y, z], "include": true}],
     "coordinateSystem": "LPS", "roi": [96, 96, 96], "out": "result.nrrd"}

`volume` (a case's channel files) is read and preprocessed once and kept (the last CACHED_VOLUMES cases);
`coordinateSystem` (LPS, default, or RAS) is that of the click positions in mm; `roi` (optional) the least
region size in voxels of the model's grid; `out` is one of
- a `.npy` file: only the region the model predicted, on the input file's own grid: a (K, J, I) array of label
  values (numpy's format, read with allow_pickle=False), and the reply says where it sits ("start_kji"); every
  voxel outside it is 0. What the Slicer panel asks for: a click on a 512x512x300 CT costs the region, not 157 MB;
- a labelmap (.nrrd, .nii.gz, written uncompressed for speed) or a .seg.nrrd of the whole volume, in the input's
  exact geometry.
Replies on stdout, one event line each (progress.PREFIX + JSON): {"event": "ready"} once, then
{"event": "result", "id": 7, "ok": true, "out": ..., "voxels": ..., "seconds": ...[, "start_kji": [k, j, i],
"shape_kji": [...]]} or {"event": "result", "id": 7, "ok": false, "error": "..."}; a bad request never ends the
worker. It ends with exit 0 on end of input or {"command": "quit"}, 3 on SIGTERM / Ctrl-C, and by itself when its
parent process dies.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from RubikSSLLib import clicks, postprocess, predict, preprocess
from RubikSSLLib.errors import EXIT_CANCELLED, EXIT_OK, BadInput, Cancelled
from RubikSSLLib.files import atomic_path
from RubikSSLLib.progress import PREFIX
from RubikSSLLib.volumes import write_volume

CACHED_VOLUMES = 2
PARENT_CHECK_S = 0.5


class Worker:
    """The loaded model and the preprocessed cases; `answer` turns one request into one reply."""

    def __init__(self, model: str, device: str = "cpu") -> None:
        self.model, self.card = predict.load_finetuned(model, "segment", device)
        self.model_loads = 1
        self.interactive = predict.is_interactive(self.card)
        self.cases: OrderedDict[tuple[str, ...], tuple[np.ndarray, Any]] = OrderedDict()
        self.case_loads = 0

    def case(self, volumes: list[str]) -> tuple[np.ndarray, Any]:
        key = tuple(str(Path(v).resolve()) for v in volumes)
        if key not in self.cases:
            self.cases[key] = preprocess.network_input(list(volumes), self.card["config"], self.card["channels"])
            self.case_loads += 1
            while len(self.cases) > CACHED_VOLUMES:
                self.cases.popitem(last=False)
        self.cases.move_to_end(key)
        return self.cases[key]

    def answer(self, request: object) -> dict:
        """The reply to one parsed request (bad requests get ok false and the reason)."""
        started = time.perf_counter()
        if not isinstance(request, dict):
            raise BadInput("a request is a JSON object with 'volume' and 'out'")
        volumes = request.get("volume")
        volumes = [volumes] if isinstance(volumes, str) else volumes
        out = request.get("out")
        if not isinstance(volumes, list) or not volumes or not isinstance(out, str):
            raise BadInput("a request needs 'volume' (a file or the case's channel files) and 'out' (a result file)")
        points = clicks.parse({"coordinateSystem": request.get("coordinateSystem", "LPS"),
                               "clicks": request.get("clicks", [])}, "request")
        if points and not self.interactive:
            raise BadInput("this model is not interactive; send no clicks, or serve a model fine-tuned with --interactive")
        image, volume = self.case(volumes)
        roi = tuple(int(v) for v in request.get("roi") or self.card["config"]["patch_size"])
        roi = tuple(max(r, p) for r, p in zip(roi, self.card["config"]["patch_size"]))
        cleaned = postprocess.parse_classes("card", self.card)
        placement = {}
        if out.endswith(".npy"):
            labels, start = predict.region_labels(self.model, self.card, image, volume, points, roi, cleaned)
            placement = {"start_kji": list(start), "shape_kji": list(labels.shape)}
        else:
            labels = predict.case_labels(self.model, self.card, image, volume, points, roi, cleaned)
        network_s = time.perf_counter() - started
        write_result(Path(out), labels, volume.native.geometry, self.card["classes"])
        return {"ok": True, "out": out, "clicks": len(points), **placement,
                "voxels": {c["name"]: int((labels == c["value"]).sum()) for c in self.card["classes"][1:]},
                "seconds": round(time.perf_counter() - started, 3), "until_labels_done_s": round(network_s, 3),
                "model_loads": self.model_loads, "case_loads": self.case_loads}


def write_result(out: Path, labels_zyx: np.ndarray, geometry, classes: list[dict]) -> None:
    """A region's labels as .npy, a labelmap (uncompressed: a click's result must be quick to write and to load)
    or a .seg.nrrd."""
    if out.name.endswith(".npy"):
        with atomic_path(out) as temporary:
            with open(temporary, "wb") as handle:
                np.save(handle, np.ascontiguousarray(labels_zyx), allow_pickle=False)
    elif out.name.endswith(".seg.nrrd"):
        with atomic_path(out) as temporary:
            predict.write_segmentation(temporary, labels_zyx, geometry, classes)
    else:
        write_volume(out, labels_zyx, geometry, compress=False)


def reply(stream: TextIO, **fields: Any) -> None:
    stream.write(PREFIX + json.dumps({"event": "result", **fields}) + "\n")
    stream.flush()


def watch_parent(parent: int) -> None:
    """End this process when the one that started it is gone (its pipes may outlive it in a grandchild)."""
    def check() -> None:
        while True:
            time.sleep(PARENT_CHECK_S)
            if os.getppid() != parent:
                os._exit(EXIT_CANCELLED)

    threading.Thread(target=check, daemon=True, name="parent-watch").start()


def serve(model: str, device: str = "cpu", requests: TextIO | None = None, replies: TextIO | None = None) -> int:
    """Answer requests until end of input or a quit command; returns the exit code (0)."""
    requests, replies = requests or sys.stdin, replies or sys.stdout
    worker = Worker(model, device)
    replies.write(PREFIX + json.dumps({"event": "ready", "interactive": worker.interactive,
                                       "classes": [c["name"] for c in worker.card["classes"]]}) + "\n")
    replies.flush()
    for line in requests:
        if not line.strip():
            continue
        request_id = None
        try:
            request = json.loads(line)
            request_id = request.get("id") if isinstance(request, dict) else None
            if isinstance(request, dict) and request.get("command") == "quit":
                break
            reply(replies, id=request_id, **worker.answer(request))
        except json.JSONDecodeError as error:
            reply(replies, id=None, ok=False, error=f"not JSON ({error.msg} at column {error.colno}); send one object per line")
        except BadInput as error:
            reply(replies, id=request_id, ok=False, error=str(error))
        except OSError as error:
            reply(replies, id=request_id, ok=False, error=f"{error.filename or 'output'}: {error.strerror}")
        except Cancelled:
            raise
        except Exception as error:  # noqa: BLE001 - one failed request must not end the session
            traceback.print_exc()
            reply(replies, id=request_id, ok=False, error=f"internal error: {type(error).__name__}: {error}")
    return EXIT_OK
