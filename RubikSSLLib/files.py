"""Atomic file writes: a reader (or a killed writer) never sees a half-written file; a full disk is one line."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from RubikSSLLib.errors import BadInput


def temp_path_for(path: Path) -> Path:
    """A sibling temp name that keeps the extension (SimpleITK picks the format from it)."""
    return path.with_name(f".tmp{os.getpid()}-{path.name}")


def real_name(name: str | os.PathLike) -> str:
    """The user's file behind one of our temp names (`temp_path_for`), for messages."""
    path = Path(name)
    match = re.fullmatch(r"\.tmp\d+-(.+)", path.name)
    return str(path.with_name(match.group(1))) if match else str(path)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path to write; on success fsync it and rename it over `path`, on failure delete it.
    A missing parent folder is created, as a user naming `results/case1.seg.nrrd` expects."""
    path = Path(path)
    make_parent(path)
    tmp = temp_path_for(path)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # some writers create 0600 temp files
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        refusal = write_refusal(path, error)
        if refusal is not None:
            raise refusal from None
        raise


# safetensors (SafetensorError) and SimpleITK (RuntimeError) report a full disk in their own exception types.
DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "file too large")
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


NOT_WRITABLE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}


def write_refusal(path: Path, error: BaseException) -> BadInput | None:
    """The one line for a write of the user's `path` that failed because of the place (full disk, read-only or
    forbidden folder), naming that path and not our temp file; None for any other failure."""
    if is_disk_full(error):
        return BadInput(f"{path}: could not be written, the disk is full; free disk space or choose another --out")
    if isinstance(error, OSError) and (error.errno in NOT_WRITABLE_ERRNOS
                                       or (error.errno == errno.ENOENT and path.parent.is_dir())):
        # ENOENT in a folder that exists: a file system that creates nothing there (/proc, /sys)
        return BadInput(f"{path}: cannot be written there ({error.strerror}); choose a writable --out")
    return None


def is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    return not isinstance(error, (KeyboardInterrupt, SystemExit)) and any(t in str(error).lower() for t in DISK_FULL_TEXT)


def make_parent(path: Path) -> None:
    """Create the folder a file goes into, or say in one line why it cannot be."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise BadInput(f"{path}: a part of this path is a file, not a folder; choose another --out") from None
    except OSError as error:
        raise BadInput(f"{path.parent}: cannot be created ({error.strerror}); choose a writable --out") from None
    if not os.access(path.parent, os.W_OK):  # /proc, a read-only mount, a folder of another user's
        raise BadInput(f"{path}: its folder {path.parent} is not writable; choose a writable --out")


def _blocking_file(path: Path) -> Path | None:
    """The first existing non-folder among the parents of `path`, if any."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def check_output_file(path: str | os.PathLike) -> None:
    """Refuse an output file path that is a folder or lies below a file (before any work is done)."""
    path = Path(path)
    if path.is_dir():
        raise BadInput(f"--out {path}: is a folder; name the result file, e.g. {path / 'result'}")
    blocking = _blocking_file(path)
    if blocking is not None:
        raise BadInput(f"--out {path}: {blocking} is a file, not a folder; choose another --out")


def check_output_folder(path: str | os.PathLike) -> None:
    """Refuse an output folder path that is a file or lies below a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BadInput(f"--out {path}: is a file, not a folder; choose another --out")
    blocking = _blocking_file(path)
    if blocking is not None:
        raise BadInput(f"--out {path}: {blocking} is a file, not a folder; choose another --out")


@contextmanager
def atomic_folder(path: str | os.PathLike, last: str) -> Iterator[Path]:
    """Yield a temp sibling folder to fill; on success publish it as `path`, on failure delete it.

    A new folder appears whole (one rename). Into an existing folder (which may hold the user's other files, so it
    is never replaced) the files move one by one and `last` (the record that describes the set) goes last."""
    path = Path(path)
    check_output_folder(path)
    make_parent(path)
    tmp = path.with_name(f".tmp{os.getpid()}-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        if not path.exists():
            os.replace(tmp, path)
            return
        for file in sorted(tmp.iterdir(), key=lambda f: f.name == last):
            os.replace(file, path / file.name)
        tmp.rmdir()
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        refusal = write_refusal(path, error)
        if refusal is not None:
            raise refusal from None
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
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
