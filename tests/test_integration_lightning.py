"""``DistillationModule`` through the real ``lightning.Trainer``: two CPU processes with the ``"ddp"``
strategy (gloo) end with equal weights, equal to one process on the same global batch, FitNet adapter
included, with no sync_dist warning; a CNN and a ViT student train in one process; each term is logged
with ``self.log``; checkpoints load back (by name alone, or with the modules) and give the bare student's
weights."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

pytest.importorskip("lightning")  # installed by `make test` ([lightning] extra)
import lightning as L  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from jacplug import UserError  # noqa: E402
from jacplug.integrations.lightning_module import DistillationModule, student_state_dict  # noqa: E402

SCRIPT = Path(__file__).parent / "scripts" / "lightning_ddp.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(out: Path, devices: int, batch: int) -> subprocess.Popen:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(SCRIPT), str(out), str(devices), str(batch)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def output_of(proc: subprocess.Popen) -> str:
    """The script's output (both streams), once it ended well."""
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    return stdout + stderr


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_on_two_processes_equals_one_process_adapters_included(tmp_path):
    # the one-process reference runs beside the two DDP processes: one process start-up instead of two in a row
    ddp, single_run = start(tmp_path / "ddp", devices=2, batch=4), start(tmp_path / "single", devices=1, batch=8)
    output = output_of(ddp)
    assert "sync_dist" not in output, output[-2000:]  # epoch-level terms are averaged over the processes
    output_of(single_run)
    single = load_file(str(tmp_path / "single.0.safetensors"))
    assert "distiller.loss.terms.fitnet.adapters.0.weight" in single
    assert not any("teacher" in key for key in single)
    for rank in range(2):
        ddp = load_file(str(tmp_path / f"ddp.{rank}.safetensors"))
        assert set(ddp) == set(single)
        for key in single:
            torch.testing.assert_close(ddp[key], single[key], rtol=1e-10, atol=1e-12, msg=f"rank {rank}: {key}")


class Images(torch.utils.data.Dataset):
    def __init__(self, n: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 4, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


@pytest.mark.parametrize("name, kwargs", [
    ("test_resnet", {}),
    ("vit_tiny_patch16_224", dict(img_size=16, patch_size=8, depth=1, embed_dim=24, num_heads=2)),
])
def test_a_cnn_and_a_vit_student_train_and_every_term_is_logged(name, kwargs):
    torch.manual_seed(0)
    student = timm.create_model(name, num_classes=4, **kwargs)
    teacher = timm.create_model("test_resnet", num_classes=4)
    before = [p.detach().clone() for p in student.parameters()]
    module = DistillationModule(student, teacher, ["kd=1", "jacobian=1"])
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
    loader = torch.utils.data.DataLoader(Images(), batch_size=4)
    trainer.fit(module, loader, loader)
    assert {"train/loss_step", "train/kd_step", "train/jacobian_step", "val/acc"} <= set(trainer.logged_metrics)
    assert sum(not torch.equal(a, b) for a, b in zip(before, student.parameters())) > len(before) // 2
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert all(not key.startswith("distiller.teacher") for key in module.state_dict())


def test_a_bad_loss_spec_and_a_bad_batch_are_one_line():
    torch.manual_seed(0)
    student, teacher = timm.create_model("test_resnet", num_classes=4), timm.create_model("test_resnet", num_classes=4)
    with pytest.raises(UserError, match="did you mean 'jacobian'"):
        DistillationModule(student, teacher, ["jacobain=1"])
    with pytest.raises(UserError, match="the batch has no 'pixel_values'"):
        DistillationModule(student, teacher).training_step({"image": torch.zeros(2, 3, 16, 16)}, 0)


def test_a_module_built_from_names_loads_back_from_its_checkpoint_alone(tmp_path):
    """Names are hyperparameters: ``load_from_checkpoint(path)`` rebuilds the module and its weights;
    ``student_state_dict`` gives the bare student's weights."""
    torch.manual_seed(0)
    module = DistillationModule("test_resnet", "test_resnet", ["kd=1", "jacobian=1"],
                                student_kwargs={"num_classes": 4}, teacher_kwargs={"num_classes": 4})
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(Images(4), batch_size=4))
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    loaded = DistillationModule.load_from_checkpoint(path)
    assert set(loaded.state_dict()) == set(module.state_dict())
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    bare = timm.create_model("test_resnet", num_classes=4)
    bare.load_state_dict(student_state_dict(path))  # strict: exactly the student's keys
    assert student_state_dict(path).keys() == module.student_state_dict().keys()


def test_a_module_built_from_modules_loads_back_with_them_passed_again(tmp_path):
    torch.manual_seed(0)
    module = DistillationModule(timm.create_model("test_resnet", num_classes=4),
                                timm.create_model("test_resnet", num_classes=4), ["kd=1"])
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(Images(4), batch_size=4))
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(TypeError, match="student"):  # modules are not hyperparameters
        DistillationModule.load_from_checkpoint(path)
    again = DistillationModule.load_from_checkpoint(path, student=timm.create_model("test_resnet", num_classes=4),
                                                    teacher=timm.create_model("test_resnet", num_classes=4))
    assert all(torch.equal(a, b) for a, b in zip(again.student.parameters(), module.student.parameters(), strict=True))
