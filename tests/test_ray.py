"""``jacplug experiment --executor ray`` on a local Ray instance with 2 CPUs (one for the module's
tests): the same records and results as the local executor, a cell whose worker process dies is run
again (Ray's ``max_retries``), a cell that dies on every attempt is one line with exit 2 and keeps the
finished cells' records, and an unreachable ``--ray-address`` is one line with exit 2."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.distributed  # a local Ray instance: its own worker processes

from jacplug.cli.main import main  # noqa: E402
from jacplug.experiment import executors  # noqa: E402

GRID = ["--teacher", "test_resnet", "--student", "test_resnet", "--image-size", "8", "--teacher-epochs", "1",
        "--samples-per-class", "2", "--methods", "kd", "kd+jacobian", "--seeds", "1", "--steps", "3",
        "--batch-size", "8", "--jacobian-weights", "1", "10", "--select-at", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module, on the loopback address."""
    with executors.on_loopback(ray, None):
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the dying cells below travel by value
    yield ray
    ray.shutdown()


def dying_cell(marker: Path, always: bool = False):
    """A ``ray_cell`` whose process kills itself in its first attempt at the ``kd+jacobian`` main cell
    (every attempt with ``always``): the worker dies as on a lost node, not with a Python error."""
    real = executors.ray_cell

    def cell(spec, config, teacher):
        if spec.phase == "main" and spec.method == "kd+jacobian" and (always or not marker.exists()):
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(spec, config, teacher)

    return cell


def without_times(value):
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if not k.endswith("time_s")}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def computed(results: dict) -> dict:
    """What an experiment computed: everything but its wall-clock times and how it was executed."""
    return without_times({k: v for k, v in results.items() if k not in ("config", "hardware")})


@pytest.mark.slow
def test_ray_runs_the_same_cells_and_retries_a_dead_worker(local_ray, tmp_path, capsys, monkeypatch):
    assert main(["experiment", *GRID, "--workers", "1", "--out", str(tmp_path / "local")]) == 0
    marker = tmp_path / "died-once"
    monkeypatch.setattr(executors, "ray_cell", dying_cell(marker))
    assert main(["experiment", *GRID, "--executor", "ray", "--out", str(tmp_path / "ray")]) == 0, capsys.readouterr().err
    assert marker.exists()  # a worker did die mid-cell, and the cell was run again
    local = json.loads((tmp_path / "local" / "results.json").read_text())
    on_ray = json.loads((tmp_path / "ray" / "results.json").read_text())
    assert computed(on_ray) == computed(local)
    assert sorted(p.name for p in (tmp_path / "ray" / "cells").iterdir()) == sorted(
        p.name for p in (tmp_path / "local" / "cells").iterdir())


@pytest.mark.slow
def test_a_cell_that_dies_on_every_attempt_is_one_line_and_keeps_the_others(local_ray, tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.setattr(executors, "ray_cell", dying_cell(tmp_path / "marker", always=True))
    out = tmp_path / "out"
    assert main(["experiment", *GRID, "--executor", "ray", "--retries", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and errors[0].startswith("jacplug: error: cell main-kd+jacobian-n2-seed0-jacobian=")
    assert "failed on each of its 2 attempts" in err and "--resume runs the rest" in err
    kept = {p.stem for p in (out / "cells").glob("*.json")}
    # the cells finished before the failure are kept: the teacher, the whole selection phase, and the main kd
    # cell when it beat the failing one; never the failing cell
    assert "teacher" in kept and "select-kd+jacobian-n2-seed1000-jacobian=1.0" in kept
    assert not any(name.startswith("main-kd+jacobian") for name in kept)
    assert kept - {"teacher", "main-kd-n2-seed0"} == {name for name in kept if name.startswith("select-")}
    assert not (out / "results.json").exists()


@pytest.mark.slow
def test_an_unreachable_ray_address_is_one_line(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "jacplug", "experiment", *GRID, "--executor", "ray",
                           "--ray-address", f"127.0.0.1:{port}", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"jacplug: error: --ray-address '127.0.0.1:{port}': no Ray cluster answers there")
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "out" / "teacher.safetensors").exists()


@pytest.mark.slow
def test_a_local_ray_instance_listens_on_loopback_only(local_ray):
    """The module's instance is started as ``RayExecutor`` starts one (:func:`executors.on_loopback`)."""
    assert local_ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
    assert local_ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")


def test_a_ray_worker_removes_its_copy_of_the_teacher(tmp_path, monkeypatch):
    from jacplug.experiment import ExperimentConfig, RunSpec

    import timm

    from jacplug.io.checkpoint import save_model

    teacher = tmp_path / "teacher.safetensors"  # untrained: the cell's result does not matter here
    save_model(teacher, timm.create_model("test_resnet", num_classes=10, in_chans=1), role="teacher",
               name="test_resnet", num_classes=10, input_shape=(1, 8, 8), mean=(0.5,), std=(0.5,), config={})
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(executors.tempfile, "tempdir", str(temp))
    monkeypatch.setattr(executors, "_WORKER", {})
    config = ExperimentConfig(teacher="test_resnet", student="test_resnet", image_size=8, steps=2, batch_size=8,
                              device="cpu", eval_batch_size=256, out=str(tmp_path / "experiment"))
    record = executors.ray_cell(RunSpec("kd", 2, 0, ()), config, teacher.read_bytes())
    assert record["test_acc"] >= 0 and executors._WORKER["teacher"] is not None
    assert list(temp.iterdir()) == []
