"""Stochastic sampling steps with log-probabilities: the policy of flow GRPO (Flow-GRPO, no CFG).

Convention (``krea2_train.flow.timesteps``): ``x_t = (1 - t) x0 + t eps``, the model predicts the
velocity ``v = eps - x0`` and sampling runs ``t`` from 1 (noise) to 0 (data). One step goes from
``t`` to ``t' < t``; ``dt = t - t' > 0``.

The reverse-time SDE that keeps the flow's marginals turns each Euler step into a Gaussian policy
``p(x_t' | x_t) = N(mean, std^2 I)``:

``sde`` (Flow-GRPO, arXiv 2505.05470)::

    sigma_t = a sqrt(t / (1 - t))                      (t = 1 uses t_cap in the denominator)
    mean    = x_t - dt [v + sigma_t^2 / (2 t) (x_t + (1 - t) v)]
            = x_t + dt [-v + sigma_t^2 / 2 * score],   score = -(x_t + (1 - t) v) / t
    std     = sigma_t sqrt(dt)
    log p   = mean over dims of log N(x_t'; mean, std^2)

``cps`` (coefficient-preserving sampling, arXiv 2509.05952)::

    std     = t' sin(a pi / 2)
    mean    = (1 - t') x0_hat + sqrt(t'^2 - std^2) eps_hat,  x0_hat = x_t - t v,  eps_hat = x_t + (1 - t) v
    log p   = -mean over dims (x_t' - mean)^2              (flow_grpo's CPS log-prob: constants and
                                                           the 1 / (2 std^2) factor dropped)

The log-probabilities are per-dimension MEANS, not sums (flow_grpo's scale): the importance ratio
``exp(logp_new - logp_old)`` is the geometric mean of the per-dimension ratios, which is why
clip ranges like 1e-4 make sense. ``a = 0`` makes ``sde`` the deterministic Euler ODE step.

The KL penalty between the policy and a reference at one step (same std, different means) is
the closed-form Gaussian KL ``mean over dims (mean_p - mean_q)^2 / (2 s^2)``, with ``s`` as
Flow-GRPO's training loop has it (:func:`policy_kl`): the diffusion coefficient ``sigma_t`` for
``sde`` (not the step's ``std = sigma_t sqrt(dt)``: that exact KL is ``1 / dt`` times larger, 10-25x
on a 10-step grid, and its weight would change from step to step), the step's ``std`` for ``cps``.
Flow-GRPO's ``beta_kl`` values are calibrated on this scale.

A rollout (:func:`rollout`) integrates from noise to data over the sampler's grid
(:func:`~krea2_train.flow.timesteps.inference_sigmas`), taking SDE steps only at the chosen step
indices (Flow-GRPO-Fast / MixGRPO: a window of SDE steps, ODE elsewhere) and recording, for each
SDE step ``j``, ``(x_j, x_{j+1}, t_j, t_{j+1}, log p_old)``: what training needs to recompute the
policy's log-probability of the same transition.

Everything here runs in float32 (flow_grpo casts for the same reason: bf16 overflows in the mean).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from krea2_train.flow.timesteps import broadcast_times

SDE_TYPES = ("sde", "cps")

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``velocity(x [B, ...] float32, t 0-d float32) -> v [B, ...]``."""

Noise = torch.Generator | Sequence[torch.Generator]
"""One generator for the whole batch, or one per sample (keyed per global-batch slot)."""


def check_sde_type(sde_type: str) -> None:
    if sde_type not in SDE_TYPES:
        raise ValueError(f"unknown sde type {sde_type!r}; expected one of {SDE_TYPES}")


def sde_sigma(t: torch.Tensor, noise_level: float, t_cap: float) -> torch.Tensor:
    """Flow-GRPO's diffusion coefficient ``sigma_t = a sqrt(t / (1 - t))``.

    ``t = 1`` would divide by zero: there the denominator uses ``t_cap`` (the grid's second time,
    ``sigmas[1]``, as flow_grpo does). ``t`` any shape; returns the same shape, float32.
    """
    t = t.float()
    denominator = 1 - torch.where(t >= 1, torch.full_like(t, t_cap), t)
    return noise_level * torch.sqrt(t / denominator)


def sde_step_mean_std(
    velocity: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor | float,
    t_next: torch.Tensor | float,
    *,
    noise_level: float,
    sde_type: str = "sde",
    t_cap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[B, ...]`` and standard deviation (broadcastable: 0-d or ``[B, 1, ...]``) of one step.

    Args:
        velocity: the model's ``v`` at ``(x_t, t)``, ``[B, ...]`` (any float dtype; cast to float32).
        x_t: current state ``[B, ...]``.
        t, t_next: current and next time (0-d or ``[B]``), ``t_next < t``.
        noise_level: ``a``.
        sde_type: ``"sde"`` or ``"cps"`` (see the module docstring).
        t_cap: stands in for ``t`` in ``sigma_t``'s denominator where ``t = 1`` (``sde`` only).
    """
    check_sde_type(sde_type)
    v, x = velocity.float(), x_t.float()
    t, t_next = broadcast_times(t, x), broadcast_times(t_next, x)
    if sde_type == "sde":
        dt = t - t_next
        sigma = sde_sigma(t, noise_level, t_cap)
        mean = x - dt * (v + sigma.square() / (2 * t) * (x + (1 - t) * v))
        return mean, sigma * dt.sqrt()
    x0_hat, eps_hat = x - t * v, x + (1 - t) * v
    std = t_next * math.sin(noise_level * math.pi / 2)
    mean = (1 - t_next) * x0_hat + (t_next.square() - std.square()).clamp_min(0).sqrt() * eps_hat
    return mean, std


def mean_gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-dimension mean of ``log N(x; mean, std^2)``: ``[B, ...] -> [B]`` float32."""
    std = torch.as_tensor(std, dtype=torch.float32)
    log_density = -(x.float() - mean.float()).square() / (2 * std.square()) - std.log() - 0.5 * math.log(2 * math.pi)
    return log_density.expand_as(x).reshape(x.shape[0], -1).mean(dim=1)


def step_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, sde_type: str = "sde") -> torch.Tensor:
    """The policy's per-dimension-mean log-probability of ``x_next`` ``[B, ...]`` -> ``[B]``.

    ``sde``: the Gaussian log-density; ``cps``: flow_grpo's ``-mean (x_next - mean)^2``.
    """
    check_sde_type(sde_type)
    if sde_type == "sde":
        return mean_gaussian_log_prob(x_next, mean, std)
    return -(x_next.float() - mean.float()).square().reshape(x_next.shape[0], -1).mean(dim=1)


def gaussian_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-dimension mean of ``KL(N(mean_p, std^2) || N(mean_q, std^2))``: ``[B, ...] -> [B]``."""
    std = torch.as_tensor(std, dtype=torch.float32)
    kl = (mean_p.float() - mean_q.float()).square() / (2 * std.square())
    return kl.expand_as(mean_p).reshape(mean_p.shape[0], -1).mean(dim=1)


def policy_kl(
    mean_p: torch.Tensor,
    mean_q: torch.Tensor,
    std: torch.Tensor,
    t: torch.Tensor | float,
    t_next: torch.Tensor | float,
    sde_type: str = "sde",
) -> torch.Tensor:
    """The per-step KL penalty of GRPO (module docstring): ``[B, ...] -> [B]``.

    Args:
        mean_p, mean_q: the policy's and the reference's step means ``[B, ...]``.
        std: the step's std from :func:`sde_step_mean_std` (broadcastable).
        t, t_next: the step's times (0-d or ``[B]``).
    """
    check_sde_type(sde_type)
    if sde_type == "sde":  # sigma_t = std / sqrt(dt)
        x = mean_p.float()
        std = torch.as_tensor(std, dtype=torch.float32) / (broadcast_times(t, x) - broadcast_times(t_next, x)).sqrt()
    return gaussian_kl(mean_p, mean_q, std)


def ode_step(velocity: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | float, t_next: torch.Tensor | float) -> torch.Tensor:
    """Euler step ``x_t' = x_t + (t' - t) v`` in float32."""
    x = x_t.float()
    return x + (broadcast_times(t_next, x) - broadcast_times(t, x)) * velocity.float()


def draw_normal(shape: torch.Size | tuple[int, ...], noise: Noise, device: torch.device | str | None = None) -> torch.Tensor:
    """Standard normal ``[B, ...]`` float32: from one generator, or one row per generator (drawn on
    the host, in a fixed order, so a keyed generator gives the same numbers on any device)."""
    if isinstance(noise, torch.Generator):
        return torch.randn(shape, generator=noise, dtype=torch.float32).to(device)
    if len(noise) != shape[0]:
        raise ValueError(f"{len(noise)} generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in noise]).to(device)


@dataclass
class StepOutcome:
    """One SDE step: the sample, its log-probability ``[B]``, the policy's mean and std."""

    x_next: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def sde_step(
    velocity: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor | float,
    t_next: torch.Tensor | float,
    z: torch.Tensor,
    *,
    noise_level: float,
    sde_type: str = "sde",
    t_cap: float = 0.0,
) -> StepOutcome:
    """Sample ``x_t' = mean + std z`` (``z`` standard normal, ``[B, ...]``) and score it."""
    mean, std = sde_step_mean_std(velocity, x_t, t, t_next, noise_level=noise_level, sde_type=sde_type, t_cap=t_cap)
    x_next = mean + std * z.float()
    return StepOutcome(x_next, step_log_prob(x_next, mean, std, sde_type), mean, std)


@dataclass
class TrainedStep:
    """The record of one SDE step of a rollout: ``x_j -> x_{j+1}`` at times ``t_j > t_{j+1}``."""

    index: int
    x: torch.Tensor  # [B, ...] float32
    x_next: torch.Tensor  # [B, ...] float32
    t: torch.Tensor  # 0-d float32
    t_next: torch.Tensor  # 0-d float32
    log_prob: torch.Tensor  # [B] float32: log p_old of the transition


@dataclass
class Rollout:
    """A finished rollout: the final sample ``[B, ...]`` and the records of its SDE steps."""

    final: torch.Tensor
    steps: list[TrainedStep]
    t_cap: float


def sde_window(num_steps: int, window_size: int, window_range: tuple[int, int], u: float) -> list[int]:
    """The step indices of an SDE window (Flow-GRPO-Fast): ``window_size`` consecutive steps
    starting at a step drawn uniformly (by ``u`` in [0, 1)) from ``[window_range[0], window_range[1]]``.

    ``window_size = 0`` means every step but the last one. No window reaches the last step (the
    step to ``t = 0``): its noise would stay in the scored sample (``sde``; no later step removes
    it) or have zero std (``cps``).
    """
    if window_size == 0:
        return list(range(num_steps - 1)) if num_steps > 1 else [0]
    low, high = window_range
    if not (0 <= low <= high and high + window_size <= num_steps - 1):
        raise ValueError(
            f"SDE window of {window_size} steps starting in [{low}, {high}] does not fit in the first {num_steps - 1} "
            f"of {num_steps} steps (the last step, to t = 0, is never stochastic)"
        )
    start = low + min(int(u * (high - low + 1)), high - low)
    return list(range(start, start + window_size))


@torch.no_grad()
def rollout(
    velocity: Velocity,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    sde_steps: Sequence[int],
    step_noise: Noise,
    *,
    noise_level: float,
    sde_type: str = "sde",
) -> Rollout:
    """Integrate from ``noise`` (``t = sigmas[0] = 1``) to ``t = 0``.

    Step ``i`` goes from ``sigmas[i]`` to ``sigmas[i + 1]``: an SDE step (recorded) when ``i`` is in
    ``sde_steps``, an Euler ODE step otherwise. The SDE noise of each step is drawn from
    ``step_noise`` in step order, so keyed generators reproduce a rollout exactly.

    Args:
        velocity: ``velocity(x [B, ...] float32, t 0-d float32) -> v``.
        noise: ``[B, ...]`` initial state.
        sigmas: ``[num_steps + 1]`` decreasing times, ``sigmas[0] = 1``, ``sigmas[-1] = 0``.
        sde_steps: indices of the stochastic (trained) steps.
        step_noise: generator(s) for the SDE noise (see :func:`draw_normal`).
        noise_level, sde_type: the SDE (module docstring).
    """
    check_sde_type(sde_type)
    sigmas = sigmas.float()
    num_steps = sigmas.shape[0] - 1
    if any(not 0 <= i < num_steps for i in sde_steps):
        raise ValueError(f"sde_steps {list(sde_steps)} must lie in [0, {num_steps})")
    t_cap = float(sigmas[1]) if num_steps > 1 else 0.0
    chosen = set(sde_steps)
    x = noise.float()
    records = []
    for i in range(num_steps):
        t, t_next = sigmas[i], sigmas[i + 1]
        v = velocity(x, t)
        if i not in chosen:
            x = ode_step(v, x, t, t_next)
            continue
        z = draw_normal(x.shape, step_noise, x.device)
        outcome = sde_step(v, x, t, t_next, z, noise_level=noise_level, sde_type=sde_type, t_cap=t_cap)
        records.append(TrainedStep(i, x, outcome.x_next, t, t_next, outcome.log_prob))
        x = outcome.x_next
    return Rollout(x, records, t_cap)
