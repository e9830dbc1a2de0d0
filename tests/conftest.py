"""Shared fixtures: small float64 models that exercise the traps (BatchNorm, in-place ReLU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


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
# no test writes outside its temporary folder

_CHECKOUT = pytest.StashKey[dict]()

REPOSITORY = Path(__file__).resolve().parents[1]
#: folders whose changes are not the tests' doing (the environment, git, caches)
NOT_CHECKOUT = {".venv", ".git", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}


def checkout_files() -> dict[str, tuple[int, int]]:
    """Every file under the repository root, ignored ones included (``runs/`` is ignored and is where a
    run's default ``--out`` goes), as path -> (size, modification time)."""
    files = {}
    for folder, subfolders, names in os.walk(REPOSITORY):
        subfolders[:] = [name for name in subfolders if name not in NOT_CHECKOUT and not name.endswith(".egg-info")]
        for name in names:
            path = os.path.join(folder, name)
            stat = os.stat(path, follow_symlinks=False)
            files[os.path.relpath(path, REPOSITORY)] = (stat.st_size, stat.st_mtime_ns)
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
    changed = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
    if changed:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = [f"the tests changed the checkout ({len(changed)} files; write under tmp_path instead):",
                 *(f"  {'new' if path not in before else 'removed' if path not in after else 'changed'}: {path}"
                   for path in changed[:20])]
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_sep("=", "checkout changed", red=True)
            for line in lines:
                reporter.write_line(line)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
