"""Gradient-norm clipping over parameters sharded by FSDP2 and TP.

After :func:`krea2_train.parallel.parallelize.parallelize_dit`, transformer-block parameters are
DTensors on the 2-D (data-parallel, tp) mesh and the other parameters DTensors on the
data-parallel mesh alone. ``torch.nn.utils.get_total_norm`` (which torchtitan's ``clip_grad_norm_``
builds on) reduces over one mesh per call, so the norm is taken per mesh and the per-mesh norms
are combined; parameters that are plain tensors (no parallelism) form one more group.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

__all__ = ["all_ranks_finite", "clip_grad_norm_", "total_grad_norm"]


def _params_by_mesh(parameters: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Parameters that have a gradient, grouped by the device mesh of the gradient (None: plain)."""
    groups: dict[object, list[torch.Tensor]] = {}
    for param in parameters:
        if param.grad is not None:
            mesh = param.grad.device_mesh if isinstance(param.grad, DTensor) else None
            groups.setdefault(mesh, []).append(param)
    return list(groups.values())


def _group_norm(params: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=norm_type)
    return (norm.full_tensor() if isinstance(norm, DTensor) else norm).float()


@torch.no_grad()
def total_grad_norm(parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The ``norm_type``-norm of all gradients as one vector: a plain 0-d fp32 tensor, equal on every rank."""
    parameters = list(parameters)
    norms = [_group_norm(group, norm_type) for group in _params_by_mesh(parameters)]
    if not norms:  # no gradient this step: a zero on the parameters' device (callers stack norms)
        return torch.zeros((), device=parameters[0].device if parameters else None)
    stacked = torch.stack([n.to(norms[0].device) for n in norms])
    if math.isinf(norm_type):
        return stacked.max()
    return stacked.pow(norm_type).sum().pow(1.0 / norm_type)


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Scale gradients in place so their total norm is at most ``max_norm``; return the norm before clipping.

    A non-finite norm turns the gradients non-finite too: test it with :func:`all_ranks_finite` and
    skip the optimizer step when that is False.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    parameters = list(parameters)
    groups = _params_by_mesh(parameters)
    total_norm = total_grad_norm(parameters, norm_type)
    for group in groups:
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total_norm)
    return total_norm


def all_ranks_finite(value: torch.Tensor) -> bool:
    """True when every element of ``value`` is finite on every rank (one all-reduce when distributed)."""
    nonfinite = (~torch.isfinite(value)).any().to(torch.float32).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(nonfinite, op=dist.ReduceOp.MAX)
    return nonfinite.item() == 0
