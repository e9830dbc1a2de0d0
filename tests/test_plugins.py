"""The plugin registry: entry-point discovery, isolation of broken plugins, duplicates, names, CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import jacplug
from jacplug import hookimpl
from jacplug.cli.main import main
from jacplug.errors import DuplicateNameError, PluginError, UnknownNameError
from jacplug.registry import PluginHost, PluginWarning, NameTable, reset_host

ROOT = Path(__file__).resolve().parent.parent


def _doc_block(marker: str, language: str) -> str:
    """The code block of docs/plugins.md whose first line is ``marker``: the docs are the fixture."""
    text = (ROOT / "docs" / "plugins.md").read_text()
    for body in re.findall(rf"```{language}\n(.*?)```", text, re.S):
        if body.startswith(marker):
            return body
    raise AssertionError(f"docs/plugins.md has no {language} block starting with {marker!r}")


def install_fake_distribution(site: Path, dist: str, version: str, modules: dict[str, str], entry_points: dict[str, str]) -> None:
    """A real installed distribution as importlib.metadata sees it: ``*.dist-info`` on sys.path."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "\n".join(f"{name} = {value}" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[jacplug]\n{lines}\n")
    for module, source in modules.items():
        (site / f"{module}.py").write_text(source)


@pytest.fixture
def site(tmp_path, monkeypatch):
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    yield path
    for name in [m for m in sys.modules if m.startswith(("jacplug_example", "broken_plugin", "raising_plugin"))]:
        del sys.modules[name]


@pytest.fixture
def example_dist(site):
    toml = _doc_block("[project]", "toml")
    version = re.search(r'version = "(.*?)"', toml)[1]
    entry = re.search(r"\[project.entry-points.jacplug\]\n(\w+) = \"(\w+)\"", toml)
    install_fake_distribution(
        site, "jacplug-example", version, {"jacplug_example": _doc_block("# jacplug_example.py", "python")},
        {entry[1]: entry[2]},
    )
    return site


@pytest.fixture
def host():
    """A fresh process-wide host for each test, restored afterwards."""
    fresh = PluginHost()
    previous = reset_host(fresh)
    yield fresh
    reset_host(previous)


def test_out_of_tree_plugin_is_discovered_listed_and_usable(example_dist, host):
    assert "cosine-logits" in host.registry("losses").names()
    info = host.plugins["example"]
    assert (info.distribution, info.version) == ("jacplug-example", "0.1.0")
    assert info.hooks == ["register_jacobian_backends", "register_losses"]
    assert info.registered == {"losses": ["cosine-logits"], "jacobian_backends": ["func-jacrev"]}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3)).double().eval()
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(
        jacplug.jacobian(model, x, backend="func-jacrev"), jacplug.jacobian(model, x, backend="loop")
    )
    assert isinstance(jacplug.create_loss("cosine-logits"), jacplug.losses.LossTerm)


@pytest.mark.subprocess
def test_cli_lists_the_out_of_tree_plugin_with_descriptions(example_dist, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(example_dist)}
    out = subprocess.run([sys.executable, "-m", "jacplug", "plugins", "--json"], env=env, capture_output=True,
                         text=True, check=True).stdout
    plugins = {p["name"]: p for p in json.loads(out)["plugins"]}
    assert plugins["example"]["distribution"] == "jacplug-example"
    assert plugins["example"]["registered"]["jacobian_backends"] == ["func-jacrev"]
    assert plugins["example"]["descriptions"]["losses"] == {"cosine-logits": "1 - cosine(student, teacher logits)"}
    assert plugins["jacplug.models"]["distribution"] == "jacplug"
    text = subprocess.run([sys.executable, "-m", "jacplug", "plugins"], env=env, capture_output=True, text=True,
                          check=True).stdout
    assert "example  (jacplug-example 0.1.0" in text
    assert "\n  losses:\n    cosine-logits  1 - cosine(student, teacher logits)\n" in text, text
    assert re.search(r"\n    kd +T\^2 \* KL", text), text  # the built-ins' descriptions too


BROKEN = "raise ImportError('needs a library that is not installed')\n"
RAISING = textwrap.dedent(
    """
    from jacplug import hookimpl

    @hookimpl
    def register_losses(register):
        raise RuntimeError("bug in plugin")
    """
)


def test_broken_plugins_are_warned_and_skipped(site, host, monkeypatch):
    monkeypatch.delenv("JACPLUG_STRICT_PLUGINS", raising=False)
    install_fake_distribution(site, "broken-dist", "1.2", {"broken_plugin": BROKEN}, {"broken": "broken_plugin"})
    install_fake_distribution(site, "raising-dist", "3.4", {"raising_plugin": RAISING}, {"raising": "raising_plugin"})
    with pytest.warns(PluginWarning) as record:
        losses = host.registry("losses")
    messages = " | ".join(str(w.message) for w in record)
    assert "plugin 'broken' (distribution broken-dist 1.2) failed to load: ImportError" in messages
    assert "plugin 'raising' (distribution raising-dist 3.4) failed in a registration hook: RuntimeError: bug in plugin" in messages
    assert "kd" in losses.names()  # the built-ins still work
    assert set(host.failed) == {"broken", "raising"}
    assert main(["plugins"]) == 0


@pytest.mark.parametrize("module", ["broken_plugin", "raising_plugin"])
def test_strict_mode_makes_broken_plugins_fatal(site, host, monkeypatch, module):
    monkeypatch.setenv("JACPLUG_STRICT_PLUGINS", "1")
    source = BROKEN if module == "broken_plugin" else RAISING
    install_fake_distribution(site, "bad-dist", "1.0", {module: source}, {"bad": module})
    with pytest.raises(PluginError, match="plugin 'bad'"):
        host.registry("losses")


def test_strict_mode_cli_exit_code(site, monkeypatch, capsys, host):
    monkeypatch.setenv("JACPLUG_STRICT_PLUGINS", "1")
    install_fake_distribution(site, "bad-dist", "1.0", {"broken_plugin": BROKEN}, {"bad": "broken_plugin"})
    assert main(["plugins"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jacplug: error: plugin 'bad'") and err.count("\n") == 1


def test_plugin_filter_environment_variable(example_dist, host, monkeypatch):
    monkeypatch.setenv("JACPLUG_PLUGINS", "example")
    assert host.registry("losses").names() == ["cosine-logits"]
    assert list(host.plugins) == ["example"]


class _Dup:
    def __init__(self, name: str, override: bool = False):
        self.name, self.override = name, override

    @hookimpl
    def register_losses(self, register):
        register(self.name, lambda: None, override=self.override)


def test_duplicate_names_name_both_plugins(host, monkeypatch):
    monkeypatch.delenv("JACPLUG_STRICT_PLUGINS", raising=False)
    host.register(_Dup("kd"), name="copycat")
    with pytest.warns(PluginWarning, match=r"loss 'kd' is registered by plugin 'jacplug.losses' and again by plugin 'copycat'"):
        entry = host.registry("losses").get("kd")
    assert entry.plugin == "jacplug.losses"
    host.unregister("copycat")
    host.register(_Dup("kd", override=True), name="replacer")
    assert host.registry("losses").get("kd").plugin == "replacer"


def test_plugins_listing_says_which_builtin_a_plugin_overrode(host, capsys):
    """A plugin may replace a built-in with override=True, but the listing must say so on both sides."""
    import json

    from jacplug.cli.main import main

    host.register(_Dup("kd", override=True), name="replacer")
    capsys.readouterr()
    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.strip().startswith("kd ") and "(overridden by plugin 'replacer': not in use)" in line for line in lines)
    assert any(line.strip().startswith("kd") and "(overrides plugin 'jacplug.losses')" in line for line in lines)
    assert main(["plugins", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["overrides"]["losses"]["kd"] == {"replaced": "jacplug.losses",
                                                                              "by": "replacer"}


def test_registry_duplicate_and_unknown_names():
    reg = NameTable("losses")
    reg.add("jacobian", object, "a")
    with pytest.raises(DuplicateNameError, match="plugin 'a' and again by plugin 'b'"):
        reg.add("jacobian", object, "b")
    reg.add("jacobian", dict, "b", override=True)
    assert reg.get("jacobian").plugin == "b"
    with pytest.raises(UnknownNameError, match="unknown loss 'jacobain'; did you mean 'jacobian'"):
        reg.get("jacobain")


def test_unknown_model_suggests_timm_names(host):
    with pytest.raises(UnknownNameError, match=r"unknown model 'resnet5O'; did you mean 'resnet50'"):
        jacplug.create_model("resnet5O", num_classes=3)
    model = jacplug.create_model("resnet18", num_classes=3, in_chans=1)
    assert model.eval()(torch.randn(1, 1, 16, 16)).shape == (1, 3)
    assert "resnet18" in host.registry("models").names("resnet1*")


def test_model_pairs_give_stage_channels(host):
    from jacplug.registry import model_pair

    pair = model_pair("resnet50", "resnet18")
    assert pair.channels["layer3"] == (1024, 256)
    assert model_pair("resnet18", "vit_tiny_patch16_224") is None


def test_lifecycle_hook_failures_are_isolated(host, monkeypatch):
    monkeypatch.delenv("JACPLUG_STRICT_PLUGINS", raising=False)
    seen = []
    good = types.SimpleNamespace(on_step_end=hookimpl(lambda step, metrics: seen.append((step, metrics["loss"]))))
    bad = types.SimpleNamespace(on_step_end=hookimpl(lambda run: 1 / 0))
    host.register(good, name="logger")
    host.register(bad, name="crashy")
    with pytest.warns(PluginWarning, match="plugin 'crashy' failed in on_step_end: ZeroDivisionError"):
        host.notify("on_step_end", run=None, step=3, metrics={"loss": 0.5})
    assert seen == [(3, 0.5)]


@pytest.mark.subprocess
def test_cli_help_version_and_lazy_imports():
    out = subprocess.run([sys.executable, "-m", "jacplug", "--help"], capture_output=True, text=True, check=True).stdout
    from jacplug.cli.main import COMMANDS

    for command in COMMANDS:
        assert command in out
    version = subprocess.run([sys.executable, "-m", "jacplug", "--version"], capture_output=True, text=True).stdout
    assert version.strip() == f"jacplug {jacplug.__version__}"
    probe = "import sys, jacplug; assert 'torch' not in sys.modules and 'timm' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", probe], check=True)
    probe = ("import sys; from jacplug.cli.main import main; main(['plugins']); "
             "assert 'timm' not in sys.modules, 'jacplug plugins imported timm'")
    subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True)


# -- the contract is pluggy's own: wrappers, partial signatures, unknown hooks, full removal ----------------


class _Wrapping:
    """A new-style wrapper on a registration hook and an old-style one on a lifecycle hook."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl(wrapper=True)
    def register_losses(self, register):
        self.calls.append("register_losses before")
        register("wrapped-loss", lambda: None)
        result = yield
        self.calls.append("register_losses after")
        return result

    @hookimpl(hookwrapper=True)
    def on_epoch_end(self, epoch):
        self.calls.append(f"epoch {epoch} before")
        yield
        self.calls.append(f"epoch {epoch} after")


def test_wrapper_implementations_run(host, recwarn):
    plugin = _Wrapping()
    host.register(plugin, name="wrapping")
    assert host.registry("losses").get("wrapped-loss").plugin == "wrapping"
    host.notify("on_epoch_end", run=None, epoch=2, metrics={})
    assert plugin.calls == ["register_losses before", "register_losses after", "epoch 2 before", "epoch 2 after"]
    assert not [w for w in recwarn if issubclass(w.category, PluginWarning)]


def test_implementations_may_take_fewer_arguments_than_the_spec(host, recwarn):
    seen = []
    plugin = types.SimpleNamespace(
        register_losses=hookimpl(lambda: seen.append("losses looked up")),  # takes none of the spec's arguments
        register_models=hookimpl(lambda register: register("tiny-net", lambda **kw: nn.Identity())),
        on_train_end=hookimpl(lambda: seen.append("ended")),
    )
    host.register(plugin, name="partial")
    assert host.registry("models").get("tiny-net").plugin == "partial"
    host.notify("on_train_end", run=None, summary={})
    assert seen == ["losses looked up", "ended"]
    assert "partial" in host.plugins and not host.failed
    assert not [w for w in recwarn if issubclass(w.category, PluginWarning)]


MISSPELLED = textwrap.dedent(
    """
    from jacplug import hookimpl

    @hookimpl
    def register_loss(register):
        register("never-seen", object)
    """
)


def test_misspelled_hook_is_reported_with_the_close_match(site, host, monkeypatch):
    monkeypatch.delenv("JACPLUG_STRICT_PLUGINS", raising=False)
    install_fake_distribution(site, "typo-dist", "0.2", {"typo_plugin": MISSPELLED}, {"typo": "typo_plugin"})
    with pytest.warns(PluginWarning, match=r"plugin 'typo' \(distribution typo-dist 0.2\) failed to load: .*"
                                           r"unknown hook 'register_loss'; did you mean 'register_losses'\?"):
        host.registry("losses")
    assert "typo" in host.failed and "typo" not in host.plugins and host.pm.get_plugin("typo") is None
    del sys.modules["typo_plugin"]


def test_misspelled_hook_is_fatal_in_strict_mode_and_in_process(site, host, monkeypatch):
    monkeypatch.setenv("JACPLUG_STRICT_PLUGINS", "1")
    install_fake_distribution(site, "typo-dist", "0.2", {"typo_plugin": MISSPELLED}, {"typo": "typo_plugin"})
    with pytest.raises(PluginError, match="unknown hook 'register_loss'; did you mean 'register_losses'"):
        host.registry("losses")
    typo = sys.modules.pop("typo_plugin")
    import pluggy

    with pytest.raises(pluggy.PluginValidationError, match="unknown hook 'register_loss'"):
        host.register(typo, name="typo-in-process")
    assert host.pm.get_plugin("typo-in-process") is None and "typo-in-process" not in host.plugins


def test_plugin_failing_in_registration_is_fully_removed(host, monkeypatch):
    monkeypatch.delenv("JACPLUG_STRICT_PLUGINS", raising=False)
    steps = []

    def register_losses(register):
        register("half-registered", lambda: None)
        raise RuntimeError("bug after the first name")

    plugin = types.SimpleNamespace(register_losses=hookimpl(register_losses),
                                   on_step_end=hookimpl(lambda step: steps.append(step)))
    host.register(plugin, name="half")
    with pytest.warns(PluginWarning, match="plugin 'half' failed in a registration hook: RuntimeError"):
        losses = host.registry("losses")
    assert "half-registered" not in losses.names() and "kd" in losses.names()
    host.notify("on_step_end", run=None, step=1, metrics={})
    assert steps == [] and host.pm.get_plugin("half") is None and "half" in host.failed


class _Shadow:
    def __init__(self, override: bool) -> None:
        self.override = override

    @hookimpl
    def register_models(self, register):
        register("resnet18", lambda **kw: nn.Sequential(), override=self.override)


def test_exact_model_name_timm_serves_needs_override(host, monkeypatch):
    monkeypatch.delenv("JACPLUG_STRICT_PLUGINS", raising=False)
    host.register(_Shadow(override=False), name="shadow")
    with pytest.warns(PluginWarning, match=r"model 'resnet18' is served by plugin 'jacplug.models' \(pattern '\*'\) "
                                           r"and registered again by plugin 'shadow'; pass override=True"):
        entry = host.registry("models").get("resnet18")
    assert entry.plugin == "jacplug.models" and "shadow" in host.failed
    host.unregister("shadow")
    host.register(_Shadow(override=True), name="shadow")
    assert host.registry("models").get("resnet18").plugin == "shadow"
    assert isinstance(jacplug.create_model("resnet18"), nn.Sequential)


# -- one PluginManager: observers per run, JACPLUG_PLUGINS typos, plugin commands ---------------------------


def test_a_runs_observers_come_and_go_without_recollecting_names(host):
    losses = host.registry("losses")
    seen = []

    @dataclasses.dataclass  # unhashable, as a run's observer may be
    class Observer:
        label: str

        @hookimpl(tryfirst=True)
        def on_step_end(self, step):
            seen.append((self.label, step))

    for label in ("teacher", "student"):
        host.register(Observer(label), name=f"observer-{label}")
        host.notify("on_step_end", run=None, phase=None, step=1, metrics={})
        host.unregister(f"observer-{label}")
    assert seen == [("teacher", 1), ("student", 1)]
    assert host.registry("losses") is losses and host.registry("models").names("resnet18") == ["resnet18"]


def test_plugin_filter_naming_no_entry_point_says_so_in_one_line(host, monkeypatch, capsys):
    monkeypatch.setenv("JACPLUG_PLUGINS", "jacplug.model")
    with pytest.raises(PluginError, match=r"JACPLUG_PLUGINS names 'jacplug.model', which no installed plugin provides; "
                                          r"the entry points of group 'jacplug' are: .*jacplug.models"):
        host.registry("datasets")
    reset_host(PluginHost())
    assert main(["plugins"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jacplug: error: JACPLUG_PLUGINS names 'jacplug.model'") and err.count("\n") == 1


COMMAND_PLUGIN = textwrap.dedent(
    """
    from jacplug import hookimpl
    from jacplug.errors import UserError


    def greet(args):
        if args.times < 1:
            raise UserError(f"--times must be at least 1, got {args.times}")
        print(" ".join(["hello", args.who] * args.times))
        return 0


    @hookimpl
    def register_commands(subparsers):
        parser = subparsers.add_parser("greet", help="say hello from a plugin")
        parser.add_argument("who")
        parser.add_argument("--times", type=int, default=1)
        parser.set_defaults(run=greet)
    """
)


@pytest.mark.subprocess
def test_plugin_adds_a_command_run_through_python_m_jacplug(site):
    install_fake_distribution(site, "jacplug-greet", "0.3", {"jacplug_example_greet": COMMAND_PLUGIN},
                              {"greet": "jacplug_example_greet"})
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-m", "jacplug", "greet", "plugins", "--times", "2"], env=env,
                         capture_output=True, text=True)
    assert (run.returncode, run.stdout) == (0, "hello plugins hello plugins\n"), run.stderr
    help_text = subprocess.run([sys.executable, "-m", "jacplug", "--help"], env=env, capture_output=True, text=True,
                               check=True).stdout
    assert "say hello from a plugin" in help_text
    bad = subprocess.run([sys.executable, "-m", "jacplug", "greet", "x", "--times", "0"], env=env, capture_output=True,
                         text=True)
    assert (bad.returncode, bad.stderr) == (2, "jacplug: error: --times must be at least 1, got 0\n")


def test_building_the_command_line_imports_no_torch():
    probe = ("import sys; from jacplug.cli.main import build_parser; build_parser(); "
             "assert not {'torch', 'timm'} & set(sys.modules), 'building the CLI imported torch'")
    subprocess.run([sys.executable, "-c", probe], check=True)


def test_loss_descriptions_show_the_defaults_the_terms_use(host, monkeypatch):
    from jacplug.losses.distill import KDLoss

    monkeypatch.setattr(KDLoss, "default_temperature", 3.0)
    losses = host.registry("losses")
    assert losses.get("kd").description.endswith("defaults: temperature=3")
    assert "defaults: classes=top1, k=1," in losses.get("jacobian").description
    assert "defaults" not in losses.get("fitnet").description  # nothing to default: layers and channels are needed
