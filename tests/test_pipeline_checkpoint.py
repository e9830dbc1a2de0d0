"""Checkpoints: atomic writes, plain-timm loading, validation errors, the resume file round trip."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file

from jacplug.errors import UserError
from jacplug.io.files import atomic_write, remove_stale_temp_files
from jacplug.io.checkpoint import (
    load_weights, load_resume, save_model, save_resume,
)
from jacplug.training.teacher import cosine_schedule

META = dict(name="test_resnet", num_classes=10, input_shape=(1, 8, 8), mean=(0.3,), std=(0.3,), config={"seed": 0})


def model(num_classes: int = 10, name: str = "test_resnet"):
    return timm.create_model(name, num_classes=num_classes, in_chans=1)


def test_model_checkpoint_loads_with_plain_timm_and_safetensors(tmp_path):
    torch.manual_seed(0)
    net = model()
    save_model(tmp_path / "s.safetensors", net, role="student_last", metrics={"test_acc": 0.5}, **META)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    plain = timm.create_model(meta["model"], num_classes=int(meta["num_classes"]), in_chans=int(meta["in_chans"]))
    plain.load_state_dict(load_file(tmp_path / "s.safetensors"))
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(plain.eval()(x), net.eval()(x))
    assert json.loads(meta["input_size"]) == [1, 8, 8] and json.loads(meta["metrics"]) == {"test_acc": 0.5}
    assert json.loads(meta["config"]) == {"seed": 0} and meta["jacplug_version"]


def test_atomic_write_leaves_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "f.safetensors"
    target.write_text("old")

    def broken(fh):
        fh.write(b"half")
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, broken)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.safetensors"]


def test_checkpoint_errors_are_one_line_user_errors(tmp_path):
    good = tmp_path / "good.safetensors"
    save_model(good, model(), role="teacher", **META)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(good.read_bytes()[:1000])
    cases = [
        (tmp_path / "missing.safetensors", {}, "does not exist"),
        (corrupt, {}, "corrupt or not a safetensors file"),
        (good, {"num_classes": 100}, "trained for 10 classes, but the dataset has 100"),
        (good, {"expected_name": "resnet18"}, "holds a 'test_resnet' model, but 'resnet18' was requested"),
    ]
    for path, kwargs, message in cases:
        with pytest.raises(UserError, match=message) as info:
            load_weights(path, model(), **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="does not fit"):  # no metadata to check, but the shapes disagree
        load_weights(good, model(num_classes=3))


def loss_module() -> torch.nn.Module:
    """A stand-in for a loss with state of its own (FitNet adapters): parameters and BatchNorm buffers."""
    return torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))


def test_resume_file_restores_optimizer_scheduler_rng_and_loss_state(tmp_path):
    torch.manual_seed(0)
    net, loss = model(), loss_module()
    params = list(net.parameters()) + list(loss.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scheduler = cosine_schedule(optimizer, 10)
    for _ in range(2):
        (net(torch.randn(4, 1, 8, 8)).sum() + loss(torch.randn(4, 2)).sum()).backward()
        optimizer.step()
        scheduler.step()
    save_resume(tmp_path / "r.safetensors", models={"student": net, "loss": loss}, optimizer=optimizer, scheduler=scheduler,
                position={"epoch": 1, "batch": 3, "step": 2}, config={})
    expected_draw = torch.rand(3)

    torch.manual_seed(99)
    net2, loss2 = model(), loss_module()
    optimizer2 = torch.optim.AdamW(list(net2.parameters()) + list(loss2.parameters()), lr=1e-2)
    scheduler2 = cosine_schedule(optimizer2, 10)
    position = load_resume(tmp_path / "r.safetensors", models={"student": net2, "loss": loss2}, optimizer=optimizer2,
                           scheduler=scheduler2)
    assert position == {"epoch": 1, "batch": 3, "step": 2}
    assert torch.equal(torch.rand(3), expected_draw)
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    before, after = optimizer.state_dict()["state"], optimizer2.state_dict()["state"]
    assert sorted(before) == sorted(after)
    for pid, entry in before.items():
        assert all(torch.equal(torch.as_tensor(value), torch.as_tensor(after[pid][k])) for k, value in entry.items())
    for a, b in zip(net.state_dict().values(), net2.state_dict().values()):
        assert torch.equal(a, b)
    trained, restored = loss.state_dict(), loss2.state_dict()
    assert trained["1.num_batches_tracked"] == 2 and sorted(trained) == sorted(restored)
    assert all(torch.equal(trained[k], restored[k]) for k in trained)


def test_checkpoints_get_the_mode_of_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_model(tmp_path / "m.safetensors", model(), role="teacher", **META)
        atomic_write(tmp_path / "t.txt", lambda fh: fh.write(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "t.txt").stat().st_mode) == 0o644


KILLED_MID_WRITE = """
import os, signal, sys
from jacplug.io import files

def write_all(fd, data):
    os.write(fd, b"half a checkpoint")
    os.kill(os.getpid(), signal.SIGKILL)

files.write_all = write_all
files.atomic_write_bytes(sys.argv[1], b"a whole checkpoint")
"""


@pytest.mark.subprocess
def test_stale_temp_files_of_a_killed_write_are_removed(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(tmp_path / "resume.safetensors")], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    (tmp_path / "notes.tmp").write_text("the user's own file")
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".resume.safetensors.")]
    assert len(stale) == 1 and stale[0].read_bytes() == b"half a checkpoint"
    assert remove_stale_temp_files(tmp_path) == stale
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.tmp"]
