"""The files of a run hold what docs/pipeline.md says they hold: the keys of every ``metrics.jsonl``
record kind, the held-out agreement in the evaluation records (``curves.png`` plots it), every option in
``config.json``, the numbers the summary promises, and every file of the run directory listing. The keys
are read from the documentation itself, so the page and the writers cannot drift apart unnoticed."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
from pathlib import Path

import pytest

from conftest import tiny_train_args
from jacplug.cli.main import main
from jacplug.training.config import TrainConfig
from jacplug.training.metrics import read_metrics

PIPELINE = (Path(__file__).resolve().parents[1] / "docs" / "pipeline.md").read_text()
LOSS = ["kd=1", "jacobian=1"]

#: the summary as docs/pipeline.md describes it (opening paragraph and "held-out gradient agreement"):
#: what the page promises -> the summary key that holds it
SUMMARY = {
    "optimizer steps": "optimizer_steps",
    "images seen": "images_seen",
    "the teacher's test accuracy": "teacher_test_acc",
    "the student's test accuracy": "student_last_test_acc",
    "the final value of every loss term": "final_losses",
    "the training speed of each phase": ("teacher_images_per_s", "student_images_per_s"),
    "the time taken": "time_s",
    "where the checkpoints are": "checkpoints",
    "held-out gradient agreement": "agreement",
}


def documented_records() -> dict[str, set[str]]:
    """``{kind: keys}`` from the page's ``metrics.jsonl records: {"kind": ..., ...}`` sentence."""
    section = PIPELINE[PIPELINE.index("`metrics.jsonl` records:"):]
    section = section[:section.index("\n\n")]
    records = {}
    for body in re.findall(r"`\{(.*?)\}`", section, flags=re.S):
        kind = re.match(r'"kind": "(\w+)"', body).group(1)
        records[kind] = set(re.findall(r'"(\w+)"', body)) - {kind}
    return records


def documented_agreement() -> set[str]:
    """The agreement numbers the page lists (``- `agreement_...`:``), which evaluation records carry."""
    return set(re.findall(r"^- `(agreement_\w+)`:", PIPELINE, flags=re.M))


def documented_files() -> list[tuple[str, str]]:
    """``(file, description)`` of the run directory listing under "## The run directory"."""
    block = PIPELINE[PIPELINE.index("## The run directory"):]
    block = block[block.index("```text\n") + len("```text\n"):]
    block = block[:block.index("```")]
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^  (\S+)\s{2,}(.*)$", block, flags=re.M)]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny run that trains its own teacher (so teacher records and files exist), both phases past the
    four warm-up steps no speed counts, and measures the held-out agreement on a few images; returns its
    directory and the ``--json`` summary."""
    out = tmp_path_factory.mktemp("documented") / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["train", *tiny_train_args(out, teacher_steps=6, steps=6, samples_per_class=2, agreement_images=8,
                                             json=True), *(arg for spec in LOSS for arg in ("--loss", spec))])
    assert rc == 0
    return out, json.loads(stdout.getvalue())


def test_the_page_documents_three_record_kinds_and_two_agreement_numbers():
    """Guards the parsing below: an edit of the page that breaks it must not make the checks vacuous."""
    records = documented_records()
    assert set(records) == {"step", "epoch", "teacher_epoch"}
    assert {"loss", "lr"} <= records["step"] and {"val_acc", "test_acc"} <= records["epoch"]
    assert documented_agreement() == {"agreement_cosine", "agreement_distance"}
    assert {"config.json", "metrics.jsonl", "curves.png"} <= {name for name, _ in documented_files()}


def test_every_metrics_record_has_its_documented_keys(run):
    out, _ = run
    records = read_metrics(out)
    terms = {spec.split("=")[0] for spec in LOSS}
    expected = {kind: set(keys) for kind, keys in documented_records().items()}
    expected["step"] |= terms  # <term>...: every term, unweighted
    expected["epoch"] |= terms | documented_agreement()  # <term means>... and the held-out agreement
    for kind, keys in expected.items():
        of_kind = [r for r in records if r["kind"] == kind]
        assert of_kind, f"no {kind!r} record in metrics.jsonl"
        for record in of_kind:
            assert keys <= set(record), f"{kind} record lacks {sorted(keys - set(record))}"


def test_config_json_holds_every_option_as_the_run_executed_it(run):
    out, _ = run
    config = json.loads((out / "config.json").read_text())
    # every option, and the images left out of their splits ("dropped_images", empty here)
    assert set(config) == {field.name for field in dataclasses.fields(TrainConfig)} | {"dropped_images"}
    # "the length, loss specs, image size ... filled in"
    assert (config["steps"], config["loss"], config["image_size"]) == (6, LOSS, 8)


def test_the_summary_has_every_documented_number(run):
    out, summary = run
    for promise, keys in SUMMARY.items():
        for key in (keys,) if isinstance(keys, str) else keys:
            assert summary.get(key) is not None, f"the summary lacks {promise} ({key!r})"
    assert {spec.split("=")[0] for spec in LOSS} <= set(summary["final_losses"])
    assert set(summary["agreement"]) == documented_agreement()
    assert Path(summary["gradient_maps"]).is_file()


def test_the_run_directory_holds_every_documented_file(run):
    out, _ = run
    names = {path.name for path in out.iterdir()}
    for name, description in documented_files():
        if name.endswith("/") or description.startswith("with "):  # the directory itself; optional files
            continue
        if "while it runs" in description:  # a phase's resume state, removed once the next phase has saved its own
            assert name not in names, f"{name} outlived its phase"
            continue
        assert name in names, f"{name} ({description.strip()}) is missing from the run directory"
