"""benchmarks/plateau.py's parts that decide what its table says: where a run stops, what a step costs in
FLOPs, and how a run's plateau and compute are read from its curve."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import jacplug

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "plateau.py"
_SPEC = importlib.util.spec_from_file_location("plateau_benchmark", _PATH)
plateau = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = plateau  # dataclasses look their module up there
_SPEC.loader.exec_module(plateau)


def curve(*val: float, every: int = 50) -> list[dict]:
    return [{"step": every * i, "val_acc": v / 100, "test_acc": v / 100, "train_s": 0.1 * every * i,
             "flops": 1e6 * every * i, "agreement_cosine": 0.0} for i, v in enumerate(val)]


def test_a_run_stops_when_its_last_third_adds_less_than_the_minimum_gain():
    # steps 0..300: the best before step 200 is 80; the last third (250, 300) reaches 80.5: less than 1 point more
    assert plateau.plateaued(curve(10, 50, 70, 78, 80, 80.5, 79), min_steps=300, min_gain=1.0)
    # the same curve still rising by 2 points in its last third goes on
    assert not plateau.plateaued(curve(10, 50, 70, 78, 80, 82, 79), min_steps=300, min_gain=1.0)
    # nothing stops before min_steps, however flat
    assert not plateau.plateaued(curve(50, 50, 50, 50), min_steps=300, min_gain=1.0)


def test_the_plateau_is_the_last_third_and_the_compute_is_where_validation_came_within_a_point():
    record = {"curve": curve(10, 50, 70, 79.5, 80, 80.5, 79)}
    read = plateau.plateau_of(record)
    assert read["test_acc"] == pytest.approx((0.805 + 0.79) / 2)  # steps 250 and 300 (> 2/3 of 300)
    assert read["best_test_acc"] == pytest.approx(0.805)
    assert read["reached_step"] == 150  # 79.5 is within one point of the best, 80.5
    assert read["reached_flops"] == pytest.approx(150e6)
    assert read["stop_step"] == 300


def test_the_counter_counts_a_linear_step_and_runs_through_a_jacobian_term():
    batch, features, classes = 4, 6, 3
    torch.manual_seed(0)
    model = nn.Linear(features, classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, targets = torch.randn(batch, features), torch.randint(0, classes, (batch,))

    def ce_step(_):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()

    # forward 2BIO, backward: the weight's gradient 2BIO (the input needs none)
    assert plateau.count_step_flops(ce_step, iter([None, None])) == 2 * (2 * batch * features * classes)

    teacher = nn.Linear(features, classes)
    counts = {}
    for name, loss in (("kd", ["kd=1"]), ("eq10", ["kd=1", "jacobian=1"])):
        student = nn.Linear(features, classes)
        distiller = jacplug.Distiller(student, teacher, loss=loss)
        opt = torch.optim.SGD(student.parameters(), lr=0.1)
        counts[name] = plateau.count_step_flops(lambda _: distiller.step(opt, inputs, targets), iter([None, None]))
    # torch's FlopCounterMode tracks modules with hooks that cannot run inside the Jacobian term's autograd.grad;
    # the total-only counter does, and counts the input gradients and their double backward on top of KD
    assert counts["eq10"] > counts["kd"] > 0
