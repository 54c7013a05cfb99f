"""Small collective helpers that are no-ops in a single process.

Statistics that are pooled over "the batch" are pooled over the GLOBAL batch: sums and
counts from every process are added with an all-reduce that carries gradients
(``torch.distributed.nn.functional.all_reduce``), so a loss built from them has the same
value on every process and the same gradient as one process holding the whole batch.
Why that is exact under DDP: the all-reduce's backward sums the upstream gradients of
all P processes (P times the gradient of the shared value), and DDP then averages the
parameter gradients over the P processes, which divides the factor P out again.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _AllReduceSum(torch.autograd.Function):
    """Fallback with the same semantics as torch.distributed.nn.functional.all_reduce(SUM)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _AllReduceSum.apply(grad)


def all_reduce_sum(tensor: torch.Tensor, *, grad: bool = True) -> torch.Tensor:
    """Sum over processes; with ``grad`` the result stays in the autograd graph."""
    if not is_distributed():
        return tensor
    if not grad or not tensor.requires_grad:
        out = tensor.detach().clone()
        dist.all_reduce(out)
        return out
    try:
        from torch.distributed.nn.functional import all_reduce as nn_all_reduce
    except ImportError:  # pragma: no cover - removed in some future torch
        return _AllReduceSum.apply(tensor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of functional collectives
        return nn_all_reduce(tensor)


def is_sharded(accelerator: Any) -> bool:
    """DeepSpeed or FSDP: parameters (and optimizer states) are sharded over the processes."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def is_deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED
