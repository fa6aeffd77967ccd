"""Pretext tasks by name. Adding a task: one module with a PretextTask subclass, plus its line in taskspec.REGISTRY."""

from __future__ import annotations

from typing import TYPE_CHECKING

from RubikSSLLib import taskspec

if TYPE_CHECKING:
    from RubikSSLLib.config import PretrainConfig
    from RubikSSLLib.tasks.base import PretextTask

# The names, the --task parser and the default crops live in the light taskspec module; re-exported here.
REGISTRY, PUZZLE_TASKS, names, parse = taskspec.REGISTRY, taskspec.PUZZLE_TASKS, taskspec.names, taskspec.parse


def create(config: PretrainConfig) -> PretextTask:
    """The task named by config.task (or the combination it lists), ready to sample, build its model and score."""
    import dataclasses
    import importlib

    parts = parse(config.task)
    if len(parts) > 1 or parts[0][1] != 1.0:
        from RubikSSLLib.tasks.combined import CombinedTask

        return CombinedTask(config, [(create(dataclasses.replace(config, task=name)), weight) for name, weight in parts])
    module, cls = REGISTRY[config.task].split(":")
    return getattr(importlib.import_module(f"RubikSSLLib.tasks.{module}"), cls)(config)


def smallest_cube(config) -> int:
    """The smallest cube edge the config's encoder reads: its downsampling (RubikSSL's encoder) or twice the plan's
    largest total stride (nnU-Net's: its deepest map keeps 2 voxels, what instance norm needs)."""
    if config.network == "nnunet":
        from RubikSSLLib.tasks.base import nnunet_plan

        return 2 * max(nnunet_plan(config).total_stride)
    return config.encoder.downsampling
