"""CapturedStep: on a CPU it falls back to eager execution and says why, and its capture is requested in
thread-local mode; `--cuda-graphs on` without CUDA is a one-line error. On CUDA (benchmarks/gpu_check.sh) a
capture beside a pinning DataLoader succeeds; the rest of the GPU behaviour is tested in test_cuda.py."""

from __future__ import annotations

import pytest
import torch

from jacplug import CapturedStep


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine test_cuda.py covers CapturedStep")
def test_cpu_inputs_fall_back_to_eager_steps_with_the_reason():
    calls = []

    def step(x):
        calls.append(x.clone())
        return {"loss": x.sum()}

    captured = CapturedStep(step, warmup=1)
    for i in range(3):
        assert float(captured(torch.full((2,), float(i)))["loss"]) == 2 * i
    assert captured.fallback == "CUDA is not available" and not captured.captured and len(calls) == 3
    assert captured.failure == "CUDA is not available" and captured.status == "eager (capture failed: CUDA is not available)"
    disabled = CapturedStep(step, enabled=False)
    assert disabled.fallback == "disabled" and disabled.failure is None and disabled.status == "eager"


def test_the_distillers_capture_read_outs_are_its_captured_steps():
    """``distiller.captured_step`` is the one object behind the step; the summary's and the loop's read-outs
    (``capture_status``, ``capture_fallback``, ``steps_run``) are its own."""
    from torch import nn

    from jacplug import Distiller

    torch.manual_seed(0)
    distiller = Distiller(nn.Linear(3, 2), nn.Linear(3, 2), ["kd=1"], capture=True)
    assert distiller.captured_step is None and distiller.capture_status == "eager" and distiller.steps_run == 0
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.1)
    for _ in range(2):
        distiller.step(optimizer, torch.randn(4, 3))
    step = distiller.captured_step
    assert isinstance(step, CapturedStep) and step.calls == distiller.steps_run == 2
    assert step.fallback == "disabled"  # CPU inputs: capture is not attempted, which is no failure
    assert distiller.capture_status == step.status == "eager" and distiller.capture_fallback is step.failure is None


def test_cuda_graphs_on_without_cuda_is_a_one_line_error(tmp_path, capsys):
    from jacplug.cli.main import main

    code = main(["train", "--device", "cpu", "--cuda-graphs", "on", "--out", str(tmp_path / "run"),
                 "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "--cuda-graphs on: the run is not on CUDA" in err and err.count("\n") == 1


def test_bad_cuda_graphs_value_in_a_config_file_is_named(tmp_path):
    from jacplug.errors import UserError
    from jacplug.training.config import read_config_file, resolve

    path = tmp_path / "run.yaml"
    path.write_text("cuda-graphs: sometimes\n")
    with pytest.raises(UserError, match="option 'cuda-graphs' has 'sometimes', not one of auto, on, off"):
        resolve(read_config_file(path), {})


class _OnCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA, so CapturedStep reaches its capture without a GPU."""

    @property
    def is_cuda(self) -> bool:
        return True


class _Stream:
    def wait_stream(self, other) -> None:
        pass


class _Graph:
    """Records what ``torch.cuda.graph`` is asked for; a replay re-runs the recorded step."""

    def __init__(self) -> None:
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1


def test_the_capture_is_taken_in_thread_local_mode_so_other_threads_cannot_break_it(monkeypatch):
    """In CUDA's default global capture mode, a DataLoader's pin-memory thread pinning the next batch
    during the capture fails ("operation not permitted when stream is capturing"); thread-local mode
    restricts only the capturing thread. torch.cuda's calls are replaced by recorders here (no GPU)."""
    import contextlib

    requested, inside = [], []
    capturing = [False]

    @contextlib.contextmanager
    def graph(cuda_graph, **kwargs):
        requested.append(kwargs)
        capturing[0] = True
        yield
        capturing[0] = False

    syncs = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", _Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: syncs.append(capturing[0]))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)

    def step(x):
        inside.append(capturing[0])
        return {"loss": x.sum()}

    captured = CapturedStep(step, warmup=1)
    batch = torch.ones(2).as_subclass(_OnCuda)
    captured(batch)  # warm-up, eager
    captured(batch)  # the capture
    assert captured.fallback is None and captured.captured, captured.fallback
    assert requested == [{"capture_error_mode": "thread_local"}]
    assert inside == [False, True]  # the step ran once eagerly, then once under the capture
    assert syncs == [False]  # the device is synchronised before the capture, not during it
    captured(batch)
    assert captured.replays == 2 and len(inside) == 2  # replayed, not re-run


class _SlowImages(torch.utils.data.Dataset):
    """Batches that keep arriving from the workers, so the pin-memory thread pins while the step is captured."""

    def __len__(self) -> int:
        return 512

    def __getitem__(self, i: int):
        import time

        time.sleep(0.002)
        return torch.randn(64), i % 4


@pytest.mark.subprocess
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by benchmarks/gpu_check.sh)")
def test_a_capture_beside_a_pinning_data_loader_succeeds_on_cuda():
    """A DataLoader with worker processes and pinned memory pins each batch in a thread of this process;
    in CUDA's global capture mode that thread's calls failed the capture."""
    model = torch.nn.Linear(64, 4).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(x, y):
        optimizer.zero_grad(set_to_none=False)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return {"loss": loss.detach()}

    captured = CapturedStep(step, warmup=1)
    loader = torch.utils.data.DataLoader(_SlowImages(), batch_size=8, num_workers=2, pin_memory=True)
    for x, y in loader:
        captured(x.cuda(non_blocking=True), y.cuda(non_blocking=True))
        optimizer.step()
    torch.cuda.synchronize()
    assert captured.fallback is None and captured.captured and captured.replays == len(loader) - 1
