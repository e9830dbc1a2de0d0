"""The published figures still come out of the code: cells of the experiments in docs/results/, rerun here, give
exactly the accuracies their records hold, so a change that moves the results page cannot land unnoticed.

The cells rerun are the student-alone (CE) ones: they read nothing of the teacher, so they need no trained teacher
(28 s), and they go through everything else a published cell does (the digits, the few-sample draw, the student's
initialisation, the batches, the optimizer and its schedule, the evaluation, the noisy inputs). The cells that
need the teacher are compared by ``python benchmarks/check_published.py``, which trains it (about two minutes).

An experiment's workers run one torch thread each, as every test does here, and CPU kernels are deterministic,
so on the CPU model and torch build that published the records the match is exact. Another CPU model rounds
differently; there the accuracies must agree within ``OTHER_CPU_POINTS``, which still catches a change to the
data, the draw, the batches or the optimizer (each moves a cell by far more).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from jacplug.experiment.config import ExperimentConfig, RunSpec
from jacplug.experiment.protocol import rounds_alike, run_one
from jacplug.models.build import build_model
from jacplug.training.prepare import load_data
from jacplug.training.runtime import init_runtime

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
# The same CE cells came out 0-2 test images (at most 0.6 points) apart on an Intel Xeon and an AMD EPYC with the
# same torch build; a change to the data, the draw, the batches or the optimizer moves a cell by far more.
OTHER_CPU_POINTS = 1.5


def published(experiment: str) -> dict:
    return json.loads((RESULTS / experiment / "results.json").read_text())


def rerun(experiment: str, name: str, tmp_path: Path) -> tuple[dict, dict]:
    """The published record of cell ``name`` and the same cell run now."""
    results = published(experiment)
    record = next(r for r in results["runs"] if RunSpec(r["method"], r["samples_per_class"], r["seed"],
                                                        tuple(r["weights"].items())).name == name)
    config = ExperimentConfig(**{**results["config"], "out": str(tmp_path)})
    runtime = init_runtime("cpu")
    full = load_data(config)
    teacher = build_model("teacher", config.teacher, full).module.eval()  # untrained: a CE cell reads none of it
    spec = RunSpec(record["method"], record["samples_per_class"], record["seed"], tuple(record["weights"].items()))
    assert torch.get_num_threads() == results["config"]["threads"] == 1
    return record, run_one(spec, config, full, teacher, runtime)


def assert_as_published(experiment: str, published_values: dict, now_values: dict) -> None:
    """Equal on the CPU model and torch build that published, within ``OTHER_CPU_POINTS`` elsewhere."""
    there = published(experiment)["hardware"]
    if rounds_alike(there):
        assert now_values == published_values
    else:
        assert now_values.keys() == published_values.keys()
        for key, value in published_values.items():
            assert abs(now_values[key] - value) * 100 <= OTHER_CPU_POINTS, (key, value, now_values[key], there)


def test_a_few_sample_cell_reproduces_the_published_accuracies(tmp_path):
    record, now = rerun("few_shot", "main-ce-n5-seed0", tmp_path)
    assert_as_published("few_shot", {"val": record["val_acc"], "test": record["test_acc"]},
                        {"val": now["val_acc"], "test": now["test_acc"]})


def test_a_noise_cell_reproduces_the_published_accuracies_at_every_sigma(tmp_path):
    record, now = rerun("noise", "main-ce-n10-seed0", tmp_path)
    assert len(record["test_acc_noise"]) == 6
    for split in ("val", "test"):
        assert_as_published("noise", record[f"{split}_acc_noise"], now[f"{split}_acc_noise"])


def _release_check():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "check_published.py"
    spec = importlib.util.spec_from_file_location("check_published", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_release_check_names_every_figure_that_moved_against_the_records_and_each_reference():
    check = _release_check()
    records = check.published_figures()
    assert len(records["demo"]) == 8 and set(records["few_shot"]["cells"]) >= {"kd n5 seed 0", "kd+jacobian n5 seed 0"}
    references = sorted(check.REFERENCES.glob("*.json"))
    assert references, "no machine other than the publishing one has a reference"
    for path in references:
        reference = json.loads(path.read_text())
        assert path == check.reference_path(reference["hardware"])
        publisher = published("few_shot")["hardware"]
        assert (reference["hardware"]["cpu"], reference["hardware"]["torch"]) != (publisher["cpu"], publisher["torch"])
        assert check.compare(reference, reference) == []
        moved = json.loads(json.dumps(reference))
        moved["demo"][-1]["test_acc"] += 1 / 360
        moved["few_shot"]["cells"]["kd+jacobian n5 seed 0"]["final_terms"]["jacobian"] *= 1 + 1e-7
        assert check.compare(reference, moved) == ["make demo epoch 4",
                                                   "few-sample kd+jacobian n5 seed 0 final_terms"]
