"""The few-sample experiment (``jacplug experiment``): a tiny configuration end to end, and proof that
loss weights are chosen on the validation split, never on the test split.

Tiny: ``test_resnet`` teacher and student on the digits at their native 8x8, 2 images per class, a
few steps, one seed, in-process (``workers=1``).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from jacplug.experiment.config import sample_size
from jacplug.experiment import ExperimentConfig, choose_weights, run_experiment
from jacplug.experiment import executors
from jacplug.experiment import protocol as runs_module
from jacplug.training import phases as phases_module


def tiny_config(out) -> ExperimentConfig:
    return ExperimentConfig(
        teacher="test_resnet", student="test_resnet", image_size=8, teacher_epochs=1,
        samples_per_class=[2, 3], methods=["kd", "kd+jacobian"], seeds=[0], steps=3, batch_size=8,
        jacobian_weights=[1.0, 10.0], select_at=[2], device="cpu", workers=1, out=str(out),
    )


def test_tiny_experiment_writes_outputs_and_selects_on_validation_only(tmp_path, monkeypatch):
    seen: list[tuple[str, str]] = []  # (phase of the current run, split handed to accuracy)
    phase = {"now": "teacher"}
    real_run_one, real_accuracy = runs_module.run_one, phases_module.accuracy

    def spy_run_one(spec, *args, **kwargs):
        phase["now"] = spec.phase
        return real_run_one(spec, *args, **kwargs)

    def spy_accuracy(model, dataset, *args, **kwargs):
        full = executors._WORKER["full"]
        name = "test" if dataset is full.test else "val" if dataset is full.val else "other"
        seen.append((phase["now"], name))
        return real_accuracy(model, dataset, *args, **kwargs)

    monkeypatch.setattr(runs_module, "run_one", spy_run_one)
    monkeypatch.setattr(phases_module, "accuracy", spy_accuracy)  # the student phase's evaluation
    torch.set_num_threads(threads := 2)  # the caller's count differs from the experiment's (1); conftest resets it

    results = run_experiment(tiny_config(tmp_path), echo=lambda line: None)

    assert torch.get_num_threads() == threads  # the experiment restores the caller's thread count
    selected = [split for p, split in seen if p == "select"]
    assert selected == ["val", "val"]  # one per grid weight, never the test split
    assert all("test_acc" not in r and "val_acc" in r for r in results["selection"])
    best = max(results["selection"], key=lambda r: (r["val_acc"], -r["weights"]["jacobian"]))
    assert results["chosen_weights"]["2"]["jacobian"] == best["weights"]["jacobian"]

    assert sorted(p for p, _ in seen if p == "main") == ["main"] * 8  # val and test of 4 runs
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {(r["method"], r["samples_per_class"], r["seed"]) for r in saved["runs"]} == {
        (m, n, 0) for m in ("kd", "kd+jacobian") for n in (2, 3)}
    assert set(saved["summary"]) == {"kd", "kd+jacobian"}
    table = (tmp_path / "table.md").read_text()
    assert "| KD + Jacobian (Eq. 10) |" in table and "| gain over KD" in table and "| jacobian | 2 / class |" in table
    assert (tmp_path / "few_shot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_choice_follows_validation_even_when_test_disagrees():
    config = ExperimentConfig(samples_per_class=[1, 100, None], select_at=[1, 100], jacobian_weights=[1.0, 10.0])
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


def test_cli_runs_the_few_shot_methods_by_default_and_refuses_others(capsys):
    from jacplug.cli.cmd_experiment import config_from_args
    from jacplug.cli.main import build_parser
    from jacplug.experiment.methods import FEW_SHOT_METHODS

    parser = build_parser()
    assert config_from_args(parser.parse_args(["experiment"])).methods == list(FEW_SHOT_METHODS)
    # the command's defaults are the library's: one protocol whether it is run from Python or the shell
    assert config_from_args(parser.parse_args(["experiment"])) == ExperimentConfig()
    from jacplug.cli.parser import UsageError

    with pytest.raises(UsageError, match=r"invalid choice 'kd\+jacobain'; did you mean 'kd\+jacobian'"):
        parser.parse_args(["experiment", "--methods", "kd+jacobain"])


def test_choice_averages_the_selection_seeds_and_can_score_noisy_validation():
    config = ExperimentConfig(samples_per_class=[5], select_at=[5], jacobian_weights=[1.0, 10.0],
                              select_seeds=[1000, 1001], methods=["kd", "kd+jacobian"])
    selection = [  # weight 10 wins seed 1000 by a little and loses seed 1001 by a lot
        {"weights": {"jacobian": 1.0}, "samples_per_class": 5, "seed": 1000, "val_acc": 0.80,
         "val_acc_noise": {"0": 0.80, "0.5": 0.10}},
        {"weights": {"jacobian": 10.0}, "samples_per_class": 5, "seed": 1000, "val_acc": 0.81,
         "val_acc_noise": {"0": 0.81, "0.5": 0.60}},
        {"weights": {"jacobian": 1.0}, "samples_per_class": 5, "seed": 1001, "val_acc": 0.80,
         "val_acc_noise": {"0": 0.80, "0.5": 0.10}},
        {"weights": {"jacobian": 10.0}, "samples_per_class": 5, "seed": 1001, "val_acc": 0.70,
         "val_acc_noise": {"0": 0.70, "0.5": 0.60}},
    ]
    assert choose_weights(config, selection, full_per_class=125.0) == {"5": {"jacobian": 1.0}}
    noisy = ExperimentConfig(**{**config.__dict__, "select_on": "noise", "noise_sigmas": [0.0, 0.5]})
    assert choose_weights(noisy, selection, full_per_class=125.0) == {"5": {"jacobian": 10.0}}


@pytest.mark.parametrize("change, message", [
    ({"select_seeds": [0, 1000]}, "overlap the reported seeds"),
    ({"select_on": "noise"}, "--select-on noise needs --noise-sigmas"),
    ({"noise_sigmas": [-0.1]}, "--noise-sigmas must be finite and >= 0"),
    ({"noisy_weights": [0.0]}, "--noisy-weights must be finite weights > 0"),
    ({"methods": ["kd", "kd+jacobain"]}, "unknown method 'kd+jacobain'"),
    ({"noisy_sigma": 0.0}, "--noisy-sigma must be finite and > 0"),
    ({"loader_workers": -1}, "--loader-workers must be >= 0"),
    ({"select_seeds": []}, "--select-at and --select-seeds need at least one value each"),
])
def test_bad_experiment_options_are_named(change, message):
    from jacplug.errors import UserError

    with pytest.raises(UserError, match=message.replace("+", r"\+")):
        ExperimentConfig(**change).validate()


def test_noise_is_one_fixed_direction_for_every_model_and_sigma():
    """Each sigma shows the model ``x + sigma * z`` with the same ``z`` (for every model, so curves are
    comparable), in eval mode (restored), and sigma 0 is the clean accuracy."""
    from jacplug.experiment.protocol import noisy_accuracy
    from jacplug.training.runtime import init_runtime
    from jacplug.training.evaluate import accuracy

    torch.manual_seed(0)
    images, labels = torch.randn(20, 1, 4, 4), torch.arange(20) % 3
    split = torch.utils.data.TensorDataset(images, labels)

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.inputs = torch.nn.Linear(16, 3), []

        def forward(self, x):
            assert not self.training
            self.inputs.append(x)
            return self.linear(x.flatten(1))

    model, runtime = Recorder().train(), init_runtime("cpu")
    config = ExperimentConfig(noise_sigmas=[0.0, 0.5, 2.0], eval_batch_size=8)
    scores = noisy_accuracy(model, split, config, runtime)
    assert model.training and list(scores) == ["0", "0.5", "2"]
    per_sigma = [torch.cat(model.inputs[i:i + 3]) for i in (0, 3, 6)]  # 20 images in batches of 8, 8, 4
    assert len(model.inputs) == 9 and torch.equal(per_sigma[0], images)
    z = (per_sigma[1] - images) / 0.5
    assert 0.8 < float(z.std()) < 1.2
    torch.testing.assert_close((per_sigma[2] - images) / 2.0, z)  # one noise direction for every sigma
    assert scores["0"] == accuracy(model, split, runtime, batch_size=8, show=False, desc="test")

    other = Recorder()
    noisy_accuracy(other, split, config, runtime)
    torch.testing.assert_close(torch.cat(other.inputs[3:6]), per_sigma[1])  # and for every model


def test_paired_gains_are_per_seed_differences_with_their_standard_error():
    from jacplug.experiment import report

    def run(method, seed, acc):
        return {"phase": "main", "method": method, "samples_per_class": 5, "seed": seed, "test_acc": acc}

    runs = [run("kd", 0, 0.50), run("kd", 1, 0.60), run("kd", 2, 0.70),
            run("kd+jacobian", 0, 0.52), run("kd+jacobian", 1, 0.63), run("kd+jacobian", 2, 0.74)]
    cell = report.paired_gains(runs, "kd")["kd+jacobian"]["5"]
    assert cell["per_seed"] == pytest.approx([2.0, 3.0, 4.0])
    assert cell["mean"] == pytest.approx(3.0) and cell["se"] == pytest.approx(1.0 / 3 ** 0.5)
    assert "+3.0 ± 0.6 (+2.0, +3.0, +4.0)" in report.gains_table(report.paired_gains(runs, "kd"), "kd", ["5"])


def test_preset_method_is_the_default_training_loss():
    """``preset`` at the preset's own ratio is exactly what ``jacplug train`` runs without ``--loss``
    and what ``jacobian_distillation()`` builds."""
    from jacplug.experiment.methods import METHODS
    from jacplug.losses import build_loss, jacobian_distillation
    from jacplug.losses.presets import DEFAULT_SPECS as DEFAULT_LOSS

    assert build_loss(DEFAULT_LOSS).weights == jacobian_distillation().weights
    ratio = jacobian_distillation().weights["jacobian"] / jacobian_distillation().weights["kd"]
    assert METHODS["preset"].specs({"preset": ratio}, ExperimentConfig()) == list(DEFAULT_LOSS)
    assert METHODS["preset"].specs({"preset": 3.0}, ExperimentConfig()) == ["kd=0.5:temperature=4", "jacobian=1.5"]


def test_noise_experiment_end_to_end_scores_teacher_and_students_under_noise(tmp_path):
    config = tiny_config(tmp_path)
    config.samples_per_class, config.methods = [2], ["kd", "kd+noisy"]
    config.noise_sigmas, config.select_on, config.noisy_weights, config.noisy_sigma = [0.0, 0.5], "noise", [0.1, 1.0], 0.3
    results = run_experiment(config, echo=lambda line: None)

    assert set(results["teacher"]["test_acc_noise"]) == {"0", "0.5"}
    assert results["teacher"]["test_acc_noise"]["0"] == results["teacher"]["test_acc"]
    for record in results["runs"]:
        assert record["test_acc_noise"]["0"] == record["test_acc"]
        assert any(spec.startswith("noisy-distill=") and "sigma=0.3" in spec for spec in record["loss"]) == (
            record["method"] == "kd+noisy")
    assert all("test_acc_noise" not in r and "val_acc_noise" in r for r in results["selection"])
    table = (tmp_path / "table.md").read_text()
    assert "| teacher |" in table and "σ = 0.5" in table and "Paired gain at σ = 0.5" in table
    assert (tmp_path / "noise.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "few_shot.png").exists()  # one sample size: no curve over sizes


def test_config_file_sets_options_and_flags_win(tmp_path, capsys):
    from jacplug.cli.cmd_experiment import config_from_args
    from jacplug.cli.main import build_parser
    from jacplug.errors import UserError

    path = tmp_path / "exp.yaml"
    path.write_text("dataset: cifar100\nsamples-per-class: [1, all]\nmethods: kd\nsteps: 2000\n"
                    "student_kwargs: {patch_size: 4}\nnoise-sigmas: [0, 0.5]\n")
    argv = ["--config", str(path), "--steps", "7"]
    config = config_from_args(build_parser().parse_args(["experiment", *argv]))
    assert (config.dataset, config.samples_per_class, config.methods, config.steps) == (
        "cifar100", [1, None], ["kd"], 7)
    assert config.student_kwargs == {"patch_size": 4} and config.noise_sigmas == [0.0, 0.5]

    for text, message in [("stpes: 3\n", "unknown option 'stpes'; did you mean steps"),
                          ("steps: many\n", "option 'steps' must be an integer, got 'many'"),
                          ("methods: [kd, kd+jacobain]\n", "'kd\\+jacobain', not one of"),
                          ("samples-per-class: [some]\n", "expected a positive integer or 'all'")]:
        path.write_text(text)
        with pytest.raises(UserError, match=message):
            config_from_args(build_parser().parse_args(["experiment", "--config", str(path)]))


def test_documented_cifar100_recipe_is_a_valid_experiment():
    """docs/examples/cifar100_few_shot.yaml must keep parsing into a valid configuration (it is not run
    here: it downloads CIFAR-100 and needs a GPU)."""
    from pathlib import Path

    from jacplug.cli.cmd_experiment import config_from_args
    from jacplug.cli.main import build_parser

    path = str(Path(__file__).parents[1] / "docs" / "examples" / "cifar100_few_shot.yaml")
    config = config_from_args(build_parser().parse_args(["experiment", "--config", path])).validate()
    assert (config.dataset, config.download, config.device, config.teacher, config.student) == (
        "cifar100", True, "cuda", "resnet34", "resnet18")
    assert config.samples_per_class == [1, 5, 10, 50, None] and len(config.seeds) == 5 and config.steps == 2000


def test_noisy_jacobian_method_is_the_first_order_term_of_noisy_distillation():
    """``kd+noisy-jacobian`` at weight ``w`` adds ``w * sigma^2 * ||J_S - J_T||_F^2`` (unnormalised),
    the Jacobian part of ``w * noisy-distill`` at that sigma; both read the weight chosen for kd+noisy."""
    from jacplug.experiment.methods import METHODS
    from jacplug.losses import build_loss

    config = ExperimentConfig(noisy_sigma=0.2, methods=["kd+noisy", "kd+noisy-jacobian"], samples_per_class=[5],
                              select_at=[5])
    loss = build_loss(METHODS["kd+noisy-jacobian"].specs({"noisy": 0.1}, config))
    assert loss.weights["jacobian-projected"] == pytest.approx(0.1 * 0.2 ** 2)
    assert loss.terms["jacobian-projected"].normalize is False
    assert build_loss(METHODS["kd+noisy"].specs({"noisy": 0.1}, config)).terms["noisy-distill"].sigma == 0.2
    chosen = choose_weights(config, [{"weights": {"noisy": 1.0}, "samples_per_class": 5, "val_acc": 0.9}], 125.0)
    assert chosen == {"5": {"noisy": 1.0}}


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_failing_run_stops_the_worker_processes(tmp_path, monkeypatch):
    """An error (or Ctrl-C, or kill) in the middle of the grid terminates the worker processes instead
    of letting them run the rest of the queue."""
    import multiprocessing

    import jacplug.experiment.driver as experiment
    from jacplug.experiment import RunSpec

    config = tiny_config(tmp_path)
    config.workers, config.methods = 2, ["kd"]
    # the last run fails inside a worker (its method reads a weight the spec lacks); runs are started
    # costliest first, so it starts first and the kd runs are still queued when it fails
    specs = [RunSpec("kd", 2, seed, ()) for seed in range(6)] + [RunSpec("kd+jacobian", 2, 0, ())]
    monkeypatch.setattr(experiment, "main_specs", lambda config, chosen: specs)
    closes = []
    real_close = executors.Executor.close
    monkeypatch.setattr(executors.Executor, "close",
                        lambda self, abort=False: (closes.append(abort), real_close(self, abort))[1])
    with pytest.raises(KeyError, match="jacobian"):
        run_experiment(config, echo=lambda line: None)
    assert closes == [True] and multiprocessing.active_children() == []


def test_two_experiments_cannot_share_an_output_directory(tmp_path):
    from jacplug.io.lock import RunDirBusy, RunDirLock

    with RunDirLock(tmp_path / "out"):  # another experiment (or training run) holds the directory
        with pytest.raises(RunDirBusy, match="is in use by another jacplug run"):
            run_experiment(tiny_config(tmp_path / "out"), echo=lambda line: None)
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.subprocess
def test_loading_batches_in_worker_processes_changes_nothing_but_speed(tmp_path):
    """``loader_workers`` (4 by default on CUDA) must train the same student as loading in the run's
    own process: same batches, and the run's random draws (here the projections) untouched."""
    from jacplug.experiment import RunSpec, run_one
    from jacplug.experiment.protocol import teacher_weights, load_teacher
    from jacplug.training.prepare import load_data
    from jacplug.training.runtime import init_runtime

    config = tiny_config(tmp_path)
    runtime = init_runtime("cpu")
    full = load_data(config)
    teacher_path, _ = teacher_weights(config, full, runtime, tmp_path)
    teacher = load_teacher(config, full, teacher_path, runtime)
    spec = RunSpec("kd+projected", 3, seed=1, weights=(("projected", 1.0),))
    records = [run_one(spec, dataclasses.replace(config, loader_workers=workers), full, teacher, runtime)
               for workers in (0, 2)]
    for record in records:
        record.pop("time_s")
    assert records[0] == records[1]


@pytest.mark.parametrize("flags, message", [
    (["--select-seeds", "0"], "--select-seeds must be a positive integer, got 0"),
    (["--student-kwargs", "patch_size"], "--student-kwargs 'patch_size': 'patch_size' is not KEY=VALUE"),
    (["--noise-sigmas", "-1", "--select-on", "noise"], "--noise-sigmas must be finite and >= 0"),
    (["--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
])
def test_bad_experiment_flags_are_one_line_errors(flags, message, capsys, tmp_path, monkeypatch):
    from jacplug.cli.main import main

    monkeypatch.chdir(tmp_path)
    assert main(["experiment", *flags, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jacplug: error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "out" / "results.json").exists()


def test_names_and_options_are_checked_before_the_teacher_is_trained(tmp_path, monkeypatch):
    import jacplug.experiment.driver as experiment
    from jacplug.errors import UnknownNameError, UserError

    trained = []
    monkeypatch.setattr(experiment, "teacher_weights", lambda *args: trained.append(args))
    for change, error, message in [
        (dict(student="tset_resnet"), UnknownNameError, "did you mean 'test_resnet'"),
        (dict(methods=["kd+attention"], attention_layers="layer9"), UnknownNameError, "unknown module 'layer9'"),
        (dict(samples_per_class=[5000]), UserError, "--samples-per-class 5000 is more than class"),
    ]:
        config = tiny_config(tmp_path / "out")
        for key, value in change.items():
            setattr(config, key, value)
        with pytest.raises(error, match=message):
            run_experiment(config, echo=lambda line: None)
    assert trained == []


@pytest.mark.subprocess
def test_an_error_in_a_worker_process_ends_the_experiment_with_that_error(tmp_path, monkeypatch):
    """A jacplug error whose constructor takes other arguments than its message (UnknownNameError),
    raised in a worker: it reached the parent's result thread unpicklable, and the parent waited forever."""
    import threading

    import jacplug.experiment.driver as experiment
    from jacplug.errors import UnknownNameError
    from jacplug.experiment import RunSpec

    config = tiny_config(tmp_path)
    config.workers, config.methods, config.attention_layers = 2, ["kd"], "layer9"
    specs = [RunSpec("kd", 2, 0, ()), RunSpec("kd+attention", 2, 0, (("attention", 1.0),))]  # the latter fails
    monkeypatch.setattr(experiment, "main_specs", lambda config, chosen: specs)
    raised: list[BaseException] = []

    def run() -> None:
        try:
            run_experiment(config, echo=lambda line: None)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=240)
    assert not thread.is_alive(), "the experiment waits forever for a failed worker"
    assert len(raised) == 1 and isinstance(raised[0], UnknownNameError) and "layer9" in str(raised[0])


def test_an_experiment_does_not_overwrite_earlier_results(tmp_path):
    from jacplug.errors import UserError

    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"runs": []}')  # a finished (or interrupted) experiment's
    with pytest.raises(UserError, match=r"already holds an experiment's results \(results.json\)"):
        run_experiment(tiny_config(out), echo=lambda line: None)
    assert (out / "results.json").read_text() == '{"runs": []}'
