"""What pyproject.toml promises about the interpreter holds: Python 3.10 has no tomllib."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.subprocess
def test_toml_config_files_load_without_tomllib(tmp_path):
    """As on Python 3.10: ``import tomllib`` fails and tomli (the same parser, installed there by the
    ``python_version < '3.11'`` dependency) takes its place, for reading and for parse errors."""
    (tmp_path / "good.toml").write_text('epochs = 7\nloss = ["kd=1"]\n')
    (tmp_path / "bad.toml").write_text("epochs = \n")
    probe = textwrap.dedent(
        f"""
        import sys
        if sys.version_info >= (3, 11):  # simulate 3.10: tomllib missing, tomli installed
            import tomllib
            sys.modules["tomli"], sys.modules["tomllib"] = tomllib, None
        from jacplug.errors import UserError
        from jacplug.training.config import read_config_file
        assert read_config_file({str(tmp_path / "good.toml")!r}) == {{"epochs": 7, "loss": ["kd=1"]}}
        try:
            read_config_file({str(tmp_path / "bad.toml")!r})
        except UserError as exc:
            assert "could not be parsed" in str(exc), exc
        else:
            raise AssertionError("a broken TOML file was accepted")
        """
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_requires_python_and_the_tomli_dependency_agree():
    from jacplug.config_fields import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floor = tuple(int(part) for part in project["requires-python"].removeprefix(">=").split("."))
    tomli = [d for d in project["dependencies"] if d.startswith("tomli")]
    if floor < (3, 11):  # then the interpreter may lack tomllib, and tomli must be installed exactly there
        assert [d.replace('"', "'").split(";")[1].strip() for d in tomli] == ["python_version < '3.11'"]
    else:
        assert tomli == []


@pytest.mark.subprocess
def test_the_library_and_the_distiller_import_no_training_framework():
    """The integrations are imported only when asked for: ``import jacplug`` and a Distiller step load
    neither transformers nor Lightning (seconds of start-up, and optional dependencies)."""
    probe = textwrap.dedent(
        """
        import sys
        import torch
        import jacplug
        from torch import nn
        step = jacplug.Distiller(nn.Linear(4, 3), nn.Linear(4, 3), ["kd=1", "jacobian=1"])
        step(torch.randn(2, 4))["loss"].backward()
        loaded = [name for name in ("transformers", "lightning", "accelerate", "jacplug.integrations") if name in sys.modules]
        assert not loaded, loaded
        """
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_make_test_installs_every_framework_the_integration_tests_need():
    """The integration tests skip where their framework is missing (an environment without the extras);
    the environment `make test` builds must have them, so that CI runs them against the real libraries."""
    import importlib.util
    import re

    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        import pytest

        pytest.skip("not the environment `make test` builds")
    extras = re.search(r"pip install --quiet -e '\.\[([^\]]+)\]'", (ROOT / "Makefile").read_text()).group(1).split(",")
    modules = {"torchdistill": "torchdistill", "huggingface": "transformers", "lightning": "lightning"}
    assert {"torchdistill", "huggingface", "lightning"} <= set(extras)
    assert [m for m in modules.values() if importlib.util.find_spec(m) is None] == []
