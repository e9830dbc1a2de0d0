"""``JacobianDistillationTask`` driven the way timm's ``train.py`` drives a task: the optimizer over
``get_trainable_module()``, ``task(input, target)``, ``result["loss"].backward()``, the EMA update, the
eval model and the checkpoint state; for a CNN and a ViT student."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch import nn

from jacplug import UserError
from jacplug.integrations.timm_task import JacobianDistillationTask
from jacplug.losses import FitNetLoss, JacobianLoss, WeightedLoss

SIZE, CLASSES = 16, 4
STUDENTS = {
    "cnn": ("test_resnet", {}),
    "vit": ("vit_tiny_patch16_224", dict(img_size=SIZE, patch_size=8, depth=1, embed_dim=24, num_heads=2)),
}


def teacher() -> nn.Module:
    torch.manual_seed(1)
    return timm.create_model("test_resnet", num_classes=CLASSES)


def student(kind: str) -> nn.Module:
    name, kwargs = STUDENTS[kind]
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=CLASSES, **kwargs)


def batches(steps: int = 3):
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(6, 3, SIZE, SIZE, generator=g), torch.randint(0, CLASSES, (6,), generator=g))
            for _ in range(steps)]


def loss_for(kind: str, model: nn.Module) -> WeightedLoss:
    """Eq. 10, and for the CNN a FitNet hint whose adapter the task must train and save."""
    terms = {"jacobian": (JacobianLoss(), 1.0)}
    if kind == "cnn":
        terms["fitnet"] = (FitNetLoss({"layer1": "layer1"}, {"layer1": (32, 32)}), 0.5)
    return WeightedLoss(terms)


@pytest.mark.parametrize("kind", list(STUDENTS))
def test_a_train_py_style_loop_trains_the_student_with_ema_and_checkpoint_state(kind):
    model, frozen = student(kind), teacher()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    teacher_state = {k: v.clone() for k, v in frozen.state_dict().items()}
    task = JacobianDistillationTask(model, frozen, criterion=nn.CrossEntropyLoss(), distill_loss_weight=0.5,
                                    task_loss_weight=0.5, temperature=4.0, loss=loss_for(kind, model), verbose=False)
    optimizer = create_optimizer_v2(task.get_trainable_module(), opt="adamw", lr=1e-2, weight_decay=0.0)
    task.setup_ema(decay=0.5)
    task.train()
    for step, (x, y) in enumerate(batches(), start=1):
        result = task(x, y)
        optimizer.zero_grad()
        result["loss"].backward()
        optimizer.step()
        task.update_ema(step)

    expected = {"loss", "output", "task_loss", "kd", "jacobian", *(["fitnet"] if kind == "cnn" else [])}
    assert set(result) == expected and result["output"].shape == (6, CLASSES)
    terms = task.distiller.loss
    by_weight = 0.5 * result["task_loss"] + sum(terms.weights[k] * result[k] for k in terms.terms)
    torch.testing.assert_close(result["loss"], by_weight)
    torch.testing.assert_close(result["task_loss"], F.cross_entropy(result["output"], y))

    assert task.get_eval_model() is model and not frozen.training
    assert all(torch.equal(teacher_state[k], v) for k, v in frozen.state_dict().items())  # never trained
    moved = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(initial[k], v)]
    assert len(moved) > len(initial) // 2
    ema = task.get_eval_model(ema=True)
    assert ema is not model and any(not torch.equal(a, b) for a, b in zip(ema.state_dict().values(),
                                                                             model.state_dict().values()))

    state = task.get_checkpoint_state()
    assert set(state["state_dict"]) == set(model.state_dict())
    if kind == "cnn":  # the adapter is the task's own state
        assert set(state["task_state"]["jacplug_loss"]) == {"terms.fitnet.adapters.0.weight"}
    twin = JacobianDistillationTask(student(kind), teacher(), loss=loss_for(kind, model), verbose=False)
    twin.load_checkpoint_state(state["state_dict"], state.get("task_state"))
    for a, b in zip(twin.distiller.parameters(), task.distiller.parameters(), strict=True):
        assert torch.equal(a, b)


def test_compile_compiles_the_eval_model_only_and_training_still_runs():
    task = JacobianDistillationTask(student("cnn"), teacher(), verbose=False)
    compiled = task.compile(backend="eager")
    assert task.get_eval_model() is compiled and compiled is not task.distiller.student
    x, y = batches(1)[0]
    task(x, y)["loss"].backward()  # the training step is not compiled: its double backward works
    assert task.distiller.student.conv1[0].weight.grad is not None


def test_weights_follow_timm_and_bad_input_is_one_line():
    model, frozen = student("cnn"), teacher()
    complementary = JacobianDistillationTask(model, frozen, task_loss_weight=0.3, verbose=False)
    assert (complementary.task_loss_weight, complementary.distill_loss_weight) == (0.3, pytest.approx(0.7))
    assert complementary.distiller.loss.weights == {"kd": pytest.approx(0.7), "jacobian": pytest.approx(0.21)}
    with pytest.raises(UserError, match="did you mean 'jacobian'"):
        JacobianDistillationTask(model, frozen, loss=["jacobain=1"], verbose=False)
    with pytest.raises(UserError, match="loss_type='mse'"):
        JacobianDistillationTask(model, frozen, loss_type="mse", verbose=False)
    with pytest.raises(UserError, match=r"loss=\['kd=1'\] holds 'kd': KD's weight is distill_loss_weight"):
        JacobianDistillationTask(model, frozen, loss=["kd=1"], verbose=False)
    labels = JacobianDistillationTask(model, frozen, loss=["jacobian=1:classes=label"], verbose=False)
    x, y = batches(1)[0]
    with pytest.raises(UserError, match="soft targets"):
        labels(x, F.one_hot(y, CLASSES).float())


def test_the_teacher_sees_the_student_input_in_its_own_normalisation():
    model = timm.create_model("vit_tiny_patch16_224", num_classes=CLASSES, **STUDENTS["vit"][1])  # mean 0.5
    frozen = timm.create_model("resnet10t", num_classes=CLASSES)  # ImageNet mean and std
    task = JacobianDistillationTask(model, frozen, verbose=False)
    x = torch.randn(2, 3, SIZE, SIZE)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (model.pretrained_cfg["mean"], model.pretrained_cfg["std"]))
    imagenet_mean, imagenet_std = (torch.tensor(v).view(1, 3, 1, 1) for v in (frozen.pretrained_cfg["mean"],
                                                                            frozen.pretrained_cfg["std"]))
    torch.testing.assert_close(task.distiller.teacher_input(x), (x * std + mean - imagenet_mean) / imagenet_std)
    assert JacobianDistillationTask(student("cnn"), teacher(), verbose=False).distiller.teacher_input is None  # same
    x, y = batches(1)[0]
    task(x, y)["loss"].backward()  # the teacher's rows go through the renormalisation


def groups_by_parameter(optimizer: torch.optim.Optimizer) -> dict[int, tuple[float, float]]:
    """id(parameter) -> (learning-rate scale, weight decay) of its group."""
    return {id(p): (group.get("lr_scale", 1.0), group["weight_decay"]) for group in optimizer.param_groups
            for p in group["params"]}


@pytest.mark.parametrize("kind", list(STUDENTS))
@pytest.mark.parametrize("layer_decay", [None, 0.75])
def test_timm_optimizer_groups_the_student_as_with_timms_own_task(kind, layer_decay):
    """timm's optimizer factory reads no_weight_decay() and group_matcher() from the trainable module:
    the student's parameters get the weight decay and layer scales they get under LogitDistillationTask;
    the adapters get the top layer's full learning rate."""
    from timm.task import LogitDistillationTask

    model = student(kind)
    ours = JacobianDistillationTask(model, teacher(), loss=loss_for(kind, model), verbose=False)
    theirs = LogitDistillationTask(model, teacher(), verbose=False)
    options = dict(opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=layer_decay)
    got = groups_by_parameter(create_optimizer_v2(ours.get_trainable_module(), **options))
    want = groups_by_parameter(create_optimizer_v2(theirs.get_trainable_module(), **options))
    assert {id(p): got[id(p)] for p in model.parameters()} == want
    scales = {scale for scale, _ in want.values()}
    assert (len(scales) > 1) == (layer_decay is not None)  # the layer decay takes effect
    if kind == "vit":  # the ViT's own no-weight-decay list
        assert want[id(model.pos_embed)][1] == got[id(model.pos_embed)][1] == 0.0
        assert want[id(model.patch_embed.proj.weight)][1] == 0.05
    adapters = list(ours.distiller.loss.parameters())
    assert len(adapters) == (1 if kind == "cnn" else 0)
    for p in adapters:
        assert got[id(p)] == (max(scales), 0.05)  # the top layer: the full learning rate
    clipped = ours.get_clip_parameters(exclude_head=True)
    assert [id(p) for p in clipped] == [id(p) for p in [*list(model.parameters())[:-2], *adapters]]


def test_a_jacplug_checkpoint_or_a_local_file_is_the_teacher_without_a_download(tmp_path):
    """train.py hands the task a string (``--kd-model-name``): a ``jacplug train`` checkpoint's path
    builds the model it records; a timm name with ``teacher_pretrained_path`` loads any local file."""
    from jacplug.io.checkpoint import save_model

    trained = teacher()
    path = tmp_path / "teacher.safetensors"
    save_model(path, trained, role="teacher", name="test_resnet", num_classes=CLASSES, input_shape=(3, SIZE, SIZE),
               mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), config={})
    torch.save(trained.state_dict(), tmp_path / "teacher.pth")
    from_jacplug = JacobianDistillationTask(student("cnn"), str(path), verbose=False)
    from_file = JacobianDistillationTask(student("cnn"), "test_resnet", verbose=False,
                                         teacher_pretrained_path=str(tmp_path / "teacher.pth"))
    for task in (from_jacplug, from_file):
        loaded = task.distiller.teacher
        pairs = zip(loaded.state_dict().values(), trained.state_dict().values(), strict=True)
        assert not loaded.training and all(torch.equal(a, b) for a, b in pairs)
    x = torch.randn(2, 3, SIZE, SIZE)  # the student's mean and std (0.5, 0.5) -> the checkpoint's (0.5, 0.25)
    torch.testing.assert_close(from_jacplug.distiller.teacher_input(x), (x * 0.5 + 0.5 - 0.5) / 0.25)
    vit_kwargs = dict(STUDENTS["vit"][1])
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=CLASSES, **vit_kwargs)  # built with kwargs
    save_model(tmp_path / "vit.safetensors", vit, role="teacher", name="vit_tiny_patch16_224", num_classes=CLASSES,
               input_shape=(3, SIZE, SIZE), mean=(0.5,) * 3, std=(0.5,) * 3, config={}, model_kwargs=vit_kwargs)
    rebuilt = JacobianDistillationTask(student("cnn"), str(tmp_path / "vit.safetensors"), verbose=False)
    rebuilt = rebuilt.distiller.teacher
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), vit.state_dict().values(), strict=True))
    with pytest.raises(UserError, match="does not exist"):
        JacobianDistillationTask(student("cnn"), str(tmp_path / "missing.safetensors"), verbose=False)


def test_each_term_is_averaged_for_the_log_line():
    task = JacobianDistillationTask(student("cnn"), teacher(), criterion=nn.CrossEntropyLoss(), verbose=False,
                                    loss=["jacobian=2"])
    task.train()
    results = [task(x, y) for x, y in batches(2)]
    means = task.term_means()
    assert list(means) == ["task_loss", "kd", "jacobian"]
    for key, value in means.items():
        assert value == pytest.approx(sum(float(r[key].detach()) for r in results) / 2)
    assert task.term_means() == {}  # restarted
    task(*batches(1)[0])
    line = task.format_term_means()
    assert line.startswith("task_loss ") and "  kd " in line and "  jacobian " in line
    task.eval()
    task(*batches(1)[0])  # evaluation is not counted
    assert task.term_means() == {}


def test_the_kd_and_criterion_baselines_run_through_the_task_by_one_rule():
    """``loss=[]`` (train.py's ``--jacplug-loss`` with no term) is KD alone; with
    ``distill_loss_weight=0``, the criterion alone; a zero weight or a 'kd' term states the same rule."""
    x, y = batches(1)[0]
    kd_alone = JacobianDistillationTask(student("cnn"), teacher(), criterion=nn.CrossEntropyLoss(), temperature=2.0,
                                        distill_loss_weight=0.5, loss=[], verbose=False)
    assert kd_alone.distiller.loss.weights == {"kd": 0.5}
    kd_alone.train()
    result = kd_alone(x, y)
    assert set(result) == {"loss", "output", "task_loss", "kd"}
    with torch.no_grad():
        logits, target = kd_alone.distiller.student(x), kd_alone.distiller.teacher(x)
    kd = F.kl_div(F.log_softmax(logits / 2, 1), F.log_softmax(target / 2, 1), reduction="batchmean", log_target=True) * 4
    torch.testing.assert_close(result["loss"].detach(), F.cross_entropy(logits, y) + 0.5 * kd, rtol=1e-5, atol=1e-6)

    model = student("cnn")
    ce_alone = JacobianDistillationTask(model, teacher(), distill_loss_weight=0, loss=[], verbose=False)
    optimizer = create_optimizer_v2(ce_alone.get_trainable_module(), opt="sgd", lr=0.1)
    ce_alone.train()
    result = ce_alone(x, y)
    assert set(result) == {"loss", "output", "task_loss"}
    result["loss"].backward()
    optimizer.step()
    assert not torch.equal(model.fc.weight, student("cnn").fc.weight)
    assert ce_alone.get_task_state() == {} and ce_alone.get_eval_model() is model

    for bad in (dict(loss=["jacobian=0"]), dict(loss={"jacobian": 0.0}), dict(loss=["kd=1"]),
                dict(distill_loss_weight=0)):
        with pytest.raises(UserError, match="loss=\\[\\] \\(train.py: --jacplug-loss with no term\\) runs KD alone"):
            JacobianDistillationTask(student("cnn"), teacher(), verbose=False, **bad)


def test_bad_inputs_to_the_task_are_one_line_each(tmp_path):
    with pytest.raises(UserError, match="device='bogus' is not a device of this machine"):
        JacobianDistillationTask(student("cnn"), teacher(), device="bogus", verbose=False)
    with pytest.raises(UserError, match="student_model= takes the student as an nn.Module"):
        JacobianDistillationTask("resnet18", teacher(), verbose=False)
    with pytest.raises(UserError, match="teacher_model= takes a timm model name.*got int 5"):
        JacobianDistillationTask(student("cnn"), 5, verbose=False)
    with pytest.raises(UserError, match="dtype='float32': pass a floating torch.dtype"):
        JacobianDistillationTask(student("cnn"), teacher(), dtype="float32", verbose=False)
    with pytest.raises(UserError, match="criterion='ce': pass the loss module itself"):
        JacobianDistillationTask(student("cnn"), teacher(), criterion="ce", verbose=False)
    with pytest.raises(UserError, match="teacher_pretrained_path=.*missing.pth.*no such file"):
        JacobianDistillationTask(student("cnn"), "test_resnet", teacher_pretrained_path=str(tmp_path / "missing.pth"),
                                 verbose=False)
    task = JacobianDistillationTask(student("cnn"), teacher(), verbose=False)
    task.train()
    x, y = batches(1)[0]
    with pytest.raises(UserError, match=r"labels \[4\] are outside the student's 4 classes"):
        task(x, y.index_fill(0, torch.tensor([0]), 4))
    with pytest.raises(UserError, match=r"takes 3 channels"):
        task(x[:, :1], y)
    with pytest.raises(UserError, match=r"torch.uint8: it takes float images"):
        task((x * 50 + 128).clamp(0, 255).to(torch.uint8), y)
    assert task.term_means() == {}  # nothing was counted
