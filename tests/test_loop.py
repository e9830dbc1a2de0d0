"""The one run loop: its teacher step equals a hand-written cross-entropy step, it stops or refuses on a
non-finite loss as its phase asks, and an interrupted run says what its directory keeps."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from jacplug.errors import UserError
from jacplug.events import Phase
from jacplug.training.runtime import Runtime
from jacplug.training.loop import ClassifierStep, EpochBatches, Loop
from jacplug.events import Events
from jacplug.training.optim import create_adamw
from jacplug.training.plan import plan_steps
from jacplug.training.teacher import cosine_schedule

CPU = Runtime(device=torch.device("cpu"))


def data() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(24, 3, 6, 6, generator=generator, dtype=torch.float64),
                         torch.randint(0, 4, (24,), generator=generator))


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 4)).double()


def teacher_loop(model: nn.Module, dataset: TensorDataset, epochs: int = 2, **options) -> tuple[Loop, list[dict]]:
    """A teacher phase through the loop, recording the events its observers would receive."""
    plan = plan_steps(samples=len(dataset), batch=8, steps_per_epoch=len(dataset) // 8, epochs=epochs)
    optimizer = create_adamw({"teacher": model}, lr=1e-2, weight_decay=0.05)
    seen: list[dict] = []

    class Recorder:
        def emit(self, hook, **kwargs):
            seen.append({"hook": hook, **kwargs})

    loop = Loop(ClassifierStep(model, CPU), EpochBatches(dataset, 8, torch.Generator().manual_seed(0), plan=plan), optimizer, cosine_schedule(optimizer, plan.total),
                plan, CPU, Recorder(), evaluate=lambda step: {"val_acc": 0.5}, **options)
    return loop, seen


def test_the_teacher_step_through_the_loop_equals_cross_entropy_written_by_hand():
    dataset = data()
    looped = net()
    loop, seen = teacher_loop(looped, dataset)
    loop.run()

    by_hand = net()
    loader = DataLoader(dataset, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0), drop_last=True)
    optimizer = create_adamw({"teacher": by_hand}, lr=1e-2, weight_decay=0.05)
    scheduler = cosine_schedule(optimizer, 2 * len(loader))
    losses = []
    for _ in range(2):
        by_hand.train()
        for inputs, targets in loader:
            loss = F.cross_entropy(by_hand(inputs).float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
    for a, b in zip(looped.state_dict().values(), by_hand.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [e["metrics"]["loss"] for e in seen if e["hook"] == "on_step_end"] == losses
    evaluations = [e for e in seen if e["hook"] == "on_epoch_end"]
    assert [e["metrics"]["step"] for e in evaluations] == [3, 6] and evaluations[1]["metrics"]["val_acc"] == 0.5
    assert evaluations[1]["metrics"]["train_loss"] == pytest.approx(sum(losses[3:]) / 3)


def poisoned() -> TensorDataset:
    dataset = data()
    dataset.tensors[0][:] = float("nan")
    return dataset


def test_a_non_finite_loss_stops_a_cell_where_it_is_and_refuses_a_phase_in_one_line():
    model = net()
    before = copy.deepcopy(dict(model.named_parameters()))
    loop, seen = teacher_loop(model, poisoned(), on_non_finite="stop")
    loop.run()
    assert loop.diverged_at == 1 and loop.position.step == 0
    assert not any(e["hook"] == "on_epoch_end" for e in seen)  # nothing to score as a finished phase
    for name, value in model.named_parameters():  # the non-finite step made no update
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)

    loop, _ = teacher_loop(net(), poisoned(), remedy="lower --teacher-lr (or --weight-decay)")
    with pytest.raises(UserError, match=r"^loss became non-finite at step 1 \(\{'loss': nan\}\); lower --teacher-lr"):
        loop.run()


def test_a_run_stopped_after_its_directory_was_written_says_what_it_keeps(tmp_path, capsys):
    from jacplug.cli.main import main

    out = tmp_path / "run"
    assert main(["train", "--teacher", "test_resnet", "--student", "test_resnet", "--image-size", "8",
                 "--teacher-lr", "1e12", "--teacher-steps", "3", "--steps", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "lower --teacher-lr" in err and f"nothing trained was kept, so the run's files in {str(out)!r} were removed" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []  # the run created it: nothing is left


def test_events_are_emitted_on_rank_0_only():
    calls = []

    class Host:
        def notify(self, hook, **kwargs):
            calls.append(hook)

    phase = Phase(kind="student", name="student", out_dir=Path("."), group=".")
    Events(None, phase, enabled=False, host=Host()).emit("on_train_start")
    Events(None, phase, enabled=True, host=Host()).emit("on_train_start")
    assert calls == ["on_train_start"]


def test_epoch_batches_resumed_mid_epoch_give_the_batches_of_an_uninterrupted_phase():
    """A phase resumed after step 4 (mid-way through the second 3-step pass) from the generator that
    :meth:`EpochBatches.resume_generator` gave gets the same batches, and leaves the generator where an
    uninterrupted phase leaves it, so the third pass is the same too."""
    dataset = data()
    plan = plan_steps(samples=len(dataset), batch=8, steps_per_epoch=3, epochs=3)

    def targets(batches: EpochBatches, first: int) -> list[list[int]]:
        seen = []
        while first < plan.total:
            end = batches.round_end(first)
            seen.extend(batch[1].tolist() for batch in batches.batches(first, end))
            first = end
        return seen

    straight = targets(EpochBatches(dataset, 8, torch.Generator().manual_seed(0), plan=plan), 0)
    interrupted = EpochBatches(dataset, 8, torch.Generator().manual_seed(0), plan=plan)
    ran = [batch[1].tolist() for batch in interrupted.batches(0, 3)]
    ran += [batch[1].tolist() for batch in itertools.islice(iter(interrupted.batches(3, 6)), 1)]  # killed after step 4
    resumed = EpochBatches(dataset, 8, interrupted.resume_generator(4), plan=plan)
    assert ran + targets(resumed, 4) == straight and len(straight) == 9
