"""The plots: drawn without touching matplotlib's global backend, each quantity on its own axis."""

from __future__ import annotations

import json

import matplotlib
import pytest
import torch
from PIL import Image

from jacplug.agreement import gradient_map_figure
from jacplug.experiment.report import plot_noise, plot_results
from jacplug.training.metrics import METRICS, curves_figure, plot_curves

RECORDS = [
    {"kind": "teacher_epoch", "epoch": 1, "val_acc": 0.5},
    {"kind": "teacher_epoch", "epoch": 2, "val_acc": 0.75},
    {"kind": "teacher_epoch", "epoch": 3, "val_acc": 0.9},
    {"kind": "step", "step": 1, "epoch": 1, "loss": 2.0, "kd": 1.5, "jacobian": 1.0},
    {"kind": "step", "step": 2, "epoch": 1, "loss": 1.0, "kd": 0.8, "jacobian": 0.6},
    {"kind": "epoch", "epoch": 1, "step": 2, "val_acc": 0.25, "test_acc": 0.3, "agreement_cosine": 0.1},
    {"kind": "epoch", "epoch": 2, "step": 4, "val_acc": 0.5, "test_acc": 0.55, "agreement_cosine": -0.2},
]


@pytest.fixture
def svg_backend(monkeypatch):
    """A backend other than Agg, as a notebook user's would be; ``matplotlib.use`` refused while it is set."""
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    monkeypatch.setattr(matplotlib, "use", lambda *a, **k: pytest.fail("a plot called matplotlib.use"))
    yield
    monkeypatch.undo()
    matplotlib.use(before)


def test_plots_leave_the_backend_alone(svg_backend, tmp_path):
    (tmp_path / METRICS).write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    summary = {"kd": {"5": {"mean": 50.0, "std": 1.0}, "all": {"mean": 90.0, "std": 0.5}}}
    noise = {"kd": {"5": {"0.0": {"mean": 50.0, "std": 1.0}, "0.5": {"mean": 40.0, "std": 2.0}}}}
    maps = torch.rand(2, 8, 8)
    written = [plot_curves(tmp_path), gradient_map_figure(torch.rand(2, 1, 8, 8), maps, maps, maps, tmp_path / "m.png")]
    plot_results(summary, ["5", "all"], 180.0, tmp_path / "few_shot.png", "title")
    plot_noise(noise, "5", {"0.0": 0.9, "0.5": 0.8}, tmp_path / "noise.png", "title")
    for path in [*written, tmp_path / "few_shot.png", tmp_path / "noise.png"]:
        with Image.open(path) as picture:
            assert picture.format == "PNG"
    assert matplotlib.get_backend() == "svg"


def test_curves_give_each_quantity_its_own_axis():
    panels = {axis.get_title(): axis for axis in curves_figure(RECORDS).axes}
    assert list(panels) == ["student losses", "student accuracy", "held-out gradient agreement", "teacher accuracy"]
    curves = {title: {line.get_label(): (list(line.get_xdata()), [round(y, 9) for y in line.get_ydata()])
                      for line in axis.lines}
              for title, axis in panels.items()}
    assert curves["student accuracy"] == {"student val": ([1, 2], [25.0, 50.0]), "student test": ([1, 2], [30.0, 55.0])}
    assert curves["held-out gradient agreement"] == {"student vs teacher": ([1, 2], [0.1, -0.2])}
    assert curves["teacher accuracy"] == {"teacher val": ([1, 2, 3], [50.0, 75.0, 90.0])}  # on its own epochs
    assert panels["teacher accuracy"].get_xlabel() == "teacher epoch"
    assert panels["student accuracy"].get_ylabel() == "accuracy (%)"
    assert set(curves["student losses"]) == {"loss", "kd", "jacobian"}
    without_teacher = curves_figure([r for r in RECORDS if r["kind"] != "teacher_epoch"])
    assert "teacher accuracy" not in [axis.get_title() for axis in without_teacher.axes]
    teacher_without_val = curves_figure([{"kind": "teacher_epoch", "epoch": 1}])  # no validation split
    assert [axis.get_title() for axis in teacher_without_val.axes] == ["no curves recorded yet"]


def test_the_gradient_maps_say_what_they_show(tmp_path):
    maps = torch.rand(3, 8, 8)
    path = gradient_map_figure(torch.rand(3, 1, 8, 8), maps, maps, maps, tmp_path / "maps.png")
    with Image.open(path) as picture:
        assert picture.size == (int(100 * (1.2 * 3 + 0.9)), 580)
