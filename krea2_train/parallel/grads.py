"""Gradient-norm clipping over parameters sharded by FSDP2 and TP.

After :func:`krea2_train.parallel.parallelize.parallelize_dit`, transformer-block parameters are
DTensors on the 2-D (data-parallel, tp) mesh and the other parameters DTensors on the
data-parallel mesh alone. ``torch.nn.utils.get_total_norm`` (which torchtitan's ``clip_grad_norm_``
builds on) reduces over one mesh per call, so the norm is taken per mesh and the per-mesh norms
are combined; parameters that are plain tensors (no parallelism) form one more group.

Clipping scales every gradient by ``min(1, max_norm / norm)``. Scaling them in place reads and
writes every gradient once more; a fused optimizer step (fused AdamW) can do it instead, dividing
each gradient by its ``grad_scale`` tensor as it reads it (the attribute ``torch.amp.GradScaler``
sets on optimizers with ``_step_supports_amp_scaling``). :func:`clip_grad_norm_` hands the clip to
such an optimizer when asked (``into=``), which saves that pass: about two thirds of the 10.8 ms per
step clipping took in the H100 profile of the 2.4 B-parameter bench model (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

__all__ = ["all_ranks_finite", "clip_grad_norm_", "skip_steps_when", "steps_take_grad_scale", "total_grad_norm"]


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
    return _norm_of_groups(_params_by_mesh(parameters), norm_type, parameters[0].device if parameters else None)


def _norm_of_groups(groups: list[list[torch.Tensor]], norm_type: float, device) -> torch.Tensor:
    norms = [_group_norm(group, norm_type) for group in groups]
    if not norms:  # no gradient this step: a zero on the parameters' device (callers stack norms)
        return torch.zeros((), device=device)
    stacked = torch.stack([n.to(norms[0].device) for n in norms])
    if math.isinf(norm_type):
        return stacked.max()
    return stacked.pow(norm_type).sum().pow(1.0 / norm_type)


def steps_take_grad_scale(optimizer: torch.optim.Optimizer) -> bool:
    """True when ``optimizer`` (one, or torchtitan's container of them) divides every gradient by
    its ``grad_scale`` in its step: the fused implementations do, the foreach and per-tensor ones
    do not."""
    inner = getattr(optimizer, "optimizers", [optimizer])
    return len(inner) > 0 and all(getattr(each, "_step_supports_amp_scaling", False) for each in inner)


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    *,
    into: torch.optim.Optimizer | None = None,
) -> torch.Tensor:
    """Clip the gradients so their total norm is at most ``max_norm``; return the norm before clipping.

    Without ``into``, the gradients are scaled in place. With ``into``, an optimizer over exactly
    ``parameters`` whose step takes a grad scale (:func:`steps_take_grad_scale`), the gradients are
    left as they are and the clip rides in its next step: ``into.grad_scale = max(1, norm / max_norm)``.
    Either way the step applies the same update (up to rounding).

    A non-finite norm makes the clipped gradients (or the grad scale) non-finite too: test it with
    :func:`all_ranks_finite` and skip the optimizer step when that is False.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    parameters = list(parameters)
    groups = _params_by_mesh(parameters)
    total_norm = _norm_of_groups(groups, norm_type, parameters[0].device if parameters else None)
    if into is None:
        for group in groups:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total_norm)
        return total_norm
    if not steps_take_grad_scale(into):
        raise ValueError(f"{type(into).__name__} does not take a grad scale in its step (only fused optimizers do)")
    # the 1e-6 and the clamp are torch.nn.utils.clip_grads_with_norm_'s, inverted: a norm under max_norm is not scaled
    grad_scale = torch.clamp((total_norm + 1e-6) / max_norm, min=1.0)
    for optimizer in getattr(into, "optimizers", [into]):
        optimizer.grad_scale = grad_scale
    return total_norm


def skip_steps_when(optimizer: torch.optim.Optimizer, skip: torch.Tensor | None) -> None:
    """Have ``optimizer``'s next steps skip their update on the device when ``skip`` (a 0-dim
    float tensor, 1 to skip) is set: the fused implementations read it as ``found_inf`` (what
    ``torch.amp.GradScaler`` sets), leaving weights, moments and step counts as they were, with no
    read on the host. None clears it. Only for optimizers whose step takes a grad scale
    (:func:`steps_take_grad_scale`)."""
    if not steps_take_grad_scale(optimizer):
        raise ValueError(f"{type(optimizer).__name__} cannot skip a step on the device (only fused optimizers can)")
    for each in getattr(optimizer, "optimizers", [optimizer]):
        each.found_inf = skip


def all_ranks_finite(value: torch.Tensor) -> bool:
    """True when every element of ``value`` is finite on every rank (one all-reduce when distributed)."""
    nonfinite = (~torch.isfinite(value)).any().to(torch.float32).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(nonfinite, op=dist.ReduceOp.MAX)
    return nonfinite.item() == 0
