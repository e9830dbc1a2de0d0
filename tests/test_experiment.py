"""The few-sample experiment (``jacplug experiment``): a tiny configuration end to end, and proof that
loss weights are chosen on the validation split, never on the test split.

Tiny: ``test_resnet`` teacher and student on the digits at their native 8x8, 2 images per class, a
few steps, one seed, in-process (``workers=1``).
"""

from __future__ import annotations

import json

import pytest
import torch

from jacplug.cli.cmd_experiment import sample_size
from jacplug.experiment import ExperimentConfig, choose_weights, run_experiment
from jacplug.experiment import runs as runs_module


def tiny_config(out) -> ExperimentConfig:
    return ExperimentConfig(
        teacher="test_resnet", student="test_resnet", image_size=8, teacher_epochs=1,
        samples_per_class=[2], methods=["kd", "kd+jacobian"], seeds=[0], steps=3, batch_size=8,
        jacobian_grid=[1.0, 10.0], select_at=[2], device="cpu", workers=1, out=str(out),
    )


def test_tiny_experiment_writes_outputs_and_selects_on_validation_only(tmp_path, monkeypatch):
    seen: list[tuple[str, str]] = []  # (phase of the current run, split handed to accuracy)
    phase = {"now": "teacher"}
    real_run_one, real_accuracy = runs_module.run_one, runs_module.accuracy

    def spy_run_one(spec, *args, **kwargs):
        phase["now"] = spec.phase
        return real_run_one(spec, *args, **kwargs)

    def spy_accuracy(model, dataset, *args, **kwargs):
        full = runs_module._WORKER["full"]
        name = "test" if dataset is full.test else "val" if dataset is full.val else "other"
        seen.append((phase["now"], name))
        return real_accuracy(model, dataset, *args, **kwargs)

    monkeypatch.setattr(runs_module, "run_one", spy_run_one)
    monkeypatch.setattr(runs_module, "accuracy", spy_accuracy)
    threads = torch.get_num_threads()

    results = run_experiment(tiny_config(tmp_path), echo=lambda line: None)

    assert torch.get_num_threads() == threads  # the experiment restores the caller's thread count
    selected = [split for p, split in seen if p == "select"]
    assert selected == ["val", "val"]  # one per grid weight, never the test split
    assert all("test_acc" not in r and "val_acc" in r for r in results["selection"])
    best = max(results["selection"], key=lambda r: (r["val_acc"], -r["weights"]["jacobian"]))
    assert results["chosen_weights"]["2"]["jacobian"] == best["weights"]["jacobian"]

    assert sorted(p for p, _ in seen if p == "main") == ["main"] * 4  # val and test of 2 runs
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {(r["method"], r["seed"]) for r in saved["runs"]} == {("kd", 0), ("kd+jacobian", 0)}
    assert set(saved["summary"]) == {"kd", "kd+jacobian"}
    assert "| KD + Jacobian (Eq. 10) |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "few_shot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_choice_follows_validation_even_when_test_disagrees():
    config = ExperimentConfig(samples_per_class=[1, 100, None], select_at=[1, 100], jacobian_grid=[1.0, 10.0])
    selection = [
        {"weights": {"jacobian": 1.0}, "samples_per_class": 1, "val_acc": 0.5},
        {"weights": {"jacobian": 10.0}, "samples_per_class": 1, "val_acc": 0.7},
        {"weights": {"jacobian": 1.0}, "samples_per_class": 100, "val_acc": 0.9},
        {"weights": {"jacobian": 10.0}, "samples_per_class": 100, "val_acc": 0.9},  # tie: the smaller wins
    ]
    chosen = choose_weights(config, selection, full_per_class=125.0)
    assert chosen["1"]["jacobian"] == 10.0
    assert chosen["100"]["jacobian"] == 1.0
    assert chosen["all"]["jacobian"] == 1.0  # nearest selection size on a log scale
    with pytest.raises(RuntimeError, match="test split"):
        choose_weights(config, [{**selection[0], "test_acc": 0.9}], full_per_class=125.0)


def test_sample_size_parses_all():
    assert sample_size("all") is None and sample_size("5") == 5


def test_cli_runs_every_experiment_method_by_default_and_refuses_others(capsys):
    from jacplug.cli.cmd_experiment import config_from_args
    from jacplug.cli.main import build_parser
    from jacplug.experiment.methods import METHODS

    parser = build_parser()
    assert config_from_args(parser.parse_args(["experiment"])).methods == list(METHODS)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["experiment", "--methods", "kd+jacobain"])
    assert exit_info.value.code == 2 and "invalid choice: 'kd+jacobain'" in capsys.readouterr().err
