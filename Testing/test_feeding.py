"""DataLoader workers on CUDA follow the machine: the cores and the measured sample and step times. The rule is
exact arithmetic; the measurement runs here on CPU (the same code the CUDA path runs, with the device switched)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ADRENAL
from RubikSSLLib import feeding, training
from RubikSSLLib.config import PretrainConfig
from RubikSSLLib.networks import EncoderConfig
from RubikSSLLib.progress import Reporter
from RubikSSLLib.puzzle import PuzzleSpec


@pytest.mark.parametrize("cores, sample_ms, step_ms, batch, processes, expected", [
    (16, 10, 20, 8, 1, 5),     # 8 samples x 10 ms in 20 ms: 4 workers, 5 with the headroom
    (4, 10, 20, 8, 1, 3),      # ...but 4 cores leave 3 beside the training process
    (16, 10, 20, 8, 2, 5),     # two training processes on 16 cores: 7 spare each
    (16, 10, 20, 8, 4, 3),     # four: 3 spare each
    (16, 5, 1000, 8, 1, 1),    # a slow step needs one worker, never zero
    (1, 50, 10, 8, 1, 1),      # one core: one worker all the same (the step waits; CUDA still gains from overlap)
    (64, 40, 10, 16, 1, 63),   # a sampler far slower than the step takes every spare core
])
def test_workers_needed_keeps_the_step_fed_within_the_cores(cores: int, sample_ms: float, step_ms: float, batch: int,
                                                          processes: int, expected: int) -> None:
    assert feeding.workers_needed(cores, sample_ms / 1e3, step_ms / 1e3, batch, processes) == expected


def test_the_measured_choice_leaves_the_model_and_the_training_stream_as_they_were(tmp_path: Path) -> None:
    """Measured on a real case: a positive sample and step time, a worker count within the usable cores, one log
    line saying why; the model's weights, BatchNorm statistics and gradients untouched, so a run that measured
    trains exactly as one that did not."""
    config = PretrainConfig(data=[str(ADRENAL)], out=str(tmp_path / "run"), task="rubik",
                            encoder=EncoderConfig(1, (8, 16, 32), (1, 2, 2)), spacing_mm=None, batch_size=4,
                            puzzle=PuzzleSpec(cube_size=(12, 12, 12), jitter=(2, 2, 2)), val_puzzles=4,
                            shortcut_puzzles=0, device="cpu")
    lines: list[str] = []
    reporter = Reporter("none")
    reporter.log = lines.append
    run = training.Pretraining(config, reporter)
    run._setup()
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    workers = run.measured_workers()
    assert 1 <= workers <= max(1, feeding.usable_cores() - 1)
    said = [line for line in lines if "DataLoader workers" in line]
    assert len(said) == 1 and said[0].startswith(f"data: {workers} DataLoader workers") and "--workers N" in said[0]
    after = run.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in run.model.parameters())
    fresh = training.Pretraining(config.__class__(**{**config.__dict__, "out": str(tmp_path / "other")}), Reporter("none"))
    fresh._setup()
    first, other = next(run._loader()), next(fresh._loader())
    assert all(torch.equal(first[k], other[k]) for k in first)


def test_seconds_per_sample_uses_its_own_generator() -> None:
    drawn: list[float] = []
    seconds = feeding.seconds_per_sample(lambda rng: drawn.append(float(rng.random())), count=4)
    assert seconds >= 0 and len(drawn) == 5
    assert drawn == list(np.random.default_rng(12345).random(5))
