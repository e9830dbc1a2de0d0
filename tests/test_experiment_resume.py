"""An experiment killed mid-grid resumes: each finished cell's record is on disk the moment the cell
ends, ``--resume`` runs only the others and reuses the teacher, and ``results.json`` equals an
uninterrupted run's except for wall-clock times (``time_s`` fields, see jacplug/experiment/records.py).

Tiny: ``test_resnet`` teacher and student on the digits at 8 px, in one process (``--workers 1``)."""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jacplug.cli.main import main

GRID = ["--teacher", "test_resnet", "--student", "test_resnet", "--image-size", "8", "--teacher-epochs", "1",
        "--samples-per-class", "2", "3", "--methods", "kd", "kd+jacobian", "--seeds", "2", "--steps", "20",
        "--batch-size", "8", "--jacobian-weights", "1", "10", "--select-at", "2", "--device", "cpu",
        "--workers", "1"]
CELLS = 2 + 2 * 2 * 2  # selection: 2 weights; main: 2 sizes x 2 methods x 2 seeds


def without_times(value):
    """``value`` without wall-clock times and the output directory: what must match exactly."""
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if not k.endswith("time_s") and k != "out"}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def cell_records(out: Path) -> list[Path]:
    return [p for p in (out / "cells").glob("*.json") if p.name != "teacher.json"] if (out / "cells").is_dir() else []


@pytest.mark.subprocess
@pytest.mark.slow
def kill_at_the_first_cell(job: subprocess.Popen, out: Path) -> None:
    """SIGKILL ``job`` the moment a cell record appears in ``out`` (or when it ended or 240 s passed)."""
    deadline = time.monotonic() + 240
    while not cell_records(out) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)


def test_a_killed_experiment_resumes_to_the_same_results(tmp_path, capsys):
    # the experiment to kill runs in its process beside the uninterrupted one in this process (one CPU
    # thread each), watched by a thread that kills it at its first finished cell
    out = tmp_path / "killed"
    job = subprocess.Popen([sys.executable, "-m", "jacplug", "experiment", *GRID, "--out", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    watcher = threading.Thread(target=kill_at_the_first_cell, args=(job, out))
    watcher.start()
    try:
        assert main(["experiment", *GRID, "--out", str(tmp_path / "straight")]) == 0
    finally:
        watcher.join()
        _, killed_err = job.communicate()
    capsys.readouterr()
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert job.returncode == -signal.SIGKILL, killed_err[-2000:]  # it was still running when killed
    kept = cell_records(out)
    assert 0 < len(kept) < CELLS and not (out / "results.json").exists()
    teacher = (out / "teacher.safetensors").stat().st_mtime_ns

    assert main(["experiment", *GRID, "--out", str(out)]) == 2  # not silently started again
    err = capsys.readouterr().err
    assert "holds an interrupted experiment" in err and "pass --resume" in err and err.count("\n") == 1
    assert main(["experiment", *GRID, "--out", str(out), "--resume", "auto", "--steps", "21"]) == 2
    err = capsys.readouterr().err
    assert "holds an experiment of another configuration: --steps 21 (saved: 20)" in err and err.count("\n") == 1

    assert main(["experiment", *GRID, "--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("[select") + printed.count("[run") == CELLS - len(kept)  # only the unfinished cells ran
    assert (out / "teacher.safetensors").stat().st_mtime_ns == teacher  # the teacher was reused
    resumed = json.loads((out / "results.json").read_text())
    assert without_times(resumed) == without_times(straight)
    assert len(resumed["runs"]) == 8 and len(resumed["selection"]) == 2

    assert main(["experiment", *GRID, "--out", str(out), "--resume", "auto"]) == 0
    assert capsys.readouterr().out == f"the experiment in {str(out)!r} is finished ({out / 'results.json'}); nothing to run\n"


def test_resume_needs_an_experiment_and_auto_starts_one(tmp_path, capsys):
    assert main(["experiment", *GRID, "--out", str(tmp_path / "none"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jacplug: error: --resume: ") and "holds no experiment" in err and err.count("\n") == 1
    assert not (tmp_path / "none").exists()  # nothing left behind


@pytest.mark.parametrize("device, devices, cuda_count, workers, expected", [
    ("cpu", None, 2, 3, ["cpu"] * 3),  # CPU workers as before, GPUs present or not
    ("auto", None, 0, 2, ["cpu", "cpu"]),
    ("auto", None, 4, 2, ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]),  # every visible GPU, one process each
    ("cuda", None, 1, 2, ["cuda:0"]),  # one GPU: the cells run in this process
    ("cuda:1", None, 2, 1, ["cuda:1"]),  # --device cuda:N alone keeps that one GPU
    ("cuda:1", "all", 2, 1, ["cuda:0", "cuda:1"]),
    ("auto", "cuda:2, cuda:0", 4, 1, ["cuda:2", "cuda:0"]),
])
def test_cells_spread_over_the_chosen_devices(device, devices, cuda_count, workers, expected):
    from jacplug.experiment.executors import worker_devices

    assert worker_devices(device, devices, cuda_count, workers) == expected


@pytest.mark.parametrize("device, devices, cuda_count, message", [
    ("cpu", "cuda:0", 2, "--devices 'cuda:0' names CUDA devices, but the experiment runs on the CPU"),
    ("auto", "cuda:2", 2, "cuda:2 does not exist: 2 CUDA device(s) are visible (cuda:0..cuda:1)"),
    ("auto", "gpu0", 2, "--devices: 'gpu0' is not a CUDA device; use all, or names like cuda:0,cuda:1"),
    ("auto", "cuda:0,cuda:0", 2, "names a device twice"),
    ("cuda:3", None, 2, "cuda:3 does not exist"),
])
def test_bad_devices_are_named(device, devices, cuda_count, message):
    from jacplug.errors import UserError
    from jacplug.experiment.executors import worker_devices

    with pytest.raises(UserError, match=re.escape(message)):
        worker_devices(device, devices, cuda_count, 1)


@pytest.mark.parametrize("flags, message", [
    (["--ray-address", "127.0.0.1:6379"], "--ray-address needs --executor ray"),
    (["--executor", "ray", "--devices", "all"], "--devices chooses this machine's GPUs"),
    (["--retries", "-1"], "--retries must be >= 0, got -1"),
])
def test_bad_execution_options_are_one_line(flags, message, tmp_path, capsys):
    assert main(["experiment", *flags, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jacplug: error: {message}") and err.count("\n") == 1
