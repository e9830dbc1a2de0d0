"""Bad command lines end in one line and exit code 2, before any work and without leftovers: argparse's
type and choice errors (with close matches), devices, image sizes, bench options, plot targets and a
corrupt metrics file."""

from __future__ import annotations

import json
import time

import pytest

from jacplug.cli.main import main


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2, argv
    out, err = capsys.readouterr()
    assert err.startswith("jacplug: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("argv, message", [
    (["train", "--steps", "abc"], "argument --steps: invalid int value: 'abc' (see jacplug train --help)"),
    (["experiment", "--methods", "kd+jacobain"], "invalid choice 'kd+jacobain'; did you mean 'kd+jacobian'"),
    (["trian"], "invalid choice 'trian'; did you mean 'train'?"),
    (["bench", "--memory", "peak"], "argument --memory: invalid choice 'peak'"),
    (["train", "--no-such-option"], "unrecognized arguments: --no-such-option"),
])
def test_argparse_errors_are_one_line(capsys, argv, message):
    assert message in one_line_error(capsys, argv)


def test_an_unknown_device_is_refused_not_replaced_by_the_cpu(capsys, tmp_path):
    for command in (["train", "--out", str(tmp_path / "t")], ["experiment", "--out", str(tmp_path / "e")],
                    ["check"]):
        err = one_line_error(capsys, [*command, "--device", "tpu"])
        assert "--device" in err and "'tpu'" in err and "cuda:N" in err
    assert not (tmp_path / "t").exists() and not (tmp_path / "e").exists()


@pytest.mark.parametrize("size, message", [
    ("1000", "would upsample the 8x8 digits to 7.2 GB of float32 images; use at most 512"),
    ("100000", "--image-size 100000 is larger than 4096 px"),
])
def test_an_image_size_too_large_is_one_line(capsys, tmp_path, size, message):
    assert message in one_line_error(capsys, ["train", "--image-size", size, "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option, value, message", [
    ("--repeats", "0", "--repeats must be at least 1, got 0"),
    ("--batch-size", "0", "--batch-size must be at least 2 (train-mode BatchNorm needs two samples), got 0"),
    ("--json", "/proc/rows.json", "--json '/proc/rows.json' cannot be written"),
    ("--json", "/no/such/folder/rows.json", "cannot be written"),
])
def test_bench_options_are_checked_before_measuring(capsys, option, value, message):
    started = time.perf_counter()
    assert message in one_line_error(capsys, ["bench", "--configs", "mlp:3", option, value])
    assert time.perf_counter() - started < 5  # nothing was measured


def test_bench_refuses_a_json_path_that_is_a_link_and_leaves_its_target_alone(capsys, tmp_path):
    link, target = tmp_path / "rows.json", tmp_path / "elsewhere.json"
    link.symlink_to(target)  # dangling: opening it would create the target
    assert "is a symbolic link" in one_line_error(capsys, ["bench", "--configs", "mlp:3", "--json", str(link)])
    assert link.is_symlink() and not target.exists()


def run_dir_with_metrics(tmp_path, text: str):
    run = tmp_path / "run"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(text)
    return run


def test_plot_refuses_an_unwritable_target_and_a_corrupt_metrics_file(capsys, tmp_path):
    good = json.dumps({"kind": "step", "step": 1, "epoch": 1, "loss": 1.0, "kd": 1.0})
    run = run_dir_with_metrics(tmp_path, good + "\n")
    assert "cannot write the plot to '/proc/x.png'" in one_line_error(capsys, ["plot", str(run), "--out", "/proc/x.png"])
    corrupt = run_dir_with_metrics(tmp_path / "c", "\x00\x13garbage\n" + good + "\n")
    assert "line 1 is not a JSON record" in one_line_error(capsys, ["plot", str(corrupt)])
    not_records = run_dir_with_metrics(tmp_path / "n", "[1, 2]\n" + good + "\n")
    assert "line 1 is not a JSON record" in one_line_error(capsys, ["plot", str(not_records)])
    torn = run_dir_with_metrics(tmp_path / "t", good + "\n" + good[:10])  # a run killed mid-write: still plots
    capsys.readouterr()
    assert main(["plot", str(torn)]) == 0


@pytest.mark.parametrize("argv, present, absent", [
    (["train", "--cache-teacher", "--augment"], "is augmented here (random changes of every training image", "flip"),
    (["check", "--student", "resnet18:patch_size=4"], "(from --student NAME:KEY=VALUE or --student-kwargs)", None),
    (["check", "--dataset", "imagefolder:"], "--dataset 'imagefolder:' names no folder", "'.'"),
    (["check", "--teacher", "resnet10t", "--student", "test_resnet", "--loss", "fitnet=1"],
     "e.g. fitnet=1:layers=layer3 for a registered model pair", None),
])
def test_hints_name_the_right_option(capsys, tmp_path, argv, present, absent):
    err = one_line_error(capsys, [*argv, *(["--out", str(tmp_path / "run")] if argv[0] == "train" else [])])
    assert present in err and (absent is None or absent not in err), err


def test_under_torchrun_only_rank_0_prints_an_error(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, lines in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        capsys.readouterr()
        assert main(["train", "--steps", "abc"]) == 2
        assert capsys.readouterr().err.count("\n") == lines


def test_the_experiments_teacher_warning_names_the_experiments_option(tmp_path):
    from jacplug.experiment import ExperimentConfig
    from jacplug.experiment.protocol import teacher_weights
    from jacplug.training.prepare import load_data
    from jacplug.training.runtime import init_runtime
    from jacplug.training.plan import FewStepsWarning

    config = ExperimentConfig(teacher="test_resnet", image_size=8, teacher_epochs=1, out=str(tmp_path))
    with pytest.warns(FewStepsWarning, match="pass --teacher-epochs N"):
        teacher_weights(config, load_data(config), init_runtime("cpu"), tmp_path)
