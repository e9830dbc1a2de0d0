"""A whole training step captured once in a CUDA graph and replayed: :class:`CapturedStep`.

Why: an exact Jacobian step launches several times the kernels of a plain KD step (the double
backward), each small at typical batch sizes, so on a GPU the eager step is bound by the CPU's
kernel launches, not by the kernels. A CUDA graph replays the whole recorded step (forward, Jacobian
rows, loss, backward, optimizer update) with one launch.

What the step function must respect (PyTorch's rules for whole-network capture):

- static shapes: the graph replays for inputs of the captured shapes only; other shapes (a last,
  smaller batch) run eagerly, which is still correct;
- no host synchronisation inside (``float(loss)``, ``.item()``, ``if tensor:``): return the values
  to log as device tensors and read them after the replay;
- gradients that keep their tensors: ``optimizer.zero_grad(set_to_none=False)`` at the start of the
  step, so the captured backward accumulates into the same ``.grad`` tensors that an eager call (a
  smaller last batch) and the optimizer use. The optimizer step itself may stay outside the graph
  (a fused optimizer is a handful of launches, and the learning-rate schedule then needs nothing
  special); inside it needs ``capturable=True`` and a tensor learning rate;
- random numbers come from the default CUDA generator, which advances on every replay.

Other threads: the capture is taken in CUDA's thread-local capture mode
(``torch.cuda.graph(..., capture_error_mode="thread_local")``). In the default global mode a CUDA
call that is unsafe during a capture (``cudaHostAlloc``, ``cudaEventQuery``, ``cudaMalloc``) made by
*any* thread invalidates it: a DataLoader with ``pin_memory=True`` and worker processes runs a
pin-memory thread that pins the next batch while the step is being captured, and that thread then
failed with "operation not permitted when stream is capturing". In thread-local mode only the
capturing thread is held to the rule; the pin-memory thread's calls touch its own pinned host buffers,
never the captured stream, so none of its work belongs in the graph. The device is synchronised
before the capture, so no earlier work (an asynchronous copy of the batch) is still running on it.

Anything that breaks these makes the capture fail; the step then keeps running eagerly and
:attr:`CapturedStep.fallback` says why, in one line.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor

Step = Callable[..., Mapping[str, Tensor]]

#: CUDA's stream-capture mode: only the capturing thread must avoid unsafe calls (see above), so a
#: DataLoader's pin-memory thread cannot break the capture
CAPTURE_ERROR_MODE = "thread_local"


class CapturedStep:
    """``step(*tensors) -> {name: tensor}``, run eagerly for ``warmup`` calls, then captured and replayed.

    ``tensors`` are the step's per-batch inputs (images, labels, cached teacher values); each call
    copies them into the captured buffers. :attr:`calls` counts the calls, :attr:`replays` the graph's
    replays, :attr:`status` and :attr:`failure` say how it runs. The returned tensors are the graph's own outputs,
    overwritten by the next replay: read or clone them before calling again. Eager warm-up calls run
    on a side stream, as capture requires; they are real training steps.
    """

    def __init__(self, step: Step, *, warmup: int = 3, enabled: bool = True) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (cuDNN and the autograd engine must initialise first), got {warmup}")
        self.step = step
        self.warmup = warmup
        self.fallback: str | None = None if enabled else "disabled"
        if enabled and not torch.cuda.is_available():
            self.fallback = "CUDA is not available"
        self.calls = 0
        self.replays = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_in: tuple[Tensor, ...] = ()
        self._static_out: Mapping[str, Tensor] = {}

    @property
    def captured(self) -> bool:
        return self._graph is not None

    @property
    def status(self) -> str:
        """How the step runs: ``"CUDA graph"`` (captured), ``"eager"`` (capture not requested, or still
        warming up) or ``"eager (capture failed: <why>)"``."""
        if self.failure is None:
            return "CUDA graph" if self.captured else "eager"
        return f"eager (capture failed: {self.failure})"

    @property
    def failure(self) -> str | None:
        """Why a requested capture is not used (one line), or ``None``: :attr:`fallback` less ``"disabled"``."""
        return None if self.fallback == "disabled" else self.fallback

    def __call__(self, *tensors: Tensor) -> Mapping[str, Tensor]:
        self.calls += 1
        if self.fallback is not None:
            return self.step(*tensors)
        if self._graph is not None:
            if not self._fits(tensors):
                return self.step(*tensors)  # e.g. the last, smaller batch of an epoch
            for static, value in zip(self._static_in, tensors):
                static.copy_(value, non_blocking=True)
            self._graph.replay()
            self.replays += 1
            return self._static_out
        if self.calls <= self.warmup:
            return self._on_side_stream(tensors)
        return self._capture(tensors)

    def _fits(self, tensors: tuple[Tensor, ...]) -> bool:
        return len(tensors) == len(self._static_in) and all(
            t.shape == s.shape and t.dtype == s.dtype and t.device == s.device for t, s in zip(tensors, self._static_in)
        )

    def _on_side_stream(self, tensors: tuple[Tensor, ...]) -> Mapping[str, Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.step(*tensors)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, tensors: tuple[Tensor, ...]) -> Mapping[str, Tensor]:
        if not all(isinstance(t, Tensor) and t.is_cuda for t in tensors):
            self.fallback = "the step's inputs are not all CUDA tensors"
            return self.step(*tensors)
        static_in = tuple(t.clone() for t in tensors)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        try:
            with torch.cuda.graph(graph, capture_error_mode=CAPTURE_ERROR_MODE):
                static_out = self.step(*static_in)
        except Exception as error:  # any capture failure: keep training eagerly, say why once
            self.fallback = f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
            torch.cuda.synchronize()
            return self.step(*tensors)
        self._graph, self._static_in, self._static_out = graph, static_in, static_out
        graph.replay()  # capture records the step without running it: run it now
        self.replays += 1
        return static_out
