"""Every phase of ``jacplug train`` resumes: a run SIGKILLed in the teacher phase (mid-epoch), between
the phases and in the student phase, resumed with ``--resume`` after each kill, ends with the same
teacher and student weights (every tensor equal) and the same ``metrics.jsonl`` as an uninterrupted run;
and a new run refuses a directory an earlier run left (docs/pipeline.md, "The run directory").

Tiny: ``test_resnet`` at 8 px on the digits, a 40-step teacher (19 steps an epoch: the kill in its second
epoch resumes a whole pass mid-way, and the third epoch depends on the generator that pass left) and a
12-step student, each process with one thread; the kills wait for files, not for time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from jacplug.cli.main import main
from jacplug.training.metrics import read_metrics

RUN = ["train", "--teacher", "test_resnet", "--student", "test_resnet", "--image-size", "8", "--teacher-steps", "40",
       "--samples-per-class", "2", "--steps", "12", "--loss", "kd=1", "--loss", "jacobian=0.1",
       "--save-every", "1", "--device", "cpu", "--no-progress", "--agreement-images", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jacplug", *RUN, "--out", str(out), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)


def saved_step(path: Path) -> int:
    """The step a resume file was saved after (-1 while there is none). Read while the run replaces the file:
    safetensors opens it twice (header, then mapping), so a rename in between reads as a RuntimeError; poll on."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return json.loads(fh.metadata()["position"])["step"]
    except (OSError, KeyError, ValueError, RuntimeError):
        return -1


def kill_when(job: subprocess.Popen, ready) -> None:
    deadline = time.monotonic() + 120
    while not ready():
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-2000:]
        time.sleep(0.005)
    job.send_signal(signal.SIGKILL)
    job.communicate()


def without_times(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in read_metrics(out)]


@pytest.mark.subprocess
def test_a_run_killed_in_every_phase_ends_as_an_uninterrupted_run(tmp_path):
    straight, out = tmp_path / "straight", tmp_path / "killed"
    first = start(straight)
    assert first.wait(timeout=300) == 0, first.communicate()[1][-2000:]

    kill_when(start(out), lambda: saved_step(out / "teacher_resume.safetensors") >= 23)  # in the teacher's 2nd epoch
    assert not (out / "teacher.safetensors").exists()
    kill_when(start(out, "--resume"), lambda: (out / "teacher.safetensors").is_file())  # between the phases
    kill_when(start(out, "--resume"), lambda: saved_step(out / "resume.safetensors") >= 5)  # in the student phase
    assert not (out / "teacher_resume.safetensors").exists()  # removed once the student phase had saved its start
    last = start(out, "--resume")
    assert last.wait(timeout=300) == 0, last.communicate()[1][-2000:]

    for name in ("teacher.safetensors", "student_last.safetensors", "student_best.safetensors"):
        expected, got = load_file(straight / name), load_file(out / name)
        assert expected.keys() == got.keys() and all(expected[k].equal(got[k]) for k in expected), name
    assert without_times(out) == without_times(straight)


def test_a_new_run_refuses_a_directory_an_earlier_run_left(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "teacher_resume.safetensors").write_bytes(b"left by a run killed in its teacher phase")
    before = sorted(p.name for p in out.iterdir())
    assert main([*RUN, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json, teacher_resume.safetensors" in err
    assert "pass --resume (or --resume auto)" in err and "choose another --out" in err
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == before  # nothing written

    (out / "config.json").unlink()
    assert main([*RUN, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is not empty (teacher_resume.safetensors) and holds no run to resume" in err


def test_a_new_experiment_refuses_a_directory_another_run_left(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    assert main(["experiment", "--teacher", "test_resnet", "--student", "test_resnet", "--image-size", "8",
                 "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty (metrics.jsonl) and holds no experiment to resume" in err
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["metrics.jsonl"]
