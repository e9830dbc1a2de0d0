"""``JacobianDistillationTrainer`` through the real Hugging Face ``Trainer``: a tiny randomly initialised
``ViTForImageClassification`` student (SDPA attention, exact Eq. 10) and a timm CNN student train for two
steps; every term reaches the parameters, each term is in the Trainer's own logs, the adapters train,
are checkpointed and resume; two processes (gloo) equal one."""

from __future__ import annotations

import subprocess

import pytest
import timm
import torch
from torch import nn

pytest.importorskip("transformers")  # installed by `make test` ([huggingface] extra)
from transformers import (  # noqa: E402
    ResNetConfig, ResNetForImageClassification, TrainingArguments, ViTConfig, ViTForImageClassification)

from jacplug import UserError  # noqa: E402
from jacplug.integrations.hf_trainer import JacobianDistillationTrainer  # noqa: E402
from jacplug.features import FeatureTap  # noqa: E402
from jacplug.losses import AttentionTransferLoss, FitNetLoss, JacobianLoss, KDLoss, WeightedLoss  # noqa: E402

SIZE, CLASSES = 16, 4


class Images(torch.utils.data.Dataset):
    """What an image-classification dataset gives the Trainer: ``{"pixel_values", "labels"}``."""

    def __init__(self, n: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, SIZE, SIZE, generator=g), torch.randint(0, CLASSES, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": int(self.y[i])}


def vit_student() -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(image_size=SIZE, patch_size=8, num_channels=3, hidden_size=24, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=48, num_labels=CLASSES, attn_implementation="sdpa")
    return ViTForImageClassification(config)


def teacher() -> nn.Module:
    torch.manual_seed(1)
    return timm.create_model("test_resnet", num_classes=CLASSES)


def arguments(tmp_path, **overrides) -> TrainingArguments:
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                   logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0)
    return TrainingArguments(**{**options, **overrides})


def test_a_vit_for_image_classification_student_trains_with_the_exact_term(tmp_path):
    student, frozen = vit_student(), teacher()
    assert student.config._attn_implementation == "sdpa"  # fused attention: no double backward without jacplug
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = JacobianDistillationTrainer(model=student, teacher_model=frozen, loss=["kd=1", "jacobian=1"],
                                          args=arguments(tmp_path), train_dataset=Images())
    trainer.train()  # the first step's check proves that kd and jacobian reach the student
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all({"kd", "jacobian"} <= set(entry) for entry in logged)
    assert all(entry["jacobian"] > 0 for entry in logged)
    changed = [k for k, v in student.state_dict().items() if not torch.equal(before[k], v)]
    assert any("attention" in k for k in changed) and any("patch_embeddings" in k for k in changed)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


def test_a_timm_cnn_student_trains_with_an_adapter_and_evaluates(tmp_path):
    torch.manual_seed(0)
    student, frozen = timm.create_model("test_resnet", num_classes=CLASSES), teacher()
    fitnet = FitNetLoss({"layer1": "layer1"}, {"layer1": (32, 32)})
    loss = WeightedLoss({"kd": (KDLoss(), 1.0), "fitnet": (fitnet, 1.0), "jacobian": (JacobianLoss(), 1.0)})
    adapter = next(fitnet.parameters()).detach().clone()
    trainer = JacobianDistillationTrainer(model=student, teacher_model=frozen, loss=loss, train_dataset=Images(),
                                          eval_dataset=Images(4), args=arguments(tmp_path, remove_unused_columns=False))
    trainer.train()
    assert not torch.equal(adapter, next(fitnet.parameters()))  # the adapter joined the Trainer's optimizer
    assert {"kd", "fitnet", "jacobian"} <= set(trainer.state.log_history[0])
    metrics = trainer.evaluate()  # the student's cross-entropy, under no_grad
    assert metrics["eval_loss"] > 0


def resnet_student() -> ResNetForImageClassification:
    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                          num_labels=CLASSES)
    return ResNetForImageClassification(config)


def test_a_vit_students_tokens_become_the_patch_grid_its_config_declares():
    """A transformers ViT has no ``num_prefix_tokens`` nor ``patch_embed``: its config's patch grid and
    its class token lay the ``[B, 1 + 4, D]`` tokens out as a ``[B, D, 2, 2]`` map, without the class token."""
    student = vit_student()
    with FeatureTap(student, ["vit.layers.0"]) as tap:
        student(torch.randn(2, 3, SIZE, SIZE))
        tokens, (mapped,) = tap.features()["vit.layers.0"], tap.maps().values()
    assert tokens.shape == (2, 5, 24) and mapped.shape == (2, 24, 2, 2)
    torch.testing.assert_close(mapped, tokens[:, 1:].transpose(1, 2).reshape(2, 24, 2, 2))


@pytest.mark.parametrize("make, layer, channels", [(vit_student, "vit.layers.0", 24),
                                                   (resnet_student, "resnet.encoder.stages.0", 8)])
def test_fitnet_and_attention_transfer_train_a_transformers_vit_and_cnn(tmp_path, make, layer, channels):
    student, frozen = make(), teacher()
    fitnet = FitNetLoss({layer: "layer1"}, {layer: (32, channels)})
    loss = WeightedLoss({"kd": (KDLoss(), 1.0), "fitnet": (fitnet, 1.0),
                         "attention": (AttentionTransferLoss({layer: "layer1"}), 1.0)})
    adapter = next(fitnet.parameters()).detach().clone()
    trainer = JacobianDistillationTrainer(model=student, teacher_model=frozen, loss=loss, train_dataset=Images(),
                                          args=arguments(tmp_path))
    trainer.train()  # the first step's check: every term reaches the student
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(entry["fitnet"] > 0 and entry["attention"] > 0 for entry in logged)
    assert not torch.equal(adapter, next(fitnet.parameters()))


def test_a_batch_without_the_images_is_one_line(tmp_path):
    torch.manual_seed(0)
    trainer = JacobianDistillationTrainer(model=timm.create_model("test_resnet", num_classes=CLASSES),
                                          teacher_model=teacher(), args=arguments(tmp_path), train_dataset=Images())
    with pytest.raises(UserError, match=r"the batch has no 'pixel_values'.*remove_unused_columns=False"):
        trainer.train()  # the default removes every column the timm model's forward(x) does not name


class Pair(nn.Module):
    """A model whose output has no logits: a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.net = timm.create_model("test_resnet", num_classes=CLASSES)

    def forward(self, pixel_values):
        return self.net(pixel_values), self.net(pixel_values)


def test_a_bad_loss_spec_and_an_output_without_logits_are_one_line(tmp_path):
    with pytest.raises(UserError, match="teacher_model= takes the teacher as an nn.Module.*got str 'resnet18'"):
        JacobianDistillationTrainer(model=vit_student(), teacher_model="resnet18", args=arguments(tmp_path))
    with pytest.raises(UserError, match="did you mean 'jacobian'"):
        JacobianDistillationTrainer(model=vit_student(), teacher_model=teacher(), loss=["kd=1", "jacobain=1"],
                                    args=arguments(tmp_path), train_dataset=Images())
    trainer = JacobianDistillationTrainer(model=Pair(), teacher_model=teacher(), args=arguments(tmp_path),
                                          train_dataset=Images())
    with pytest.raises(UserError, match=r"^the student's forward returned a tuple, not logits"):
        trainer.train()


def adapter_loss() -> WeightedLoss:
    fitnet = FitNetLoss({"layer1": "layer1"}, {"layer1": (32, 32)})
    return WeightedLoss({"kd": (KDLoss(), 1.0), "fitnet": (fitnet, 1.0)})


def cnn_trainer(tmp_path, **overrides) -> JacobianDistillationTrainer:
    torch.manual_seed(0)
    student = timm.create_model("test_resnet", num_classes=CLASSES)
    return JacobianDistillationTrainer(model=student, teacher_model=teacher(), loss=adapter_loss(),
                                       train_dataset=Images(),
                                       args=arguments(tmp_path, remove_unused_columns=False,
                                                      lr_scheduler_type="constant", **overrides))


def test_checkpoints_carry_the_adapters_and_a_resumed_run_continues_them(tmp_path):
    """Three steps in one run equal two steps, a checkpoint, and a resumed third step: student and adapter."""
    whole = cnn_trainer(tmp_path / "whole", max_steps=3)
    whole.train()
    first = cnn_trainer(tmp_path / "resumed", max_steps=2, save_strategy="steps", save_steps=2)
    first.train()
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    assert (checkpoint / "jacplug_loss.safetensors").is_file()
    resumed = cnn_trainer(tmp_path / "resumed", max_steps=3)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for a, b in zip(resumed.distiller.parameters(), whole.distiller.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    bare = timm.create_model("test_resnet", num_classes=CLASSES)
    bare.load_state_dict(resumed.student_state_dict())


def start_script(out, batch: int, processes: int) -> subprocess.Popen:
    import os
    import socket
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = str(Path(__file__).parent / "scripts" / "hf_ddp.py")
    launch = [sys.executable]
    if processes > 1:
        launch += ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={port}"]
    return subprocess.Popen([*launch, script, str(out), str(batch)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def finished(proc: subprocess.Popen) -> None:
    try:
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_equal_one_process_adapters_and_logged_terms_included(tmp_path):
    """The Trainer's DDP over gloo (2 CPU processes, float64): both ranks end with one process's student
    and adapter on the same global batches, and log the same term values (averaged over the ranks)."""
    import json

    from safetensors.torch import load_file

    # the one-process reference runs beside the two DDP processes: one process start-up instead of two in a row
    ddp, single_run = start_script(tmp_path / "ddp", batch=2, processes=2), start_script(tmp_path / "single", 4, 1)
    finished(ddp)
    finished(single_run)
    single = load_file(str(tmp_path / "single.0.safetensors"))
    assert "loss.terms.fitnet.adapters.0.weight" in single
    logged = [entry for entry in json.loads((tmp_path / "single.0.json").read_text()) if "kd" in entry]
    assert len(logged) == 3
    for rank in range(2):
        ddp = load_file(str(tmp_path / f"ddp.{rank}.safetensors"))
        assert set(ddp) == set(single)
        for key in single:
            torch.testing.assert_close(ddp[key], single[key], rtol=1e-10, atol=1e-12, msg=f"rank {rank}: {key}")
        entries = [entry for entry in json.loads((tmp_path / f"ddp.{rank}.json").read_text()) if "kd" in entry]
        for ours, theirs in zip(entries, logged, strict=True):
            for key in ("kd", "fitnet", "jacobian"):
                assert ours[key] == pytest.approx(theirs[key], rel=1e-9), (rank, key)
