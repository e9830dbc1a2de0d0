"""The torchdistill bridge, through torchdistill's real DistillationBox and the shipped sample config.

torchdistill is installed by ``make test`` (the ``torchdistill`` extra), so these tests run in CI;
without it (an install without the extra, or a torch older than torchdistill needs) the module skips.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("torchdistill", reason="the torchdistill bridge needs the [torchdistill] extra")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.optim.lr_scheduler import ReduceLROnPlateau  # noqa: E402
from torch.utils.data import Subset  # noqa: E402
from torchdistill.core.distillation import get_distillation_box  # noqa: E402
from torchdistill.core.interfaces import registry as proc_registry  # noqa: E402
from torchdistill.losses import registry as loss_registry  # noqa: E402

from jacplug.errors import UserError  # noqa: E402
from jacplug.integrations.torchdistill import (  # noqa: E402
    BridgeConfigError, TorchdistillNameCollision, register_with_torchdistill)
from jacplug.integrations.torchdistill.epoch import TermMeter, plateau_metric  # noqa: E402
from jacplug.integrations.torchdistill.run import build_model, load_config, run  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "docs" / "examples" / "torchdistill_digits.yaml"
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Batches of 8 16x16 images are too small for intra-op threads: on a busy two-core machine the
    thread hand-offs made these tests 8x slower than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sample_config() -> dict:
    return load_config(CONFIG)


def _config(sample_config: dict, train_images: int | None = None) -> dict:
    """A private copy (torchdistill edits configs in place) of the sample config, unchanged but for
    size: batches of 8, 16 validation and 32 test images (and ``train_images`` training images) keep
    each test to seconds on two CPU cores."""
    config = copy.deepcopy({k: v for k, v in sample_config.items() if k != "datasets"})
    for section in ("teacher_train", "train"):
        config[section]["train_data_loader"]["kwargs"]["batch_size"] = 8
    datasets = dict(sample_config["datasets"])
    sizes = {"val_data_loader": 16, "train_data_loader": train_images}
    for loader, size in sizes.items():
        if size is not None:
            dataset_id = config["train"][loader]["dataset_id"]
            datasets[dataset_id] = Subset(datasets[dataset_id], range(size))
    test_id = config["test"]["test_data_loader"]["dataset_id"]
    datasets[test_id] = Subset(datasets[test_id], range(32))
    config["datasets"] = datasets
    return config


def _distillation_box(config: dict, sub_terms: list[str] | None = None):
    torch.manual_seed(0)
    teacher = build_model(config["models"]["teacher_model"], CPU)
    student = build_model(config["models"]["student_model"], CPU)
    train = config["train"]
    if sub_terms is not None:
        terms = train["criterion"]["kwargs"]["sub_terms"]
        train["criterion"]["kwargs"]["sub_terms"] = {k: terms[k] for k in sub_terms}
    return get_distillation_box(teacher, student, config["datasets"], train, CPU, None, False, 1)


def _first_batch(box):
    box.pre_epoch_process(epoch=0)
    return next(iter(box.train_data_loader))


def _example_script_epoch(box, epoch: int) -> list[float]:
    """One epoch as torchdistill's own example script (examples/torchvision/image_classification.py)
    drives a box: its train_one_epoch, then post_epoch_process() with no metric. Returns the losses."""
    box.pre_epoch_process(epoch=epoch)
    losses = []
    for sample_batch, targets, supp_dict in box.train_data_loader:
        loss = box.forward_process(sample_batch, targets, supp_dict)
        box.post_forward_process(loss=loss)
        losses.append(loss.item())
    return losses


@torch.no_grad()
def _val_accuracy(model, loader) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        correct += int((model(images).argmax(1) == labels).sum())
        total += labels.numel()
    return 100.0 * correct / total


def test_torchdistills_own_loop_steps_reduce_on_plateau_and_logs_each_term(sample_config, caplog):
    """The sample config (ReduceLROnPlateau on validation accuracy, a val_data_loader,
    JacplugWeightedSumLoss, jacplug_post_epoch_process) in torchdistill's DistillationBox, driven as
    torchdistill's example script drives it; torchdistill's default post-epoch process would call
    ReduceLROnPlateau.step(None) here and fail."""
    config = _config(sample_config, train_images=16)
    assert config["train"]["scheduler"]["key"] == "ReduceLROnPlateau"
    box = _distillation_box(config)
    assert isinstance(box.lr_scheduler, ReduceLROnPlateau) and box.lr_scheduler.mode == "max"
    caplog.set_level(logging.INFO, logger="jacplug.integrations.torchdistill.epoch")
    epoch_losses, val_accs = [], []
    for epoch in range(2):
        epoch_losses.append(_example_script_epoch(box, epoch))
        val_accs.append(_val_accuracy(box.student_model, box.val_data_loader))  # the script's evaluate()
        box.post_epoch_process()
    assert box.lr_scheduler.last_epoch == 2
    assert box.lr_scheduler.best == max(val_accs), "the scheduler must have been stepped with validation top-1"

    lines = [r.getMessage() for r in caplog.records if "loss terms" in r.getMessage()]
    assert [line.split(" loss terms")[0] for line in lines] == ["epoch 0", "epoch 1"]
    for line, losses in zip(lines, epoch_losses):
        values = {k: float(v) for k, v in re.findall(r"(\w+)=([-\d.]+)", line)}
        assert set(values) == {"kd", "jacobian", "total"}
        assert values["jacobian"] > 0
        assert values["total"] == pytest.approx(sum(losses) / len(losses), abs=2e-4)
        assert values["kd"] + values["jacobian"] == pytest.approx(values["total"], abs=2e-4)
        assert "jacobian=" in line and "(x1)" in line


def test_plateau_metric_follows_the_scheduler_mode():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    meter = TermMeter()
    for value in (3.0, 5.0):
        meter.add("total", torch.tensor(value))
    minimise = SimpleNamespace(lr_scheduler=ReduceLROnPlateau(optimizer, mode="min"), scheduling_step=0,
                               criterion=SimpleNamespace(meter=meter))
    assert plateau_metric(minimise) == pytest.approx(4.0)  # the epoch's mean training loss
    maximise = SimpleNamespace(lr_scheduler=ReduceLROnPlateau(optimizer, mode="max"), scheduling_step=0,
                               val_data_loader=None, criterion=None)
    assert plateau_metric(maximise, val_accuracy=87.5) == 87.5
    with pytest.raises(BridgeConfigError, match="val_data_loader"):
        plateau_metric(maximise)
    minimise.criterion = SimpleNamespace()  # torchdistill's own WeightedSumLoss records nothing
    with pytest.raises(BridgeConfigError, match="JacplugWeightedSumLoss"):
        plateau_metric(minimise)
    other = SimpleNamespace(lr_scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 1), scheduling_step=0)
    assert plateau_metric(other) is None


def test_runner_keeps_and_tests_the_best_student(sample_config, tmp_path):
    config = _config(sample_config, train_images=16)
    config["teacher_train"]["num_epochs"] = 1
    config["train"]["num_epochs"] = 2
    config["models"]["student_model"]["dst_ckpt"] = str(tmp_path / "student.safetensors")
    torch.manual_seed(0)
    summary = run(config, "cpu")
    assert summary["steps"] == 4
    with safe_open(summary["student_weights"], framework="pt") as fh:
        meta = fh.metadata()
    assert float(meta["val_top1"]) == pytest.approx(summary["best_val_acc"], abs=1e-4)
    assert int(meta["epoch"]) == summary["best_epoch"]
    best = load_file(summary["student_weights"])
    student = build_model(config["models"]["student_model"], CPU)
    student.load_state_dict(best)
    test_id = config["test"]["test_data_loader"]["dataset_id"]
    loader = torch.utils.data.DataLoader(config["datasets"][test_id], batch_size=32)
    assert summary["student_acc"] == pytest.approx(_val_accuracy(student, loader)), "the best student is tested"


def test_forward_procs_leave_the_batch_alone(sample_config):
    box = _distillation_box(_config(sample_config), sub_terms=["jacobian"])
    images, targets, supp = _first_batch(box)
    loss = box.forward_process(images, targets, supp)
    loss.backward()
    assert not images.requires_grad and images.grad is None and images.is_leaf


def test_learnable_term_is_refused_when_the_config_is_built(sample_config):
    config = _config(sample_config)
    fitnet = {"term": "fitnet", "options": {"layers": {"layer1": "layer1"}, "channels": {"layer1": [64, 64]}}}
    config["train"]["criterion"]["kwargs"]["sub_terms"]["fitnet"] = {
        "criterion": {"key": "JacplugLoss", "kwargs": fitnet}, "weight": 1.0,
    }
    with pytest.raises(BridgeConfigError, match="learnable parameters.*optimizer"):
        _distillation_box(config)


def _hard_sigmoid_student_box(sample_config):
    """mobilenetv3's squeeze-excitation gate is a hard-sigmoid, whose backward has no derivative."""
    config = _config(sample_config)
    config["models"]["student_model"]["kwargs"]["name"] = "mobilenetv3_small_050"
    box = _distillation_box(config, sub_terms=["jacobian"])
    return box, _first_batch(box)


def test_student_with_hard_sigmoid_trains_through_the_substitution(sample_config):
    box, (images, targets, supp) = _hard_sigmoid_student_box(sample_config)
    loss = box.forward_process(images, targets, supp)
    loss.backward()  # hardsigmoid_backward has no derivative; the student ran double-differentiable
    gate = box.student_model.blocks[0][0].se.conv_reduce.weight  # feeds the hard-sigmoid gate
    assert gate.grad is not None and gate.grad.abs().sum() > 0


def test_op_without_double_backward_fails_before_backward_and_is_named(sample_config):
    """An op no substitution covers (here: hard-sigmoid with the Distiller's substitutions switched off) is
    named in torchdistill's forward_process by the Distiller's first-call check, not left to fail in
    loss.backward()."""
    from jacplug.integrations.torchdistill.procedures import BOUND_ATTR

    box, (images, targets, supp) = _hard_sigmoid_student_box(sample_config)
    getattr(box.student_model, BOUND_ATTR)[0].substitutions = []
    with pytest.raises(UserError, match=r"student 'MobileNetV3' cannot run terms jacobian: aten::hardsigmoid_backward has no "
                                         r"derivative and no op substitution covers it; use jacobian-direction"):
        box.forward_process(images, targets, supp)


def test_sample_config_runs_in_torchdistills_loop(sample_config, tmp_path):
    config = _config(sample_config)
    config["models"]["student_model"]["dst_ckpt"] = str(tmp_path / "student.safetensors")
    losses = []

    def on_step(box, step, loss):
        losses.append(float(loss))

    torch.manual_seed(0)
    summary = run(config, "cpu", max_steps=2, on_step=on_step)
    assert summary["steps"] == 2 and len(losses) == 2
    assert all(math.isfinite(v) and v > 0 for v in losses)
    assert 0.0 <= summary["student_acc"] <= 100.0
    assert (tmp_path / "student.safetensors").is_file()


def test_jacobian_term_alone_trains_the_student(sample_config):
    box = _distillation_box(_config(sample_config), sub_terms=["jacobian"])
    images, targets, supp = _first_batch(box)
    loss = box.forward_process(images, targets, supp)
    assert loss.ndim == 0 and float(loss.detach()) > 0
    params = [p for p in box.student_model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    reached = [g for g in grads if g is not None and bool(g.abs().sum() > 0)]
    assert len(reached) > len(params) // 2, "the Jacobian term's gradient must reach the student's parameters"
    first_conv = next(p for p in box.student_model.parameters() if p.ndim == 4)
    assert grads[params.index(first_conv)].abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in box.teacher_model.parameters())
    assert not box.teacher_model.training, "the teacher runs in eval mode for per-sample Jacobians"


def test_jacobian_term_with_hooked_teacher_keeps_the_teachers_graph_out_of_its_features(sample_config):
    """torchdistill's feature hooks on the teacher see the teacher's forward procedure, which runs without
    grad; the Distiller takes the teacher's rows itself."""
    config = _config(sample_config)
    config["train"]["teacher"]["forward_hook"] = {"output": ["layer1"]}
    box = _distillation_box(config, sub_terms=["jacobian"])
    images, targets, supp = _first_batch(box)
    teacher_outputs, teacher_io = box.get_teacher_output(images, targets, supp)
    assert not teacher_io["layer1"]["output"].requires_grad
    loss = box.forward_process(images, targets, supp)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in box.student_model.parameters())


def test_jacobian_term_without_bridge_forward_procs_says_what_to_set(sample_config):
    config = _config(sample_config)
    config["train"]["student"]["forward_proc"] = "forward_batch_only"
    config["train"]["teacher"]["forward_proc"] = "forward_batch_only"
    box = _distillation_box(config, sub_terms=["jacobian"])
    images, targets, supp = _first_batch(box)
    with pytest.raises(ValueError, match="jacplug_student_input_grad.*jacplug_pre_epoch_process"):
        box.forward_process(images, targets, supp)


def test_student_procedure_without_the_pre_epoch_process_says_what_to_set(sample_config):
    config = _config(sample_config)
    del config["train"]["pre_epoch_process"]
    box = _distillation_box(config, sub_terms=["jacobian"])
    images, targets, supp = _first_batch(box)
    with pytest.raises(BridgeConfigError, match="set `pre_epoch_process: 'jacplug_pre_epoch_process'` under train"):
        box.forward_process(images, targets, supp)


def test_registration_is_idempotent():
    keys = register_with_torchdistill()
    assert register_with_torchdistill() == keys
    assert {"JacobianMatchingLoss", "JacobianProjectedLoss", "JacplugLoss"} <= set(keys["mid-level loss"])
    assert {"jacplug_student_input_grad", "jacplug_teacher_input_grad"} <= set(keys["forward procedure"])
    assert keys["high-level loss"] == ["JacplugWeightedSumLoss"]
    assert keys["post-epoch process"] == ["jacplug_post_epoch_process"]
    assert keys["pre-epoch process"] == ["jacplug_pre_epoch_process"]


@pytest.mark.parametrize(
    "registry, key",
    [
        (loss_registry.MIDDLE_LEVEL_LOSS_DICT, "JacobianMatchingLoss"),
        (loss_registry.LOW_LEVEL_LOSS_DICT, "JacplugLoss"),  # a mid-level key would hide it
        (proc_registry.FORWARD_PROC_FUNC_DICT, "jacplug_teacher_input_grad"),
        (proc_registry.POST_EPOCH_PROC_FUNC_DICT, "jacplug_post_epoch_process"),
        (loss_registry.HIGH_LEVEL_LOSS_DICT, "JacplugWeightedSumLoss"),
    ],
)
def test_name_collision_is_refused(monkeypatch, registry, key):
    def someone_elses(*args, **kwargs):
        raise AssertionError("never called")

    monkeypatch.setitem(registry, key, someone_elses)
    untouched = dict(loss_registry.MIDDLE_LEVEL_LOSS_DICT)
    with pytest.raises(TorchdistillNameCollision, match=key) as info:
        register_with_torchdistill()
    assert "someone_elses" in str(info.value)
    assert loss_registry.MIDDLE_LEVEL_LOSS_DICT == untouched, "a refused registration must register nothing"


def test_docs_show_the_sample_config_as_shipped():
    """docs/torchdistill.md prints the sample file in full: the two must not drift apart."""

    def significant_lines(text: str) -> list[str]:
        lines = (line.split(" #", 1)[0].rstrip() for line in text.splitlines())
        return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]

    doc = (CONFIG.parents[1] / "torchdistill.md").read_text()
    shown = doc.split("The file, in full:\n\n```yaml\n", 1)[1].split("```", 1)[0]
    assert significant_lines(shown) == significant_lines(CONFIG.read_text())
