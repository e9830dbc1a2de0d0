"""The torchdistill bridge, through torchdistill's real DistillationBox and the shipped sample config.

torchdistill is installed by ``make test`` (the ``torchdistill`` extra), so these tests run in CI;
a missing torchdistill is an install error here, not a skip.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset
from torchdistill.core.distillation import get_distillation_box
from torchdistill.core.interfaces import registry as proc_registry
from torchdistill.losses import registry as loss_registry

from jacplug_plugins.torchdistill_bridge import TorchdistillNameCollision, register_with_torchdistill
from jacplug_plugins.torchdistill_run import build_model, load_config, run

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


def _config(sample_config: dict) -> dict:
    """A private copy (torchdistill edits configs in place) of the sample config, unchanged but for
    size: batches of 8 and a 32-image test split keep each test to seconds on two CPU cores."""
    config = copy.deepcopy({k: v for k, v in sample_config.items() if k != "datasets"})
    for section in ("teacher_train", "train"):
        config[section]["train_data_loader"]["kwargs"]["batch_size"] = 8
    datasets = dict(sample_config["datasets"])
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


def test_jacobian_term_with_hooked_teacher_recomputes_the_teacher(sample_config):
    """With torchdistill feature hooks on the teacher, it runs without grad and the term re-runs it."""
    config = _config(sample_config)
    config["train"]["teacher"]["forward_hook"] = {"output": ["layer1"]}
    box = _distillation_box(config, sub_terms=["jacobian"])
    images, targets, supp = _first_batch(box)
    loss = box.forward_process(images, targets, supp)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in box.student_model.parameters())


def test_jacobian_term_without_bridge_forward_procs_says_what_to_set(sample_config):
    config = _config(sample_config)
    config["train"]["student"]["forward_proc"] = "forward_batch_only"
    config["train"]["teacher"]["forward_proc"] = "forward_batch_only"
    box = _distillation_box(config, sub_terms=["jacobian"])
    images, targets, supp = _first_batch(box)
    with pytest.raises(ValueError, match="jacplug_student_input_grad"):
        box.forward_process(images, targets, supp)


def test_registration_is_idempotent():
    keys = register_with_torchdistill()
    assert register_with_torchdistill() == keys
    assert {"JacobianMatchingLoss", "JacobianProjectedLoss", "JacplugLoss"} <= set(keys["mid-level loss"])
    assert {"jacplug_student_input_grad", "jacplug_teacher_input_grad"} <= set(keys["forward procedure"])


@pytest.mark.parametrize(
    "registry, key",
    [
        (loss_registry.MIDDLE_LEVEL_LOSS_DICT, "JacobianMatchingLoss"),
        (loss_registry.LOW_LEVEL_LOSS_DICT, "JacplugLoss"),  # a mid-level key would hide it
        (proc_registry.FORWARD_PROC_FUNC_DICT, "jacplug_teacher_input_grad"),
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
