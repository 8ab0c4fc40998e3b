"""Euler flow-matching sampler with Krea's classifier-free guidance, and the sampler presets.

The model is any callable with the DiT's forward::

    model(hidden_states=[B, N, C], encoder_hidden_states=[B, L, layers, D], timestep=[B] in [0, 1],
          position_ids=[L + N, 3], encoder_attention_mask=[B, L] bool or None) -> velocity [B, N, C]

Guidance follows Krea: ``v = c + g (c - u)`` with ``c`` the conditional and ``u`` the
unconditional (negative or empty prompt) velocity; ``g = 0`` turns guidance off and skips the
unconditional pass.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Protocol

import torch

from krea2_train.flow.timesteps import MAX_SHIFT, inference_sigmas, mu_for_tokens
from krea2_train.model.patchify import position_ids


class VelocityModel(Protocol):
    def __call__(
        self,
        *,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        position_ids: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
    ) -> torch.Tensor: ...


StepCallback = Callable[[int, float, torch.Tensor], None]


@dataclass(frozen=True)
class SamplerPreset:
    """Default settings of a checkpoint family; ``mu=None`` means resolution-aware."""

    num_steps: int
    guidance_scale: float
    mu: float | None


@dataclass(frozen=True)
class SamplerSettings:
    """Concrete settings for one image size."""

    num_steps: int
    guidance_scale: float
    mu: float


SAMPLER_PRESETS: dict[str, SamplerPreset] = {
    # Krea 2 Raw (the midtraining checkpoint): 52 steps, g = 3.5, resolution-aware shift.
    "raw": SamplerPreset(num_steps=52, guidance_scale=3.5, mu=None),
    # Krea 2 Turbo (TDM-distilled): 8 steps, no guidance, fixed shift.
    "turbo": SamplerPreset(num_steps=8, guidance_scale=0.0, mu=MAX_SHIFT),
}


def resolve_sampler_settings(
    preset: str,
    num_image_tokens: int,
    *,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    mu: float | None = None,
) -> SamplerSettings:
    """Settings of ``preset`` for images of ``num_image_tokens`` tokens, with any given overrides.

    A preset without a fixed ``mu`` gets the resolution-aware ``mu_for_tokens(num_image_tokens)``.
    """
    if preset not in SAMPLER_PRESETS:
        raise ValueError(f"unknown sampler preset {preset!r}; known presets: {sorted(SAMPLER_PRESETS)}")
    chosen = SAMPLER_PRESETS[preset]
    overrides = {"num_steps": num_steps, "guidance_scale": guidance_scale, "mu": mu}
    chosen = replace(chosen, **{name: value for name, value in overrides.items() if value is not None})
    resolved_mu = mu_for_tokens(num_image_tokens) if chosen.mu is None else chosen.mu
    settings = SamplerSettings(num_steps=chosen.num_steps, guidance_scale=chosen.guidance_scale, mu=resolved_mu)
    _check_settings(settings.num_steps, settings.guidance_scale)
    return settings


def _check_settings(num_steps: int, guidance_scale: float) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0 (0 disables guidance), got {guidance_scale}")


def _check_text(name: str, states: torch.Tensor, mask: torch.Tensor | None, batch_size: int) -> None:
    if states.ndim != 4:
        raise ValueError(f"{name} must be [B, L, layers, D], got shape {tuple(states.shape)}")
    if states.shape[0] not in (1, batch_size):
        raise ValueError(f"{name} has batch {states.shape[0]}, expected 1 or {batch_size}")
    if mask is not None and (mask.ndim != 2 or mask.shape[0] != states.shape[0] or mask.shape[1] != states.shape[1]):
        raise ValueError(
            f"{name} mask must be [{states.shape[0]}, {states.shape[1]}] to match the states, got {tuple(mask.shape)}"
        )


def _expand_text(
    states: torch.Tensor, mask: torch.Tensor | None, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Broadcast batch-1 text conditioning (e.g. the empty prompt) to ``batch_size``."""
    states = states.expand(batch_size, *states.shape[1:])
    mask = None if mask is None else mask.to(torch.bool).expand(batch_size, -1)
    return states, mask


def _full_mask(states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return states.new_ones(states.shape[:2], dtype=torch.bool) if mask is None else mask


def _velocity(
    model: VelocityModel,
    latents: torch.Tensor,
    t: torch.Tensor,
    text_states: torch.Tensor,
    text_mask: torch.Tensor | None,
    grid_height: int,
    grid_width: int,
) -> torch.Tensor:
    positions = position_ids(text_states.shape[1], grid_height, grid_width, device=latents.device)
    return model(
        hidden_states=latents,
        encoder_hidden_states=text_states,
        timestep=t.expand(latents.shape[0]),
        position_ids=positions,
        encoder_attention_mask=text_mask,
    )


def pad_text(states: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad text states ``[B, L, K, T]`` and mask ``[B, L]`` with masked zero tokens to ``length``.

    Text tokens all sit at rotary position 0 and masked tokens are ignored, so the DiT's output does
    not change (``states`` is returned as it is when it is long enough).
    """
    missing = length - states.shape[1]
    if missing <= 0:
        return states, mask
    states = torch.cat([states, states.new_zeros(states.shape[0], missing, *states.shape[2:])], dim=1)
    return states, torch.cat([mask.bool(), mask.new_zeros(mask.shape[0], missing, dtype=torch.bool)], dim=1)


def texts_at_one_length(
    text: tuple[torch.Tensor, torch.Tensor], negative: tuple[torch.Tensor, torch.Tensor]
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The conditional and negative texts (each ``(states [B, L, K, T], mask [B, L])``) padded to
    one length, so :func:`guided_velocity` runs their CFG passes as one forward.

    Training must: text is padded per micro-batch, so a rank whose captions are longer than the
    empty prompt would otherwise run two forwards per step where another runs one, and FSDP's
    collectives would no longer pair up across ranks (a hang, or gathers of the wrong blocks).
    """
    length = max(text[0].shape[1], negative[0].shape[1])
    return pad_text(*text, length), pad_text(*negative, length)


def guided_velocity(
    model: VelocityModel,
    latents: torch.Tensor,
    t: torch.Tensor,
    text_states: torch.Tensor,
    text_mask: torch.Tensor | None,
    grid_height: int,
    grid_width: int,
    *,
    guidance_scale: float = 0.0,
    negative_text_states: torch.Tensor | None = None,
    negative_text_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Velocity at ``latents`` ``[B, N, C]`` and time ``t`` (a 0-d or ``[B]`` tensor), with Krea's CFG.

    ``v = c + g (c - u)``. With ``g > 0`` the conditional and unconditional passes share one forward
    of batch ``2B`` when their text lengths match, otherwise they run one after the other.
    Text conditioning: ``[B or 1, L, layers, D]`` states and ``[B or 1, L]`` bool masks (``None`` = all valid).

    Returns:
        velocity ``[B, N, C]`` in the model's output dtype.
    """
    batch_size = latents.shape[0]
    _check_text("text_states", text_states, text_mask, batch_size)
    text_states, text_mask = _expand_text(text_states, text_mask, batch_size)
    if guidance_scale == 0:
        return _velocity(model, latents, t, text_states, text_mask, grid_height, grid_width)
    if negative_text_states is None:
        raise ValueError(
            f"guidance_scale={guidance_scale} needs negative_text_states (the negative or empty prompt's states); "
            "pass guidance_scale=0 to sample without guidance"
        )
    _check_text("negative_text_states", negative_text_states, negative_text_mask, batch_size)
    negative_text_states, negative_text_mask = _expand_text(negative_text_states, negative_text_mask, batch_size)
    if negative_text_states.shape[1] == text_states.shape[1]:
        both_masks = None
        if text_mask is not None or negative_text_mask is not None:
            both_masks = torch.cat(
                [_full_mask(text_states, text_mask), _full_mask(negative_text_states, negative_text_mask)]
            )
        both = _velocity(
            model,
            torch.cat([latents, latents]),
            t.expand(batch_size).repeat(2),
            torch.cat([text_states, negative_text_states]),
            both_masks,
            grid_height,
            grid_width,
        )
        conditional, unconditional = both.chunk(2)
    else:
        conditional = _velocity(model, latents, t, text_states, text_mask, grid_height, grid_width)
        unconditional = _velocity(
            model, latents, t, negative_text_states, negative_text_mask, grid_height, grid_width
        )
    return conditional + guidance_scale * (conditional - unconditional)


@torch.no_grad()
def sample(
    model: VelocityModel,
    noise_tokens: torch.Tensor,
    text_states: torch.Tensor,
    text_mask: torch.Tensor | None,
    grid_height: int,
    grid_width: int,
    *,
    num_steps: int,
    guidance_scale: float,
    mu: float,
    negative_text_states: torch.Tensor | None = None,
    negative_text_mask: torch.Tensor | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Integrate the flow ODE from noise (``t = 1``) to data (``t = 0``) with Euler steps.

    The noise levels are :func:`~krea2_train.flow.timesteps.inference_sigmas` ``(num_steps, mu)``;
    the running latents are kept in float32 and fed to the model in ``noise_tokens.dtype``.

    Args:
        model: the velocity network (see the module docstring).
        noise_tokens: ``[B, N, C]`` packed Gaussian noise, ``N = grid_height * grid_width``.
        text_states: ``[B or 1, L, layers, D]`` tapped text-encoder states.
        text_mask: ``[B or 1, L]`` bool, ``None`` when every text token is valid.
        grid_height, grid_width: the token grid of the image.
        num_steps: Euler steps (model evaluations per pass).
        guidance_scale: Krea CFG scale ``g`` (0 = off).
        mu: time shift (see :func:`~krea2_train.flow.timesteps.mu_for_tokens`).
        negative_text_states, negative_text_mask: unconditional conditioning, required when ``g > 0``.
        callback: called after every step as ``callback(step, t, latents)``, where ``latents``
            ``[B, N, C]`` float32 is the state at time ``t`` reached by step ``step`` (0-based).
    Returns:
        clean tokens ``[B, N, C]`` in ``noise_tokens.dtype``.
    """
    _check_settings(num_steps, guidance_scale)
    if noise_tokens.ndim != 3:
        raise ValueError(f"noise_tokens must be [B, N, C], got shape {tuple(noise_tokens.shape)}")
    num_tokens = noise_tokens.shape[1]
    if num_tokens != grid_height * grid_width:
        raise ValueError(f"{num_tokens} noise tokens do not form a {grid_height}x{grid_width} grid")

    model_dtype = noise_tokens.dtype
    sigmas = inference_sigmas(num_steps, mu, device=noise_tokens.device)
    latents = noise_tokens.to(torch.float32)
    for step in range(num_steps):
        t, t_next = sigmas[step], sigmas[step + 1]
        velocity = guided_velocity(
            model,
            latents.to(model_dtype),
            t.to(model_dtype),
            text_states,
            text_mask,
            grid_height,
            grid_width,
            guidance_scale=guidance_scale,
            negative_text_states=negative_text_states,
            negative_text_mask=negative_text_mask,
        )
        latents = latents + (t_next - t) * velocity.to(torch.float32)
        if callback is not None:
            callback(step, t_next.item(), latents)
    return latents.to(model_dtype)
