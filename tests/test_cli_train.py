"""``jacplug train`` end to end through the real CLI: files, hooks, checkpoints, resume, bad input.

Runs use timm's ``test_resnet`` (a tiny ResNet) on the embedded digits at their native 8x8, a few
images per class and a few steps, so the whole module stays within seconds per run on 2 CPU cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from jacplug import hookimpl
from jacplug.cli.main import main
from jacplug.io.checkpoint import save_model
from jacplug.training.metrics import loss_keys, read_metrics
from jacplug.registry import create_dataset, get_host
from conftest import tiny_train_args
from detached_loss import DetachedPlugin
from image_tree import image_tree

TINY = tiny_train_args()


def cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["train", *TINY, *args]) if args[:1] != ("plot",) else main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def teacher_file(teacher_checkpoint) -> str:
    """The session's trained ``test_resnet`` teacher (conftest: 3 epochs on all 1,258 training digits)."""
    return teacher_checkpoint


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    @hookimpl
    def on_train_start(self, run):
        self.calls.append(("start", run.config.student))

    @hookimpl
    def on_step_end(self, run, step, metrics):
        self.calls.append(("step", (step, sorted(metrics))))

    @hookimpl
    def on_epoch_end(self, run, epoch, metrics):
        self.calls.append(("epoch", epoch))

    @hookimpl
    def on_train_end(self, run, summary):
        self.calls.append(("end", summary["run_dir"]))


@pytest.fixture
def plugin():
    """Register plugin objects in the CLI's host for one test."""
    names = []

    def register(obj, name):
        names.append(get_host().register(obj, name=name))
        return obj

    yield register
    for name in names:
        get_host().unregister(name)


def test_end_to_end_run_writes_everything_and_best_checkpoint_reproduces_accuracy(tmp_path, capsys, teacher_file, plugin):
    recorder = plugin(Recorder(), "recorder")
    out = tmp_path / "run"
    rc, stdout, err = cli(capsys, "--teacher-checkpoint", teacher_file, "--samples-per-class", "3", "--epochs", "2",
                          "--out", str(out), "--json")
    assert rc == 0, err
    summary = json.loads(stdout)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "metrics.jsonl", "curves.png", "student_best.safetensors", "student_last.safetensors",
            "resume.safetensors"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["samples_per_class"] == 3 and (config["epochs"], config["steps"]) == (2, None)
    assert config["loss"] == ["kd=0.5:temperature=4", "jacobian=0.15"] and config["augment"] is False  # resolved
    assert (summary["optimizer_steps"], summary["batch"], summary["images_seen"]) == (8, 8, 64)
    assert summary["checkpoints"]["teacher"] == teacher_file  # the run trained no teacher of its own
    assert "student test_resnet: step 8/8 (epoch 2/2), 64 images, loss" in err  # progress lines without bars
    records = read_metrics(out)
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6, 7, 8]  # 30 images / batch 8 = 4 steps per epoch
    assert all({"loss", "kd", "jacobian", "lr"} <= set(r) for r in steps)
    assert loss_keys(steps) == ["jacobian", "kd", "loss"]  # the plotted curves: positions such as images are not
    assert [r["epoch"] for r in epochs] == [1, 2] and all({"kd", "jacobian", "val_acc", "test_acc"} <= set(r) for r in epochs)
    assert set(summary["final_losses"]) == {"train_loss", "kd", "jacobian"}
    kinds = [c[0] for c in recorder.calls]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("step") == 8 and kinds.count("epoch") == 2
    assert recorder.calls[1] == ("step", (1, ["jacobian", "kd", "loss", "lr"]))

    # the best student loads with nothing but safetensors + timm and reproduces the reported accuracy
    path = summary["checkpoints"]["student_best"]
    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata()
    student = timm.create_model(meta["model"], num_classes=int(meta["num_classes"]), in_chans=int(meta["in_chans"]))
    student.load_state_dict(load_file(path))
    test = create_dataset("digits", image_size=json.loads(meta["input_size"])[-1]).test
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.tensor([test[i][1] for i in range(len(test))])
    with torch.no_grad():
        acc = int((student.eval()(x).argmax(1) == y).sum()) / len(y)
    assert acc == pytest.approx(summary["student_best_test_acc"], abs=1e-9)
    assert summary["teacher_test_acc"] > 0.3  # one epoch of a tiny ResNet: well above chance

    # AdamW decays weights, not norm parameters or biases (the default loss has no parameters)
    with safe_open(str(out / "resume.safetensors"), framework="pt") as fh:
        groups = json.loads(fh.metadata()["optimizer"])["param_groups"]
    undecayed = [g for g in groups if g["weight_decay"] == 0.0]
    assert len(undecayed) == 1 and {g["weight_decay"] for g in groups} == {0.0, 0.05}
    assert len(undecayed[0]["params"]) == sum(p.ndim <= 1 for p in student.parameters()) > 0

    (out / "curves.png").unlink()
    rc, stdout, _ = cli(capsys, "plot", str(out))
    assert rc == 0 and (out / "curves.png").stat().st_size > 1000


class Interrupt:
    """Stops training after a given step, as Ctrl-C or a kill between two checkpoints would."""

    def __init__(self, at: int) -> None:
        self.at = at

    @hookimpl
    def on_step_end(self, step):
        if step == self.at:
            raise KeyboardInterrupt


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, capsys, teacher_file, plugin):
    common = ["--teacher-checkpoint", teacher_file, "--samples-per-class", "4", "--epochs", "2", "--save-every", "2"]
    rc, _, err = cli(capsys, *common, "--out", str(tmp_path / "straight"))
    assert rc == 0, err

    plugin(Interrupt(at=7), "interrupt")  # 5 steps per epoch: killed in epoch 2, last save at step 6
    rc, _, err = cli(capsys, *common, "--out", str(tmp_path / "resumed"))
    assert rc == 130 and "interrupted" in err
    get_host().unregister("interrupt")
    recorder = plugin(Recorder(), "recorder")
    rc, _, err = cli(capsys, "--out", str(tmp_path / "resumed"), "--resume")
    assert rc == 0, err
    assert "student test_resnet: resuming at step 6 of 10, 10 optimizer steps" in err

    straight = load_file(tmp_path / "straight" / "student_last.safetensors")
    resumed = load_file(tmp_path / "resumed" / "student_last.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [r["step"] for r in read_metrics(tmp_path / "resumed") if r["kind"] == "step"] == list(range(1, 11))
    # the resumed process continued from the save at step 6: it redid step 7 and nothing before
    assert [call[1][0] for call in recorder.calls if call[0] == "step"] == [7, 8, 9, 10]


KILLED_MID_WRITE = """
import os, signal, sys
from jacplug.io import files

def write_all(fd, data):
    os.write(fd, b"x" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)

files.write_all = write_all
files.atomic_write_bytes(sys.argv[1], b"a whole file")
"""


def _without_times(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in records]


@pytest.mark.subprocess
def test_resume_before_the_first_save_logs_every_step_once_and_removes_stale_temp_files(tmp_path, capsys, teacher_file,
                                                                                       plugin):
    common = ["--teacher-checkpoint", teacher_file, "--samples-per-class", "2", "--epochs", "2", "--save-every", "0",
              "--loss", "kd=1"]
    rc, _, err = cli(capsys, *common, "--out", str(tmp_path / "straight"))
    assert rc == 0, err

    resumed = tmp_path / "resumed"
    plugin(Interrupt(at=1), "interrupt")  # before the first save after a step (save-every 0: at epoch ends only)
    rc, _, err = cli(capsys, *common, "--out", str(resumed))
    with safe_open(str(resumed / "resume.safetensors"), framework="pt") as fh:  # the phase's start only
        assert rc == 130 and json.loads(fh.metadata()["position"])["step"] == 0
    get_host().unregister("interrupt")
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(resumed / "resume.safetensors")], timeout=120)
    assert killed.returncode == -9 and any(p.name.startswith(".resume.safetensors.") for p in resumed.iterdir())

    rc, _, err = cli(capsys, "--out", str(resumed), "--resume")
    assert rc == 0, err
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((tmp_path / "straight" / "metrics.jsonl").read_text().splitlines())
    assert _without_times(read_metrics(resumed)) == _without_times(read_metrics(tmp_path / "straight"))
    assert not any(p.name.startswith(".resume.safetensors.") for p in resumed.iterdir())


@pytest.fixture
def tiny_folder(tmp_path):
    """Two colours, three 10x10 images each, in train/ and val/ only."""
    return image_tree(tmp_path / "images", {"train": ["blue", "red"], "val": ["blue", "red"]})


def test_resume_after_an_interrupted_teacher_logs_each_teacher_epoch_once(tmp_path, capsys, monkeypatch, tiny_folder):
    from jacplug.training.metrics import MetricsLog

    common = ["--dataset", f"imagefolder:{tiny_folder}", "--teacher-epochs", "2", "--epochs", "1", "--loss", "kd=1"]
    write = MetricsLog.write

    def interrupt_after_first_teacher_epoch(self, record):
        write(self, record)
        if record.get("kind") == "teacher_epoch":
            raise KeyboardInterrupt

    monkeypatch.setattr(MetricsLog, "write", interrupt_after_first_teacher_epoch)
    rc, _, _ = cli(capsys, *common, "--out", str(tmp_path / "run"))
    assert rc == 130 and not (tmp_path / "run" / "teacher.safetensors").exists()
    monkeypatch.setattr(MetricsLog, "write", write)
    rc, _, err = cli(capsys, "--out", str(tmp_path / "run"), "--resume")
    assert rc == 0, err
    teacher = [r["epoch"] for r in read_metrics(tmp_path / "run") if r["kind"] == "teacher_epoch"]
    assert teacher == [1, 2]


def test_image_folder_without_a_validation_split_says_the_best_epoch_was_chosen_on_test(tmp_path, capsys, tiny_folder):
    rc, stdout, err = cli(capsys, "--dataset", f"imagefolder:{tiny_folder}", "--teacher-epochs", "1", "--epochs", "1",
                          "--loss", "kd=1", "--out", str(tmp_path / "run"))
    assert rc == 0, err
    assert "best on test" in stdout and "no validation split: the best epoch was chosen on the test split" in stdout


def test_resume_refuses_changed_identity_options(tmp_path, capsys, teacher_file):
    out = str(tmp_path / "run")
    rc, _, _ = cli(capsys, "--teacher-checkpoint", teacher_file, "--samples-per-class", "2", "--epochs", "1",
                   "--out", out, "--loss", "kd=1")
    assert rc == 0
    rc, _, err = cli(capsys, "--out", out, "--resume", "--loss", "kd=2")
    assert rc == 2 and "--loss" in err and "saved" in err and len(err.strip().splitlines()) == 1
    rc, _, err = cli(capsys, "--teacher-checkpoint", teacher_file, "--out", out)
    assert rc == 2 and "already holds a run (config.json, " in err and "; pass --resume" in err
    rc, _, err = cli(capsys, "--out", out, "--resume", "--epochs", "2")  # would move the cosine's end mid-run
    assert rc == 2 and "cannot change the training length" in err and len(err.strip().splitlines()) == 1


def test_resume_under_a_step_budget_matches_an_uninterrupted_run(tmp_path, capsys, teacher_file, plugin):
    common = ["--teacher-checkpoint", teacher_file, "--samples-per-class", "3", "--steps", "7", "--save-every", "2"]
    rc, stdout, err = cli(capsys, *common, "--out", str(tmp_path / "straight"), "--json")
    assert rc == 0, err
    summary = json.loads(stdout)
    assert (summary["optimizer_steps"], summary["images_seen"], summary["epochs"]) == (7, 56, 2)
    records = read_metrics(tmp_path / "straight")
    assert [r["step"] for r in records if r["kind"] == "epoch"] == [4, 7]  # each epoch end, and the last step
    assert records[-1]["images"] == 56
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert (config["epochs"], config["steps"]) == (None, 7)

    plugin(Interrupt(at=5), "interrupt")  # last save at step 4 (an evaluation), so steps 5.. rerun
    rc, _, err = cli(capsys, *common, "--out", str(tmp_path / "resumed"))
    assert rc == 130
    get_host().unregister("interrupt")
    rc, _, err = cli(capsys, "--out", str(tmp_path / "resumed"), "--resume", "--steps", "7")
    assert rc == 0, err
    straight = load_file(tmp_path / "straight" / "student_last.safetensors")
    resumed = load_file(tmp_path / "resumed" / "student_last.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [r["step"] for r in read_metrics(tmp_path / "resumed") if r["kind"] == "step"] == list(range(1, 8))
    rc, _, err = cli(capsys, "--out", str(tmp_path / "resumed"), "--resume", "--steps", "9")
    assert rc == 2 and "cannot change the training length" in err and "saved: --steps 7" in err


def test_teacher_phase_obeys_the_step_cap_and_records_its_accuracy(tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, err = cli(capsys, "--teacher-epochs", "3", "--max-steps-per-epoch", "2", "--steps", "1",
                          "--samples-per-class", "2", "--loss", "kd=1", "--out", str(out), "--json")
    assert rc == 0, err
    teacher = [r for r in read_metrics(out) if r["kind"] == "teacher_epoch"]
    assert [(r["epoch"], r["step"], r["images"]) for r in teacher] == [(1, 2, 16), (2, 4, 32), (3, 6, 48)]
    with safe_open(str(out / "teacher.safetensors"), framework="pt") as fh:
        metrics = json.loads(fh.metadata()["metrics"])
    summary = json.loads(stdout)
    assert metrics["test_acc"] == pytest.approx(summary["teacher_test_acc"]) and 0 <= metrics["val_acc"] <= 1
    assert "teacher test_resnet: step 6/6 (epoch 3/3), 48 images" in err
    # images/s of the 2 steps after the 4 warm-up steps, in the checkpoint and the summary
    assert metrics["images_per_s"] > 0 and summary["teacher_images_per_s"] == metrics["images_per_s"]

    rc, stdout, err = cli(capsys, "--teacher-epochs", "3", "--max-steps-per-epoch", "2", "--steps", "1",
                          "--samples-per-class", "2", "--loss", "kd=1", "--out", str(tmp_path / "printed"))
    assert rc == 0 and "teacher training speed" in stdout and "images/s after warm-up" in stdout
    rc, stdout, err = cli(capsys, "--teacher-epochs", "2", "--max-steps-per-epoch", "2", "--steps", "1",
                          "--samples-per-class", "2", "--loss", "kd=1", "--out", str(tmp_path / "short"), "--json")
    assert rc == 0 and json.loads(stdout)["teacher_images_per_s"] is None  # 4 steps are all warm-up: no figure


def test_warnings_for_few_steps_and_another_input_size(tmp_path, capsys, teacher_file):
    from jacplug.training.plan import FewStepsWarning
    from jacplug.training.teacher import InputSizeWarning

    with pytest.warns(InputSizeWarning, match=r"trained on 8x8 inputs, but this run feeds it 10x10.*--image-size 8"):
        with pytest.warns(FewStepsWarning, match=r"the student will make only 1 optimizer step .*pass --steps N"):
            rc, _, err = cli(capsys, "--teacher-checkpoint", teacher_file, "--image-size", "10", "--steps", "1",
                             "--samples-per-class", "2", "--loss", "kd=1", "--out", str(tmp_path / "run"))
    assert rc == 0, err


def _wrong_classes(tmp_path) -> str:
    path = tmp_path / "three.safetensors"
    net = timm.create_model("test_resnet", num_classes=3, in_chans=1)
    save_model(path, net, role="teacher", name="test_resnet", num_classes=3, input_shape=(1, 8, 8), mean=(0.0,),
               std=(1.0,), config={})
    return str(path)


def _corrupt(tmp_path) -> str:
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return str(path)


BAD = [
    (["--teacher", "resnet5O"], "unknown model 'resnet5O'; did you mean"),
    (["--student", "resnet1B"], "unknown model 'resnet1B'; did you mean"),
    (["--loss", "kdd=1"], "unknown loss 'kdd'; did you mean 'kd'"),
    (["--dataset", "digitz"], "unknown dataset 'digitz'; did you mean 'digits'"),
    (["--dataset", "imagefolder:/no/such/folder"], "does not exist"),
    (["--loss", "kd=0"], "weight must be finite and > 0"),
    (["--loss", "kd=-1"], "weight must be finite and > 0"),
    (["--epochs", "0"], "--epochs must be a positive integer"),
    (["--teacher-epochs", "-1"], "--teacher-epochs must be a positive integer"),
    (["--samples-per-class", "0"], "--samples-per-class must be a positive integer"),
    (["--samples-per-class", "500"], "--samples-per-class 500 is more than class"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--epochs", "2", "--steps", "5"], "--epochs and --steps both set the training length; pass one"),
    (["--teacher-steps", "0"], "--teacher-steps must be a positive integer"),
    (["--resume"], "holds no run (no config.json)"),
    (["--cache-teacher", "--augment"], "--cache-teacher needs un-augmented training data"),
    (["--config", "/no/such.yaml"], "config file '/no/such.yaml' does not exist"),
    ("wrong-classes", "trained for 3 classes, but the dataset has 10"),
    ("corrupt", "is corrupt or not a safetensors file"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[str(a)[:40] for a, _ in BAD])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, args, message):
    if args == "wrong-classes":
        args = ["--teacher-checkpoint", _wrong_classes(tmp_path)]
    elif args == "corrupt":
        args = ["--teacher-checkpoint", _corrupt(tmp_path)]
    rc, out, err = cli(capsys, *args, "--out", str(tmp_path / "run"))
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jacplug: error: ") and message in lines[0], err


def test_offline_download_suggests_the_embedded_dataset(tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    rc, _, err = cli(capsys, "--dataset", "cifar10", "--download", "--data-root", str(tmp_path), "--out", str(tmp_path / "r"))
    assert rc == 2 and "offline" in err and "--dataset digits" in err and len(err.strip().splitlines()) == 1


@pytest.mark.subprocess
def test_real_process_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jacplug", "train", "--teacher", "resnet5O", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("jacplug: error: unknown model 'resnet5O'")


def test_training_checks_gradient_flow_first(tmp_path, capsys, teacher_file, plugin):
    plugin(DetachedPlugin(), "detached-loss")
    common = ["--teacher-checkpoint", teacher_file, "--samples-per-class", "2", "--epochs", "1",
              "--loss", "kd=1", "--loss", "detached=1"]
    rc, _, err = cli(capsys, *common, "--out", str(tmp_path / "checked"))
    assert rc == 2 and err.startswith("jacplug: error: loss term(s) with no gradient path to the parameters: detached")
    assert not (tmp_path / "checked" / "student_last.safetensors").exists()
    rc, _, err = cli(capsys, *common, "--out", str(tmp_path / "unchecked"), "--no-check-gradients")
    assert rc == 0, err


def test_cache_teacher_run(tmp_path, capsys, teacher_file):
    out = tmp_path / "cached"
    rc, stdout, err = cli(capsys, "--teacher-checkpoint", teacher_file, "--samples-per-class", "2", "--epochs", "2",
                          "--cache-teacher", "--out", str(out), "--json")
    assert rc == 0, err
    from safetensors import safe_open as open_

    with open_(str(out / "teacher_cache.safetensors"), framework="pt") as fh:
        assert fh.get_slice("teacher_jacobian_rows").get_shape() == [20, 1, 1, 8, 8]  # top-1 row per sample
    assert json.loads(stdout)["final_losses"]["jacobian"] > 0


def test_config_file_options_are_overridden_by_flags(tmp_path):
    from jacplug.cli.cmd_train import resolve_config
    from jacplug.cli.main import build_parser

    path = tmp_path / "run.toml"
    path.write_text('teacher = "resnet34"\nepochs = 9\nbatch-size = 16\nloss = ["kd=1", "jacobian=3"]\ncache_teacher = true\n')
    args = build_parser().parse_args(["train", "--config", str(path), "--epochs", "2", "--lr", "0.01"])
    config = resolve_config(args)
    assert (config.teacher, config.epochs, config.batch_size, config.lr) == ("resnet34", 2, 16, 0.01)
    assert config.loss == ["kd=1", "jacobian=3"] and config.cache_teacher and config.student == "resnet18"
    args = build_parser().parse_args(["train", "--config", str(path), "--loss", "kd=2"])
    assert resolve_config(args).loss == ["kd=2"]  # a repeated flag replaces the file's list


def test_a_bad_teacher_checkpoint_is_refused_before_anything_is_written(tmp_path, capsys, teacher_file):
    """Each problem ends in one line, exit 2, and no run directory is left behind (not even config.json)."""
    valid = open(teacher_file, "rb").read()
    (tmp_path / "truncated.safetensors").write_bytes(valid[: len(valid) // 2])
    (tmp_path / "random.safetensors").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "text.safetensors").write_text("not a checkpoint\n")
    (tmp_path / "folder").mkdir()
    for name, classes, chans in (("classes", 5, 1), ("rgb", 10, 3)):
        torch.manual_seed(0)
        model = timm.create_model("test_resnet", num_classes=classes, in_chans=chans)
        save_model(tmp_path / f"{name}.safetensors", model, role="teacher", name="test_resnet", num_classes=classes,
                   input_shape=(chans, 8, 8), mean=(0.5,) * chans, std=(0.25,) * chans, config={})
    cases = [
        ([str(tmp_path / "none.safetensors")], "does not exist"),
        ([str(tmp_path / "truncated.safetensors")], "is corrupt or not a safetensors file"),
        ([str(tmp_path / "random.safetensors")], "is corrupt or not a safetensors file"),
        ([str(tmp_path / "text.safetensors")], "is corrupt or not a safetensors file"),
        ([str(tmp_path / "folder")], "is a directory"),
        ([teacher_file, "--teacher", "resnet10t"], "holds a 'test_resnet' model, but 'resnet10t' was requested"),
        ([str(tmp_path / "classes.safetensors")], "was trained for 5 classes, but the dataset has 10"),
        ([str(tmp_path / "rgb.safetensors")], "expects 3 input channels, but the dataset has 1"),
    ]
    for args, message in cases:
        out = tmp_path / "run"
        rc, _, err = cli(capsys, "--teacher-checkpoint", *args, "--epochs", "1", "--out", str(out))
        assert rc == 2 and message in err and err.count("\n") == 1, (args, err)
        assert not out.exists(), (args, sorted(p.name for p in out.iterdir()))


def test_a_teacher_checkpoint_names_its_model_unless_the_teacher_is_given(tmp_path, capsys, teacher_file):
    args = ["train", "--student", "test_resnet", "--image-size", "8", "--batch-size", "8", "--no-progress",
            "--teacher-checkpoint", teacher_file, "--steps", "1", "--samples-per-class", "2", "--loss", "kd=1", "--json"]
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "run")]) == 0  # no --teacher: the checkpoint's test_resnet
    assert json.loads(capsys.readouterr().out)["teacher"] == "test_resnet"
    assert main([*args, "--teacher", "resnet50", "--out", str(tmp_path / "other")]) == 2  # given: it must match
    assert "holds a 'test_resnet' model, but 'resnet50' was requested" in capsys.readouterr().err
