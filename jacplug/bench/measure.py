"""The measurements behind :mod:`jacplug.bench`: setups, methods, interleaved timing, memory.

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

import functools
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..capture import CapturedStep
from ..engine import jacobian
from ..distiller import Distiller
from ..engine.substitutions import Substitution, double_differentiable, registered_substitutions
from ..errors import UserError
from ..losses import DistillBatch, KDLoss, WeightedLoss
from ..losses.jacobian_terms import DirectionalJacobianLoss, JacobianLoss, ProjectedJacobianLoss, row_distance
from ..losses.teacher_rows import CACHE_JACOBIAN_ROWS, CACHE_ROWS
from ..outputs import at_least_float32
from ..training.runtime import Runtime
from ..specs import parse_options, spec_error
from ..models.build import ModelInput, build_model

Step = Callable[[], object]
Builder = Callable[["Setup", bool], Step]  # (setup, graphed) -> a whole training step
#: the op substitutions made for cost, which the ``*-native*`` methods leave out
NATIVE_BATCH_NORM = ("batch-norm-double-backward",)
NATIVE_CONVOLUTION = ("conv1d-double-backward", "conv2d-double-backward", "conv3d-double-backward")
#: the start of PyTorch's warning about ``backward(create_graph=True)`` (a regular expression)
CREATE_GRAPH_WARNING = r"Using backward\(\) with create_graph=True"


@dataclass
class Setup:
    """One benchmark configuration: frozen teacher, trainable student, a fixed batch, and how the
    forward passes run (``runtime``: device, bf16 autocast, channels-last)."""

    name: str
    teacher: nn.Module
    student: nn.Module
    inputs: Tensor
    targets: Tensor
    optimizer: torch.optim.Optimizer
    runtime: Runtime


_MODEL_SPEC = re.compile(r"^([\w.\-]+)(?:\((.*)\))?$")
_MODEL_FORM = "NAME or NAME(KEY=VALUE,...) (e.g. vit_tiny_patch16_224(patch_size=4))"


def bench_model(spec: str, classes: int, size: int) -> nn.Module:
    """``NAME`` or ``NAME(key=value,...)`` (e.g. ``vit_tiny_patch16_224(patch_size=4)``), built by the
    pipeline's one model factory (:func:`jacplug.models.build.build_model`) for RGB ``size`` px inputs."""
    match = _MODEL_SPEC.match(spec)
    if match is None:
        raise spec_error("--configs", spec, "not a model name", _MODEL_FORM)
    kwargs = parse_options(match.group(2) or "", "--configs", spec, _MODEL_FORM)
    return build_model("model", match.group(1), ModelInput(classes, (3, size, size)), kwargs).module


def make_setup(name: str, classes: int, batch: int, size: int, device: torch.device, seed: int = 0,
               amp: bool = False, channels_last: bool = False) -> Setup:
    torch.manual_seed(seed)
    if name == "mlp":
        def mlp(width: int) -> nn.Module:
            return nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, width), nn.ReLU(), nn.Linear(width, classes))

        teacher, student = mlp(1024), mlp(256)
    else:
        teacher_name, student_name = name.split("->")
        teacher, student = bench_model(teacher_name, classes, size), bench_model(student_name, classes, size)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    teacher = teacher.to(device, memory_format=memory_format).eval().requires_grad_(False)
    student = student.to(device, memory_format=memory_format).train()
    inputs = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    targets = torch.randint(0, classes, (batch,), device=device)
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)
    runtime = Runtime(device=device, amp_dtype=torch.bfloat16 if amp else None, channels_last=channels_last)
    return Setup(f"{name} C={classes} {size}px", teacher, student, inputs, targets, optimizer, runtime)


def _distiller_step(loss: WeightedLoss, cached: bool = False, without: tuple[str, ...] = ()) -> Builder:
    """The step users run: :meth:`jacplug.Distiller.step` (what ``jacplug train`` runs), captured in a
    CUDA graph for the graphed variant. ``cached``: what ``--cache-teacher`` provides, the teacher's
    logits and top-1 rows computed once ahead of time. ``without``: names of registered op
    substitutions the student's forward leaves out, to measure what the substitutions made for cost save."""

    def prepare(s: Setup, graphed: bool) -> Step:
        entries = None
        if cached:
            xt = s.inputs.detach().requires_grad_(True)
            with s.runtime.autocast():
                logits = at_least_float32(s.teacher(xt))
            rows = logits.argmax(1, keepdim=True)
            entries = {"teacher_logits": logits.detach(), CACHE_ROWS: rows,
                       CACHE_JACOBIAN_ROWS: jacobian(logits, xt, rows, create_graph=False)}
        substitutions = _registered_without(without) if without else None
        distiller = Distiller(s.student, s.teacher, loss, amp=s.runtime.amp_dtype, capture=graphed,
                              substitutions=substitutions)
        step = functools.partial(distiller.step, s.optimizer, s.inputs, s.targets, cached=entries)
        step.status = lambda: "graphed" if distiller.capture_status == "CUDA graph" else (  # type: ignore[attr-defined]
            f"eager fallback ({distiller.capture_fallback})" if distiller.capture_fallback else "eager")
        return step

    return prepare


def _by_hand_step(s: Setup, graphed: bool) -> Step:
    """``eq10-top1`` written by hand from the engine, as docs/reuse.md's lower layer shows it: the same
    models, maths, double-differentiable student forward and precision as the Distiller's step, without
    the Distiller (no loss modules, feature taps or checks), so the two differ only by its overhead."""
    kd = KDLoss(temperature=4.0)

    def forward_backward() -> dict[str, Tensor]:
        x = s.inputs.detach().requires_grad_(True)
        with s.runtime.autocast(), double_differentiable():
            out = at_least_float32(s.student(x))
        with s.runtime.autocast():
            t = at_least_float32(s.teacher(x))
        rows = t.argmax(1, keepdim=True)
        t_rows = jacobian(t, x, rows, create_graph=False)
        s_rows = jacobian(out, x, rows)
        jac = row_distance(s_rows, t_rows, normalize=True, squared=True, eps=1e-8).mean()
        total = kd(DistillBatch(inputs=x, student_logits=out, teacher_logits=t.detach())) + 10.0 * jac
        s.optimizer.zero_grad(set_to_none=False)
        total.backward()
        return {"loss": total.detach()}

    forward_backward = CapturedStep(forward_backward) if graphed else forward_backward

    def step() -> None:
        forward_backward()
        s.optimizer.step()

    step.status = lambda: _graph_status(forward_backward) if graphed else "eager"  # type: ignore[attr-defined]
    return step


def _registered_without(names: tuple[str, ...]) -> list[Substitution]:
    registered = registered_substitutions()
    missing = set(names) - {s.name for s in registered}
    if missing:
        raise ValueError(f"no registered op substitution is called {sorted(missing)}")
    return [s for s in registered if s.name not in names]


def _eager(step: Callable[[Setup], None]) -> Builder:
    """A hand-written reference step (it runs its own optimizer step, never in a CUDA graph) in the same shape."""

    def prepare(s: Setup, graphed: bool) -> Step:
        run = functools.partial(step, s)
        run.status = lambda: "eager"  # type: ignore[attr-defined]
        return run

    return prepare


def _forum_top1_step(s: Setup) -> None:
    """Eq. 10 as commonly hand-written: both rows by autograd.grad(create_graph=True), teacher not frozen
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
    """The full Jacobian as commonly hand-written: per class, ``backward(grad_output, create_graph=True)`` and read
    ``x.grad``, for teacher and student; then match the flattened full Jacobians."""
    x = s.inputs.detach().requires_grad_(True)
    t, out = s.teacher(x), s.student(x)
    jacs = []
    with warnings.catch_warnings():
        # PyTorch warns that backward(create_graph=True) can leak through a parameter's .grad; this reference
        # is that pattern on purpose, accumulates only into x.grad and clears it after each class
        warnings.filterwarnings("ignore", message=CREATE_GRAPH_WARNING, category=UserWarning)
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


def methods() -> dict[str, Builder]:
    """Method name -> builder of a whole training step for a setup. ``kd`` is the unit; ``full-*`` are
    the expensive all-class rows; ``forum-*`` are hand-written references that are never graphed;
    ``eq10-top1-by-hand`` is ``eq10-top1`` without the Distiller (its overhead)."""
    kd = KDLoss(temperature=4.0)

    def with_kd(term, weight: float = 10.0) -> WeightedLoss:
        return WeightedLoss({"kd": (kd, 1.0), term.name: (term, weight)})

    return {
        "kd": _distiller_step(WeightedLoss({"kd": (kd, 1.0)})),
        "forum-eq10-top1": _eager(_forum_top1_step),
        "eq10-top1": _distiller_step(with_kd(JacobianLoss())),
        "eq10-top1-by-hand": _by_hand_step,
        "eq10-top1-cached": _distiller_step(with_kd(JacobianLoss()), cached=True),
        # the same step with PyTorch's own double backward of BatchNorm, of convolutions, of both
        # (what each substitution made for cost saves)
        "eq10-top1-native-bn": _distiller_step(with_kd(JacobianLoss()), without=NATIVE_BATCH_NORM),
        "eq10-top1-native-conv": _distiller_step(with_kd(JacobianLoss()), without=NATIVE_CONVOLUTION),
        "eq10-top1-native": _distiller_step(with_kd(JacobianLoss()), without=NATIVE_BATCH_NORM + NATIVE_CONVOLUTION),
        "projected-k1": _distiller_step(with_kd(ProjectedJacobianLoss(k=1))),
        "direction-fd": _distiller_step(with_kd(DirectionalJacobianLoss(method="finite-difference"))),
        "direction-forward": _distiller_step(with_kd(DirectionalJacobianLoss(method="forward"))),
        "full-forum-loop": _eager(_forum_full_loop_step),
        "full-loop": _distiller_step(with_kd(JacobianLoss(classes="all", backend="loop"))),
        "full-batched": _distiller_step(with_kd(JacobianLoss(classes="all", backend="batched"))),
    }


class Runner:
    """A whole training step of one method on one setup, eager or captured in a CUDA graph."""

    def __init__(self, setup: Setup, method: str, graphed: bool = False) -> None:
        self.setup = setup
        self.step = methods()[method](setup, graphed)

    @property
    def status(self) -> str:
        """``eager``, ``graphed``, or ``eager fallback (why)``."""
        return self.step.status()

    def __call__(self, setup: Setup | None = None) -> None:
        self.step()


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
    """Peak allocated bytes of one step above the level before it (CUDA), or autograd's saved bytes (CPU)."""
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
    runner = Runner(setup, method)
    for _ in range(3):
        runner()
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
    """One timed call. Not ``torch.utils.benchmark.Timer``, which times one statement in a loop: the
    methods here are timed in interleaved rounds, so that drift in the machine's load hits all alike."""
    sync = torch.cuda.synchronize if setup.inputs.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    step(setup)
    sync()
    return time.perf_counter() - start


def variants(classes: int, selected: list[str], graphs: bool) -> list[tuple[str, bool]]:
    """The ``(method, graphed)`` steps measured on a config of ``classes`` classes: ``kd`` first (the unit), the
    selected methods (the ``full-*`` ones only up to 100 classes: their cost grows with C), and with ``graphs``
    each again captured in a CUDA graph (not the hand-written references, which are never graphed)."""
    names = ["kd"] + [m for m in selected if m != "kd" and not (m.startswith("full-") and classes > 100)]
    eager = [(m, False) for m in names]
    if not graphs:
        return eager
    return eager + [(m, True) for m in names if not m.startswith("forum-") and m != "full-forum-loop"]


def run(
    configs: list[tuple[str, int, int]],
    selected: list[str],
    repeats: int,
    full_repeats: int,
    batch: int,
    device: torch.device,
    memory_mode: str = "saved",
    echo: Callable[[str], None] = print,
    amp: bool = False,
    channels_last: bool = False,
    graphs: bool = False,
) -> list[dict]:
    """Measure every selected method on every ``(models, classes, image size)`` config; one row per
    (config, method, eager or graphed), ratios to the *eager* KD step of the same config; ``echo`` prints the
    progress lines."""
    rows: list[dict] = []
    for model_name, classes, size in configs:
        setup = make_setup(model_name, classes, batch, size, device, amp=amp, channels_last=channels_last)
        measured = variants(classes, selected, graphs)
        runners = {v: Runner(setup, v[0], graphed=v[1]) for v in measured}
        for runner in runners.values():  # warm-up: allocator, cuDNN autotuning, graph capture
            for _ in range(4 if graphs else 1):
                runner()
        if memory_mode == "rss" and device.type == "cpu":
            memory = {v: measure_rss(model_name, classes, batch, size, v[0]) for v in measured}
        else:
            memory = {v: measure_memory(setup, runners[v]) for v in measured}
        times: dict[tuple[str, bool], list[float]] = {v: [] for v in measured}
        for r in range(repeats):
            order = measured[r % len(measured):] + measured[: r % len(measured)]
            for v in order:
                if v[0].startswith("full-") and len(times[v]) >= full_repeats:
                    continue
                times[v].append(_time(setup, runners[v]))
            echo(f"  {setup.name}: round {r + 1}/{repeats} done")
        kd_time, kd_mem = statistics.median(times[("kd", False)]), memory[("kd", False)]
        for v in measured:
            median = statistics.median(times[v])
            rows.append({
                "config": setup.name, "method": v[0], "graph": runners[v].status if v[1] else "eager",
                "median_ms": 1e3 * median, "time_ratio": median / kd_time, "images_per_s": batch / median,
                "memory_ratio": memory[v] / kd_mem if kd_mem else float("nan"), "peak_mb": memory[v] / 2**20,
                "runs": len(times[v]),
            })
    return rows


def _graph_status(step: CapturedStep) -> str:
    return "graphed" if step.captured else f"eager fallback ({step.fallback})"


def format_table(rows: list[dict]) -> str:
    lines = [f"{'config':<44} {'method':<18} {'mode':<8} {'median ms':>10} {'x eager KD':>10} {'img/s':>9} "
             f"{'x KD mem':>9} {'runs':>5}"]
    for r in rows:
        mode = r["graph"] if r["graph"] in ("eager", "graphed") else "FALLBACK"
        lines.append(f"{r['config']:<44} {r['method']:<18} {mode:<8} {r['median_ms']:>10.1f} {r['time_ratio']:>10.2f} "
                     f"{r['images_per_s']:>9.0f} {r['memory_ratio']:>9.2f} {r['runs']:>5}")
    fallbacks = sorted({r["graph"] for r in rows if r["graph"] not in ("eager", "graphed")})
    return "\n".join(lines + [f"# {f}" for f in fallbacks])


def parse_config(spec: str, default_size: int) -> tuple[str, int, int]:
    """``"TEACHER->STUDENT:C[@SIZE]"`` or ``"mlp:C"`` -> ``(models, C, size)``; a model may carry
    keyword arguments, ``NAME(key=value,...)``; names are checked when built."""
    head, _, size = spec.partition("@")
    models, _, classes = head.rpartition(":")
    valid_models = models == "mlp" or (models.count("->") == 1 and all(models.split("->")))
    if not valid_models or not classes.isdigit() or int(classes) < 2 or (size and not size.isdigit()):
        raise UserError(f"bad --configs entry {spec!r}; expected TEACHER->STUDENT:C[@SIZE] (e.g. "
                        f"resnet34->resnet18:10 or resnet50->resnet18:1000@224) or mlp:C, with C >= 2 classes")
    return models, int(classes), int(size) if size else default_size
