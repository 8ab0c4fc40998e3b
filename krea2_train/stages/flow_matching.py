"""Flow matching: the loss of pretraining, midtraining and SFT.

``x_t = (1 - t) x0 + t eps``, the DiT predicts ``v = eps - x0``; ``t`` is drawn from a shifted
logit-normal (``krea2_train.flow.timesteps``); captions are dropped to "" with probability
``caption_dropout`` so the model learns the unconditional velocity used by CFG.

With ``irepa.enabled`` the loss adds ``irepa.weight`` times the iREPA alignment term
(``krea2_train.stages.irepa``) until its switch-off point; metrics report ``loss_fm`` and
``loss_irepa`` separately.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from krea2_train.config.schema import RunConfig
from krea2_train.data.cache import ConditioningCache
from krea2_train.devices import to_device
from krea2_train.flow.timesteps import TimestepSampling, flow_matching_loss, interpolate, sample_training_times
from krea2_train.model.patchify import position_ids
from krea2_train.stages.base import CAPTION_DROPOUT, NOISE, TIMESTEP, StepContext
from krea2_train.stages.irepa import IrepaAlignment


class FlowMatchingStage:
    def __init__(self, config: RunConfig) -> None:
        self.name = config.stage.name
        self.caption_dropout = config.conditioning.caption_dropout
        self.timesteps = TimestepSampling(
            loc=config.flow.loc, scale=config.flow.scale, shift=config.flow.shift, mu=config.flow.mu
        )
        self.irepa = IrepaAlignment.from_config(config) if config.irepa.enabled else None
        # latents and text taps read from disk after their first encoding (small datasets)
        self.cache = ConditioningCache.for_run(config) if config.conditioning_cache.enabled else None

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Attach the iREPA projector and block hook when enabled."""
        return model if self.irepa is None else self.irepa.attach(model)

    def captions(self, ctx: StepContext, captions: list[str]) -> list[str]:
        return [
            "" if ctx.uniform(CAPTION_DROPOUT, slot) < self.caption_dropout else caption
            for slot, caption in zip(ctx.slots(len(captions)), captions)
        ]

    def conditioning(self, ctx: StepContext, batch: dict[str, Any], images: torch.Tensor):
        """(image tokens, grid, text taps, text mask): encoded now, or through the conditioning cache."""
        captions = self.captions(ctx, list(batch["captions"]))
        if self.cache is None:
            x0, grid = ctx.conditioner.encode_images(images)
            return (x0, grid, *ctx.conditioner.encode_text(captions))
        x0, grid = self.cache.image_tokens(batch["sample_ids"], images, ctx.conditioner.encode_images)
        return (x0, grid, *self.cache.text_states(captions, ctx.conditioner.encode_text, ctx.device))

    def noise_and_times(self, ctx: StepContext, shape: torch.Size, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample noise ``[B, N, C]`` and times ``[B]``, keyed by global-batch slot."""
        noise, times = [], []
        for slot in ctx.slots(shape[0]):
            noise.append(torch.randn(shape[1:], generator=ctx.generator(NOISE, slot)))
            times.append(sample_training_times(1, num_tokens, self.timesteps, ctx.generator(TIMESTEP, slot)))
        # drawn on the host (keyed RNG); copied without a host sync
        return to_device(torch.stack(noise), ctx.device), to_device(torch.cat(times), ctx.device)

    def loss(self, ctx: StepContext, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = batch["images"].to(ctx.device, non_blocking=True)
        x0, grid, text_states, text_mask = self.conditioning(ctx, batch, images)  # [B, N, C], [B, L, K, T], [B, L]
        noise, t = self.noise_and_times(ctx, x0.shape, grid.num_tokens)
        x_t = interpolate(x0, noise, t)
        positions = position_ids(text_states.shape[1], grid.height, grid.width, device=ctx.device)
        irepa_on = self.irepa is not None and self.irepa.active(batch)
        with self.irepa.armed(text_states.shape[1], grid.num_tokens) if irepa_on else nullcontext():
            velocity = ctx.model(x_t.to(ctx.dtype), text_states.to(ctx.device, ctx.dtype), t, positions, text_mask.to(ctx.device))
        loss_fm = flow_matching_loss(velocity.float(), x0, noise).mean()
        metrics = {"t_mean": t.mean(), "loss_fm": loss_fm.detach()}
        if not irepa_on:
            return loss_fm, metrics
        loss_irepa = self.irepa.loss(images, grid.height, grid.width, ctx.device, ctx.dtype)
        metrics["loss_irepa"] = loss_irepa.detach()
        return loss_fm + self.irepa.weight * loss_irepa, metrics
