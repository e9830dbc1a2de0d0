"""Cost of Jacobian-matching training steps, as ratios to a plain KD step measured in the same run.

Why ratios, interleaved, medians: absolute step times move with the machine and its load; running
every method once per round, in rotating order, and taking medians over rounds cancels most drift.
Each measured step is a full training step (forward, loss, backward, optimizer step) built from the
public library API exactly as a user's own loop would build it (docs/reuse.md).

Memory: on CUDA the peak allocated bytes of the step. On CPU, where PyTorch exposes no allocator
statistics, two measures: ``--memory saved`` (default, in-process) sums the distinct tensors autograd
saves during the step, an upper bound that ignores that the teacher's saved activations are freed
before the student's double backward; ``--memory rss`` runs each method in a fresh process and
reports the growth of the peak resident set over three steps, the real high-water mark.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .engine import jacobian
from .errors import UserError
from .registry import create_model
from .losses import DistillBatch, KDLoss, WeightedLoss
from .losses.jacobian_terms import DirectionalJacobianLoss, JacobianLoss, ProjectedJacobianLoss
from .losses.teacher import CACHE_JACOBIAN_ROWS, CACHE_ROWS


@dataclass
class Setup:
    """One benchmark configuration: frozen teacher, trainable student, a fixed batch."""

    name: str
    teacher: nn.Module
    student: nn.Module
    inputs: Tensor
    targets: Tensor
    optimizer: torch.optim.Optimizer


def make_setup(name: str, classes: int, batch: int, size: int, device: torch.device, seed: int = 0) -> Setup:
    torch.manual_seed(seed)
    if name == "mlp":
        def mlp(width: int) -> nn.Module:
            return nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, width), nn.ReLU(), nn.Linear(width, classes))

        teacher, student = mlp(1024), mlp(256)
    else:
        teacher_name, student_name = name.split("->")
        teacher = create_model(teacher_name, num_classes=classes)
        student = create_model(student_name, num_classes=classes)
    teacher = teacher.to(device).eval().requires_grad_(False)
    student = student.to(device).train()
    inputs = torch.randn(batch, 3, size, size, device=device)
    targets = torch.randint(0, classes, (batch,), device=device)
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)
    return Setup(f"{name} C={classes}", teacher, student, inputs, targets, optimizer)


def _jacplug_step(loss: WeightedLoss, cached: bool = False) -> Callable[[Setup], None]:
    """A training step following jacplug's protocol: inputs require grad only when a term needs input
    Jacobians; the teacher then runs with grad w.r.t. the inputs only (its rows are taken without a
    graph), otherwise under no_grad."""
    input_grad = "input_grad" in loss.needs
    cache_store: dict[int, dict] = {}

    def step(s: Setup) -> None:
        x = s.inputs.detach().requires_grad_(input_grad)
        student_logits = s.student(x)
        cache: dict = {}
        if cached:  # what --cache-teacher provides: logits and top-1 rows computed once, ahead of time
            if id(s) not in cache_store:
                xt = s.inputs.detach().requires_grad_(True)
                logits = s.teacher(xt)
                rows = logits.argmax(1, keepdim=True)
                cache_store[id(s)] = {"logits": logits.detach(), CACHE_ROWS: rows,
                                      CACHE_JACOBIAN_ROWS: jacobian(logits, xt, rows, create_graph=False)}
            entry = cache_store[id(s)]
            teacher_logits = entry["logits"]
            cache = {CACHE_ROWS: entry[CACHE_ROWS], CACHE_JACOBIAN_ROWS: entry[CACHE_JACOBIAN_ROWS]}
        else:
            with torch.set_grad_enabled(input_grad):
                teacher_logits = s.teacher(x)
        batch = DistillBatch(inputs=x, student_logits=student_logits, teacher_logits=teacher_logits,
                             targets=s.targets, student_fn=s.student, teacher_fn=s.teacher, cache=cache)
        total, _ = loss(batch)
        s.optimizer.zero_grad(set_to_none=True)
        total.backward()
        s.optimizer.step()

    return step


def _forum_top1_step(s: Setup) -> None:
    """The forum's Eq. 10 code: both rows by autograd.grad(create_graph=True), teacher not frozen
    for the Jacobian (its graph is kept alive), plain (not squared) distance."""
    teacher_params = [p.requires_grad_(True) for p in s.teacher.parameters()]
    try:
        x = s.inputs.detach().requires_grad_(True)
        t, out = s.teacher(x), s.student(x)
        i = t.argmax(1)
        rows = []
        for logits in (t, out):
            grad_output = torch.zeros_like(logits)
            grad_output[torch.arange(len(i)), i] = 1
            rows.append(torch.autograd.grad(logits, x, grad_output, create_graph=True)[0].flatten(1))
        t_jac, s_jac = (r / r.norm(dim=1, keepdim=True) for r in rows)
        kd = KDLoss()(DistillBatch(inputs=x, student_logits=out, teacher_logits=t.detach()))
        loss = 0.5 * kd + 0.5 * (t_jac - s_jac).norm(dim=1).mean()
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        s.optimizer.step()
    finally:
        for p in teacher_params:
            p.requires_grad_(False)
            p.grad = None


def _forum_full_loop_step(s: Setup) -> None:
    """The forum's full Jacobian: per class, ``backward(grad_output, create_graph=True)`` and read
    ``x.grad``, for teacher and student; then match the flattened full Jacobians."""
    x = s.inputs.detach().requires_grad_(True)
    t, out = s.teacher(x), s.student(x)
    jacs = []
    for logits in (t, out):
        b, c = logits.shape
        jac = torch.zeros(b, c, x[0].numel(), device=x.device)
        for i in range(c):
            grad_output = torch.zeros_like(logits)
            grad_output[:, i] = 1
            logits.backward(grad_output, create_graph=True, inputs=[x])
            jac[:, i, :] = x.grad.view(b, -1)
            x.grad = None
        jacs.append(jac.view(b, -1))
    t_jac, s_jac = (j / j.norm(dim=1, keepdim=True) for j in jacs)
    kd = KDLoss()(DistillBatch(inputs=x, student_logits=out, teacher_logits=t.detach()))
    loss = 0.5 * kd + 0.5 * (t_jac.detach() - s_jac).norm(dim=1).mean()
    s.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    s.optimizer.step()


def methods() -> dict[str, Callable[[Setup], None]]:
    """Method name -> step. ``kd`` is the unit; ``full-*`` are the expensive all-class rows."""
    kd = KDLoss(temperature=4.0)

    def with_kd(term, weight: float = 10.0) -> WeightedLoss:
        return WeightedLoss({"kd": (kd, 1.0), term.name: (term, weight)})

    return {
        "kd": _jacplug_step(WeightedLoss({"kd": (kd, 1.0)})),
        "forum-eq10-top1": _forum_top1_step,
        "eq10-top1": _jacplug_step(with_kd(JacobianLoss())),
        "eq10-top1-cached": _jacplug_step(with_kd(JacobianLoss()), cached=True),
        "projected-k1": _jacplug_step(with_kd(ProjectedJacobianLoss(k=1))),
        "direction-fd": _jacplug_step(with_kd(DirectionalJacobianLoss(method="finite-difference"))),
        "direction-forward": _jacplug_step(with_kd(DirectionalJacobianLoss(method="forward"))),
        "full-forum-loop": _forum_full_loop_step,
        "full-loop": _jacplug_step(with_kd(JacobianLoss(classes="all", backend="loop"))),
        "full-batched": _jacplug_step(with_kd(JacobianLoss(classes="all", backend="batched"))),
    }


def _saved_bytes(fn: Callable[[], None]) -> int:
    """Bytes of distinct storages autograd saves during ``fn`` (CPU memory proxy)."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. functorch wrappers)
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def measure_memory(setup: Setup, step: Callable[[Setup], None]) -> int:
    if setup.inputs.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(setup)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _saved_bytes(lambda: step(setup))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_rss_growth(model_name: str, classes: int, batch: int, size: int, method: str) -> int:
    """Bytes by which the resident set peaks above its level before three steps of ``method``.

    Linux only: the peak (VmHWM) is reset through /proc/self/clear_refs once the models exist, and
    the parent sets MALLOC_MMAP_THRESHOLD_ so freed tensors go back to the system at once instead of
    hiding later allocations in reused heap."""
    setup = make_setup(model_name, classes, batch, size, torch.device("cpu"))
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _status_kib("VmRSS")
    for _ in range(3):
        methods()[method](setup)
    return 1024 * (_status_kib("VmHWM") - before)


def measure_rss(model_name: str, classes: int, batch: int, size: int, method: str) -> int:
    """:func:`peak_rss_growth` in a fresh process."""
    code = ("import torch; from jacplug.bench import peak_rss_growth; "
            f"torch.set_num_threads({torch.get_num_threads()}); "
            f"print(peak_rss_growth({model_name!r}, {classes}, {batch}, {size}, {method!r}))")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    return int(out.strip().splitlines()[-1])


def _time(setup: Setup, step: Callable[[Setup], None]) -> float:
    sync = torch.cuda.synchronize if setup.inputs.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    step(setup)
    sync()
    return time.perf_counter() - start


def run(
    configs: list[tuple[str, int]],
    selected: list[str],
    repeats: int,
    full_repeats: int,
    batch: int,
    size: int,
    device: torch.device,
    memory_mode: str = "saved",
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Measure every selected method on every config; returns one row per (config, method)."""
    table = methods()
    rows: list[dict] = []
    for model_name, classes in configs:
        setup = make_setup(model_name, classes, batch, size, device)
        names = ["kd"] + [m for m in selected if m != "kd"]
        times: dict[str, list[float]] = {m: [] for m in names}
        for m in names:  # warm-up (allocator, one-time initialisation)
            table[m](setup)
        if memory_mode == "rss" and device.type == "cpu":
            memory = {m: measure_rss(model_name, classes, batch, size, m) for m in names}
        else:
            memory = {m: measure_memory(setup, table[m]) for m in names}
        for r in range(repeats):
            order = names[r % len(names):] + names[: r % len(names)]
            for m in order:
                if m.startswith("full-") and len(times[m]) >= full_repeats:
                    continue
                times[m].append(_time(setup, table[m]))
            log(f"  {setup.name}: round {r + 1}/{repeats} done")
        kd_time, kd_mem = statistics.median(times["kd"]), memory["kd"]
        for m in names:
            median = statistics.median(times[m])
            rows.append({
                "config": setup.name, "method": m, "median_ms": 1e3 * median, "time_ratio": median / kd_time,
                "memory_ratio": memory[m] / kd_mem if kd_mem else float("nan"), "runs": len(times[m]),
            })
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'config':<28} {'method':<20} {'median ms':>10} {'x KD time':>10} {'x KD memory':>12} {'runs':>5}"]
    for r in rows:
        lines.append(f"{r['config']:<28} {r['method']:<20} {r['median_ms']:>10.1f} {r['time_ratio']:>10.2f} "
                     f"{r['memory_ratio']:>12.2f} {r['runs']:>5}")
    return "\n".join(lines)


def parse_config(spec: str) -> tuple[str, int]:
    """``"TEACHER->STUDENT:C"`` or ``"mlp:C"`` -> ``(models, C)``; model names are checked when built."""
    models, _, classes = spec.rpartition(":")
    valid_models = models == "mlp" or (models.count("->") == 1 and all(models.split("->")))
    if not valid_models or not classes.isdigit() or int(classes) < 2:
        raise UserError(f"bad --configs entry {spec!r}; expected TEACHER->STUDENT:C (e.g. resnet34->resnet18:10) "
                        f"or mlp:C, with C >= 2 classes")
    return models, int(classes)


def main_from_args(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = [parse_config(spec) for spec in args.configs]
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available on this machine; use --device cpu")
    device = torch.device(args.device)
    print(f"# jacplug bench: torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"batch {args.batch_size}, {args.image_size}x{args.image_size}, {args.repeats} rounds, memory: "
          f"{'peak allocated' if device.type == 'cuda' else args.memory}")
    rows = run(configs, args.methods, args.repeats, args.full_repeats, args.batch_size, args.image_size, device,
               memory_mode=args.memory)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0
