"""Group-relative advantages (GRPO) from one or several rewards.

A batch of ``B = P * G`` rewards holds ``P`` prompts, each sampled ``G`` times (its group),
group-major: sample ``i`` belongs to group ``i // G``.

Group advantage (flow_grpo's ``PerPromptStatTracker`` with ``global_std=True``, its default)::

    A_i = (r_i - mean_{group(i)} r) / (std_batch r + eps),     eps = 1e-4

``std_batch`` is the population std over the whole global batch: every rank's rewards, all-reduced
when ``torch.distributed`` is initialised (a group lives on one rank; the std does not). With
``std_scope="group"`` (DanceGRPO / MixGRPO) the std is the group's own.

Several rewards ``r_k`` with weights ``w_k``:

- ``reward_aggr`` (flow_grpo ``multi_score``): ``A = advantage(sum_k w_k r_k)``. A reward with a
  larger scale dominates.
- ``advantage_aggr`` (MixGRPO, GDPO): ``A = sum_k w_k advantage(r_k)``: each reward normalised on
  its own first, so rescaling one reward does not change the balance.

Groups whose rewards are all equal (every reward, for ``advantage_aggr``) carry no signal: their
advantages are 0 and they are masked out of the policy loss; ``zero_std_ratio`` is their share.
Advantages are finally clipped to ``[-adv_clip_max, adv_clip_max]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

AGGREGATIONS = ("reward_aggr", "advantage_aggr")
STD_SCOPES = ("global", "group")
DEFAULT_EPS = 1e-4
ZERO_STD_TOLERANCE = 1e-6  # a group whose reward std is at most this is "constant"


def _groups(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[B] -> [P, G]`` (group-major)."""
    if values.ndim != 1:
        raise ValueError(f"rewards must be [B], got shape {tuple(values.shape)}")
    if group_size < 1 or values.shape[0] % group_size:
        raise ValueError(f"a batch of {values.shape[0]} rewards does not split into groups of {group_size}")
    return values.reshape(-1, group_size)


def _use_all_reduce(all_reduce: bool | None) -> bool:
    return (dist.is_available() and dist.is_initialized()) if all_reduce is None else all_reduce


def batch_std(values: torch.Tensor, all_reduce: bool | None = None) -> torch.Tensor:
    """Population std (0-d, float64) of ``values`` ``[B]`` over the global batch.

    With ``all_reduce`` (default: when torch.distributed is initialised) the mean and the squared
    deviations are summed over every rank (two all-reduces, exact two-pass variance).
    """
    values = values.double()
    totals = torch.stack([values.sum(), values.new_tensor(float(values.numel()))])
    reduce = _use_all_reduce(all_reduce)
    if reduce:
        dist.all_reduce(totals)
    mean = totals[0] / totals[1]
    squares = (values - mean).square().sum()
    if reduce:
        dist.all_reduce(squares)
    return (squares / totals[1]).sqrt()


def zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[P]`` bool: the groups whose rewards are all (numerically) equal."""
    return _groups(rewards.double(), group_size).std(dim=1, unbiased=False) <= ZERO_STD_TOLERANCE


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    std_scope: str = "global",
    eps: float = DEFAULT_EPS,
    all_reduce: bool | None = None,
) -> torch.Tensor:
    """``(r_i - mean_group) / (std + eps)`` for ``rewards`` ``[B]`` -> ``[B]`` float32 (see the
    module docstring; ``std_scope`` "global" (batch, all-reduced) or "group")."""
    if std_scope not in STD_SCOPES:
        raise ValueError(f"std_scope must be one of {STD_SCOPES}, got {std_scope!r}")
    grouped = _groups(rewards.double(), group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if std_scope == "global":
        std = batch_std(rewards, all_reduce)
    else:
        std = grouped.std(dim=1, unbiased=False, keepdim=True)
    return (centred / (std + eps)).reshape(-1).float()


def _check_weights(rewards: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> None:
    if not rewards:
        raise ValueError("no rewards to aggregate")
    missing = sorted(set(rewards) - set(weights))
    if missing:
        raise ValueError(f"no weight for rewards {missing}")


def weighted_total(rewards: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """``sum_k w_k r_k`` ``[B]`` float64."""
    _check_weights(rewards, weights)
    return sum(weights[name] * value.double() for name, value in rewards.items())


def reward_aggr(
    rewards: Mapping[str, torch.Tensor], weights: Mapping[str, float], group_size: int, **options
) -> torch.Tensor:
    """Advantages of the weighted sum of the rewards ``[B]``."""
    return group_advantages(weighted_total(rewards, weights), group_size, **options)


def advantage_aggr(
    rewards: Mapping[str, torch.Tensor], weights: Mapping[str, float], group_size: int, **options
) -> torch.Tensor:
    """Weighted sum of each reward's own group advantages ``[B]``."""
    _check_weights(rewards, weights)
    return sum(weights[name] * group_advantages(value, group_size, **options) for name, value in rewards.items())


@dataclass
class AdvantageResult:
    """advantages ``[B]`` (clipped, 0 in masked groups), ``valid [B]`` bool (not in a constant
    group), ``zero_std_ratio`` 0-d (this rank's share of constant groups), ``total [B]`` (the
    weighted reward sum)."""

    advantages: torch.Tensor
    valid: torch.Tensor
    zero_std_ratio: torch.Tensor
    total: torch.Tensor


def aggregate_advantages(
    rewards: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
    group_size: int,
    *,
    aggregation: str = "advantage_aggr",
    adv_clip_max: float | None = 5.0,
    std_scope: str = "global",
    eps: float = DEFAULT_EPS,
    all_reduce: bool | None = None,
) -> AdvantageResult:
    """Advantages of several rewards (``aggregation`` in AGGREGATIONS), clipped and masked."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    options = dict(std_scope=std_scope, eps=eps, all_reduce=all_reduce)
    combine = reward_aggr if aggregation == "reward_aggr" else advantage_aggr
    advantages = combine(rewards, weights, group_size, **options)
    total = weighted_total(rewards, weights)
    if aggregation == "reward_aggr":
        constant = zero_std_groups(total, group_size)
    else:
        constant = torch.stack([zero_std_groups(value, group_size) for value in rewards.values()]).all(dim=0)
    valid = (~constant).repeat_interleave(group_size)
    if adv_clip_max is not None:
        advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    advantages = torch.where(valid, advantages, torch.zeros_like(advantages))
    return AdvantageResult(advantages, valid, constant.float().mean(), total)
