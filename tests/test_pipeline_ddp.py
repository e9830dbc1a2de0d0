"""DDP over gloo with 2 CPU processes: the real Eq. 10 Jacobian term (student rows from a
``create_graph=True`` double backward) gives parameter gradients equal to one process on the same
global batch (float64). The net has no BatchNorm: train-mode BatchNorm would
normalise each rank's half with its own statistics, a different computation from the global batch.
The training loop's own step keeps the loss terms' adapters in sync and stops every rank together."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

from jacplug.distiller import Distiller
from jacplug.losses import FitNetLoss, JacobianLoss, KDLoss, WeightedLoss
from jacplug.training.config import TrainConfig
from jacplug.training.runtime import Runtime, distribute
from jacplug.io.lock import RunDirLock
from jacplug.events import Phase
from jacplug.training.loop import Loop
from jacplug.events import Events
from jacplug.training.optim import create_adamw
from jacplug.commands.train_run import RunContext, _run_dir
from jacplug.training.plan import stream_plan
from jacplug.training.teacher import cosine_schedule

pytestmark = pytest.mark.distributed  # every test here runs 2 gloo processes (torchrun or mp.spawn)

WORLD = 2


def models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)

    def net() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Softplus(),
            nn.Flatten(), nn.Linear(4 * 3 * 3, 5),
        ).double()

    student, teacher = net(), net()
    return student, teacher.eval().requires_grad_(False)


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 5, (8,), generator=g)


def gradients(student: nn.Module, model: nn.Module, teacher: nn.Module, x, y, runtime: Runtime) -> dict:
    """The Jacobian term alone (the double-backward part), as the pipeline adds it up."""
    loss = WeightedLoss({"jacobian": (JacobianLoss(), 10.0)})
    Distiller(model, teacher, loss)(x, y)["loss"].backward()
    return {name: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
            for name, p in student.named_parameters()}


def leave() -> None:
    """End a worker whose results are on disk without tearing gloo down: the teardown (or the
    interpreter's exit after it) aborts now and then with "terminate called without an active
    exception" while the other rank closes its side, which fails the spawn although nothing went wrong."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def on_gloo_rank(rank: int, port: int, body) -> None:
    """``body()`` on this rank of a 2-process gloo group; then, once both ranks are done talking, leave."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        body()
        dist.barrier()  # both ranks are done talking before either leaves
    except BaseException:
        dist.destroy_process_group()
        raise
    leave()


def worker(rank: int, port: int, out: str) -> None:
    def body() -> None:
        student, teacher = models()
        ddp = nn.parallel.DistributedDataParallel(student)
        x, y = global_batch()
        shard = slice(rank * 4, (rank + 1) * 4)
        runtime = Runtime(device=torch.device("cpu"), rank=rank, world_size=WORLD)
        grads = gradients(student, ddp, teacher, x[shard], y[shard], runtime)
        if rank == 0:
            save_file(grads, out)

    on_gloo_rank(rank, port, body)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_jacobian_gradients_equal_single_process(tmp_path):
    out = str(tmp_path / "ddp.safetensors")
    mp.spawn(worker, args=(free_port(), out), nprocs=WORLD, join=True)
    student, teacher = models()
    x, y = global_batch()
    single = gradients(student, student, teacher, x, y, Runtime(device=torch.device("cpu")))
    ddp = load_file(out)
    assert set(ddp) == set(single)
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-10, atol=1e-12, msg=name)
    assert any(float(g.abs().sum()) > 0 for g in single.values())


def every_gradient(distiller: Distiller) -> dict[str, torch.Tensor]:
    return {name: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
            for name, p in distiller.named_parameters()}


def adapters_and_jacobian(without_kd: bool = False) -> WeightedLoss:
    """KD (unless ``without_kd``: a timm task adds its own), a FitNet hint (a learnable adapter) and the
    Eq. 10 term (a double backward)."""
    terms = {"fitnet": (FitNetLoss({"1": "1"}, {"1": (4, 4)}), 1.0), "jacobian": (JacobianLoss(), 10.0)}
    return WeightedLoss({**({} if without_kd else {"kd": (KDLoss(), 1.0)}), **terms}).double()


def whole_distiller_worker(rank: int, port: int, out: str) -> None:
    """``DistributedDataParallel(Distiller(...))``, the way a framework that wraps the module it trains
    (Lightning's DDP strategy) uses it: one step on this rank's half of the batch."""

    def body() -> None:
        student, teacher = models()
        torch.manual_seed(rank)  # each rank draws other adapter weights: DDP starts them as rank 0's
        distiller = Distiller(student, teacher, adapters_and_jacobian())
        ddp = nn.parallel.DistributedDataParallel(distiller)
        x, y = global_batch()
        shard = slice(rank * 4, (rank + 1) * 4)
        ddp(x[shard], y[shard])["loss"].backward()
        save_file(every_gradient(distiller), f"{out}.{rank}")

    on_gloo_rank(rank, port, body)


def test_a_whole_distiller_under_ddp_trains_like_one_process_adapters_included(tmp_path):
    mp.spawn(whole_distiller_worker, args=(free_port(), str(tmp_path / "grads")), nprocs=WORLD, join=True)
    student, teacher = models()
    torch.manual_seed(0)
    distiller = Distiller(student, teacher, adapters_and_jacobian())
    distiller(*global_batch())["loss"].backward()
    single = every_gradient(distiller)
    assert "loss.terms.fitnet.adapters.0.weight" in single and not any(k.startswith("teacher") for k in single)
    for rank in range(WORLD):
        ddp = load_file(str(tmp_path / f"grads.{rank}"))
        assert set(ddp) == set(single)
        for name in single:
            torch.testing.assert_close(ddp[name], single[name], rtol=1e-10, atol=1e-12, msg=f"rank {rank}: {name}")


def test_torchrun_two_processes_end_to_end(tmp_path):
    """The real launcher: 2 gloo processes, rank 0 trains the teacher and writes every file. The teacher
    makes 4 steps, not an epoch at batch 8 (158 steps): how well it is trained is not what is tested."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
           "-m", "jacplug", "train", "--teacher", "test_resnet", "--student", "test_resnet", "--image-size", "8",
           "--teacher-steps", "4", "--epochs", "1", "--samples-per-class", "4", "--batch-size", "8",
           "--out", str(out), "--no-progress", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)  # printed once, by rank 0
    assert summary["train_samples"] == 40
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["kind"] == "step"] == [1, 2, 3]  # 20 images per rank, batch 8
    assert "student test_resnet: starting, 3 optimizer steps x 16 images (global batch: 2 processes x 8)" in proc.stderr
    assert (out / "student_last.safetensors").is_file() and (out / "teacher.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------
# the training loop's own step under DDP: loss-module parameters, non-finite losses, the run lock


def fitnet_loss() -> WeightedLoss:
    """KD plus a FitNet hint on the first conv's output, whose 1x1 adapter is a loss-module parameter."""
    return WeightedLoss({"kd": (KDLoss(), 1.0), "fitnet": (FitNetLoss({"1": "1"}, {"1": (4, 4)}), 1.0)}).double()


def loop(student: nn.Module, loss: WeightedLoss, teacher: nn.Module, runtime: Runtime) -> Loop:
    """A :class:`Loop` set up as ``jacplug train`` sets up the student's: DDP, optimizer, schedule."""
    config = TrainConfig(check_gradients=False)
    distiller = Distiller(distribute(student, runtime), teacher, loss, check_gradients=False)
    optimizer = create_adamw({"student": student, "loss": loss}, lr=config.lr, weight_decay=config.weight_decay)
    run = RunContext(config=config, out_dir=Path("."), device=runtime.device, teacher=teacher, student=student,
                     loss=loss, splits=None, runtime=runtime)
    plan = stream_plan(16, 8, steps=10)
    events = Events(run, Phase(kind="student", name="student", out_dir=Path("."), group=".", plan=plan), enabled=False)
    return Loop(distiller, None, optimizer, cosine_schedule(optimizer, plan.total), plan, runtime, events,
                evaluate=lambda step: {})


def adapter_gradients(loss: WeightedLoss) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in loss.named_parameters()}


def pipeline_worker(rank: int, port: int, out: str, held_dir: str) -> None:
    """The pipeline's own DDP code on this rank, writing what happened to files ``OUT.WHAT.RANK``:
    claiming a run directory another process holds (``lock``); one ``Loop.step`` on this rank's half of
    the global batch (``grads``: the adapter gradients); a second step with a NaN input on rank 1 only
    (``nonfinite``)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))

    def record(what: str, action) -> None:
        try:
            action()
            Path(f"{out}.{what}.{rank}").write_text("no error")
        except Exception as exc:  # a rank that fails differently (or times out in a collective) shows up here
            Path(f"{out}.{what}.{rank}").write_text(f"{type(exc).__name__}: {exc}")

    try:
        runtime = Runtime(device=torch.device("cpu"), rank=rank, world_size=WORLD)
        with contextlib.ExitStack() as held:
            record("lock", lambda: _run_dir(TrainConfig(out=held_dir), runtime, held))

        student, teacher = models()
        torch.manual_seed(rank)  # each rank draws other adapter weights: they must start as rank 0's
        loss = fitnet_loss()
        step = loop(student, loss, teacher, runtime)
        x, y = global_batch()
        shard = slice(rank * 4, (rank + 1) * 4)
        step.train_step(x[shard], y[shard], torch.arange(4))
        save_file(adapter_gradients(loss), f"{out}.grads.{rank}")

        x = x[shard].clone()
        if rank == 1:
            x[0, 0, 0, 0] = float("nan")
        record("nonfinite", lambda: step.train_step(x, y[shard], torch.arange(4)))
        dist.barrier()  # as in worker(): both ranks are done before either leaves
    except BaseException:
        dist.destroy_process_group()
        raise
    leave()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> str:
    """Runs :func:`pipeline_worker` on 2 gloo processes once for the tests below (while this process
    holds the lock of ``held_dir``); returns the prefix of its result files."""
    tmp = tmp_path_factory.mktemp("ddp-pipeline")
    with RunDirLock(tmp / "held"):
        mp.spawn(pipeline_worker, args=(free_port(), str(tmp / "out"), str(tmp / "held")), nprocs=WORLD, join=True)
    return str(tmp / "out")


def single_process_adapter_gradients() -> dict[str, torch.Tensor]:
    student, teacher = models()
    torch.manual_seed(0)
    loss = fitnet_loss()
    x, y = global_batch()
    loop(student, loss, teacher, Runtime(device=torch.device("cpu"))).train_step(x, y, torch.arange(8))
    return adapter_gradients(loss)


def test_ddp_loss_module_gradients_equal_single_process(ddp_results):
    single = single_process_adapter_gradients()
    assert list(single) == ["terms.fitnet.adapters.0.weight"] and float(single[list(single)[0]].abs().sum()) > 0
    for rank in range(WORLD):
        ddp = load_file(f"{ddp_results}.grads.{rank}")
        assert set(ddp) == set(single)
        for name in single:
            torch.testing.assert_close(ddp[name], single[name], rtol=1e-10, atol=1e-12, msg=f"rank {rank}: {name}")


def test_ddp_non_finite_loss_on_one_rank_stops_every_rank(ddp_results):
    results = [Path(f"{ddp_results}.nonfinite.{rank}").read_text() for rank in range(WORLD)]
    assert results[1].startswith("UserError: loss became non-finite at step 2 ("), results[1]
    assert results[0].startswith("UserError: loss became non-finite at step 2 on another process"), results[0]


def test_ddp_run_directory_held_elsewhere_is_refused_on_every_rank(ddp_results):
    for rank in range(WORLD):
        result = Path(f"{ddp_results}.lock.{rank}").read_text()
        assert result.startswith("UserError: run directory ") and "is in use by another jacplug run" in result, result
        assert f"pid {os.getpid()} on host" in result


def timm_task_worker(rank: int, port: int, out: str) -> None:
    """timm's task protocol under DDP: ``prepare_distributed()`` wraps the Distiller; one step on this
    rank's half of the batch."""
    from jacplug.integrations.timm_task import JacobianDistillationTask

    def body() -> None:
        student, teacher = models()
        torch.manual_seed(rank)  # other adapter weights on each rank: DDP starts them as rank 0's
        task = JacobianDistillationTask(student, teacher, criterion=nn.CrossEntropyLoss(), distill_loss_weight=1.0,
                                        loss=adapters_and_jacobian(without_kd=True), verbose=False)
        task.prepare_distributed()
        x, y = global_batch()
        shard = slice(rank * 4, (rank + 1) * 4)
        task(x[shard], y[shard])["loss"].backward()
        save_file(every_gradient(task.distiller), f"{out}.{rank}")

    on_gloo_rank(rank, port, body)


def test_the_timm_task_under_ddp_trains_like_one_process(tmp_path):
    from jacplug.integrations.timm_task import JacobianDistillationTask

    mp.spawn(timm_task_worker, args=(free_port(), str(tmp_path / "grads")), nprocs=WORLD, join=True)
    student, teacher = models()
    torch.manual_seed(0)
    task = JacobianDistillationTask(student, teacher, criterion=nn.CrossEntropyLoss(), distill_loss_weight=1.0,
                                    loss=adapters_and_jacobian(without_kd=True), verbose=False)
    task(*global_batch())["loss"].backward()
    single = every_gradient(task.distiller)
    assert "loss.terms.fitnet.adapters.0.weight" in single
    for rank in range(WORLD):
        ddp = load_file(str(tmp_path / f"grads.{rank}"))
        for name in single:
            torch.testing.assert_close(ddp[name], single[name], rtol=1e-10, atol=1e-12, msg=f"rank {rank}: {name}")
