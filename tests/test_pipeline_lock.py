"""The run-directory lock: one run per ``--out``, released however the holder ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from jacplug.cli.main import main
from jacplug.errors import UserError
from jacplug.io.lock import LOCK_FILE, RunDirBusy, RunDirLock
from image_tree import image_tree

HOLDER = """
import sys, time
from jacplug.io.lock import RunDirLock
RunDirLock(sys.argv[1]).__enter__()
print("locked", flush=True)
time.sleep(300)
"""


@pytest.fixture
def holder(tmp_path):
    """A separate process that holds the lock of ``tmp_path / "run"`` until it is killed."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield run, proc
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.subprocess
def test_second_train_on_a_held_directory_gets_one_line_naming_the_holder(holder):
    run, proc = holder
    cmd = [sys.executable, "-m", "jacplug", "train", "--teacher", "test_resnet", "--student", "test_resnet",
           "--device", "cpu", "--image-size", "8", "--teacher-epochs", "1", "--epochs", "1", "--samples-per-class", "1",
           "--no-progress", "--out", str(run)]  # small, should the lock ever fail to stop it
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "is in use by another jacplug run" in lines[0], second.stderr
    assert f"pid {proc.pid} on host" in lines[0]
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # the refused run wrote nothing


@pytest.mark.subprocess
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_lock_of_a_killed_run_is_taken_over(holder, sig):
    run, proc = holder
    with pytest.raises(RunDirBusy):
        RunDirLock(run).__enter__()
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert (run / LOCK_FILE).is_file()  # left behind by the killed process
    with RunDirLock(run):
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("error", [KeyboardInterrupt, ValueError])
def test_lock_is_released_when_the_run_raises(tmp_path, error):
    run = tmp_path / "run"
    with pytest.raises(error):
        with RunDirLock(run):
            (run / "config.json").write_text("{}")
            with pytest.raises(RunDirBusy):  # a second descriptor, as another process would open it
                RunDirLock(run).__enter__()
            raise error
    with RunDirLock(run):
        pass
    assert (run / "config.json").is_file()


def test_a_directory_the_run_created_but_never_used_is_removed(tmp_path):
    with RunDirLock(tmp_path / "new" / "run"):
        assert (tmp_path / "new" / "run" / LOCK_FILE).is_file()
    assert not (tmp_path / "new" / "run").exists()
    with RunDirLock(tmp_path):  # a directory that existed before stays
        pass
    assert tmp_path.is_dir()


def test_an_unusable_directory_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot use .* as the run directory") as info:
        RunDirLock(tmp_path / "file").__enter__()
    assert not isinstance(info.value, RunDirBusy)


@pytest.mark.subprocess
def test_train_takes_over_the_directory_of_a_run_killed_with_sigkill(holder, capsys):
    run, proc = holder
    proc.kill()
    proc.wait(timeout=30)
    images = image_tree(run.parent / "images", {"train": ["blue", "red"], "test": ["blue", "red"]})
    rc = main(["train", "--dataset", f"imagefolder:{images}", "--teacher", "test_resnet", "--student", "test_resnet",
               "--image-size", "8", "--teacher-epochs", "1", "--epochs", "1", "--loss", "kd=1", "--device", "cpu",
               "--no-progress", "--out", str(run)])
    assert rc == 0, capsys.readouterr().err
    assert (run / "student_last.safetensors").is_file()


def test_a_directory_that_cannot_be_created_is_one_line_not_a_spin(tmp_path):
    """Under /proc, mkdir raises FileNotFoundError, the same error as a directory removed by a finishing
    holder; retrying it forever spun at 100 % CPU."""
    import threading

    result: list = []

    def enter() -> None:
        try:
            with RunDirLock("/proc/jacplug-run"):
                result.append("entered")
        except UserError as exc:
            result.append(str(exc))

    worker = threading.Thread(target=enter, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "the lock kept retrying"
    assert result and result[0].startswith("cannot use '/proc/jacplug-run' as the run directory") and "\n" not in result[0]
