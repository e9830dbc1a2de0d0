"""The step benchmark runs end to end on tiny settings and reports ratios to KD (not timed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from jacplug.bench import METHOD_NAMES, METHODS, methods
from jacplug.cli.main import main


def test_cli_runs_every_method_by_default_and_reports_ratios_to_kd(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["bench", "--configs", "mlp:3", "--repeats", "1", "--batch-size", "2", "--image-size", "4",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == list(methods())  # the CLI's default is every method the benchmark has
    kd = rows[0]
    for r in rows:
        assert r["time_ratio"] == pytest.approx(r["median_ms"] / kd["median_ms"])
        assert r["memory_ratio"] == pytest.approx(r["peak_mb"] / kd["peak_mb"])
        assert r["images_per_s"] == pytest.approx(2 / (r["median_ms"] / 1e3))
    assert rows[[r["method"] for r in rows].index("full-loop")]["memory_ratio"] > 1  # double backward saves more
    printed = capsys.readouterr().out
    assert all(f" {r['method']} " in printed for r in rows)
    # before measuring: the run's length and a line on each method
    full = sum(m.startswith("full-") for m in METHOD_NAMES)
    assert f"# length: 1 configs x 1 rounds of their methods' steps ({len(rows)}; full-* in 1 round(s)) = " \
           f"{len(rows)} timed steps" in printed and full == 3
    assert all(f"#   {name}" in printed and description in printed for name, description in METHODS.items())
    assert printed.index("# length") < printed.index("round 1/1 done")


@pytest.mark.subprocess
def test_the_hand_written_create_graph_loop_raises_no_warning(tmp_path):
    """PyTorch warns once per process about backward(create_graph=True): a fresh process sees it if it comes."""
    done = subprocess.run([sys.executable, "-m", "jacplug", "bench", "--configs", "mlp:3", "--repeats", "1",
                           "--batch-size", "2", "--image-size", "4", "--methods", "full-forum-loop"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr and "full-forum-loop" in done.stdout


def test_the_method_names_the_command_line_shows_are_the_benchmarks_methods():
    from jacplug.bench import METHOD_NAMES

    assert METHOD_NAMES == tuple(methods())


def test_bad_bench_arguments_are_one_line_errors(capsys):
    for configs, message in [("resnet34:10", "bad --configs entry 'resnet34:10'"),
                             ("mlp:x", "bad --configs entry 'mlp:x'"),
                             ("resnet5O->resnet18:10", "unknown model 'resnet5O'; did you mean 'resnet50'"),
                             ("resnet18->resnet18:10@x", "bad --configs entry 'resnet18->resnet18:10@x'")]:
        assert main(["bench", "--configs", configs, "--repeats", "1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"jacplug: error: {message}") and err.count("\n") == 1


def test_gpu_options_need_cuda(capsys):
    from jacplug.cli.main import main

    assert main(["bench", "--configs", "mlp:3", "--cuda-graphs"]) == 2
    assert "add --device cuda" in capsys.readouterr().err


def test_model_keyword_arguments_and_image_size_reach_the_models():
    from jacplug.bench import make_setup

    setup = make_setup("resnet10t->vit_tiny_patch16_224(patch_size=8,depth=1)", 3, batch=2, size=16,
                       device=torch.device("cpu"))
    assert setup.student.patch_embed.patch_size == (8, 8) and len(setup.student.blocks) == 1
    assert setup.student(setup.inputs).shape == (2, 3)  # img_size followed the benchmark's 16 px


def test_native_double_backward_methods_compute_the_same_step(monkeypatch):
    """``eq10-top1`` (jacplug's BatchNorm and convolution double backwards) and ``eq10-top1-native*``
    (PyTorch's for BatchNorm, convolutions or both) time the same step: same loss and parameter
    gradients (float64); each runs exactly the double backwards its name says."""
    from jacplug.bench import make_setup
    from jacplug.engine import batch_norm, convolution

    calls: list[str] = []
    for name, function in (("bn", batch_norm._BatchNormBackward), ("conv", convolution._ConvolutionBackward)):
        original = function.backward
        monkeypatch.setattr(function, "backward", staticmethod(
            lambda ctx, *g, name=name, original=original: (calls.append(name), original(ctx, *g))[1]))
    results, ran = {}, {}
    for method in ("eq10-top1", "eq10-top1-native-bn", "eq10-top1-native-conv", "eq10-top1-native"):
        setup = make_setup("resnet10t->test_resnet", 4, batch=4, size=16, device=torch.device("cpu"))
        setup.teacher.double()
        setup.student.double()
        setup.inputs = setup.inputs.double()
        step = methods()[method](setup, False)
        step()  # the first call also runs the Distiller's gradient-flow check, which differentiates again
        calls.clear()
        loss = step()["loss"]
        results[method] = (loss, [p.grad.clone() for p in setup.student.parameters()])
        ran[method] = (calls.count("bn"), calls.count("conv"))
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in setup.student.modules())
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in setup.student.modules())
    assert ran == {"eq10-top1": (norms, convs), "eq10-top1-native-bn": (0, convs),
                   "eq10-top1-native-conv": (norms, 0), "eq10-top1-native": (0, 0)}
    native_loss, native = results.pop("eq10-top1-native")
    assert len(native) > 10
    for loss, grads in results.values():
        torch.testing.assert_close(loss, native_loss)
        for a, b in zip(native, grads):
            torch.testing.assert_close(b, a)


def test_the_distiller_step_and_the_step_written_by_hand_do_the_same_work():
    """``eq10-top1`` (the Distiller) against ``eq10-top1-by-hand`` (the engine, no Distiller): the bench's
    overhead row compares equal work only if both give the same loss and the same update (float64)."""
    from jacplug.bench import make_setup

    params = {}
    for method in ("eq10-top1", "eq10-top1-by-hand"):
        setup = make_setup("resnet10t->test_resnet", 4, batch=4, size=16, device=torch.device("cpu"))
        setup.teacher.double()
        setup.student.double()
        setup.inputs = setup.inputs.double()
        step = methods()[method](setup, False)
        for _ in range(2):
            step()
        params[method] = [p.detach().clone() for p in setup.student.parameters()]
    for ours, by_hand in zip(params["eq10-top1"], params["eq10-top1-by-hand"], strict=True):
        torch.testing.assert_close(ours, by_hand, rtol=1e-10, atol=1e-12)
