"""Pretraining runs: it learns on real data, and it survives cancel, kill -9, resume, a second process and DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ADRENAL, REPO, TINY_RUN, rubikssl
from RubikSSLLib import checkpoint, progress, rundir, training
from RubikSSLLib.config import PretrainConfig
from RubikSSLLib.networks import EncoderConfig
from RubikSSLLib.progress import Reporter
from RubikSSLLib.puzzle import PuzzleSpec


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "RubikSSLLib", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)


def wait_for_progress(process: subprocess.Popen, min_step: int = 1, timeout: float = 120) -> list[dict]:
    """Read the JSON events of a running process until a progress event reaches `min_step`."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            pytest.fail(f"process ended early: {process.wait()} {process.stderr.read()}")
        event = progress.parse_line(line)
        if event:
            seen.append(event)
            if event["event"] == "progress" and event["step"] >= min_step:
                return seen
    pytest.fail("no progress in time")


def load_state(run: Path) -> dict:
    config = PretrainConfig.read(run / rundir.CONFIG)
    model = training.build_model(config)
    optimizer = torch.optim.Adam(model.parameters())
    return checkpoint.load_training_state(run / rundir.TRAINING_STATE, model, optimizer)


@pytest.mark.slow
def test_pretraining_on_real_volumes_learns_the_puzzle(tmp_path: Path) -> None:
    """AdrenalMNIST3D 64^3: 1188 training volumes, validation puzzles from the 98 held-out ones."""
    config = PretrainConfig(
        data=[str(ADRENAL)], out=str(tmp_path / "run"), steps=160, eval_every=80, val_puzzles=128,
        puzzle=PuzzleSpec(cube_size=(28, 28, 28), jitter=(4, 4, 4)), spacing_mm=None, warmup_steps=20,
    )
    metrics = training.Pretraining(config, Reporter("none")).run()
    # chance is 1/100 for ordering and 1/3 per cube for orientation
    assert metrics["val_ordering_acc"] > 0.25, metrics
    assert metrics["val_orientation_acc"] > 0.34, metrics
    history = [json.loads(line) for line in (tmp_path / "run" / rundir.METRICS).read_text().splitlines()]
    assert [h["step"] for h in history] == [80, 160]
    card = json.loads((tmp_path / "run" / "model.json").read_text())
    assert card["task"] == "rubik" and len(card["permutations"]) == 100
    assert card["data"]["train"][0]["sha256"] and len(card["data"]["train"][0]["indices"]) == 1188
    assert card["normalisation"]["canonical_orientation"] == "LPS"
    shortcut = card["puzzle_shortcut"]  # checked before training: these centred masks give the order away
    assert shortcut["trivial_ordering_acc"] > 10 * shortcut["chance_ordering"] and shortcut["smaller_cubes"], shortcut
    model, _ = training.load_pretrained(tmp_path / "run")
    assert not model.training


def test_json_progress_is_monotone_and_ends_with_done(small_adrenal: Path, tmp_path: Path) -> None:
    result = rubikssl("pretrain", "--data", str(small_adrenal), "--out", str(tmp_path / "run"), "--steps", "12",
                      "--eval-every", "6", *TINY_RUN)
    assert result.returncode == 0, result.stderr
    events = [e for e in map(progress.parse_line, result.stdout.splitlines()) if e]
    steps = [e["step"] for e in events if e["event"] == "progress"]
    assert steps == sorted(steps) and steps[-1] == 12
    # the share of the time spent waiting for the sampler (on a CPU, without workers, it makes every batch)
    assert all(0 < e["data_wait"] < 1 and e["puzzles_per_s"] > 0 for e in events if e["event"] == "progress")
    assert [e["step"] for e in events if e["event"] == "metric"] == [6, 12]
    assert events[-1]["event"] == "done" and events[-1]["exit_code"] == 0
    assert any(e["event"] == "artifact" and e["kind"] == "model" for e in events)
    assert sum("puzzle shortcut check" in e.get("message", "") for e in events if e["event"] == "log") == 1


def test_resume_continues_from_the_checkpoint(small_adrenal: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert rubikssl("pretrain", "--data", str(small_adrenal), "--out", str(run), "--steps", "6", "--eval-every", "3",
                    *TINY_RUN).returncode == 0
    first = load_state(run)
    assert first["step"] == 6
    again = rubikssl("pretrain", "--data", str(small_adrenal), "--out", str(run), "--steps", "6", *TINY_RUN)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = rubikssl("pretrain", "--data", str(small_adrenal), "--out", str(run), "--steps", "10", "--resume", *TINY_RUN)
    assert resumed.returncode == 0, resumed.stderr
    steps = [e["step"] for e in map(progress.parse_line, resumed.stdout.splitlines()) if e and e["event"] == "progress"]
    assert steps[0] > 6 and steps[-1] == 10
    assert load_state(run)["step"] == 10
    assert [json.loads(line)["step"] for line in (run / rundir.METRICS).read_text().splitlines()] == [3, 6, 9, 10]
    # the shortcut check ran once, before the first step; the resumed run carries its result forward
    assert "puzzle shortcut check" not in resumed.stdout
    assert json.loads((run / "model_last.json").read_text())["puzzle_shortcut"]["puzzles"] == 2000


@pytest.mark.parametrize("how", ["stop_file", "sigterm"])
def test_cancel_checkpoints_and_exits_3(small_adrenal: Path, tmp_path: Path, how: str) -> None:
    run = tmp_path / "run"
    process = start("pretrain", "--data", str(small_adrenal), "--out", str(run), "--steps", "100000",
                    "--eval-every", "100000", *TINY_RUN)
    wait_for_progress(process, min_step=5)
    if how == "stop_file":
        (run / rundir.STOP).touch()
    else:
        process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 3, stderr
    assert "cancelled" in stderr and "--resume" in stderr
    done = [e for e in map(progress.parse_line, stdout.splitlines()) if e and e["event"] == "done"]
    assert done[-1]["status"] == "cancelled" and done[-1]["exit_code"] == 3
    state = load_state(run)
    assert state["step"] >= 5
    # a resumed run does not stop on the old STOP request
    resumed = rubikssl("pretrain", "--data", str(small_adrenal), "--out", str(run), "--steps", str(state["step"] + 2),
                       "--resume", *TINY_RUN)
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_cancel_sent_to_the_process_group_of_a_run_with_workers_keeps_its_steps(small_adrenal: Path, tmp_path: Path,
                                                                                 signum: int) -> None:
    """The panel's SIGTERM and a terminal's Ctrl-C reach the DataLoader workers too (one process group): the run must
    still checkpoint what it trained and exit 3 (the workers killed by it took the cancel's BN batches with them,
    and the run folder, with nothing saved yet, was removed), then resume."""
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "RubikSSLLib", "pretrain", "--data", str(small_adrenal), "--out",
                                str(run), "--steps", "100000", "--eval-every", "100000", *TINY_RUN, "--workers", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True)
    wait_for_progress(process, min_step=5)
    os.killpg(process.pid, signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 3, stderr
    assert "continue with --resume" in stderr
    state = load_state(run)
    assert state["step"] >= 5
    resumed = rubikssl("pretrain", "--data", str(small_adrenal), "--out", str(run), "--steps", str(state["step"] + 2),
                       "--resume", *TINY_RUN, "--workers", "1")
    assert resumed.returncode == 0, resumed.stderr
    assert load_state(run)["step"] == state["step"] + 2


@pytest.mark.slow
def test_kill_9_never_leaves_an_unloadable_checkpoint(small_adrenal: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    rng = np.random.default_rng(0)
    for attempt in range(4):
        process = start("pretrain", "--data", str(small_adrenal), "--out", str(run), "--steps", "100000",
                        "--eval-every", "1", *TINY_RUN, *(["--resume"] if attempt else []))
        wait_for_progress(process, min_step=1)
        time.sleep(float(rng.uniform(0.0, 1.5)))
        process.kill()
        process.communicate()
        if (run / rundir.TRAINING_STATE).exists():
            load_state(run)
            checkpoint.load_model(run / rundir.BEST_MODEL)
    step = load_state(run)["step"]
    assert step >= 1
    finished = rubikssl("pretrain", "--data", str(small_adrenal), "--out", str(run), "--steps", str(step + 1), "--resume",
                        *TINY_RUN)
    assert finished.returncode == 0, finished.stderr
    assert not list(run.glob(".tmp*"))


def test_a_second_process_on_the_same_run_folder_is_refused(small_adrenal: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    process = start("pretrain", "--data", str(small_adrenal), "--out", str(run), "--steps", "100000",
                    "--eval-every", "100000", *TINY_RUN)
    try:
        wait_for_progress(process)
        second = rubikssl("pretrain", "--data", str(small_adrenal), "--out", str(run), "--steps", "5", "--resume", *TINY_RUN)
        assert second.returncode == 2
        assert "another rubikssl process" in second.stderr
    finally:
        (run / rundir.STOP).touch()
        process.communicate(timeout=120)
    assert process.returncode == 3


def test_corrupt_checkpoint_is_refused_on_resume_and_left_in_place(small_adrenal: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert rubikssl("pretrain", "--data", str(small_adrenal), "--out", str(run), "--steps", "2", *TINY_RUN).returncode == 0
    state = run / rundir.TRAINING_STATE
    state.write_bytes(state.read_bytes()[:1000])
    result = rubikssl("pretrain", "--data", str(small_adrenal), "--out", str(run), "--steps", "4", "--resume", *TINY_RUN)
    assert result.returncode == 2 and "checkpoint.safetensors" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert state.stat().st_size == 1000


@pytest.mark.slow
def test_distributed_data_parallel_with_two_gloo_processes(small_adrenal: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "RubikSSLLib",
         "pretrain", "--data", str(small_adrenal), "--out", str(run), "--steps", "4", "--eval-every", "2", *TINY_RUN],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=environment,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    events = [e for e in map(progress.parse_line, result.stdout.splitlines()) if e]
    assert [e["step"] for e in events if e["event"] == "metric"] == [2, 4]  # rank 0 alone reports
    assert sum(e["event"] == "done" for e in events) == 1
    assert load_state(run)["step"] == 4


def test_learning_rate_schedule_warms_up_then_decays() -> None:
    config = PretrainConfig(data=["x"], out="y", steps=1000, warmup_steps=100, learning_rate=1e-3)
    rates = [training.learning_rate_at(step, config) for step in range(1000)]
    assert rates[0] == pytest.approx(1e-5) and rates[99] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[100:], rates[101:]))
    assert rates[-1] == pytest.approx(1e-5, rel=0.01)


def test_batchnorm_recalibration_replaces_stale_statistics() -> None:
    config = PretrainConfig(data=["x"], out="y", encoder=EncoderConfig(widths=(8, 16), depths=(1, 1)))
    model = training.build_model(config)
    norm = model.encoder.stages[0][0][1]
    norm.running_mean.fill_(100.0)
    cubes = torch.randn(4, 8, 1, 12, 12, 12) * 2 + 3
    batches = iter([{"cubes": cubes}] * 3)
    training.recalibrate_batchnorm(model, batches, 3, torch.device("cpu"))
    conv_out = model.encoder.stages[0][0][0](cubes.flatten(0, 1))
    torch.testing.assert_close(norm.running_mean, conv_out.mean(dim=(0, 2, 3, 4)), atol=1e-4, rtol=1e-4)
    assert norm.momentum == 0.1


def test_a_run_that_finishes_puzzles_on_the_device_trains_what_a_cpu_run_trains(tmp_path: Path, monkeypatch) -> None:
    """On a GPU the sampler only gathers and the batch is turned and scaled on the device (devicepuzzle): with the
    same seed it must train the very weights of the CPU path. Forced here on the CPU - the same code, the device
    switched - on a real MRI with its intensity window."""
    from conftest import HEAD_MR
    from safetensors.torch import load_file

    from RubikSSLLib.tasks.rubik import RubikTask

    def train(name: str) -> tuple[dict, list[str]]:
        out = tmp_path / name
        result = rubikssl("pretrain", "--data", str(HEAD_MR), "--out", str(out), "--steps", "4", "--eval-every", "2",
                          *TINY_RUN, "--intensity", "mri", "--progress", "none", "--shortcut-puzzles", "0")
        assert result.returncode == 0, result.stderr
        return load_file(out / "model.safetensors"), (out / rundir.METRICS).read_text().splitlines()

    cpu_weights, cpu_metrics = train("sampler")
    seen = []
    real_finish = RubikTask.network_input

    def finishing_on_device(self, batch):
        seen.append((self.finish_on_device, "window" in batch))
        return real_finish(self, batch)

    monkeypatch.setattr(RubikTask, "place_finishing", lambda self, device: setattr(self, "finish_on_device", True))
    monkeypatch.setattr(RubikTask, "network_input", finishing_on_device)
    device_weights, device_metrics = train("device")
    # the training forwards finished raw batches; the shortcut check's own task read finished ones
    assert sum(on_device for on_device, _ in seen) >= 4 and all(on_device == raw for on_device, raw in seen)
    assert device_metrics == cpu_metrics
    assert cpu_weights.keys() == device_weights.keys()
    assert all(torch.equal(cpu_weights[k], device_weights[k]) for k in cpu_weights)


def test_a_run_fed_by_a_worker_trains_what_a_run_without_workers_trains(small_adrenal: Path, tmp_path: Path) -> None:
    """`--workers 1` hands the batches through the worker's reused shared-memory slots (batchslots.py), with BN
    recalibration and evaluation drawing from the same loader: the weights and metrics must be those of the run that
    makes its batches in the training process (one worker draws the same seeded stream)."""
    from safetensors.torch import load_file

    def train(workers: str) -> tuple[dict, list[str]]:
        out = tmp_path / f"workers{workers}"
        result = rubikssl("pretrain", "--data", str(small_adrenal), "--out", str(out), "--steps", "4", "--eval-every",
                          "2", *TINY_RUN, "--progress", "none", "--shortcut-puzzles", "0", "--workers", workers)
        assert result.returncode == 0, result.stderr
        return load_file(out / "model.safetensors"), (out / rundir.METRICS).read_text().splitlines()

    (alone, alone_metrics), (fed, fed_metrics) = train("0"), train("1")
    assert fed_metrics == alone_metrics and len(fed_metrics) >= 2
    assert alone.keys() == fed.keys() and all(torch.equal(alone[k], fed[k]) for k in alone)
