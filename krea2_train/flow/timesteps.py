"""Flow-matching time: the shift, inference grids, training-time sampling, interpolation and loss.

This module is the one place where the flow-matching formulas live. Conventions (DESIGN.md §2):

- ``t = 1`` is pure noise, ``t = 0`` is data; ``x_t = (1 - t) x0 + t eps``.
- The network predicts the velocity ``v = d x_t / d t = eps - x0``; sampling runs ``t`` from 1 to 0.
- Resolution-aware shift ``t' = e^mu / (e^mu + (1/t - 1))`` with ``mu`` linear in the number of image
  tokens: 0.5 at 256 tokens, 1.15 at 6400 tokens. ``mu = 0`` is the identity; a larger ``mu`` moves
  time toward the noise end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

# Krea 2's resolution-aware shift: mu = BASE_SHIFT at BASE_TOKENS image tokens, MAX_SHIFT at MAX_TOKENS.
BASE_TOKENS = 256
MAX_TOKENS = 6400
BASE_SHIFT = 0.5
MAX_SHIFT = 1.15

# Training times are kept this far inside (0, 1) so that neither endpoint is ever drawn exactly.
TRAINING_TIME_MARGIN = 1e-6


def shift_time(t: torch.Tensor | float, mu: torch.Tensor | float) -> torch.Tensor:
    """Resolution-aware time shift ``t' = e^mu / (e^mu + (1/t - 1))``; maps 0 to 0 and 1 to 1.

    Evaluated in ``t``'s dtype in the same order of operations as diffusers' exponential shift, so
    float32 grids agree with its scheduler bit for bit.

    Args:
        t: times in ``[0, 1]``, any shape (a Python float becomes a 0-d tensor).
        mu: shift, a float or a tensor broadcastable against ``t``.
    Returns:
        shifted times, shape of ``t`` broadcast with ``mu``.
    """
    t = torch.as_tensor(t)
    scale = mu.exp() if isinstance(mu, torch.Tensor) else math.exp(mu)
    scale = torch.as_tensor(scale, dtype=t.dtype, device=t.device)
    return scale / (scale + (1 / t - 1))


def mu_for_tokens(
    num_image_tokens: int,
    base_tokens: int = BASE_TOKENS,
    max_tokens: int = MAX_TOKENS,
    base_shift: float = BASE_SHIFT,
    max_shift: float = MAX_SHIFT,
) -> float:
    """Shift ``mu`` for an image of ``num_image_tokens`` DiT tokens.

    Linear in the token count through ``(base_tokens, base_shift)`` and ``(max_tokens, max_shift)``,
    extrapolated outside that range (as diffusers' ``calculate_shift``).
    """
    if num_image_tokens <= 0:
        raise ValueError(f"num_image_tokens must be positive, got {num_image_tokens}")
    if max_tokens == base_tokens:
        raise ValueError(f"max_tokens and base_tokens must differ, both are {base_tokens}")
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return base_shift + slope * (num_image_tokens - base_tokens)


def inference_sigmas(num_steps: int, mu: float, device: torch.device | str | None = None) -> torch.Tensor:
    """Noise levels of an Euler sampler with ``num_steps`` steps, shifted by ``mu``.

    The unshifted grid is ``linspace(1, 1/num_steps, num_steps)``; each value is shifted with
    :func:`shift_time` and a terminal 0 is appended, as diffusers' ``FlowMatchEulerDiscreteScheduler``
    does for the Krea 2 pipeline. Step ``i`` evaluates the model at ``sigmas[i]`` and moves the
    latents to ``sigmas[i + 1]``; diffusers' integer-scale ``timesteps`` are ``1000 * sigmas[:-1]``.

    Returns:
        ``[num_steps + 1]`` float32, decreasing from 1 to 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    grid = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64).to(torch.float32)
    sigmas = shift_time(grid, mu)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device)


@dataclass(frozen=True)
class TimestepSampling:
    """How training draws ``t``.

    Attributes:
        kind: ``"logit_normal"`` (``t = sigmoid(loc + scale * z)``, ``z ~ N(0, 1)``) or ``"uniform"``.
        loc, scale: location and scale of the logit-normal, in logit space.
        shift: ``"resolution"`` (``mu`` from the image token count with the ``*_tokens`` and
            ``*_shift`` fields below), ``"fixed"`` (``mu`` as given) or ``"none"``.
        mu: the fixed shift; required with ``shift="fixed"`` and not allowed otherwise.
        base_tokens, max_tokens, base_shift, max_shift: the linear map from token count to ``mu``
            used by ``shift="resolution"`` (defaults: Krea 2's inference values; the report sweeps the
            training shift per resolution).
    """

    kind: Literal["logit_normal", "uniform"] = "logit_normal"
    loc: float = 0.0
    scale: float = 1.0
    shift: Literal["resolution", "fixed", "none"] = "resolution"
    mu: float | None = None
    base_tokens: int = BASE_TOKENS
    max_tokens: int = MAX_TOKENS
    base_shift: float = BASE_SHIFT
    max_shift: float = MAX_SHIFT

    def __post_init__(self) -> None:
        if self.kind not in ("logit_normal", "uniform"):
            raise ValueError(f"TimestepSampling.kind must be 'logit_normal' or 'uniform', got {self.kind!r}")
        if self.shift not in ("resolution", "fixed", "none"):
            raise ValueError(f"TimestepSampling.shift must be 'resolution', 'fixed' or 'none', got {self.shift!r}")
        if not self.scale > 0:
            raise ValueError(f"TimestepSampling.scale must be positive, got {self.scale}")
        if self.shift == "fixed" and self.mu is None:
            raise ValueError("TimestepSampling.shift='fixed' needs a value for mu")
        if self.shift != "fixed" and self.mu is not None:
            raise ValueError(f"TimestepSampling.mu={self.mu} is only used with shift='fixed', not shift={self.shift!r}")

    def mu_for(self, num_image_tokens: int) -> float:
        """The shift applied to times drawn for images of ``num_image_tokens`` tokens (0 = none)."""
        if self.shift == "fixed":
            return self.mu
        if self.shift == "none":
            return 0.0
        return mu_for_tokens(num_image_tokens, self.base_tokens, self.max_tokens, self.base_shift, self.max_shift)


def sample_training_times(
    batch_size: int,
    num_image_tokens: int,
    config: TimestepSampling,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw one training time per sample.

    Args:
        batch_size: number of times to draw.
        num_image_tokens: DiT image tokens per sample (sets ``mu`` when ``config.shift="resolution"``).
        config: the distribution.
        generator: source of randomness; its device is used when ``device`` is not given.
    Returns:
        ``t`` ``[batch_size]`` float32 in the open interval ``(0, 1)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if device is None and generator is not None:
        device = generator.device
    if config.kind == "logit_normal":
        logits = torch.randn(batch_size, generator=generator, device=device, dtype=torch.float64)
        t = torch.sigmoid(config.loc + config.scale * logits)
    else:
        t = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)
    t = shift_time(t, config.mu_for(num_image_tokens))
    return t.clamp(TRAINING_TIME_MARGIN, 1 - TRAINING_TIME_MARGIN).to(torch.float32)


def broadcast_times(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Times in ``like``'s dtype, broadcastable against ``like`` ``[B, ...]``: ``[B]`` becomes
    ``[B, 1, ..., 1]``; a float or 0-d tensor stays a scalar (no host-to-device copy)."""
    if not isinstance(t, torch.Tensor) or t.ndim == 0:
        return torch.as_tensor(t, dtype=like.dtype)
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t must have shape [{like.shape[0]}] (one time per sample) or be a scalar, got {tuple(t.shape)}")
    return t.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Noisy sample ``x_t = (1 - t) x0 + t noise``.

    Args:
        x0: clean data ``[B, ...]``.
        noise: Gaussian noise, same shape as ``x0``.
        t: ``[B]`` times in ``[0, 1]``.
    Returns:
        ``x_t`` with the shape and dtype of ``x0``.
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    t = broadcast_times(t, x0)
    return (1 - t) * x0 + t * noise.to(x0.dtype)


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The regression target ``v = d x_t / d t = noise - x0``, same shape as ``x0``."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    return noise - x0


def flow_matching_loss(
    pred_velocity: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample flow-matching loss: mean squared error between predicted and target velocity.

    Computed in float32 whatever the input dtype.

    Args:
        pred_velocity: the network output ``[B, ...]``.
        x0, noise: the clean sample and noise that built ``x_t``, same shape.
        weights: optional ``[B]`` per-sample multipliers (e.g. a time weighting).
    Returns:
        ``[B]`` float32; reduce (e.g. ``.mean()``) in the stage.
    """
    target = velocity_target(x0, noise)
    if pred_velocity.shape != target.shape:
        raise ValueError(
            f"pred_velocity {tuple(pred_velocity.shape)} does not match the target shape {tuple(target.shape)}"
        )
    squared_error = (pred_velocity.float() - target.float()).square()
    per_sample = squared_error.reshape(squared_error.shape[0], -1).mean(dim=1)
    if weights is None:
        return per_sample
    if weights.shape != per_sample.shape:
        raise ValueError(
            f"weights must have shape {tuple(per_sample.shape)} (one per sample), got {tuple(weights.shape)}"
        )
    return per_sample * weights.float()
