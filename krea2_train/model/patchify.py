"""Latent packing and rotary coordinates: how an image latent becomes DiT tokens.

The DiT sees a latent of ``C`` channels as a grid of ``p x p`` patches, each flattened
channel-major into ``C * p * p`` features (the layout of the Krea 2 pipeline). Token ``n`` of an
image is patch ``(n // grid_width, n % grid_width)``.
"""

from __future__ import annotations

import torch


def pack_latents(latents: torch.Tensor, patch_size: int = 2) -> torch.Tensor:
    """Patchify latents.

    Args:
        latents: ``[B, C, H, W]`` with ``H`` and ``W`` divisible by ``patch_size``.
    Returns:
        tokens ``[B, (H / p) * (W / p), C * p * p]``.
    """
    batch, channels, height, width = latents.shape
    p = patch_size
    if height % p or width % p:
        raise ValueError(f"latent grid {height}x{width} is not divisible by the patch size {p}")
    patches = latents.reshape(batch, channels, height // p, p, width // p, p)
    patches = patches.permute(0, 2, 4, 1, 3, 5)  # [B, H/p, W/p, C, p, p]
    return patches.reshape(batch, (height // p) * (width // p), channels * p * p)


def unpack_latents(tokens: torch.Tensor, grid_height: int, grid_width: int, patch_size: int = 2) -> torch.Tensor:
    """Inverse of :func:`pack_latents`.

    Args:
        tokens: ``[B, grid_height * grid_width, C * p * p]``.
    Returns:
        latents ``[B, C, grid_height * p, grid_width * p]``.
    """
    batch, num_tokens, features = tokens.shape
    p = patch_size
    if num_tokens != grid_height * grid_width:
        raise ValueError(f"{num_tokens} tokens do not form a {grid_height}x{grid_width} grid")
    if features % (p * p):
        raise ValueError(f"{features} token features are not divisible by patch area {p * p}")
    channels = features // (p * p)
    patches = tokens.reshape(batch, grid_height, grid_width, channels, p, p)
    patches = patches.permute(0, 3, 1, 4, 2, 5)  # [B, C, H/p, p, W/p, p]
    return patches.reshape(batch, channels, grid_height * p, grid_width * p)


def position_ids(text_seq_len: int, grid_height: int, grid_width: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Rotary ``(t, h, w)`` coordinates of the joint ``[text; image]`` sequence.

    Text tokens sit at ``(0, 0, 0)``; image token ``(row, col)`` at ``(0, row, col)``.

    Returns:
        ``[text_seq_len + grid_height * grid_width, 3]`` float32.
    """
    rows = torch.arange(grid_height, device=device).repeat_interleave(grid_width)
    cols = torch.arange(grid_width, device=device).repeat(grid_height)
    image_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)
    text_ids = torch.zeros(text_seq_len, 3, dtype=image_ids.dtype, device=device)
    return torch.cat([text_ids, image_ids], dim=0).float()
