"""Command-line options derived from config dataclasses, so that each default and help text is written once.

A config field becomes an option when its metadata carries `option(...)`; a field whose type is itself a settings
dataclass (a PuzzleSpec, an EncoderConfig) contributes its own marked fields, flattened. Only the options the user
gave are handed back (`given`), so the dataclass defaults, and a task's own default crop, stay the only defaults.
Imports neither torch nor MONAI: the Slicer panel builds the same configs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from typing import Any

OPTION = "rubikssl_option"
DERIVED = "rubikssl_derived"  # metadata of a field computed from the others when left at None (rebuilt on change)


def option(help: str, flag: str | None = None, parse: Callable[[str], Any] | None = None,
           choices: tuple | None = None, metavar: str | None = None, default_note: str | None = None) -> dict:
    """Field metadata that puts the field on the command line (flag defaults to --field-name).
    default_note: how --help states a default that is not a plain value."""
    return {OPTION: {"help": help, "flag": flag, "parse": parse, "choices": choices, "metavar": metavar,
                     "default_note": default_note}}


def voxel_triple(text: str) -> tuple[int, int, int]:
    """'32' -> (32, 32, 32); '16,32,32' -> (z, y, x) = (16, 32, 32)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give one integer or three as z,y,x") from None
    if len(values) not in (1, 3):
        raise argparse.ArgumentTypeError(f"{text!r}: give one integer or three as z,y,x")
    return tuple(values * 3 if len(values) == 1 else values)


def int_list(text: str) -> tuple[int, ...]:
    """'16,32,64' -> (16, 32, 64)."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers separated by commas, as 16,32,64") from None


def float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers separated by commas, as 0.1,0.25,1") from None


def spacing(text: str) -> float | None:
    """Millimetres, or None for 'native' (the file's own grid)."""
    if text.lower() in ("native", "none", "0"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a spacing in mm, or 'native'") from None


def _flag(field: dataclasses.Field) -> str:
    return field.metadata[OPTION]["flag"] or "--" + field.name.replace("_", "-")


def _marked(cls: type, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dataclasses.Field, Any]]:
    """(path of field names, field, default) of every option of `cls`, nested settings flattened."""
    found = []
    for field in dataclasses.fields(cls):
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
        if OPTION in field.metadata:
            found.append((prefix + (field.name,), field, default))
        elif dataclasses.is_dataclass(default):
            found += _marked(type(default), prefix + (field.name,))
    return found


def _describe(value: Any) -> str:
    if isinstance(value, tuple) and len(set(value)) == 1 and len(value) == 3:
        return str(value[0])
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return "native" if value is None else str(value)


def add_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                required: tuple[str, ...] = ()) -> None:
    """Add an option for every marked field of `cls` (by flattened field name), except `skip`; `required`: the
    fields the user must give."""
    for path, field, default in _marked(cls):
        name = path[-1]
        if name in skip:
            continue
        spec = field.metadata[OPTION]
        kwargs: dict[str, Any] = {"dest": "__".join(path), "help": spec["help"], "default": argparse.SUPPRESS}
        if isinstance(default, bool):
            kwargs["action"] = "store_false" if default else "store_true"
        else:
            kwargs["type"] = spec["parse"] or (type(default) if default is not None else str)
            if spec["choices"]:
                kwargs["choices"] = spec["choices"]
            if not spec["choices"]:
                kwargs["metavar"] = spec["metavar"] or _flag(field)[2:].upper().replace("-", "_")
        if name in required:
            kwargs["required"] = True
        elif not isinstance(default, bool):
            note = spec["default_note"] or _describe(default)
            kwargs["help"] += f" (default {note})"
        if field.type in ("list[str]", "list[str] | None") and "action" not in kwargs:
            kwargs["nargs"] = "+"
        kwargs["help"] = kwargs["help"].replace("%", "%%")  # argparse formats help with %-substitution
        parser.add_argument(_flag(field), **kwargs)


def given(args: argparse.Namespace) -> dict[str, Any]:
    """The options the user gave, nested by field path: {"puzzle": {"cube_size": ...}, "steps": 10}."""
    nested: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if "__" not in dest and dest in ("command", "handler", "progress", "resume"):
            continue
        *parents, name = dest.split("__")
        level = nested
        for parent in parents:
            level = level.setdefault(parent, {})
        level[name] = value
    return nested


def build(cls: type, values: dict[str, Any], base: Any = None) -> Any:
    """An instance of `cls` from nested `values`, over `base` (an instance whose other fields are kept) or the
    dataclass defaults. Nested settings are rebuilt through their own constructors, so their checks run."""
    current = {f.name: getattr(base, f.name) for f in dataclasses.fields(cls)} if base is not None else {}
    for field in dataclasses.fields(cls):
        if field.name not in values:
            continue
        value = values[field.name]
        if isinstance(value, dict) and not field.type.startswith("dict"):
            inner = current.get(field.name)
            if inner is None:
                inner = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            derived = {f.name: f.default for f in dataclasses.fields(inner)
                       if f.metadata.get(DERIVED) and f.name not in value}
            value = dataclasses.replace(inner, **derived, **value)
        current[field.name] = value
    return cls(**current)


def check_range(name: str, value: float | None, low: float, high: float, low_open: bool = False) -> None:
    """Refuse a value outside [low, high] ((low, high] with low_open), NaN or infinite, naming its flag."""
    from RubikSSLLib.errors import BadInput

    if value is None:
        return
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > low if low_open else value >= low) \
        and value <= high
    if not ok:
        bound = f"{'above' if low_open else 'at least'} {low:g} and at most {high:g}"
        raise BadInput(f"--{name.replace('_', '-')} {value}: must be a number {bound}")
