"""CapturedStep without a GPU: it must fall back to eager execution and say why; `--cuda-graphs on`
without CUDA is a one-line error. The GPU behaviour is tested in test_cuda.py."""

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
    assert CapturedStep(step, enabled=False).fallback == "disabled"


def test_cuda_graphs_on_without_cuda_is_a_one_line_error(tmp_path, capsys):
    from jacplug.cli.main import main

    code = main(["train", "--device", "cpu", "--cuda-graphs", "on", "--out", str(tmp_path / "run"),
                 "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "--cuda-graphs on: the run is not on CUDA" in err and err.count("\n") == 1


def test_bad_cuda_graphs_value_in_a_config_file_is_named(tmp_path):
    from jacplug.errors import UserError
    from jacplug.pipeline.config import read_config_file, resolve

    path = tmp_path / "run.yaml"
    path.write_text("cuda-graphs: sometimes\n")
    with pytest.raises(UserError, match="option 'cuda-graphs' has 'sometimes', not one of auto, on, off"):
        resolve(read_config_file(path), {})
