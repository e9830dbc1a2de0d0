"""Write faults: every file a run writes fails in turn, through the one write path (``jacplug.io.files``) and
through the operating system (a file-size limit, a read-only directory), and the run must end in one line
naming the file (essential writes) or go on with a warning (optional observers), leave every file it
completed whole and no temporary file behind, and ``--resume`` must reach exactly the uninterrupted result.

Tiny: ``test_resnet`` on the 8 px digits, one image per class, one step, an untrained teacher from a file.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from jacplug.cli.main import main
from jacplug.io import files
from jacplug.io.checkpoint import save_model
from jacplug.io.lock import LOCK_FILE
from jacplug.registry import PluginWarning
from jacplug.training.metrics import read_metrics

#: the harness names files through /proc/self/fd and limits the OS through prctl and RLIMIT_FSIZE
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the fault harness uses Linux's /proc and prctl")

TINY = ["--teacher", "test_resnet", "--student", "test_resnet", "--image-size", "8", "--batch-size", "10",
        "--seed", "0", "--device", "cpu", "--no-progress", "--samples-per-class", "1", "--epochs", "1",
        "--agreement-images", "0", "--loss", "kd=1", "--no-check-gradients"]
#: the writes of a clean run, in order: (file, essential)
#: (the resume state is first written when the student phase starts, so a kill before its first save resumes there)
WRITES = [(LOCK_FILE, True), ("config.json", True), ("resume.safetensors", True), ("metrics.jsonl", False),
          ("metrics.jsonl", False),
          ("student_best.safetensors", True), ("student_last.safetensors", True), ("resume.safetensors", True),
          ("curves.png", False)]
FULL = "[Errno 28] No space left on device"


def train(teacher: str, out: Path, *extra: str) -> int:
    return main(["train", *TINY, "--teacher-checkpoint", teacher, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """An untrained test_resnet teacher: what it knows does not matter here, only that it loads."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    torch.manual_seed(0)
    save_model(path, timm.create_model("test_resnet", num_classes=10, in_chans=1), role="teacher",
               name="test_resnet", num_classes=10, input_shape=(1, 8, 8), mean=(0.5,), std=(0.5,), config={})
    return str(path)


@pytest.fixture(scope="module")
def reference(teacher, tmp_path_factory) -> tuple[Path, list[str]]:
    """An uninterrupted run, and the files its writes went to, in order (counted through the write path)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    return out, files_written(lambda: train(teacher, out))


def files_written(run) -> list[str]:
    """The names of the files ``run``'s writes went to through the one write path, in order; ``run`` succeeds."""
    written: list[str] = []
    original = files.write_all

    def counting(fd, data):
        written.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        original(fd, data)

    files.write_all = counting
    try:
        assert run() == 0
    finally:
        files.write_all = original
    return written


def failing_at(monkeypatch, n: int, error: OSError) -> None:
    """Make the ``n``-th write (from 1) write half its bytes, then fail with ``error``."""
    original, count = files.write_all, [0]

    def write_all(fd, data):
        count[0] += 1
        if count[0] == n:
            os.write(fd, bytes(memoryview(data).cast("B")[: len(data) // 2]))
            raise error
        original(fd, data)

    monkeypatch.setattr(files, "write_all", write_all)


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("jacplug: error:")]


def check_left_behind(run: Path) -> None:
    """No temporary file anywhere, and every file the run completed reads back whole."""
    leftovers = [p for p in run.rglob("*") if p.name.endswith((files.TEMP_SUFFIX, ".tmp"))]
    assert not leftovers, leftovers
    for path in run.glob("*.safetensors"):
        load_file(path)
    if (run / "config.json").exists():
        json.loads((run / "config.json").read_text())
    read_metrics(run)  # raises on a torn line in the middle


def same_weights(a: Path, b: Path) -> bool:
    first, second = load_file(a), load_file(b)
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_a_clean_run_writes_what_the_harness_injects(reference):
    run, written = reference
    named = [name if name == LOCK_FILE else name.removeprefix(".").rsplit(".", 2)[0] if name.endswith(files.TEMP_SUFFIX)
             else name for name in written]
    assert named == [name for name, _ in WRITES]


@pytest.mark.parametrize("n", range(1, len(WRITES) + 1), ids=[f"{i + 1}-{name}" for i, (name, _) in enumerate(WRITES)])
def test_each_write_of_a_run_fails_in_turn(n, teacher, reference, tmp_path, monkeypatch, capsys):
    name, essential = WRITES[n - 1]
    run = tmp_path / "run"
    failing_at(monkeypatch, n, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    capsys.readouterr()
    if essential:
        rc = train(teacher, run)
        errors = error_lines(capsys.readouterr().err)
        assert rc == 2 and len(errors) == 1, errors
        assert f"could not write {run / name}: {FULL}" in errors[0]
    else:  # an optional observer: a warning naming it, and the run goes on
        with pytest.warns(PluginWarning, match="metrics|plot"):
            rc = train(teacher, run)
        assert rc == 0 and not error_lines(capsys.readouterr().err)
    check_left_behind(run)
    if name == "metrics.jsonl":  # the line that failed is missing whole, the others are there
        assert len(read_metrics(run)) == len(read_metrics(reference[0])) - 1
    if name == "curves.png":
        assert not (run / "curves.png").exists()
    monkeypatch.undo()
    if essential:
        assert train(teacher, run, "--resume", "auto") == 0, capsys.readouterr().err
        check_left_behind(run)
    assert same_weights(run / "student_last.safetensors", reference[0] / "student_last.safetensors")


def test_the_file_and_then_its_directory_are_synced_around_the_rename(tmp_path, monkeypatch):
    events: list[tuple] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        info = os.fstat(fd)
        events.append(("fsync", "dir" if stat.S_ISDIR(info.st_mode) else "file", info.st_ino))
        fsync(fd)

    def recording_replace(src, dst):
        events.append(("replace", os.stat(src).st_ino))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    files.atomic_write_text(tmp_path / "config.json", "{}")
    inode, directory = (tmp_path / "config.json").stat().st_ino, tmp_path.stat().st_ino
    assert events == [("fsync", "file", inode), ("replace", inode), ("fsync", "dir", directory)]


def test_a_write_never_touches_the_umask(tmp_path, monkeypatch):
    def umask(mask):
        raise AssertionError("the umask is process-wide: changing it races with every thread creating a file")

    monkeypatch.setattr(os, "umask", umask)
    files.atomic_write_text(tmp_path / "config.json", "{}")
    files.append_text(tmp_path / "metrics.jsonl", "{}\n")
    assert (tmp_path / "config.json").read_text() == "{}"


@pytest.mark.parametrize("entry", ["metrics.jsonl", LOCK_FILE, "student_best.safetensors", "config.json"])
def test_a_symlinked_entry_of_the_run_directory_is_refused_and_its_target_untouched(entry, teacher, tmp_path,
                                                                                     capsys):
    target = tmp_path / "precious.txt"
    target.write_text("the user's own file")
    run = tmp_path / "run"
    run.mkdir()
    (run / entry).symlink_to(target)
    capsys.readouterr()
    assert train(teacher, run) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and f"refusing to write {run / entry}: it is a symbolic link" in errors[0], errors
    assert target.read_text() == "the user's own file"
    assert sorted(p.name for p in run.iterdir()) == sorted({entry, LOCK_FILE})


def test_a_symlink_is_never_written_through(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("the user's own file")
    (tmp_path / "metrics.jsonl").symlink_to(target)
    for write in (lambda p: files.append_text(p, "x\n"), lambda p: files.atomic_write_text(p, "x")):
        with pytest.raises(files.NotAFile, match="is a symbolic link"):
            write(tmp_path / "metrics.jsonl")
    assert target.read_text() == "the user's own file"


# ---------------------------------------------------------------------------------------------------
# through the operating system, in a subprocess


def without_dac_override():
    """In the child before it runs Python: root writes into a read-only directory unless it gives up
    CAP_DAC_OVERRIDE; dropped from the bounding set, the capability is gone after ``exec``."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "cannot drop CAP_DAC_OVERRIDE")


def run_cli(*args: str, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jacplug", "train", *TINY, *args], capture_output=True, text=True,
                          timeout=600, preexec_fn=preexec, env={**os.environ, "OMP_NUM_THREADS": "1"})


# ---------------------------------------------------------------------------------------------------
# the teacher phase's own writes: its resume state and the trained teacher

TEACHER_RUN = ["--teacher", "test_resnet", "--student", "test_resnet", "--image-size", "8", "--batch-size", "10",
               "--seed", "0", "--device", "cpu", "--no-progress", "--samples-per-class", "1", "--steps", "2",
               "--teacher-steps", "4", "--save-every", "2", "--agreement-images", "0", "--loss", "kd=1",
               "--no-check-gradients"]


def train_own_teacher(out: Path, *extra: str) -> int:
    return main(["train", *TEACHER_RUN, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def teacher_reference(tmp_path_factory) -> tuple[Path, list[str]]:
    """A run that trains its own teacher, uninterrupted, and the files its writes went to, in order."""
    out = tmp_path_factory.mktemp("teacher-reference") / "run"
    return out, files_written(lambda: train_own_teacher(out))


@pytest.mark.parametrize("target", ["teacher_resume.safetensors", "teacher.safetensors"])
def test_a_failed_teacher_phase_write_ends_the_run_and_resumes_to_the_same_teacher(target, teacher_reference,
                                                                                 tmp_path, monkeypatch, capsys):
    reference, written = teacher_reference
    named = [name.removeprefix(".").rsplit(".", 2)[0] if name.endswith(files.TEMP_SUFFIX) else name
             for name in written]
    # the last write to the target: a teacher resume state saved mid-phase, or the trained teacher itself
    n = max(i for i, name in enumerate(named) if name == target) + 1
    run = tmp_path / "run"
    failing_at(monkeypatch, n, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    capsys.readouterr()
    rc = train_own_teacher(run)
    errors = error_lines(capsys.readouterr().err)
    assert rc == 2 and len(errors) == 1, errors
    assert f"could not write {run / target}: {FULL}" in errors[0]
    check_left_behind(run)
    monkeypatch.undo()
    assert train_own_teacher(run, "--resume", "auto") == 0, capsys.readouterr().err
    check_left_behind(run)
    for name in ("teacher.safetensors", "student_last.safetensors"):
        assert same_weights(run / name, reference / name), name


@pytest.mark.subprocess
def test_a_file_size_limit_ends_the_run_in_one_line(teacher, reference, tmp_path, capsys):
    import resource

    run = tmp_path / "run"
    # above config.json and the metrics, below the resume state the student phase writes when it starts
    limit = (reference[0] / "student_best.safetensors").stat().st_size // 2

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: the write gets EFBIG

    proc = run_cli("--teacher-checkpoint", teacher, "--out", str(run), preexec=limited)
    errors = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert f"could not write {run / 'resume.safetensors'}: [Errno 27] File too large" in errors[0]
    check_left_behind(run)
    assert not (run / "resume.safetensors").exists()  # the resume state never counts on a missing best
    # nothing worth resuming was written (no resume state), so the run removed what it wrote; auto starts afresh
    assert train(teacher, run, "--resume", "auto") == 0, capsys.readouterr().err
    assert same_weights(run / "student_last.safetensors", reference[0] / "student_last.safetensors")


@pytest.mark.subprocess
def test_a_read_only_directory_ends_the_run_in_one_line(teacher, reference, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text("")  # a finished run's lock file: the directory is read-only, not the file
    run.chmod(0o555)
    try:
        proc = run_cli("--teacher-checkpoint", teacher, "--out", str(run), preexec=without_dac_override)
    finally:
        run.chmod(0o755)
    errors = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert f"could not write {run / 'config.json'}: [Errno 13] Permission denied" in errors[0]
    check_left_behind(run)
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]
    assert train(teacher, run, "--resume", "auto") == 0, capsys.readouterr().err
    assert same_weights(run / "student_last.safetensors", reference[0] / "student_last.safetensors")


# ---------------------------------------------------------------------------------------------------
# the run lock where fcntl does not exist

WITHOUT_FCNTL = """
import ctypes, errno, os, sys, types
sys.modules["fcntl"] = None  # as on Windows
import matplotlib.pyplot, torch, timm  # what the run imports, before the stand-in below: a module that finds
from jacplug.commands import train_run  # msvcrt takes the platform for Windows (subprocess, for one)
from jacplug.cli.main import main
from jacplug.io import lock
assert lock.fcntl is None

# msvcrt.locking, as Windows' C runtime does it, over the kernel's flock (Linux has no msvcrt)
libc = ctypes.CDLL(None, use_errno=True)
msvcrt = types.ModuleType("msvcrt")
msvcrt.LK_UNLCK, msvcrt.LK_NBLCK, msvcrt.calls = 0, 2, []
def locking(fd, mode, nbytes):
    msvcrt.calls.append((mode, os.lseek(fd, 0, os.SEEK_CUR), nbytes))
    if libc.flock(fd, 8 if mode == msvcrt.LK_UNLCK else 2 | 4) != 0:  # LOCK_UN, LOCK_EX | LOCK_NB
        raise OSError(errno.EDEADLOCK, "Resource deadlock avoided")
msvcrt.locking = locking
sys.modules["msvcrt"] = msvcrt
held, free = sys.argv[1], sys.argv[2]
with lock.RunDirLock(held):  # another descriptor: as another process, the second run is refused
    print("held:", main(["train", *sys.argv[3:], "--out", held]), flush=True)
print("free:", main(["train", *sys.argv[3:], "--out", free]), flush=True)
print("pid:", os.getpid())
print("locked at:", sorted({offset for _, offset, _ in msvcrt.calls}), flush=True)
"""


@pytest.mark.subprocess
def test_the_run_lock_works_without_fcntl(teacher, tmp_path):
    held, free = tmp_path / "held", tmp_path / "free"
    proc = subprocess.run([sys.executable, "-c", WITHOUT_FCNTL, str(held), str(free), *TINY, "--teacher-checkpoint",
                           teacher], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "held: 2" in proc.stdout and "free: 0" in proc.stdout, proc.stdout
    assert f"locked at: [{1 << 20}]" in proc.stdout  # past the holder's record, which stays readable
    pid = proc.stdout.split("pid: ")[1].split()[0]
    refusal = [line for line in proc.stderr.splitlines() if "is in use by" in line]
    assert len(refusal) == 1 and f"another jacplug run (pid {pid} on host" in refusal[0], proc.stderr
    assert (free / "student_last.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------
# jacplug experiment: its records (jacplug/experiment/records.py), reports and the cells' metrics

GRID = ["--teacher", "test_resnet", "--student", "test_resnet", "--image-size", "8", "--samples-per-class", "1",
        "--methods", "kd", "--seeds", "1", "--steps", "1", "--batch-size", "10", "--device", "cpu", "--workers", "1",
        "--agreement-images", "0"]
CELL = "main-kd-n1-seed0"
EXPERIMENT_WRITES = [(LOCK_FILE, True), ("experiment.json", True), ("cells/teacher.json", True),
                     (f"cells/{CELL}/metrics.jsonl", False), (f"cells/{CELL}/metrics.jsonl", False),
                     (f"cells/{CELL}.json", True), ("table.md", True), ("results.json", True)]


def experiment(teacher: str, out: Path, *extra: str) -> int:
    return main(["experiment", *GRID, "--teacher-checkpoint", teacher, "--out", str(out), *extra])


def without_times(value):
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if not k.endswith("time_s") and k != "out"}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


@pytest.fixture(scope="module")
def experiment_reference(teacher, tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("experiment") / "out"
    written: list[str] = []
    original = files.write_all

    def counting(fd, data):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        name = path.name.removeprefix(".").rsplit(".", 2)[0] if path.name.endswith(files.TEMP_SUFFIX) else path.name
        written.append(str(path.with_name(name).relative_to(out)))
        original(fd, data)

    files.write_all = counting
    try:
        assert experiment(teacher, out) == 0
    finally:
        files.write_all = original
    return out, written


def test_a_clean_experiment_writes_what_the_harness_injects(experiment_reference):
    assert experiment_reference[1] == [name for name, _ in EXPERIMENT_WRITES]


@pytest.mark.parametrize("n", range(1, len(EXPERIMENT_WRITES) + 1),
                         ids=[f"{i + 1}-{name}" for i, (name, _) in enumerate(EXPERIMENT_WRITES)])
def test_each_write_of_an_experiment_fails_in_turn(n, teacher, experiment_reference, tmp_path, monkeypatch, capsys):
    name, essential = EXPERIMENT_WRITES[n - 1]
    out = tmp_path / "out"
    failing_at(monkeypatch, n, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    capsys.readouterr()
    if essential:
        rc = experiment(teacher, out)
        errors = error_lines(capsys.readouterr().err)
        assert rc == 2 and len(errors) == 1, errors
        assert f"could not write {out / name}: {FULL}" in errors[0]
        check_left_behind(out)
        monkeypatch.undo()
        assert experiment(teacher, out, "--resume", "auto") == 0, capsys.readouterr().err
    else:
        with pytest.warns(PluginWarning, match="metrics"):
            assert experiment(teacher, out) == 0
    check_left_behind(out)
    expected = json.loads((experiment_reference[0] / "results.json").read_text())
    assert without_times(json.loads((out / "results.json").read_text())) == without_times(expected)
    steps = [r["step"] for r in read_metrics(out / "cells" / CELL) if r["kind"] == "step"]
    assert steps == ([] if n == 4 else [1])  # a cell that ran again started its records afresh
