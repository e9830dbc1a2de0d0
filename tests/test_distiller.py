"""``jacplug.Distiller``: the step equals the one built by hand from the library's parts (float64), for a
BatchNorm CNN, a ViT and a MobileNetV3 student with every registered term; and each rule it applies by
itself holds (frozen eval teacher, labels only when read, checks on the first call, what is trained,
state, precision, model outputs, bad input)."""

from __future__ import annotations

import contextlib

import pytest
import timm
import torch
from torch import nn

from jacplug import DetachedLossError, Distiller, FeatureTap, UserError, double_differentiable
from jacplug.engine.substitutions import DOUBLE_BACKWARD
from jacplug.errors import UnknownNameError
from jacplug.losses import (
    AttentionTransferLoss, DistillBatch, FeatureJacobianLoss, FitNetLoss, KDLoss, LossTerm, WeightedLoss,
    build_loss, extra_evaluation, jacobian_distillation,
)
from jacplug.losses.base import as_scalar
from jacplug.registry import registry

SIZE, CLASSES = 16, 5

#: student -> (timm name, kwargs, the layer its feature terms read)
STUDENTS = {
    "cnn": ("test_resnet", {}, "layer1"),
    "vit": ("vit_tiny_patch16_224", dict(img_size=SIZE, patch_size=8, depth=1, embed_dim=24, num_heads=2), "blocks.0"),
    "mobilenetv3": ("mobilenetv3_small_050", {}, "blocks.1"),
}
TEACHER_LAYER = "layer1"


def models(student: str) -> tuple[nn.Module, nn.Module]:
    name, kwargs, _ = STUDENTS[student]
    torch.manual_seed(0)
    student_model = timm.create_model(name, num_classes=CLASSES, in_chans=1, **kwargs).double().train()
    teacher = timm.create_model("test_resnet", num_classes=CLASSES, in_chans=1).double().eval().requires_grad_(False)
    return student_model, teacher


def channels(model: nn.Module, layer: str) -> int:
    with FeatureTap(model, [layer], requires_grad=False) as tap, torch.no_grad():
        model.eval()(torch.zeros(2, 1, SIZE, SIZE, dtype=torch.float64))
    model.train()
    return tap.maps()[layer].shape[1]


def every_term(student: str, student_model: nn.Module, teacher: nn.Module) -> WeightedLoss:
    """One of each registered term (feature terms on one layer pair), weights between 0.1 and 1."""
    layer = STUDENTS[student][2]
    pair = {layer: TEACHER_LAYER}
    specs = {"kd": {}, "mse-soft": {}, "ce": {}, "ce-teacher": {}, "jacobian": {}, "jacobian-projected": dict(k=2),
             "jacobian-direction": {}, "noisy-distill": {}}
    # feature-jacobian first: it needs the teacher's graph to its features, which the Jacobian terms free
    terms: dict = {"feature-jacobian": (FeatureJacobianLoss(pair), 0.3)}
    for i, (key, options) in enumerate(specs.items()):
        terms[key] = (registry("losses").get(key).factory(**options), 0.1 + 0.1 * i)
    terms["fitnet"] = (FitNetLoss(pair, {layer: (channels(teacher, TEACHER_LAYER), channels(student_model, layer))}), 0.5)
    terms["attention"] = (AttentionTransferLoss(pair), 0.7)
    assert set(terms) == set(registry("losses").names())  # every registered term, none forgotten
    return WeightedLoss(terms).double()


def by_hand(loss: WeightedLoss, student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The step from the library's parts, as docs/reuse.md builds it: inputs that require grad before both
    forwards, taps on both models, the double-differentiable student, the teacher with grad to the inputs
    only, model callables for the terms that evaluate again."""
    layers = loss.feature_layers
    x = x.detach().requires_grad_(True)
    with FeatureTap(student, list(layers)) as s_tap, FeatureTap(teacher, list(layers.values()), requires_grad=False) as t_tap:
        with double_differentiable():
            s = student(x)
        t = teacher(x)
        s_maps, t_maps = s_tap.maps(), t_tap.maps()
    batch = DistillBatch(inputs=x, student_logits=s, teacher_logits=t, targets=y, student_fn=extra_evaluation(student),
                         teacher_fn=extra_evaluation(teacher), student_features=s_maps, teacher_features=t_maps)
    return sum(loss.weights[key] * as_scalar(term(batch), term) for key, term in loss.terms.items())


@pytest.mark.slow
@pytest.mark.parametrize("student", list(STUDENTS))
def test_a_step_equals_the_step_built_by_hand_for_every_term(student):
    student_model, teacher = models(student)
    loss = every_term(student, student_model, teacher)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, SIZE, SIZE, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (4,), generator=g)
    params = [*student_model.parameters(), *loss.parameters()]
    state = {k: v.clone() for k, v in student_model.state_dict().items()}
    results = []
    for step in ("distiller", "by hand"):
        student_model.load_state_dict(state)  # the same BatchNorm statistics before each
        for p in params:
            p.grad = None
        torch.manual_seed(2)  # the same random projections, directions and noise
        if step == "distiller":
            out = Distiller(student_model, teacher, loss)(x, y)
            assert set(out) == {"loss", "output", *loss.terms} and out["output"].shape == (4, CLASSES)
            total = out["loss"]
        else:
            total = by_hand(loss, student_model, teacher, x, y)
        total.backward()
        results.append((total.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]))
    (ours, our_grads), (reference, reference_grads) = results
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=0)
    for a, b in zip(our_grads, reference_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert sum(float(g.abs().sum()) > 0 for g in our_grads) > len(params) // 2


# ---------------------------------------------------------------------------------------------------
# the rules it applies by itself


def cnn(width: int = 6) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.Flatten(),
                         nn.Linear(width * 16, 3))


def batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_the_teacher_is_frozen_in_eval_mode_and_never_trained_or_saved():
    torch.manual_seed(0)
    student, teacher = cnn(), cnn(8).train()
    distiller = Distiller(student, teacher, ["kd=1", "jacobian=1"])
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    distiller.train()  # what every training loop calls: the teacher stays in eval mode
    assert student.training and not teacher.training
    teacher.train()  # even switched back by hand, the step runs it in eval mode
    stats = {k: v.clone() for k, v in teacher.state_dict().items()}
    x, y = batch()
    distiller(x, y)["loss"].backward()
    assert not teacher.training
    assert all(torch.equal(stats[k], v) for k, v in teacher.state_dict().items())  # running stats unmoved
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in distiller.trainable_parameters()}
    assert not teacher_ids & {id(p) for p in distiller.parameters()}
    assert all(key.startswith(("student.", "loss.")) for key in distiller.state_dict())
    distiller.double()  # the teacher moves with the Distiller
    assert next(teacher.parameters()).dtype == torch.float64


def test_labels_are_needed_only_by_terms_that_read_them():
    torch.manual_seed(0)
    x, y = batch()
    out = Distiller(cnn(), cnn(), ["kd=1", "jacobian=1"])(x)
    assert out["loss"].grad_fn is not None
    with pytest.raises(UserError, match=r"loss terms \['ce'\] read labels: call distiller\(inputs, targets\)"):
        Distiller(cnn(), cnn(), ["kd=1", "ce=1"])(x)
    with pytest.raises(UserError, match=r"targets must be a tensor \[B\] with B = 6"):
        Distiller(cnn(), cnn(), ["ce=1"])(x, y[:3])
    with pytest.raises(UserError, match="floating-point batch"):
        Distiller(cnn(), cnn(), ["kd=1"])(y)


def test_every_loss_form_and_bad_specs():
    torch.manual_seed(0)
    student, teacher = cnn(), cnn()
    preset = Distiller(student, teacher).loss
    assert preset.weights == jacobian_distillation().weights
    assert Distiller(student, teacher, {"kd": 1, "jacobian": 10}).loss.weights == {"kd": 1.0, "jacobian": 10.0}
    assert Distiller(student, teacher, "kd=2").loss.weights == {"kd": 2.0}
    custom = WeightedLoss({"kd": (KDLoss(), 1.0)})
    assert Distiller(student, teacher, custom).loss is custom
    with pytest.raises(UnknownNameError, match="did you mean 'jacobian'"):
        Distiller(student, teacher, ["kd=1", "jacobain=1"])
    with pytest.raises(UserError, match="--loss 'kd': a term needs a name and a weight"):
        Distiller(student, teacher, ["kd"])
    with pytest.raises(UserError, match="clash with the result's"):
        Distiller(student, teacher, WeightedLoss({"output": (KDLoss(), 1.0)}))
    with pytest.raises(UserError, match="amp="):
        Distiller(student, teacher, amp="fast")


class DetachedTerm(LossTerm):
    name = "detached"
    needs = frozenset({"student_logits"})

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        return batch.student_logits.detach().pow(2).mean()  # trains nothing


def test_a_detached_term_is_refused_on_the_first_call_before_any_update():
    torch.manual_seed(0)
    loss = WeightedLoss({"kd": (KDLoss(), 1.0), "detached": (DetachedTerm(), 1.0)})
    distiller = Distiller(cnn(), cnn(), loss)
    x, y = batch()
    with pytest.raises(DetachedLossError, match="detached"):
        distiller(x, y)
    assert all(p.grad is None for p in distiller.student.parameters())
    assert Distiller(cnn(), cnn(), loss, check_gradients=False)(x, y)["detached"].grad_fn is None


class RawHardSigmoid(nn.Module):
    def forward(self, x):
        return torch._C._nn.hardsigmoid(x)  # past the call site a substitution reaches


def test_an_op_without_double_backward_is_named_in_one_line_on_the_first_call():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), RawHardSigmoid(), nn.Linear(8, 3))
    with pytest.raises(UserError) as info:
        Distiller(student, cnn(), ["kd=1", "jacobian=1"], name="mynet")(*batch())
    message = str(info.value)
    assert "\n" not in message and "student 'mynet' cannot run terms jacobian" in message
    assert "aten::hardsigmoid_backward" in message and "module 2 (RawHardSigmoid)" in message
    assert "jacobian-direction:method=finite-difference or noisy-distill" in message


def test_the_optimizer_gets_the_student_and_the_adapters_and_state_round_trips():
    torch.manual_seed(0)
    fitnet = FitNetLoss({"1": "1"}, {"1": (8, 6)})
    distiller = Distiller(cnn(6), cnn(8), WeightedLoss({"kd": (KDLoss(), 1.0), "fitnet": (fitnet, 1.0)}))
    trainable = distiller.trainable_parameters()
    assert {id(p) for p in fitnet.parameters()} <= {id(p) for p in trainable}
    assert len(trainable) == len(list(distiller.student.parameters())) + len(list(fitnet.parameters()))
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    x, y = batch()
    adapter = next(fitnet.parameters()).detach().clone()
    values = distiller.step(optimizer, x, y)
    assert not any(v.requires_grad for v in values.values()) and set(values) == {"loss", "output", "kd", "fitnet"}
    assert not torch.equal(adapter, next(fitnet.parameters()))  # the adapter was trained

    torch.manual_seed(1)  # other initial weights everywhere
    twin = Distiller(cnn(6), cnn(8), WeightedLoss({"kd": (KDLoss(), 1.0), "fitnet": (FitNetLoss({"1": "1"}, {"1": (8, 6)}), 1.0)}))
    twin.teacher.load_state_dict(distiller.teacher.state_dict())  # the teacher is not part of the state
    twin.load_state_dict(distiller.state_dict())
    distiller.eval(), twin.eval()  # BatchNorm on the (loaded) running statistics
    torch.testing.assert_close(twin(x, y)["loss"], distiller(x, y)["loss"], rtol=0, atol=0)


def test_step_is_forward_backward_and_the_optimizer_step():
    x, y = batch()
    trained = []
    for how in ("step", "by hand"):
        torch.manual_seed(0)
        distiller = Distiller(cnn(), cnn(), ["kd=1", "jacobian=1"])
        optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            if how == "step":
                distiller.step(optimizer, x, y)
            else:
                optimizer.zero_grad()
                distiller(x, y)["loss"].backward()
                optimizer.step()
        trained.append([p.detach().clone() for p in distiller.student.parameters()])
    for a, b in zip(*trained, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert distiller.capture_status == "eager"  # no CUDA graph without capture=True and a CUDA device


class LogitsOutput:
    """What a Hugging Face model returns: an object with ``.logits``."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class HuggingFaceLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = cnn()

    def forward(self, x):
        return LogitsOutput(self.net(x))


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = cnn()

    def forward(self, x):
        return self.net(x), self.net(x)


def test_model_outputs_with_logits_work_and_others_are_one_line():
    torch.manual_seed(0)
    x, y = batch()
    out = Distiller(HuggingFaceLike(), HuggingFaceLike(), ["kd=1", "jacobian=1", "jacobian-direction=1"])(x, y)
    assert out["output"].shape == (6, 3) and out["jacobian-direction"].grad_fn is not None
    with pytest.raises(UserError, match=r"the student's forward returned a tuple, not logits"):
        Distiller(Pair(), cnn(), ["kd=1"])(x, y)


def test_float64_models_keep_float64_terms_and_bf16_autocast_gives_float32_terms():
    torch.manual_seed(0)
    x, y = batch()
    out = Distiller(cnn().double(), cnn().double(), ["kd=1", "jacobian=1"])(x.double(), y)
    assert all(v.dtype == torch.float64 for v in out.values())
    out = Distiller(cnn(), cnn(), ["kd=1", "jacobian=1"], amp=True)(x, y)  # bf16 autocast, on a CPU too
    assert all(v.dtype == torch.float32 for v in out.values())


def test_the_student_is_double_differentiable_only_when_a_term_needs_it(monkeypatch):
    import jacplug.distiller as module

    entered = []

    def spy(substitutions=None):
        entered.append(substitutions)
        return contextlib.nullcontext()

    monkeypatch.setattr(module, "double_differentiable", spy)
    torch.manual_seed(0)
    x, y = batch()
    Distiller(cnn(), cnn(), ["kd=1", "jacobian-direction=1:method=finite-difference"])(x, y)
    assert entered == []  # no term back-propagates through the student's input Jacobian
    loss = build_loss(["kd=1", "jacobian=1"])
    assert DOUBLE_BACKWARD in loss.higher_order
    Distiller(cnn(), cnn(), loss)(x, y)
    assert len(entered) >= 1


class Scale(nn.Module):
    def forward(self, x):
        return 2.0 * x - 1.0


def test_teacher_input_is_part_of_the_teachers_function():
    """A map from the student's input to the teacher's (another normalisation) is differentiated through:
    the same step as a teacher that applies the map itself."""
    x, y = batch()
    results = []
    for inside in (False, True):
        torch.manual_seed(0)
        student, teacher = cnn(), cnn(8)
        if inside:
            out = Distiller(student, nn.Sequential(Scale(), teacher), ["kd=1", "jacobian=1", "noisy-distill=1"])(x, y)
        else:
            out = Distiller(student, teacher, ["kd=1", "jacobian=1", "noisy-distill=1"], teacher_input=Scale())(x, y)
        torch.manual_seed(3)
        results.append({k: v.detach() for k, v in out.items()})
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-6, atol=1e-7)


class Affine(nn.Module):
    """A teacher_input with state of its own: a learnable-looking scale and a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.norm = nn.BatchNorm2d(1)

    def forward(self, x):
        return self.norm(self.scale * x)


def test_teacher_input_is_frozen_with_the_teacher_and_outside_what_is_trained():
    torch.manual_seed(0)
    view = Affine().train()
    distiller = Distiller(cnn(), cnn(8), ["kd=1", "jacobian=1"], teacher_input=view).train()
    assert distiller.teacher_input is view and distiller.frozen_teacher.view is view
    assert not view.training and not view.scale.requires_grad  # part of the frozen teacher's function
    assert id(view.scale) not in {id(p) for p in distiller.parameters()}
    assert all(key.startswith(("student.", "loss.")) for key in distiller.state_dict())
    stats = view.norm.running_mean.clone()
    distiller(*batch())["loss"].backward()
    assert torch.equal(view.norm.running_mean, stats) and view.scale.grad is None
    distiller.double()
    assert view.scale.dtype == torch.float64 and next(distiller.teacher.parameters()).dtype == torch.float64


def test_terms_stay_float32_under_the_callers_own_autocast():
    """Loops that wrap the step in autocast themselves (timm's train.py, the Hugging Face Trainer, Lightning's
    bf16 precision): the terms still run outside it, on float32 logits."""
    torch.manual_seed(0)
    x, y = batch()
    student, teacher = cnn(), cnn()
    reference = Distiller(student, teacher, ["kd=1", "jacobian=1"], amp=False)(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = Distiller(student, teacher, ["kd=1", "jacobian=1"], amp=False)(x, y)
    assert out["output"].dtype == torch.float32 and out["jacobian"].dtype == torch.float32
    assert out["jacobian"].item() == pytest.approx(reference["jacobian"].item(), rel=0.05)
