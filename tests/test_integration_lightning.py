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


def test_model_checkpoint_monitors_the_documented_name_and_writes_a_checkpoint(tmp_path):
    """docs/integrations.md: each term under ``train/<term>``, the total under ``train/loss``; the
    checkpoint, whose teacher is a ``jacplug train`` checkpoint's path, loads with ``weights_only``."""
    from jacplug.io.checkpoint import save_model

    torch.manual_seed(0)
    teacher_path = tmp_path / "teacher.safetensors"
    save_model(teacher_path, timm.create_model("test_resnet", num_classes=4), role="teacher", name="test_resnet",
               num_classes=4, input_shape=(3, 16, 16), mean=(0.5,) * 3, std=(0.25,) * 3, config={})
    module = DistillationModule("test_resnet", teacher_path, ["kd=1", "jacobian=1"], student_kwargs={"num_classes": 4})
    watch = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, monitor="train/loss", mode="min")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, callbacks=[watch],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(Images(4), batch_size=2))
    assert {"train/loss", "train/kd", "train/jacobian"} <= set(trainer.callback_metrics)
    assert watch.best_model_path and Path(watch.best_model_path).is_file()
    assert torch.isfinite(watch.best_model_score)
    assert student_state_dict(watch.best_model_path).keys() == module.student_state_dict().keys()
    assert DistillationModule.load_from_checkpoint(watch.best_model_path).hparams.teacher == str(teacher_path)


def test_a_fitnet_loss_object_must_be_passed_again_to_load_and_then_restores_its_adapter(tmp_path):
    from jacplug.losses import FitNetLoss, KDLoss, WeightedLoss

    def loss() -> WeightedLoss:
        return WeightedLoss({"kd": (KDLoss(), 1.0), "fitnet": (FitNetLoss({"layer1": "layer1"}, {"layer1": (32, 32)}),
                                                              0.5)})

    torch.manual_seed(0)
    module = DistillationModule("test_resnet", "test_resnet", loss(), student_kwargs={"num_classes": 4},
                                teacher_kwargs={"num_classes": 4})
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(Images(4), batch_size=4))
    path = tmp_path / "fitnet.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(UserError, match=r"load_from_checkpoint\(path, loss=\.\.\.\)"):
        DistillationModule.load_from_checkpoint(path)
    loaded = DistillationModule.load_from_checkpoint(path, loss=loss())
    adapter = "distiller.loss.terms.fitnet.adapters.0.weight"
    assert torch.equal(loaded.state_dict()[adapter], module.state_dict()[adapter])


def test_a_teacher_name_without_its_classes_and_other_bad_arguments_are_one_line():
    with pytest.raises(UserError, match=r"teacher='test_resnet'.*num_classes.*teacher_kwargs="):
        DistillationModule("test_resnet", "test_resnet", ["kd=1"], student_kwargs={"num_classes": 4})
    with pytest.raises(UserError, match=r"student_kwargs=.*unexpected keyword argument 'bogus'"):
        DistillationModule("test_resnet", "test_resnet", student_kwargs={"num_classes": 4, "bogus": 1},
                           teacher_kwargs={"num_classes": 4})
    with pytest.raises(UserError, match=r"input_key= names a batch dict's key, a str; got int 3"):
        DistillationModule(timm.create_model("test_resnet", num_classes=4),
                           timm.create_model("test_resnet", num_classes=4), input_key=3)


class _RunsCode:
    """Unpickling this calls ``os.makedirs(path)``: what a crafted checkpoint could do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.makedirs, (str(self.path),)


def test_student_state_dict_refuses_a_pickle_that_would_run_code(tmp_path):
    crafted, ran = tmp_path / "handed.ckpt", tmp_path / "ran"
    torch.save({"state_dict": {"distiller.student.w": torch.zeros(1)}, "x": _RunsCode(ran)}, crafted)
    with pytest.raises(UserError, match="handed.ckpt holds objects other than tensors"):
        student_state_dict(crafted)
    assert not ran.exists()
    with pytest.raises(UserError, match="no checkpoint file"):
        student_state_dict(tmp_path / "missing.ckpt")
