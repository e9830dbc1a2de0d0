"""The PyTorch calls that changed between the oldest supported torch (2.3, see pyproject.toml; 2.2 and
2.3 share the older signatures) and this one answer the same through jacplug's version-safe helpers
when only the older signatures exist (simulated here)."""

from __future__ import annotations

import types

import pytest
import torch

from jacplug.engine.backward_pass import autocast_dtype, is_vmapped


def seen_in_backward(batched: bool) -> list[bool]:
    """``is_vmapped`` of the gradient a custom Function's backward receives."""
    seen: list[bool] = []

    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, grad):
            seen.append(is_vmapped(grad))
            return 2 * grad

    x = torch.randn(3, requires_grad=True)
    y = Double.apply(x)
    if batched:
        torch.autograd.grad(y, x, torch.eye(3), is_grads_batched=True)
    else:
        torch.autograd.grad(y, x, torch.ones(3))
    return seen


@pytest.mark.parametrize("old", [False, True], ids=["this torch", "torch 2.2 (no is_legacy_batchedtensor)"])
def test_is_vmapped_tells_batched_gradients_with_either_api(monkeypatch, old):
    if old:
        functorch = torch._C._functorch
        monkeypatch.setattr(torch._C, "_functorch", types.SimpleNamespace(is_batchedtensor=functorch.is_batchedtensor))
    assert seen_in_backward(batched=True) == [True]
    assert seen_in_backward(batched=False) == [False]  # the fast path stays on where nothing is vmapped


def test_is_vmapped_is_true_where_torch_cannot_answer(monkeypatch):
    monkeypatch.setattr(torch._C, "_functorch", types.SimpleNamespace())
    assert is_vmapped(torch.ones(2))  # the safe answer: PyTorch's own derivative


def test_autocast_dtype_with_the_old_per_device_functions(monkeypatch):
    enabled = torch.is_autocast_enabled

    def no_device_argument():  # torch 2.2: CUDA's state only, no device argument
        try:
            return enabled("cuda")
        except TypeError:  # running on torch 2.2 itself
            return enabled()

    def answers(old: bool) -> tuple:
        with monkeypatch.context() as patch:
            if old:  # torch's own autocast context calls the new API: patch only around the helper
                patch.delattr(torch, "get_autocast_dtype", raising=False)
                patch.setattr(torch, "is_autocast_enabled", no_device_argument)
            return autocast_dtype("cpu"), autocast_dtype("cuda"), autocast_dtype("mps")

    for old in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = answers(old)
        assert inside == (torch.bfloat16, None, None), old
        assert answers(old) == (None, None, None), old
