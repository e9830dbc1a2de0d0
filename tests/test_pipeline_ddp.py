"""DDP over gloo with 2 CPU processes: the real Eq. 10 Jacobian term (student rows from a
``create_graph=True`` double backward) gives parameter gradients equal to one process on the same
global batch (float64). The net has no BatchNorm: train-mode BatchNorm would
normalise each rank's half with its own statistics, a different computation from the global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

from jacplug.losses import JacobianLoss, WeightedLoss
from jacplug.pipeline.device import Runtime
from jacplug.pipeline.step import compute_terms, weighted_total, with_every_parameter

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
    total = weighted_total(loss, compute_terms(loss, model, teacher, x, y, runtime))
    if runtime.distributed:
        total = with_every_parameter(total, list(student.parameters()))
    total.backward()
    return {name: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
            for name, p in student.named_parameters()}


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        student, teacher = models()
        ddp = nn.parallel.DistributedDataParallel(student)
        x, y = global_batch()
        shard = slice(rank * 4, (rank + 1) * 4)
        runtime = Runtime(device=torch.device("cpu"), rank=rank, world_size=WORLD)
        grads = gradients(student, ddp, teacher, x[shard], y[shard], runtime)
        if rank == 0:
            save_file(grads, out)
    finally:
        dist.destroy_process_group()


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


def test_torchrun_two_processes_end_to_end(tmp_path):
    """The real launcher: 2 gloo processes, rank 0 trains the teacher and writes every file."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
           "-m", "jacplug", "train", "--teacher", "test_resnet", "--student", "test_resnet", "--image-size", "8",
           "--teacher-epochs", "1", "--epochs", "1", "--samples-per-class", "4", "--batch-size", "8",
           "--out", str(out), "--no-progress", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)  # printed once, by rank 0
    assert summary["train_samples"] == 40
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["kind"] == "step"] == [1, 2, 3]  # 20 images per rank, batch 8
    assert (out / "student_last.safetensors").is_file() and (out / "teacher.safetensors").is_file()
