"""Shared fixtures: small float64 models that exercise the traps (BatchNorm, in-place ReLU); the tiny
``jacplug train`` run (timm's ``test_resnet`` on the embedded 8 px digits) as arguments, data, models
and teacher checkpoints built once per session; and a check that no test writes into the checkout."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

torch.set_num_threads(1)  # see _one_intra_op_thread below


def small_convnet(classes: int = 5, channels: int = 2, inplace: bool = True) -> nn.Module:
    """Conv -> BatchNorm -> ReLU(inplace) -> Linear: the pattern timm's resnets use."""
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=inplace),
        nn.Conv2d(4, 3, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, classes),
    )


def small_mlp(inputs: int = 6, classes: int = 4) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, 8), nn.Tanh(), nn.Linear(8, classes))


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Every test starts on one intra-op thread (whatever the test before it set): the suite's tensors are
    small, and on them the hand-offs between threads cost more than the work (a small convolution's
    gradgradcheck: 1.5 s of CPU on one thread, 43 s on two, measured on the busy two-core test machine)."""
    torch.set_num_threads(1)


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def convnet() -> nn.Module:
    torch.manual_seed(0)
    net = small_convnet().double()
    with torch.no_grad():  # non-trivial BatchNorm statistics so eval mode is not the identity
        net(torch.randn(16, 2, 5, 5, dtype=torch.float64) * 2 + 0.5)
    return net.eval()


def per_sample_reference(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Diagonal blocks of torch.autograd.functional.jacobian: ``[B, C, *S]``."""
    full = torch.autograd.functional.jacobian(net, x.detach())
    return torch.stack([full[b, :, b] for b in range(x.shape[0])])


# ---------------------------------------------------------------------------------------------------
# the tiny run: one set of arguments, data, models and teachers for every test that trains

#: ``jacplug train`` options of the tiny run: a few seconds per run on two CPU cores
TINY_TRAIN: dict[str, Any] = {"teacher": "test_resnet", "student": "test_resnet", "image_size": 8, "batch_size": 8,
                              "seed": 0, "device": "cpu", "no_progress": True}


def tiny_train_args(out: str | Path | None = None, **overrides: Any) -> list[str]:
    """The arguments after ``jacplug train`` for the tiny run, :data:`TINY_TRAIN` updated by ``overrides``
    (option names with underscores; ``True`` gives a bare flag, ``None`` or ``False`` drops the option,
    a list gives several values), then ``--out out`` when given."""
    options = {**TINY_TRAIN, **overrides, **({"out": out} if out is not None else {})}
    argv: list[str] = []
    for name, value in options.items():
        if value is None or value is False:
            continue
        argv.append("--" + name.replace("_", "-"))
        if isinstance(value, (list, tuple)):
            argv.extend(str(v) for v in value)
        elif value is not True:
            argv.append(str(value))
    return argv


@pytest.fixture(scope="session")
def tiny_digits():
    """The embedded digits at 8 px (train/val/test splits); shared, so tests only read them."""
    from jacplug.registry import create_dataset

    return create_dataset("digits", image_size=8)


@pytest.fixture(scope="session")
def _tiny_resnet() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=10, in_chans=1)


@pytest.fixture
def tiny_resnet(_tiny_resnet) -> Callable[[], nn.Module]:
    """A fresh ``test_resnet`` for 8 px digits (10 classes, 1 channel) per call: a copy of one seeded
    model, so every call gives the same weights and no test sees another's changes."""
    return lambda: copy.deepcopy(_tiny_resnet)


@pytest.fixture(scope="session")
def untrained_teacher_checkpoint(tmp_path_factory, _tiny_resnet, tiny_digits) -> str:
    """A ``test_resnet`` teacher checkpoint for 8 px digits with its initial weights, for tests that need
    *a* teacher file, not a good teacher."""
    from jacplug.io.checkpoint import save_model

    path = tmp_path_factory.mktemp("untrained-teacher") / "teacher.safetensors"
    save_model(path, _tiny_resnet, role="teacher", name="test_resnet", num_classes=10,
               input_shape=tiny_digits.input_shape, mean=tiny_digits.mean, std=tiny_digits.std, config={})
    return str(path)


@pytest.fixture(scope="session")
def teacher_checkpoint(tmp_path_factory) -> str:
    """A ``test_resnet`` teacher trained once per session by ``jacplug train`` (3 epochs on all 1,258
    training digits, well above chance), for tests that need a trained teacher."""
    from jacplug.cli.main import main

    out = tmp_path_factory.mktemp("teacher-run")
    assert main(["train", *tiny_train_args(out, batch_size=64, teacher_epochs=3, teacher_lr=5e-3, steps=1,
                                           samples_per_class=2, loss="kd=1")]) == 0
    return str(out / "teacher.safetensors")


# ---------------------------------------------------------------------------------------------------
# marks (registered in pyproject.toml)


#: files whose module-scoped fixtures are costly (a local Ray instance, DDP workers, a trained run): under
#: ``make test``'s two workers (pytest-xdist, ``--dist loadgroup``) each runs whole on one worker, so its
#: fixture is built once; the other files' tests are spread one by one
ONE_WORKER_FILES = {"test_ray.py", "test_pipeline_ddp.py", "test_faults.py", "test_features.py",
                    "test_pipeline_models.py", "test_run_files.py", "test_timm_interop.py",
                    "test_torchdistill_bridge.py", "test_zoo.py"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A distributed test starts processes: ``-m "not subprocess"`` leaves it out too. Tests of a file with
    costly module fixtures share one xdist worker."""
    for item in items:
        if item.get_closest_marker("distributed") is not None:
            item.add_marker(pytest.mark.subprocess)
        if item.path.name in ONE_WORKER_FILES:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))


# ---------------------------------------------------------------------------------------------------
# no test writes outside its temporary folder

_CHECKOUT = pytest.StashKey[set]()

REPOSITORY = Path(__file__).resolve().parents[1]
#: folders whose changes are not the tests' doing (the environment, git, caches)
NOT_CHECKOUT = {".venv", ".git", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}


def checkout_files() -> set[str]:
    """Every file under the repository root, ignored ones included (``runs/`` is ignored and is where a
    run's default ``--out`` goes). Paths only: an engineer editing a source while the suite runs is not
    a test writing into the checkout."""
    files = set()
    for folder, subfolders, names in os.walk(REPOSITORY):
        subfolders[:] = [name for name in subfolders if name not in NOT_CHECKOUT and not name.endswith(".egg-info")]
        files.update(os.path.relpath(os.path.join(folder, name), REPOSITORY) for name in names)
    return files


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_CHECKOUT] = checkout_files()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the suite when the checkout changed: a test wrote outside its ``tmp_path`` (a default
    ``--out`` such as ``runs/...``, a file beside the sources)."""
    before = session.config.stash.get(_CHECKOUT, None)
    if before is None:
        return
    after = checkout_files()
    changed = sorted(before ^ after)
    if changed:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = [f"the tests changed the checkout ({len(changed)} files; write under tmp_path instead):",
                 *(f"  {'new' if path in after else 'removed'}: {path}"
                   for path in changed[:20])]
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_sep("=", "checkout changed", red=True)
            for line in lines:
                reporter.write_line(line)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
