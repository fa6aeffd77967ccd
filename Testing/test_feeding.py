"""DataLoader workers on CUDA follow the machine: the cores and the measured sample and step times. The rule is
exact arithmetic; the measurement runs here on CPU (the same code the CUDA path runs, with the device switched)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ADRENAL, REPO
from RubikSSLLib import batchslots, feeding, sampling, training
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


def slot_run(tmp_path: Path, batch_size: int = 3) -> training.Pretraining:
    config = PretrainConfig(data=[str(ADRENAL)], out=str(tmp_path / "run"), task="rubik",
                            encoder=EncoderConfig(1, (8, 16), (1, 2)), spacing_mm=None, batch_size=batch_size,
                            puzzle=PuzzleSpec(cube_size=(12, 12, 12), jitter=(2, 2, 2)), val_puzzles=4,
                            shortcut_puzzles=0, device="cpu")
    run = training.Pretraining(config, Reporter("none"))
    run._setup()
    return run


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("finish_on_device", [False, True])
def test_slot_batches_are_the_dataloader_batches_and_stay_the_callers(tmp_path: Path, workers: int,
                                                                      finish_on_device: bool) -> None:
    """The workers reuse their shared-memory slots (batchslots.py): the batches must be exactly the DataLoader's over
    the same stream (same samples, same order, every field), through many rounds of every slot, and a batch the
    caller keeps must not change while its slot is written again."""
    run = slot_run(tmp_path)
    run.task.finish_on_device = finish_on_device  # as a CUDA run sets it: raw cubes and their window
    count = 3 * batchslots.SLOTS * workers

    def stream() -> sampling.SampleStream:
        return sampling.SampleStream(run.train_cases, run.task.sample, seed=5, rank=0, start_step=7)

    loader = torch.utils.data.DataLoader(stream(), batch_size=3, num_workers=workers)
    expected = list(itertools.islice(loader, count))
    slots = batchslots.SlotLoader(stream(), 3, workers, torch.device("cpu"))
    got = list(itertools.islice(slots, count))
    assert {"cubes", "order", "rotations"} <= got[0].keys() and ("window" in got[0]) == finish_on_device
    for mine, theirs in zip(got, expected, strict=True):
        assert mine.keys() == theirs.keys()
        assert all(mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]) for k in mine)
    assert not torch.equal(got[0]["cubes"], got[1]["cubes"])  # the comparison sees different batches
    # got was compared after all of it was drawn: a kept batch survived three rounds of its slot. Busy now: at most
    # the batches each worker made ahead (the bound SLOTS is sized by)
    assert max(slots.batches.busy.sum(dim=1).tolist()) <= batchslots.PREFETCH


def test_a_sample_of_another_shape_is_refused_by_name() -> None:
    batch = {"cubes": torch.zeros(2, 8, 1, 4, 4, 4)}
    with pytest.raises(ValueError, match="'cubes' is \\(8, 1, 5, 5, 5\\)"):
        batchslots._write(batch, 0, {"cubes": torch.zeros(8, 1, 5, 5, 5)})
    with pytest.raises(ValueError, match="fields"):
        batchslots._write(batch, 0, {"cubes": torch.zeros(8, 1, 4, 4, 4), "order": torch.tensor(1)})


def test_a_worker_waits_for_a_busy_slot_only_while_the_training_process_lives(tmp_path: Path) -> None:
    """After a kill -9 of the training process its slots stay busy: the worker must stop, not wait WAIT_S."""
    batches = batchslots.SlotBatches(sampling.SampleStream([], lambda *a: {}, seed=0), batch_size=2, workers=1)
    assert batches.wait_until_free(0, 1, os.getppid())  # free: no wait
    batches.busy[0, 1] = 1
    started = time.monotonic()
    assert not batches.wait_until_free(0, 1, parent=-1)  # the pid it was started by is no longer its parent's
    assert time.monotonic() - started < 1.0


def test_every_pretext_task_reaches_the_step_through_the_slots_unchanged(tmp_path: Path) -> None:
    """Each task's sample has its own fields (masks, targets, several crops, a combined task's prefixed ones): the
    slot loader must deliver the DataLoader's batches for all of them, whatever they hold."""
    from RubikSSLLib import tasks

    for name in [*tasks.REGISTRY, "rubik,mae=0.5"]:
        config = PretrainConfig(data=[str(ADRENAL)], out=str(tmp_path / name), task=name,
                                encoder=EncoderConfig(1, (8, 16), (1, 2), norm="group" if "," in name else "batch"),
                                spacing_mm=None, batch_size=2, puzzle=PuzzleSpec(cube_size=(12, 12, 12), jitter=(2, 2, 2)),
                                val_puzzles=4, shortcut_puzzles=0, device="cpu")
        run = training.Pretraining(config, Reporter("none"))
        run._setup()
        stream = sampling.SampleStream(run.train_cases, run.task.sample, seed=1)
        expected = list(itertools.islice(torch.utils.data.DataLoader(stream, batch_size=2), 3))
        got = list(itertools.islice(batchslots.SlotLoader(stream, 2, 1, torch.device("cpu")), 3))
        for mine, theirs in zip(got, expected, strict=True):
            assert mine.keys() == theirs.keys(), name
            assert all(torch.equal(mine[k], theirs[k]) for k in mine), name


def test_a_dropped_slot_loader_stops_its_copy_thread_and_its_workers(tmp_path: Path) -> None:
    """A run that ends (done, cancelled, failed) drops its loader: nothing of it may outlive it in the process - no
    copy thread, no worker process (in-process runs follow one another: tests, the demo, bench_gpu)."""
    import gc
    import multiprocessing
    import threading

    run = slot_run(tmp_path)
    slots = batchslots.SlotLoader(sampling.SampleStream(run.train_cases, run.task.sample, seed=0), 3, 2,
                                  torch.device("cpu"))
    next(slots)
    workers = multiprocessing.active_children()
    assert len(workers) >= 2 and slots.thread.is_alive()
    thread = slots.thread
    del slots
    gc.collect()
    thread.join(timeout=30)
    assert not thread.is_alive()
    deadline = time.monotonic() + 30
    while any(w.is_alive() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(w.is_alive() for w in workers)


def test_an_error_in_a_worker_reaches_the_training_process(tmp_path: Path) -> None:
    def broken(case, rng, train):
        raise ValueError("a sample that cannot be made")

    slots = batchslots.SlotLoader(sampling.SampleStream([None], broken, seed=0), 2, 1, torch.device("cpu"))
    with pytest.raises(ValueError, match="a sample that cannot be made"):
        next(slots)


def test_a_process_that_exits_with_its_slot_loader_alive_ends(tmp_path: Path) -> None:
    """The workers ignore SIGTERM from anyone else (the panel's group cancel), but the interpreter's exit terminates
    them with SIGTERM and then waits for them: a process ending with a loader still referenced (an exception's
    traceback, a global) must end, not wait for ever."""
    code = f"""
import sys, torch
sys.path.insert(0, {str(REPO / 'Testing')!r})
from pathlib import Path
from test_feeding import slot_run
from RubikSSLLib import batchslots, sampling
run = slot_run(Path({str(tmp_path)!r}))
kept = batchslots.SlotLoader(sampling.SampleStream(run.train_cases, run.task.sample, seed=0), 3, 2, torch.device("cpu"))
next(kept)
print("exiting", flush=True)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=90)
    assert result.returncode == 0 and "exiting" in result.stdout, result.stderr[-2000:]


def test_a_closed_slot_loader_says_so_instead_of_waiting(tmp_path: Path) -> None:
    run = slot_run(tmp_path)
    slots = batchslots.SlotLoader(sampling.SampleStream(run.train_cases, run.task.sample, seed=0), 3, 1,
                                  torch.device("cpu"))
    next(slots)
    slots.close()
    assert not slots.thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        while True:  # what the thread had copied ahead, then the error
            next(slots)
