"""Atomic file writes: a reader (or a killed writer) never sees a half-written file."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def temp_path_for(path: Path) -> Path:
    """A sibling temp name that keeps the extension (SimpleITK picks the format from it)."""
    return path.with_name(f".tmp{os.getpid()}-{path.name}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path to write; on success fsync it and rename it over `path`, on failure delete it.
    A missing parent folder is created, as a user naming `results/case1.seg.nrrd` expects."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # some writers create 0600 temp files
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def remove_stale_temp_files(folder: Path) -> None:
    """Delete temp files left by a killed writer: ours (.tmp<pid>-name) and safetensors' own (.tmpXXXXXX).
    They are never the only copy of anything; call this only while holding the folder's lock."""
    for stale in folder.glob(".tmp*"):
        stale.unlink(missing_ok=True)
