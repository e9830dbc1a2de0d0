"""The TensorBoard and MLflow observers (jacplug_plugins.trackers), driven through the plugin host as the run
loop drives them, then read back with TensorBoard's own reader and MLflow's client."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from jacplug.errors import UserError
from jacplug.events import Phase
from jacplug.registry import PluginHost, get_host

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

from mlflow import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: E402

STEPS, EVALUATED = 4, (2, 4)


@pytest.fixture(autouse=True)
def strict_plugins(monkeypatch):
    """A hook that raises fails the test instead of being reported and skipped."""
    monkeypatch.setenv("JACPLUG_STRICT_PLUGINS", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def step_metrics(phase: Phase, step: int) -> dict[str, float]:
    offset = len(phase.name)  # different numbers in every phase
    return {"loss": offset + 1.0 / step, "kd": 0.5 / step, "jacobian": 0.25 / step, "attention@layer1": 0.1, "lr": 0.1}


def eval_metrics(phase: Phase, step: int) -> dict[str, float]:
    return {"step": step, "train_loss": 1.0 / step, "test_acc": 0.5 + step / 10 + len(phase.name) / 100,
            "agreement_cosine": step / 8, "agreement_distance": 2 - step / 4}


def drive(host: PluginHost, phase: Phase, picture: Path) -> None:
    """The events of one phase, in the order the run loop sends them."""
    run = types.SimpleNamespace(out_dir=phase.out_dir)
    host.notify("on_train_start", run=run, phase=phase)
    for step in range(1, STEPS + 1):
        host.notify("on_step_end", run=run, phase=phase, step=step, metrics=step_metrics(phase, step))
        if step in EVALUATED:
            metrics = eval_metrics(phase, step)
            host.notify("on_epoch_end", run=run, phase=phase, epoch=step // 2, metrics=metrics)
            files = {"last": phase.out_dir / f"{phase.name}_last.safetensors"}
            host.notify("on_checkpoint", run=run, phase=phase, step=step, metrics=metrics, files=files)
    host.notify("on_image", run=run, phase=phase, name="gradient_maps", path=picture, step=STEPS)
    summary = {"test_acc": 0.875, "best_checkpoint": str(phase.out_dir / "best.safetensors")}
    host.notify("on_train_end", run=run, phase=phase, summary=summary)


def phases(tmp_path: Path) -> list[Phase]:
    run_dir, experiment_dir = tmp_path / "run", tmp_path / "experiment"
    params = {"lr": 0.1, "loss": "kd=0.5 jacobian=0.15", "steps": STEPS, "channels_last": False, "seed": None}
    return [
        Phase("teacher", "teacher", run_dir, "run", params),
        Phase("student", "student", run_dir, "run", {**params, "teacher": "resnet50"}),
        Phase("cell", "main-kd-n5-seed0", experiment_dir, "experiment", {**params, "method": "kd"}),
        Phase("cell", "main-kd+jacobian-n5-seed0", experiment_dir, "experiment", {**params, "method": "kd+jacobian"}),
    ]


@pytest.fixture
def picture(tmp_path) -> Path:
    path = tmp_path / "gradient_maps.png"
    Image.new("RGB", (24, 12), (200, 30, 10)).save(path)
    return path


def observing(name: str, **options) -> PluginHost:
    """A host holding one fresh observer, made by the process-wide registry (the installed entry point)."""
    host = PluginHost(load_entry_points=False)
    host.register(get_host().registry("observers").create(name, **options), name=name)
    return host


def test_both_trackers_are_registered_off_by_default():
    registry = get_host().registry("observers")
    for name in ("tensorboard", "mlflow"):
        entry = registry.get(name)
        assert entry.plugin == "jacplug.trackers" and entry.metadata["default"] is False


def test_tensorboard_writes_one_run_per_phase(tmp_path, picture):
    host = observing("tensorboard")
    all_phases = phases(tmp_path)
    for phase in all_phases:
        drive(host, phase, picture)

    assert sorted(p.name for p in (tmp_path / "run" / "tensorboard").iterdir()) == ["student", "teacher"]
    for phase in all_phases:
        events = EventAccumulator(str(phase.out_dir / "tensorboard" / phase.name), size_guidance={"scalars": 0}).Reload()
        loss = events.Scalars("train/loss")
        assert [e.step for e in loss] == [1, 2, 3, 4]
        assert [e.value for e in loss] == pytest.approx([step_metrics(phase, s)["loss"] for s in (1, 2, 3, 4)])
        assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([0.1] * 4)
        accuracy = events.Scalars("eval/test_acc")
        assert [(e.step, e.value) for e in accuracy] == [
            (s, pytest.approx(eval_metrics(phase, s)["test_acc"])) for s in EVALUATED
        ]
        assert [e.value for e in events.Scalars("eval/agreement_cosine")] == pytest.approx([0.25, 0.5])
        assert "eval/step" not in events.Tags()["scalars"]
        assert [(e.step, e.value) for e in events.Scalars("summary/test_acc")] == [(4, 0.875)]

        (image,) = events.Images("images/gradient_maps")
        assert (image.step, image.width, image.height) == (STEPS, 24, 12)

        content = events.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        hparams = start.session_start_info.hparams
        assert hparams["lr"].number_value == pytest.approx(0.1) and hparams["steps"].number_value == STEPS
        assert hparams["loss"].string_value == "kd=0.5 jacobian=0.15" and hparams["seed"].string_value == "None"
        assert hparams["channels_last"].bool_value is False
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
        assert [info.name.tag for info in experiment.metric_infos] == ["summary/test_acc"]


def test_mlflow_logs_one_finished_run_per_phase_in_a_local_store(tmp_path, picture):
    host = observing("mlflow")
    all_phases = phases(tmp_path)
    for phase in all_phases:
        drive(host, phase, picture)

    for directory, group, names in (("run", "run", {"teacher", "student"}),
                                    ("experiment", "experiment", {p.name for p in all_phases[2:]})):
        client = MlflowClient(f"sqlite:///{tmp_path / directory / 'mlflow.db'}")
        experiment = client.get_experiment_by_name(group)
        assert experiment.artifact_location == (tmp_path / directory / "mlartifacts").resolve().as_uri()
        runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
        assert set(runs) == names
        for phase in (p for p in all_phases if p.name in names):
            run = runs[phase.name]
            assert run.info.status == "FINISHED"
            assert run.data.tags["kind"] == phase.kind and run.data.tags["group"] == group
            assert run.data.tags["checkpoint.last"] == str(phase.out_dir / f"{phase.name}_last.safetensors")
            assert run.data.params == {key: str(value) for key, value in phase.params.items()}
            loss = client.get_metric_history(run.info.run_id, "train/loss")
            assert sorted((m.step, m.value) for m in loss) == [
                (s, pytest.approx(step_metrics(phase, s)["loss"])) for s in (1, 2, 3, 4)
            ]
            accuracy = client.get_metric_history(run.info.run_id, "eval/test_acc")
            assert sorted((m.step, m.value) for m in accuracy) == [
                (s, pytest.approx(eval_metrics(phase, s)["test_acc"])) for s in EVALUATED
            ]
            assert run.data.metrics["summary/test_acc"] == 0.875 and "eval/step" not in run.data.metrics
            assert run.data.metrics["train/attention_layer1"] == 0.1  # a character MLflow refuses, replaced
            images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
            assert images, "the picture was not logged"
            png = next(Path(client.download_artifacts(run.info.run_id, p, str(tmp_path / "dl"))) for p in images
                       if p.endswith(".png"))
            with Image.open(png) as logged:
                assert logged.size == (24, 12)


def test_tensorboard_writes_out_a_crashed_phase_when_the_next_starts(tmp_path):
    host = observing("tensorboard")
    first, second = phases(tmp_path)[:2]
    run = types.SimpleNamespace(out_dir=first.out_dir)
    host.notify("on_train_start", run=run, phase=first)
    host.notify("on_step_end", run=run, phase=first, step=1, metrics={"loss": 3.0})  # then it crashes
    host.notify("on_train_start", run=run, phase=second)
    events = EventAccumulator(str(first.out_dir / "tensorboard" / first.name)).Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 3.0)]


def test_mlflow_ends_a_crashed_phase_and_the_option_beats_the_environment(tmp_path, monkeypatch):
    option_store, env_store = tmp_path / "option.db", tmp_path / "env.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{env_store}")
    host = observing("mlflow", tracking_uri=f"sqlite:///{option_store}")
    first, second = phases(tmp_path)[:2]
    run = types.SimpleNamespace(out_dir=first.out_dir)
    host.notify("on_train_start", run=run, phase=first)
    host.notify("on_step_end", run=run, phase=first, step=1, metrics={"loss": 3.0})  # then it crashes
    host.notify("on_train_start", run=run, phase=second)
    host.notify("on_train_end", run=run, phase=second, summary={})

    assert not env_store.exists() and not (first.out_dir / "mlflow.db").exists()
    client = MlflowClient(f"sqlite:///{option_store}")
    runs = client.search_runs([client.get_experiment_by_name("run").experiment_id])
    assert {r.info.run_name: r.info.status for r in runs} == {"teacher": "FAILED", "student": "FINISHED"}

    host = observing("mlflow")  # no option: the environment's store
    host.notify("on_train_start", run=run, phase=first)
    host.notify("on_train_end", run=run, phase=first, summary={"test_acc": 0.5})
    client = MlflowClient(f"sqlite:///{env_store}")
    (only,) = client.search_runs([client.get_experiment_by_name("run").experiment_id])
    assert only.data.metrics == {"summary/test_acc": 0.5} and only.info.status == "FINISHED"


@pytest.mark.parametrize("tracker, module", [("tensorboard", "torch.utils.tensorboard"), ("mlflow", "mlflow")])
def test_a_missing_extra_is_one_line_naming_the_install(tracker, module, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # what `import` sees when the package is not installed
    with pytest.raises(UserError) as raised:
        get_host().registry("observers").create(tracker)
    assert str(raised.value) == f"--log {tracker} needs the {tracker} package: pip install 'jacplug[{tracker}]'"


def test_unknown_options_are_named():
    with pytest.raises(UserError, match="tracker 'mlflow' got unknown option\\(s\\) uri; it takes tracking_uri"):
        get_host().registry("observers").create("mlflow", uri="x")
    with pytest.raises(UserError, match="'tensorboard' got unknown option\\(s\\) dir; it takes no options"):
        get_host().registry("observers").create("tensorboard", dir="x")
