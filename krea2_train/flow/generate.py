"""Text to image: prompts -> noise -> Euler sampler -> decoded images.

The one path used by the trainer's sample grids and by ``krea2 sample``.
"""

from __future__ import annotations

import logging
import math

import torch
from PIL import Image

from krea2_train.conditioning.conditioner import Conditioner
from krea2_train.flow.sampler import SamplerSettings, sample
from krea2_train.logs import Progress

logger = logging.getLogger(__name__)

SAMPLING_PROGRESS_EVERY_S = 10.0


def initial_noise(num_images: int, num_tokens: int, channels: int, seed: int) -> torch.Tensor:
    """Gaussian noise ``[num_images, num_tokens, channels]``; image i depends only on (seed, i)."""
    noise = [
        torch.randn(num_tokens, channels, generator=torch.Generator().manual_seed(seed * 100_003 + i))
        for i in range(num_images)
    ]
    return torch.stack(noise)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    conditioner: Conditioner,
    prompts: list[str],
    height_px: int,
    width_px: int,
    settings: SamplerSettings,
    *,
    seed: int = 0,
    negative_prompt: str = "",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Generate one image per prompt, logging the start and, on long runs, the steps' progress.

    Returns:
        images ``[B, 3, height_px, width_px]`` in [-1, 1], float32 on the CPU.
    """
    logger.info("sampling %d image(s) at %dx%d px: %d steps, guidance %g", len(prompts), width_px, height_px,
                settings.num_steps, settings.guidance_scale)
    progress = Progress(f"sampling {len(prompts)} image(s): step", settings.num_steps, "steps", logger, SAMPLING_PROGRESS_EVERY_S)
    grid = conditioner.grid(height_px, width_px)
    text_states, text_mask = conditioner.encode_text(prompts)
    negative_states = negative_mask = None
    if settings.guidance_scale > 0:
        negative_states, negative_mask = conditioner.encode_text([negative_prompt])
        negative_states, negative_mask = negative_states.to(device, dtype), negative_mask.to(device)
    channels = conditioner.autoencoder.latent_channels * conditioner.patch_size**2
    noise = initial_noise(len(prompts), grid.num_tokens, channels, seed).to(device, dtype)
    tokens = sample(
        model,
        noise,
        text_states.to(device, dtype),
        text_mask.to(device),
        grid.height,
        grid.width,
        num_steps=settings.num_steps,
        guidance_scale=settings.guidance_scale,
        mu=settings.mu,
        negative_text_states=negative_states,
        negative_text_mask=negative_mask,
        callback=lambda step, t, latents: progress.update(step + 1),
    )
    return conditioner.decode_tokens(tokens.float().cpu(), grid)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """images ``[B, 3, H, W]`` in [-1, 1] -> RGB PIL images."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p) for p in pixels]


def image_grid(images: list[Image.Image], columns: int | None = None, pad: int = 2) -> Image.Image:
    """Tile equally sized images into one grid image."""
    if not images:
        raise ValueError("no images to tile")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * (width + pad) + pad, rows * (height + pad) + pad), (255, 255, 255))
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid.paste(image, (pad + column * (width + pad), pad + row * (height + pad)))
    return grid

