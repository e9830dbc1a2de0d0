"""No code from data: every loader of a file the user hands jacplug reads safetensors, JSON or safe YAML, and a
checkpoint's metadata hands timm only a model name and architecture arguments (docs/pipeline.md, Checkpoints)."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

import jacplug
from jacplug.cli.main import main
from jacplug.errors import UserError
from jacplug.io.checkpoint import load_resume, save_model
from jacplug.training.teacher import cosine_schedule
from jacplug.training.teacher_cache import TeacherCache

TINY = ["train", "--teacher", "test_resnet", "--student", "test_resnet", "--image-size", "8", "--batch-size", "8",
        "--device", "cpu", "--no-progress", "--steps", "1", "--loss", "kd=1"]


class _Payload:
    """Unpickling this creates ``marker``: proof that a loader ran code from the file."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def pickled(tmp_path, name: str = "evil.safetensors"):
    path, marker = tmp_path / name, tmp_path / "code-ran"
    torch.save({"conv.weight": torch.zeros(1), "payload": _Payload(marker)}, path)
    return path, marker


def crafted(tmp_path, model: str = "test_resnet", **kwargs) -> str:
    """A real test_resnet teacher whose metadata records ``model`` and ``kwargs``."""
    path = tmp_path / "crafted.safetensors"
    net = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    save_model(path, net, role="teacher", name="test_resnet", num_classes=10, input_shape=(1, 8, 8), mean=(0.5,),
               std=(0.5,), config={})
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
    meta.update(model=model, model_kwargs=json.dumps(kwargs))
    save_file(load_file(path), path, metadata=meta)
    return str(path)


def one_line(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2, argv
    out, err = capsys.readouterr()
    assert err.startswith("jacplug: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_pickled_checkpoints_are_refused_unread(tmp_path, capsys):
    path, marker = pickled(tmp_path)
    with pytest.raises(UserError, match="not a safetensors file"):
        jacplug.load_model(path)
    err = one_line(capsys, [*TINY, "--teacher-checkpoint", str(path), "--out", str(tmp_path / "run")])
    assert "not a safetensors file" in err
    net = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    optimizer = torch.optim.AdamW(net.parameters())
    with pytest.raises(UserError, match="not a safetensors file"):
        load_resume(path, models={"student": net, "loss": torch.nn.Identity()}, optimizer=optimizer,
                    scheduler=cosine_schedule(optimizer, 1))
    assert not TeacherCache.matches(path, "any fingerprint")  # an unreadable cache is rebuilt, never read
    assert not marker.exists()


def test_a_yaml_config_cannot_build_python_objects(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    config = tmp_path / "run.yaml"
    config.write_text(f"seed: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    one_line(capsys, [*TINY, "--config", str(config), "--out", str(tmp_path / "run")])
    assert not marker.exists()


@pytest.mark.parametrize("kwargs, key", [
    ({"checkpoint_path": "/etc/passwd"}, "checkpoint_path"),
    ({"pretrained": True}, "pretrained"),
    ({"pretrained_cfg_overlay": {"file": "/tmp/x"}}, "pretrained_cfg_overlay"),
    ({"cache_dir": "/tmp"}, "cache_dir"),
    ({"act_layer": "../../x"}, "act_layer"),
])
def test_recorded_model_arguments_are_architecture_only(tmp_path, capsys, kwargs, key):
    path = crafted(tmp_path, **kwargs)
    with pytest.raises(UserError, match=f"records the model argument '?{key}"):
        jacplug.load_model(path)
    err = one_line(capsys, [*TINY, "--teacher-checkpoint", path, "--out", str(tmp_path / "run")])
    assert key in err and "--teacher-kwargs" in err
    assert not (tmp_path / "run").exists()


def test_recorded_architecture_arguments_still_rebuild_the_model(tmp_path):
    path = crafted(tmp_path)  # test_resnet takes no img_size; an empty mapping must pass
    assert isinstance(jacplug.load_model(path), torch.nn.Module)
    from jacplug.models.pretrained import checkpoint_pretrained_cfg

    cfg = checkpoint_pretrained_cfg({"pretrained_cfg": json.dumps({"mean": [0.5], "url": "http://x/w.pth",
                                                                   "hf_hub_id": "evil/weights", "file": "/tmp/w"})})
    assert cfg == {"mean": (0.5,)}  # the data keys only: nothing that sends timm's load_pretrained elsewhere
    from jacplug.io.recorded import recorded_model_kwargs

    plain = {"img_size": 32, "depths": [1, 2], "act_layer": "gelu", "drop_rate": 0.1, "global_pool": None}
    assert recorded_model_kwargs(plain, "f") == plain


@pytest.mark.parametrize("name", ["../../escape", "a/b", "a\\b", "hf-hub:org/repo", "x..y"])
def test_a_recorded_model_name_must_be_a_model_name(tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    path = crafted(tmp_path, model=name)
    with pytest.raises(UserError, match="is not a model name"):
        jacplug.load_model(path)
    err = one_line(capsys, ["train", *TINY[3:], "--teacher-checkpoint", path])  # no --teacher: the file names it
    assert "is not a model name" in err and "--teacher" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crafted.safetensors"]  # no runs/, no escaped folder


def test_a_restarted_worker_that_cannot_join_names_the_unshared_store_setting(monkeypatch):
    """The real failure takes the process group's timeout (30 minutes for gloo) to surface, so the join
    raises what torch raises then: a ``DistNetworkError`` naming the address it could not reach."""
    import torch.distributed as dist

    from jacplug.training import runtime

    def unreachable(backend):
        raise dist.DistNetworkError("The client socket has timed out after 1800000ms while trying to connect to "
                                    "(10.0.0.7, 29400).")

    monkeypatch.setattr(dist, "init_process_group", unreachable)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    with pytest.raises(dist.DistNetworkError):  # a first start: torch's own error, unchanged
        runtime.init_runtime("cpu")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.raises(UserError, match=r"rank 1 of 2, restarted by torchrun \(1\), could not reach its peers "
                                        r"\(.*10\.0\.0\.7, 29400.*TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1") as caught:
        runtime.init_runtime("cpu")
    assert "\n" not in str(caught.value)


def test_a_resumed_run_does_not_follow_a_saved_tracking_uri(tmp_path, capsys):
    from jacplug.training.config import for_resume

    run = tmp_path / "run"
    run.mkdir()
    saved = {"teacher": "test_resnet", "student": "test_resnet", "image_size": 8, "steps": 1, "device": "cpu",
             "log": ["mlflow:tracking_uri=http://203.0.113.9:5000"]}
    (run / "config.json").write_text(json.dumps(saved))
    err = one_line(capsys, ["train", "--resume", "--out", str(run)])
    assert "--log mlflow:tracking_uri=http://203.0.113.9:5000 (saved in its config.json" in err and "give --log" in err
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]
    again = for_resume(saved, {"log": ["mlflow"]}, str(run))  # the user's choice, here $MLFLOW_TRACKING_URI
    assert again.log == ["mlflow"]
    assert for_resume({**saved, "log": ["tensorboard"]}, {}, str(run)).log == ["tensorboard"]  # no destination saved
