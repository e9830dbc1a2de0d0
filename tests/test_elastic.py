"""A torchrun job that survives a lost worker: 2 gloo processes under the c10d rendezvous with
``--max-restarts 1`` and ``jacplug train --resume auto``; one rank is killed with SIGKILL mid-run,
torchrun restarts both, they continue from the last resume save, and the final student equals an
uninterrupted run's bit for bit (docs/pipeline.md, "Multi-node").

Also ``--resume auto`` alone, in one process: it starts a run in an empty ``--out``, continues one of
the same configuration, and refuses one of another configuration in one line."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

TRAIN = ["--teacher", "test_resnet", "--student", "test_resnet", "--image-size", "8", "--teacher-steps", "4",
         "--steps", "40", "--samples-per-class", "4", "--batch-size", "8", "--save-every", "2", "--no-progress",
         "--json"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "jacplug", "train",
           *TRAIN, "--out", str(out), "--resume", "auto"]
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE: the restarted workers must not read the previous round's gloo
    # addresses from the agent's store, where they hang connecting to the dead workers (docs/pipeline.md)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})


@contextlib.contextmanager
def stopped_on_failure(job: subprocess.Popen):
    """Whatever happens in the test, no agent or worker outlives it."""
    try:
        yield job
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.communicate()


def student_steps(out: Path) -> int:
    """The last student step logged in ``out/metrics.jsonl`` (0 before the student phase)."""
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line) for line in lines if line.strip().endswith("}")]
    return max((r["step"] for r in steps if r.get("kind") == "step"),
               default=0)


def worker(agent: psutil.Process, rank: int) -> psutil.Process:
    """The worker process of ``rank``: a child of the torchrun agent with that ``RANK``."""
    for child in agent.children():
        if child.environ().get("RANK") == str(rank):
            return child
    raise LookupError(f"no worker of rank {rank} under the agent")


@pytest.mark.distributed
@pytest.mark.slow
def test_a_killed_rank_is_restarted_and_the_run_ends_as_if_uninterrupted(tmp_path):
    # the uninterrupted reference runs beside the killed run: its start-up and its ranks' waits overlap the
    # other's instead of adding to them (its output is a few lines: the pipes cannot fill up meanwhile)
    with stopped_on_failure(torchrun(tmp_path / "straight")) as straight, \
            stopped_on_failure(torchrun(tmp_path / "killed")) as job:
        agent = psutil.Process(job.pid)
        deadline = time.monotonic() + 180
        while student_steps(tmp_path / "killed") < 8:  # past a few resume saves, well before step 40
            assert job.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.05)
        worker(agent, 1).send_signal(signal.SIGKILL)
        out, err = job.communicate(timeout=240)
        _, straight_err = straight.communicate(timeout=240)
    assert straight.returncode == 0, straight_err[-3000:]

    assert job.returncode == 0, err[-3000:]
    assert "exitcode: -9" in err and "local_rank: 1" in err  # the agent saw the kill and restarted the workers
    assert json.loads(out[out.index("{"):])["optimizer_steps"] == 40
    final = load_file(tmp_path / "killed" / "student_last.safetensors")
    expected = load_file(tmp_path / "straight" / "student_last.safetensors")
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)
    # the surviving rank, when it saw the loss before the agent stopped it, said so in one line
    assert "Traceback" not in err
    assert all(line.startswith("jacplug: rank 0 of 2 lost rank 1 ") for line in err.splitlines() if " lost " in line)


def resolved(*argv: str):
    from jacplug.cli.cmd_train import resolve_config
    from jacplug.cli.main import build_parser

    return resolve_config(build_parser().parse_args(["train", *argv]))


def test_resume_auto_starts_continues_or_refuses_by_what_out_holds(tmp_path, capsys):
    from jacplug.cli.main import main
    from jacplug.errors import UserError

    out = tmp_path / "run"
    first = resolved("--out", str(out), "--resume", "auto", "--lr", "0.01")
    assert first.resume is False and first.lr == 0.01  # nothing to continue: a fresh start
    out.mkdir()
    (out / "config.json").write_text(first.to_json())
    again = resolved("--out", str(out), "--resume", "auto", "--lr", "0.01")
    assert again.resume is True and again.lr == 0.01
    config_file = tmp_path / "job.yaml"
    config_file.write_text(f"out: {out}\nresume: auto\n")
    assert resolved("--config", str(config_file)).resume is True
    assert resolved("--out", str(out), "--resume").resume is True  # plain --resume keeps its meaning
    with pytest.raises(UserError, match=r"--resume auto continues the run in .* these differ: --lr 0.1 "):
        resolved("--out", str(out), "--resume", "auto", "--lr", "0.1")
    assert main(["train", "--out", str(out), "--resume", "auto", "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jacplug: error: --resume auto continues the run") and err.count("\n") == 1
    assert main(["train", "--out", str(out), "--resume", "sometimes"]) == 2
    assert "argument --resume: expected nothing or 'auto', got 'sometimes'" in capsys.readouterr().err
