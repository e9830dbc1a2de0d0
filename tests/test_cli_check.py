"""``jacplug check``: one batch of the embedded digits, the per-term gradient-flow table, exit codes."""

from __future__ import annotations

from jacplug.cli.main import main
from jacplug.registry import get_host
from detached_loss import DetachedPlugin

TINY = ["check", "--teacher", "test_resnet", "--student", "test_resnet", "--image-size", "8", "--batch-size", "4"]


def test_check_prints_one_row_per_term(capsys):
    rc = main([*TINY, "--loss", "kd=1", "--loss", "jacobian=10:classes=label"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in ("kd", "jacobian")}
    assert set(rows) == {"kd", "jacobian"} and all(line.rstrip().endswith("ok") for line in rows.values())


def test_check_names_a_detached_term_and_exits_2(capsys):
    name = get_host().register(DetachedPlugin(), name="detached-loss")
    try:
        rc = main([*TINY, "--loss", "kd=1", "--loss", "detached=1"])
    finally:
        get_host().unregister(name)
    out, err = capsys.readouterr()
    assert rc == 2
    assert "detached" in out and "kd" in out  # the table is printed before the error
    assert err.startswith("jacplug: error: loss term(s) with no gradient path to the parameters: detached")
