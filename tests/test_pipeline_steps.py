"""Step arithmetic and batch order shared by ``jacplug train`` and ``jacplug experiment``; the length
defaults, the few-steps warning, progress lines without bars, the resolved configuration."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from jacplug.errors import UserError
from jacplug.training.config import TrainConfig, resolve
from jacplug.training.runtime import Runtime
from jacplug.training.progress import PhaseProgress
from jacplug.training.plan import (
    DEFAULT_EPOCHS,
    FEW_SAMPLE_STEPS,
    FEW_STEPS,
    MAX_EVALUATIONS,
    FewStepsWarning,
    batch_stream,
    default_length,
    plan_steps,
    stream_plan,
    warn_if_few,
)

CPU = Runtime(device=torch.device("cpu"))


def test_epoch_plan_counts_full_batches_and_caps_epochs():
    plan = stream_plan(100, 64, epochs=4)  # 10 images per class, the default batch
    assert (plan.batch, plan.steps_per_epoch, plan.total, plan.images) == (64, 2, 8, 512)
    assert [s for s in range(1, plan.total + 1) if plan.evaluates_at(s)] == [2, 4, 6, 8]  # every epoch end
    assert [plan.epoch_of(s) for s in (1, 2, 3, 8)] == [1, 1, 2, 4]
    small = stream_plan(20, 64, epochs=3)  # less data than one batch: every step sees all of it
    assert (small.batch, small.steps_per_epoch, small.total) == (20, 1, 3)
    capped = stream_plan(1258, 64, epochs=2, max_steps_per_epoch=5)
    assert (capped.steps_per_epoch, capped.total) == (5, 10)


def test_step_plan_spreads_at_most_the_maximum_evaluations_over_epoch_ends():
    plan = stream_plan(100, 64, steps=150)
    assert (plan.total, plan.images, plan.epochs) == (150, 9600, 75)
    points = [s for s in range(1, plan.total + 1) if plan.evaluates_at(s)]
    assert len(points) <= MAX_EVALUATIONS + 1 and points[-1] == 150
    assert all(s % plan.steps_per_epoch == 0 for s in points)  # at epoch ends
    assert plan.next_evaluation(0) == points[0] and plan.next_evaluation(points[-2]) == 150
    few = stream_plan(1258, 64, steps=45)  # 20 steps per epoch, 3 epochs begun: each end evaluated
    assert [s for s in range(1, 46) if few.evaluates_at(s)] == [20, 40, 45]


def test_batch_stream_is_seeded_full_resumable_and_sharded():
    first = list(itertools.islice(batch_stream(10, 4, seed=3), 5))
    assert all(len(b) == 4 for b in first)
    assert sorted(first[0] + first[1] + first[2][:2]) == list(range(10))  # one permutation, then the next
    assert list(itertools.islice(batch_stream(10, 4, seed=3, start=2), 3)) == first[2:]
    assert first != list(itertools.islice(batch_stream(10, 4, seed=4), 5))
    ranks = [list(itertools.islice(batch_stream(10, 3, seed=3, rank=r, world_size=2), 4)) for r in (0, 1)]
    whole = list(itertools.islice(batch_stream(10, 6, seed=3), 4))  # global batch 6 = 2 processes x 3
    for step in range(4):
        assert (ranks[0][step], ranks[1][step]) == (whole[step][0::2], whole[step][1::2])


def test_one_sample_cannot_make_a_batch():
    with pytest.raises(UserError, match="at least 2 per batch"):
        stream_plan(1, 64, epochs=1)


def test_default_length_switches_to_a_step_budget_only_for_short_few_sample_epochs():
    assert default_length(2, few_samples=True) == (None, FEW_SAMPLE_STEPS)  # 10 per class, batch 64
    assert default_length(20, few_samples=False) == (DEFAULT_EPOCHS, None)  # the whole digits split
    assert default_length(2, few_samples=False) == (DEFAULT_EPOCHS, None)
    long_epochs = -(-FEW_SAMPLE_STEPS // DEFAULT_EPOCHS)
    assert default_length(long_epochs, few_samples=True) == (DEFAULT_EPOCHS, None)


def test_few_steps_warning_names_the_option_and_fires_only_below_the_threshold():
    with pytest.warns(FewStepsWarning, match=r"only 8 optimizer steps .*100 training images.*pass --steps N"):
        warn_if_few(stream_plan(100, 64, epochs=4), "student", "--steps")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_few(stream_plan(100, 64, steps=FEW_STEPS), "student", "--steps")


def test_length_options_exclude_each_other_and_flags_replace_the_files_choice():
    with pytest.raises(UserError, match="--epochs and --steps both set the training length"):
        resolve({}, {"epochs": 2, "steps": 10})
    with pytest.raises(UserError, match="--teacher-epochs and --teacher-steps"):
        resolve({"teacher_epochs": 2, "teacher_steps": 10}, {})
    config = resolve({"epochs": 20, "teacher_steps": 300}, {"steps": 100, "teacher_epochs": 2})
    assert (config.epochs, config.steps, config.teacher_epochs, config.teacher_steps) == (None, 100, 2, None)
    with pytest.raises(UserError, match="--workers must be >= 0"):
        resolve({}, {"workers": -1})


def test_progress_without_bars_prints_lines_every_n_steps_and_at_evaluations(capsys):
    plan = stream_plan(100, 64, steps=7)
    report = PhaseProgress("student tiny", plan, bars=False, every=3)
    for step in range(1, 8):
        report.step(step, 0.5)
        if plan.evaluates_at(step):
            report.evaluated(step, {"train_loss": 0.25, "val_acc": 0.5, "test_acc": 0.75})
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "student tiny: step 2/7 (epoch 1/4)", "student tiny: step 3/7 (epoch 2/4)", "student tiny: step 4/7 (epoch 2/4)",
        "student tiny: step 6/7 (epoch 3/4)", "student tiny: step 7/7 (epoch 4/4)",
    ]
    assert lines[-1].startswith("student tiny: step 7/7 (epoch 4/4), 448 images, loss 0.25, val 50.0%, test 75.0%")
    assert lines[1] == "student tiny: step 3/7 (epoch 2/4), 192 images, loss 0.5"
    PhaseProgress("student tiny", plan, bars=False, enabled=False).evaluated(7, {"train_loss": 1.0})
    assert capsys.readouterr().err == ""  # other ranks stay silent


def test_resolved_config_spells_out_the_defaults():
    from jacplug.losses import jacobian_distillation
    from jacplug.data.datasets import few_sample_subset
    from jacplug.training.prepare import loss_for_pair
    from jacplug.commands.train_run import resolve_run
    from jacplug.registry import create_dataset

    full = create_dataset("digits")
    few = few_sample_subset(full, 10, seed=0)
    config, plan = resolve_run(TrainConfig(samples_per_class=10), few, CPU)
    assert (config.epochs, config.steps, plan.total, plan.batch) == (None, FEW_SAMPLE_STEPS, FEW_SAMPLE_STEPS, 64)
    assert config.image_size == 16 and config.augment is False and config.teacher_epochs == DEFAULT_EPOCHS
    assert resolve(config.to_dict(), {}) == config  # what config.json holds is a valid configuration again
    config, plan = resolve_run(TrainConfig(), full, CPU)
    assert (config.epochs, config.steps, plan.total) == (DEFAULT_EPOCHS, None, DEFAULT_EPOCHS * 20)
    config, _ = resolve_run(TrainConfig(samples_per_class=10, epochs=3, teacher_checkpoint="t.safetensors"), few, CPU)
    assert (config.epochs, config.steps, config.teacher_epochs) == (3, None, None)

    spelled, preset = loss_for_pair(config.loss, config.teacher, config.student), jacobian_distillation()  # config.loss: the preset as specs
    assert spelled.weights == preset.weights
    assert {k: (type(t), vars(t)) for k, t in spelled.terms.items()} == {k: (type(t), vars(t)) for k, t in preset.terms.items()}


def test_help_and_docs_state_the_default_budget_the_code_uses():
    from pathlib import Path

    from jacplug.cli.main import build_parser

    train = next(a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions if "--epochs" in a.option_strings)
    assert f"{FEW_SAMPLE_STEPS} steps" in train.help
    page = (Path(__file__).parent.parent / "docs" / "pipeline.md").read_text()
    assert f"**{FEW_SAMPLE_STEPS} steps**" in page and f"fewer than {FEW_STEPS} optimizer steps" in page


def test_piped_progress_says_when_a_phase_starts_and_never_stays_silent_for_long(capsys, monkeypatch):
    from jacplug.training import progress as module

    clock = {"now": 0.0}
    monkeypatch.setattr(module.time, "perf_counter", lambda: clock["now"])
    plan = plan_steps(samples=640, batch=64, steps_per_epoch=10, steps=200)
    report = module.PhaseProgress("student x", plan, bars=False)
    report.start()
    assert capsys.readouterr().err.startswith("student x: starting, 200 optimizer steps x 64 images")
    module.PhaseProgress("student x", plan, bars=False, start=120).start()
    assert capsys.readouterr().err.startswith("student x: resuming at step 120 of 200, 200 optimizer steps")
    shared = stream_plan(640, 64, epochs=1, world_size=2)  # torchrun: each step takes both processes' shares
    assert shared.describe().startswith("5 optimizer steps x 128 images (global batch: 2 processes x 64) = 640")
    clock["now"] = 10.0
    report.step(1, 1.0)
    assert capsys.readouterr().err == ""  # neither 50 steps nor 30 s yet
    clock["now"] = 41.0
    report.step(2, 0.5)
    assert capsys.readouterr().err.startswith("student x: step 2/200")  # 31 s of silence: a line


def test_the_summary_says_why_a_training_speed_is_missing():
    from jacplug.cli.cmd_train import format_summary

    summary = {"teacher": "t", "teacher_source": "run/teacher.safetensors (trained here: 3 optimizer steps)",
               "student": "s", "dataset": "digits", "train_samples": 20, "optimizer_steps": 3, "batch": 20,
               "images_seen": 60, "epochs": 3, "teacher_test_acc": 0.5, "student_last_test_acc": 0.5,
               "student_best_test_acc": 0.5, "best_chosen_on": "val", "student_best_step": 3, "student_best_epoch": 3,
               "final_losses": {}, "teacher_images_per_s": None, "student_images_per_s": None,
               "student_step_mode": "eager", "time_s": 1.0, "checkpoints": {}}
    table = format_summary(summary)
    assert "teacher training speed" in table and "student training speed" in table
    assert table.count("not measured: the first 4 steps are warm-up") == 2
    assert "warm-up, and the phase was not longer (eager)" in table
    summary["student_steps_run"] = summary.pop("student_step_mode")  # a summary saved before the key's rename
    assert format_summary(summary) == table
