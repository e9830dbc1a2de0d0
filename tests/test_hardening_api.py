"""Bad input to the Python API: one jacplug error naming the problem, at construction or on the first call,
never a PyTorch error from deep inside the step or a silent no-op; a plugin's bad loss names the plugin."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import jacplug
from jacplug import Distiller, hookimpl
from jacplug.errors import PluginError, UserError
from jacplug.losses import LossTerm

CLASSES = 4


def mlp(classes: int = CLASSES) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, classes))


def batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 6), torch.arange(n) % CLASSES


def kd(student: nn.Module | None = None, teacher: nn.Module | None = None, **kwargs) -> Distiller:
    return Distiller(student or mlp(), teacher or mlp(), ["kd=1", "ce=1"], **kwargs)


class Triple(nn.Module):
    """A student whose output is ``[B, C, 2]`` (a forgotten pooling)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(CLASSES * 2)

    def forward(self, x):
        return self.net(x).view(x.shape[0], CLASSES, 2)


class Integers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        return self.net(x).argmax(1, keepdim=True).expand(-1, CLASSES)


def one_line(error: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(error.value)
    return str(error.value)


@pytest.mark.parametrize("make, call, message", [
    (lambda: kd(teacher=mlp(10)), batch, r"the student returns logits \(4, 4\) but the teacher \(4, 10\); both must "
                                         r"classify the same C classes"),
    (lambda: kd(teacher=mlp().double()), batch, r"the teacher's parameters are torch.float64 but the inputs are "
                                                r"torch.float32"),
    (lambda: kd(teacher=mlp().to("meta")), batch, r"the teacher is on meta but the inputs are on cpu"),
    (kd, lambda: (batch()[0], torch.tensor([0, 1, 2, 7])),
     r"targets hold labels from 0 to 7, but the models classify 4 classes; labels must be 0 to 3"),
    (kd, lambda: (batch()[0], torch.tensor([0.0, 1.0, 2.0, 3.0])),
     r"loss terms \['ce'\] read class labels: targets must be integer class indices \[B\] \(torch.long\), got "
     r"\(4,\) torch.float32"),
    (kd, lambda: (torch.full((4, 6), float("nan")), batch()[1]), r"the inputs hold NaN or infinite values"),
    (kd, lambda: (torch.full((4, 6), float("inf")), batch()[1]), r"the inputs hold NaN or infinite values"),
    (lambda: kd(student=Triple()), batch, r"the student returned \(4, 4, 2\) torch.float32 logits; a classifier's "
                                          r"forward must return floating-point logits \[B, C\]"),
    (lambda: kd(student=Integers()), batch, r"the student returned \(4, 4\) torch.int64 logits"),
])
def test_bad_models_and_batches_are_one_jacplug_error_on_the_first_call(make, call, message):
    distiller = make()
    with pytest.raises(UserError, match=message) as error:
        distiller(*call())
    one_line(error)


@pytest.mark.parametrize("cached, message", [
    ({"rows": torch.zeros(4, 1)}, r"cached= must be a mapping with at least 'teacher_logits' \[B, C\]"),
    ({"teacher_logits": torch.zeros(3, CLASSES)}, r"cached= entries must be tensors \[B, \.\.\.\] with B = 4"),
    ({"teacher_logits": torch.zeros(4, CLASSES + 1)}, r"the student returns logits \(4, 4\) but the teacher \(4, 5\)"),
])
def test_a_bad_cached_teacher_entry_is_one_line(cached, message):
    with pytest.raises(UserError, match=message) as error:
        kd(check_gradients=False)(*batch(), cached=cached)
    one_line(error)


@pytest.mark.parametrize("kwargs, message", [
    ({"substitutions": "attention"}, r"substitutions= takes Substitution objects, .* got str 'attention'"),
    ({"substitutions": ["attention"]}, r"substitutions= takes Substitution objects .*got \['str'\]"),
    ({"teacher_input": "normalize"}, r"teacher_input must be a callable .* got str"),
    ({"check_gradients": "yes"}, r"check_gradients= takes True or False, got str 'yes'"),
    ({"capture": "no"}, r"capture= takes True or False, got str 'no'"),
])
def test_bad_constructor_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises(UserError, match=message) as error:
        kd(**kwargs)
    one_line(error)


def test_the_student_as_its_own_teacher_is_refused_before_anything_is_frozen():
    student = mlp().train()
    with pytest.raises(UserError, match=r"got the same module as student and teacher; freezing the teacher would "
                                        r"freeze the student: .*copy.deepcopy\(student\)") as error:
        Distiller(student, student, ["kd=1"])
    one_line(error)
    with pytest.raises(UserError, match=r"the teacher holds 4 of the student's trainable parameters \(1.weight, "
                                        r"1.bias, 3.weight, \.\.\.\)"):
        Distiller(student, nn.Sequential(student, nn.Softmax(1)), ["kd=1"])
    assert student.training and all(p.requires_grad for p in student.parameters())  # untouched
    frozen_backbone = nn.Sequential(mlp(), nn.Linear(CLASSES, CLASSES))
    frozen_backbone[0].requires_grad_(False)  # sharing parameters that do not train freezes nothing
    Distiller(frozen_backbone, frozen_backbone[0], ["kd=1"])
    assert frozen_backbone[1].weight.requires_grad


def resnet(channels: int = 3) -> nn.Module:
    import timm

    return timm.create_model("test_resnet", num_classes=CLASSES, in_chans=channels)


@pytest.mark.parametrize("student, teacher, images, message", [
    (resnet, resnet, (2, 1, 8, 8),
     r"the student's first layer 'conv1.0' \(Conv2d\) takes 3 input channels, but what it gets, \(2, 1, 8, 8\), has 1; "
     r"build the student for 1 input channels \(timm: in_chans=1\) or give it 3"),
    (lambda: resnet(1), resnet, (2, 1, 8, 8),
     r"the teacher's first layer 'conv1.0' \(Conv2d\) takes 3 input channels, but what it gets, \(2, 1, 8, 8\), has 1"),
    (mlp, mlp, (2, 7), r"the student's first layer '1' \(Linear\) takes 6 input features, but what it gets, "
                       r"\(2, 7\), has 7; build the student for 7 input features or give it 6"),
    (mlp, mlp, (0, 6), r"the Distiller's inputs are an empty batch \(0, 6\); pass at least one sample"),
])
def test_inputs_that_do_not_fit_the_models_are_named_with_the_shapes(student, teacher, images, message):
    distiller = Distiller(student(), teacher(), ["kd=1"])
    with pytest.raises(UserError, match=message) as error:
        distiller(torch.randn(*images))
    one_line(error)


def test_a_misspelt_loss_option_names_the_closest_one():
    with pytest.raises(UserError, match=r"loss 'jacobian' has no option 'clases' \(did you mean 'classes'\?\); it "
                                        r"takes: classes, k, squared, eps, backend") as error:
        jacplug.create_loss("jacobian", clases="label")
    one_line(error)
    with pytest.raises(UserError, match=r"loss 'fitnet': missing a required argument: 'layers'; it takes: layers"):
        jacplug.create_loss("fitnet")
    assert jacplug.create_loss("jacobian", classes="label").classes == "label"


def test_an_optimizer_without_the_trainable_parameters_is_refused_not_a_silent_no_op():
    distiller = kd()
    elsewhere = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(UserError, match=r"the optimizer holds none of the Distiller's trainable parameters, so "
                                        r"step\(\) would train nothing"):
        distiller.step(elsewhere, *batch())
    before = [p.clone() for p in distiller.student.parameters()]
    distiller.step(torch.optim.SGD(distiller.trainable_parameters(), lr=0.1), *batch())
    assert any(not torch.equal(a, b) for a, b in zip(before, distiller.student.parameters()))


def test_values_are_checked_on_the_first_call_only():
    """After the first call, bad values are no longer looked for (each look is a host synchronisation)."""
    distiller = kd()
    distiller(*batch())
    out = distiller(torch.full((4, 6), float("nan")), batch()[1])  # not re-checked: the caller reads the loss
    assert not torch.isfinite(out["loss"])


# ---------------------------------------------------------------------------------------------------
# plugins: a loss that is not a term, a term that returns no scalar


class Vector(LossTerm):
    name = "vector-loss"
    needs = frozenset({"student_logits"})

    def forward(self, batch):
        return batch.student_logits.pow(2).mean(0)


class Nothing(LossTerm):
    name = "nothing-loss"
    needs = frozenset({"student_logits"})

    def forward(self, batch):
        return None


class BadLosses:
    @hookimpl
    def register_losses(self, register):
        register("not-a-term", lambda: "a string")
        register("vector-loss", Vector)
        register("nothing-loss", Nothing)


@pytest.fixture
def bad_plugin():
    from jacplug.registry import PluginHost, reset_host

    host = PluginHost()
    previous = reset_host(host)
    host.register(BadLosses(), name="bad-losses")
    yield
    reset_host(previous)


@pytest.mark.parametrize("spec, message", [
    ("not-a-term=1", r"loss 'not-a-term' \(registered by plugin 'bad-losses'\) was built as a str, not a loss term"),
    ("vector-loss=1", r"loss term 'vector-loss' \(registered by plugin 'bad-losses'\) returned shape \(4,\), not a "
                      r"scalar"),
    ("nothing-loss=1", r"loss term 'nothing-loss' \(registered by plugin 'bad-losses'\) returned NoneType, not a "
                       r"tensor"),
])
def test_a_plugins_bad_loss_names_the_loss_and_the_plugin(bad_plugin, spec, message):
    with pytest.raises(PluginError, match=message) as error:
        Distiller(mlp(), mlp(), [spec])(*batch())
    one_line(error)


def test_a_weighted_loss_of_something_else_than_modules_is_refused():
    with pytest.raises(UserError, match=r"loss term 'mine' is a function, not a torch.nn.Module"):
        jacplug.losses.WeightedLoss({"mine": (lambda batch: 0.0, 1.0)})


# ---------------------------------------------------------------------------------------------------
# integrations: small validation blocks in their constructors


def test_timm_task_refuses_negative_weights_a_misspelt_teacher_and_nothing_to_distil():
    pytest.importorskip("timm.task")
    import timm

    from jacplug.integrations.timm_task import JacobianDistillationTask

    student = timm.create_model("test_resnet", num_classes=CLASSES)
    with pytest.raises(UserError, match=r"task_loss_weight=-1.0: weights must be finite and >= 0"):
        JacobianDistillationTask(student, mlp(), task_loss_weight=-1.0, distill_loss_weight=1.0, verbose=False)
    with pytest.raises(UserError, match=r"distill_loss_weight=0 leaves nothing to distil"):
        JacobianDistillationTask(student, mlp(), distill_loss_weight=0.0, verbose=False)
    with pytest.raises(UserError, match=r"unknown timm model 'resnt18'; did you mean 'resnet18'"):
        JacobianDistillationTask(student, "resnt18", verbose=False)
    task = JacobianDistillationTask(student, timm.create_model("test_resnet", num_classes=CLASSES),
                                    distill_loss_weight=0.0, loss=["jacobian=1"], verbose=False)
    assert list(task.distiller.loss.terms) == ["jacobian"]  # weight 0: no KD term at all


def test_lightning_refuses_a_non_callable_optimizer_or_scheduler():
    pytest.importorskip("lightning")
    from jacplug.integrations.lightning_module import DistillationModule

    with pytest.raises(UserError, match=r"optimizer= takes a callable that builds it, e.g. functools.partial"):
        DistillationModule(mlp(), mlp(), optimizer="adamw")
    with pytest.raises(UserError, match=r"lr_scheduler= takes a callable that builds it"):
        DistillationModule(mlp(), mlp(), lr_scheduler="cosine")


def test_hf_trainer_names_a_missing_label_key(tmp_path):
    pytest.importorskip("transformers")
    from transformers import TrainingArguments

    from jacplug.integrations.hf_trainer import JacobianDistillationTrainer

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no")
    trainer = JacobianDistillationTrainer(model=mlp(), teacher_model=mlp(), loss=["kd=1", "ce=1"], args=args)
    trainer.model.train()
    with pytest.raises(UserError, match=r"the batch has no 'labels' \(it has \['pixel_values', 'target'\]\), but "
                                        r"loss terms \['ce'\] read labels; pass label_key="):
        trainer.compute_loss(trainer.model, {"pixel_values": batch()[0], "target": batch()[1]})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_checks_leave_the_captured_cuda_step_alone():
    """Value checks run on the first (eager) call only: the captured step holds no host synchronisation."""
    distiller = kd(capture=True).cuda()
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01)
    images, labels = (t.cuda() for t in batch(8))
    for _ in range(5):
        distiller.step(optimizer, images, labels)
    assert distiller.capture_status == "CUDA graph"
    with pytest.raises(UserError, match=r"the student is on cuda:0 but the inputs are on cpu"):
        kd().cuda()(*batch())
