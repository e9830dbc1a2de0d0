"""The step benchmark runs end to end on tiny settings and reports ratios to KD (not timed)."""

from __future__ import annotations

import math

import torch

from jacplug.bench import format_table, methods, run
from jacplug.cli.cmd_bench import METHODS


def test_cli_method_list_matches_the_benchmark():
    assert tuple(methods()) == METHODS


def test_every_method_runs_and_reports_ratios():
    rows = run([("mlp", 3, 4)], list(METHODS), repeats=1, full_repeats=1, batch=2, device=torch.device("cpu"),
               log=lambda _: None)
    assert [r["method"] for r in rows] == list(METHODS)
    kd = rows[0]
    assert kd["time_ratio"] == 1.0 and kd["memory_ratio"] == 1.0
    assert all(r["median_ms"] > 0 and math.isfinite(r["time_ratio"]) for r in rows)
    assert "eq10-top1" in format_table(rows)


def test_bad_bench_arguments_are_one_line_errors(capsys):
    from jacplug.cli.main import main

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
