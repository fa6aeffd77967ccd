"""bench_gpu.py, the one command for a machine with a GPU: what can be checked of it on a CPU."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "Testing" / "Benchmarks"))
import bench_gpu  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the benchmark would run")
def test_without_cuda_it_says_so_exits_0_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert bench_gpu.main(["--out", str(tmp_path / "out")]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    assert bench_gpu.cuda_missing("cpu") is None


def test_worker_counts_are_parsed_and_bad_ones_refused(capsys: pytest.CaptureFixture) -> None:
    args = bench_gpu.parse_arguments(["--workers", "0,3,6"])
    assert args.sizes.workers == (0, 3, 6) and args.sizes.cube == bench_gpu.FULL.cube
    assert bench_gpu.parse_arguments(["--tiny"]).sizes == bench_gpu.TINY
    for bad in ("two", "-1,2"):
        with pytest.raises(SystemExit) as stop:
            bench_gpu.parse_arguments([f"--workers={bad}"])
        assert stop.value.code == 2 and f"--workers {bad}" in capsys.readouterr().err


def test_the_steady_rate_leaves_out_the_warm_up_and_refuses_too_few_events() -> None:
    """Three progress events of a run at batch 4: steps 5, 10, 15 at cumulative 2, 4, 5 puzzles/s: the time to
    step 10 is 10 s, to step 15 is 12 s, so 5 steps (20 puzzles) took 2 s between them: 10 puzzles/s."""
    events = [{"event": "progress", "step": step, "puzzles_per_s": rate, "data_wait": wait}
              for step, rate, wait in ((5, 2.0, 0.9), (10, 4.0, 0.5), (15, 5.0, 0.25))]
    rate, wait = bench_gpu.steady_rate([{"event": "log"}] + events)
    assert rate == pytest.approx(10.0) and wait == 0.25
    with pytest.raises(ValueError, match="2 progress events"):
        bench_gpu.steady_rate(events[:2])


def test_the_report_has_a_row_per_measurement() -> None:
    results = {"pretraining": [{"precision": p, "workers": w, "puzzles_per_s": 100.0 + w, "data_wait": 0.1}
                               for p in bench_gpu.PRECISIONS for w in (0, 4)],
               "finetuning": {"steps_per_s": 3.5}, "segmentation": {"seconds": 4.2, "peak_gpu_gib": 1.25},
               "click": {"median_s": 0.08, "first_s": 1.5, "clicks": 5},
               "distributed": {"backend": "nccl", "exit_code": 0, "puzzles_per_s": 99.0}}
    report = bench_gpu.tables("cuda", bench_gpu.FULL, results)
    assert report.count("| bf16 |") == 2 and "| fp32 | 4 | 104.0 | 0.10 |" in report
    for text in ("steps/s | 3.50", "240x240x155 x 2 channels: s | 4.2", "GiB | 1.25", "median of 5: s | 0.080",
                 "(nccl): exit code | 0"):
        assert text in report


@pytest.mark.slow
def test_the_cpu_run_measures_every_part_through_the_product(tmp_path: Path) -> None:
    """--device cpu --tiny: every measurement the GPU run makes, at toy sizes, on the CPU (the same code)."""
    assert bench_gpu.main(["--device", "cpu", "--tiny", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [(r["precision"], r["workers"]) for r in results["pretraining"]] == [("fp32", 1), ("bf16", 1)]
    assert all(r["puzzles_per_s"] > 0 and 0 <= r["data_wait"] <= 1 for r in results["pretraining"])
    assert results["finetuning"]["steps_per_s"] > 0
    assert results["segmentation"]["seconds"] > 0 and math.isnan(results["segmentation"]["peak_gpu_gib"])
    assert 0 < results["click"]["median_s"] < results["click"]["first_s"]
    assert results["distributed"] | {"puzzles_per_s": 0, "wall_s": 0} == {
        "backend": "gloo", "exit_code": 0, "done": True, "puzzles_per_s": 0, "wall_s": 0, "error": ""}
    assert (tmp_path / "case.seg.nrrd").exists()
