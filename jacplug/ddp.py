"""What a distillation step needs in a multi-process ``DistributedDataParallel`` run, beyond DDP itself.

DDP averages the gradients of the module it wraps, and waits for every one of its parameters: a loss term's
adapters (a FitNet's regressor) outside a wrapped student need their own broadcast and averaging, and a
loss that misses some parameter (a Jacobian-only loss never reaches the classifier's bias) must still reach
it. In one process each function here is a no-op.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn


def world_size() -> int:
    """The processes of the run (1 without an initialised process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast_state(module: nn.Module) -> None:
    """Every rank starts from rank 0's parameters and buffers, as DDP does for the module it wraps."""
    for tensor in module.state_dict().values():
        dist.broadcast(tensor, src=0)


def reach_every_parameter(total: Tensor, parameters: Callable[[], Sequence[Tensor]]) -> Tensor:
    """``total``, plus ``0 * p[0]`` for every parameter in a multi-process run: the same value and
    gradients, but every parameter is reached.

    Why: DDP all-reduces gradients in buckets and waits for every parameter's gradient; a loss whose terms
    miss some parameters would leave a bucket unreduced. One element per parameter (not ``p.sum()``, whose
    gradient is an expanded, zero-stride tensor that does not fit DDP's bucket layout). ``parameters`` is
    called only then."""
    if world_size() == 1:
        return total
    return total + 0.0 * torch.stack([p.reshape(-1)[0] for p in parameters()]).sum()


def average_gradients(parameters: Sequence[Tensor]) -> None:
    """Average ``parameters``' gradients over the ranks (a missing gradient counts as zero), in one
    all-reduce; each ``.grad`` keeps its tensor (a CUDA graph holds it)."""
    world = world_size()
    if world == 1 or not parameters:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in parameters])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in parameters:
        mean = flat[offset: offset + p.numel()].view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = mean.clone()
        else:
            p.grad.copy_(mean)
        offset += p.numel()
