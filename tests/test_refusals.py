"""A refused ``jacplug train`` is one line, exit code 2, no traceback, names what is wrong, and leaves nothing
behind: no ``runs/``, no missing parents of ``--out`` or ``--data-root``."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
import timm
from safetensors.torch import save_file

from jacplug.cli.main import main

TINY = ["train", "--teacher", "test_resnet", "--student", "test_resnet", "--image-size", "8", "--device", "cpu",
        "--no-progress", "--steps", "1"]


def refused(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2, argv
    out, err = capsys.readouterr()
    assert err.startswith("jacplug: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("command", ["train", "experiment"])
@pytest.mark.parametrize("out", [None, "a/b/run"])
def test_a_misspelt_model_creates_no_folder(tmp_path, capsys, monkeypatch, out, command):
    monkeypatch.chdir(tmp_path)
    argv = [command, "--teacher", "resnet5O", "--student", "test_resnet", *(["--out", out] if out else [])]
    assert "unknown model 'resnet5O'" in refused(capsys, argv)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "notes.txt").write_text("x")
    assert "--out 'notes.txt/run' is under 'notes.txt', which is a file" in refused(
        capsys, [command, "--out", "notes.txt/run"])


def test_an_offline_download_leaves_no_data_root(tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    err = refused(capsys, [*TINY, "--dataset", "cifar10", "--download", "--data-root", str(tmp_path / "data" / "cifar"),
                           "--out", str(tmp_path / "run")])
    assert "offline" in err and list(tmp_path.iterdir()) == []


def test_messages_name_the_problem(tmp_path, capsys):
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    assert f"config file '{tmp_path}' is a directory" in refused(capsys, [*TINY, "--config", str(tmp_path)])
    assert f"'{afile}' is a file; pass the run directory" in refused(capsys, ["plot", str(afile)])
    plain = tmp_path / "plain.safetensors"  # no metadata, and 3 classes where the digits have 10
    save_file(timm.create_model("test_resnet", num_classes=3, in_chans=1).state_dict(), plain)
    err = refused(capsys, [*TINY, "--teacher-checkpoint", str(plain), "--out", str(tmp_path / "run")])
    assert "wrong shape" in err and "it records no model name, so it was tried as test_resnet: pass --teacher" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "plain.safetensors"]


@pytest.mark.subprocess
def test_benchmarks_run_from_any_folder(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "noise_robustness.py"), "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "usage: jacplug experiment" in run.stdout, run.stderr
    script = (root / "benchmarks" / "gpu_check.sh").read_text()  # its checks use the repository's relative paths
    assert 'cd "$(dirname "${BASH_SOURCE[0]}")/.."' in script and script.index("OUT=$(cd") < script.index("cd \"$(dirname")
    assert list(tmp_path.iterdir()) == []


KILLED_PARENT = """
import multiprocessing, os, sys, time
from jacplug.experiment.executors import exit_with_parent

def sleep(seconds):
    time.sleep(seconds)

if __name__ == "__main__":
    pool = multiprocessing.get_context("spawn").Pool(1, initializer=exit_with_parent)
    print(*[p.pid for p in pool._pool], flush=True)
    pool.map_async(sleep, [60])
    time.sleep(60)
"""


@pytest.mark.subprocess
def test_pool_workers_exit_quietly_when_the_experiment_is_killed(tmp_path):
    """``jacplug experiment --workers N`` killed with SIGKILL: its pool workers exit at once, without
    finishing their cells for nobody and without a BrokenPipeError traceback each."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(KILLED_PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = [int(pid) for pid in parent.stdout.readline().split()]
    time.sleep(1)  # the workers are in their cells
    parent.send_signal(signal.SIGKILL)
    parent.wait()

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return open(f"/proc/{pid}/stat").read().split()[2] != "Z"

    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(workers) == 1 and not any(alive(pid) for pid in workers)
    assert "Traceback" not in parent.stderr.read()
