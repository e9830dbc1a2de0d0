"""The run loop's events reach an installed plugin from every phase and every experiment cell; the built-in
observers are plugins that can be switched off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = ["--teacher", "test_resnet", "--student", "test_resnet", "--image-size", "8"]

#: an observer distribution as a third party writes it: module-level hooks appending every event to a file
EVENTS_PLUGIN = '''
import json, os
from jacplug import hookimpl

def _write(event, phase, **extra):
    with open(os.environ["EVENTS_FILE"], "a") as fh:
        fh.write(json.dumps({"event": event, "kind": phase.kind, "name": phase.name, "group": phase.group,
                             "pid": os.getpid(), **extra}) + "\\n")

@hookimpl
def on_train_start(run, phase):
    _write("start", phase, total=phase.plan.total)

@hookimpl
def on_step_end(phase, step, metrics):
    _write("step", phase, step=step, keys=sorted(metrics))

@hookimpl
def on_epoch_end(phase, epoch, metrics):
    _write("epoch", phase, step=metrics["step"], keys=sorted(metrics))

@hookimpl
def on_checkpoint(phase, step, files):
    _write("checkpoint", phase, step=step, files={k: os.path.exists(v) for k, v in files.items()})

@hookimpl
def on_image(phase, name, path):
    _write("image", phase, image=name, exists=os.path.exists(path))

@hookimpl
def on_train_end(phase, summary):
    _write("end", phase)
'''


@pytest.fixture
def events_plugin(tmp_path) -> tuple[dict[str, str], Path]:
    """Installs the plugin as a real distribution (a ``*.dist-info`` with a ``jacplug`` entry point) on a
    directory put on ``PYTHONPATH``; returns the environment for the commands and the events file."""
    site = tmp_path / "site"
    info = site / "jacplug_events-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: jacplug-events\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[jacplug]\nevents = jacplug_events\n")
    (site / "jacplug_events.py").write_text(EVENTS_PLUGIN)
    events = tmp_path / "events.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "EVENTS_FILE": str(events), "JACPLUG_STRICT_PLUGINS": "1"}
    return env, events


def jacplug(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jacplug", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.subprocess
def test_train_reports_the_teacher_and_the_student_phase_to_an_installed_plugin(events_plugin, tmp_path):
    env, events_file = events_plugin
    out = tmp_path / "run"
    proc = jacplug(["train", *TINY, "--teacher-steps", "3", "--steps", "4", "--no-check-gradients", "--out", str(out)],
                   env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    events = read_events(events_file)
    teacher = [e for e in events if e["kind"] == "teacher"]
    student = [e for e in events if e["kind"] == "student"]
    assert [e["event"] for e in teacher] == ["start", "step", "step", "step", "epoch", "end"] and teacher[0]["total"] == 3
    assert teacher[1]["keys"] == ["loss", "lr"]
    assert teacher[4]["keys"] == ["images", "step", "time_s", "train_loss", "val_acc"]
    assert [e["event"] for e in student] == ["start", "step", "step", "step", "step", "epoch", "checkpoint", "image",
                                             "image", "end"]
    assert [e["step"] for e in student if e["event"] == "step"] == [1, 2, 3, 4]
    assert student[1]["keys"] == ["jacobian", "kd", "loss", "lr"]
    assert {"agreement_cosine", "agreement_distance", "val_acc", "test_acc"} <= set(student[5]["keys"])
    assert student[6]["files"] == {"best": True, "last": True}  # written before later observers see them
    assert [(e["image"], e["exists"]) for e in student[7:9]] == [("gradient_maps", True), ("curves", True)]
    assert {e["group"] for e in events} == {str(out)}
    assert events.index(teacher[-1]) < events.index(student[0])  # the teacher phase ends before the student's begins


@pytest.mark.slow
@pytest.mark.subprocess
def test_experiment_reports_its_teacher_and_every_cell_from_the_worker_processes(events_plugin, tmp_path):
    env, events_file = events_plugin
    out = tmp_path / "exp"
    proc = jacplug(["experiment", "--teacher", "test_resnet", "--student", "test_resnet", "--image-size", "8",
                    "--samples-per-class", "2", "--methods", "kd", "kd+jacobian", "--seeds", "1", "--steps", "3",
                    "--teacher-epochs", "1", "--select-at", "2", "--jacobian-weights", "1", "--workers", "2",
                    "--out", str(out)], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    events = read_events(events_file)
    assert [e["event"] for e in events if e["kind"] == "teacher"] == ["start", *["step"] * 19, "epoch", "end"]
    results = json.loads((out / "results.json").read_text())
    runs = [*results["selection"], *results["runs"]]
    cells = {e["name"] for e in events if e["kind"] == "cell"}
    assert len(cells) == len(runs) == 3  # one selection run of kd+jacobian, two main runs
    for cell in cells:
        assert [e["event"] for e in events if e["name"] == cell] == ["start", "step", "step", "step", "epoch", "end"]
        assert (out / "cells" / cell / "metrics.jsonl").is_file()
    parent = {e["pid"] for e in events if e["kind"] == "teacher"}
    assert parent.isdisjoint(e["pid"] for e in events if e["kind"] == "cell")  # reported from the worker processes
    assert {e["group"] for e in events} == {str(out)}


def test_switching_off_the_metrics_observer_leaves_no_metrics_file(tmp_path):
    from jacplug.cli.main import main

    out = tmp_path / "run"
    assert main(["train", *TINY, "--teacher-steps", "2", "--steps", "2", "--no-check-gradients", "--out", str(out),
                 "--log-off", "metrics", "progress"]) == 0
    assert not (out / "metrics.jsonl").exists() and not (out / "curves.png").exists()  # the plot reads the metrics
    assert (out / "student_last.safetensors").is_file() and (out / "resume.safetensors").is_file()


@pytest.mark.parametrize("args, message", [
    (["--log-off", "checkpoints"], "--log-off checkpoints: the 'checkpoints' observer is essential"),
    (["--log", "tensorbord"], "tensorboard"),
    (["--log-off", "metric"], "did you mean"),
])
def test_unknown_or_essential_observers_are_refused_before_anything_is_written(args, message, tmp_path, capsys):
    from jacplug.cli.main import main

    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "2", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()
