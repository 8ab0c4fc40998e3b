"""The frozen conditioning networks of a run, behind one object.

A :class:`Conditioner` turns images into packed DiT tokens and prompts into tapped text states.
Training stages, the sampler and the `krea2 sample` command all use it, so the image <-> token
layout and the text template exist in one place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from krea2_train.conditioning.autoencoder import LatentAutoencoder, build_autoencoder
from krea2_train.conditioning.text import Qwen3VLTextTaps
from krea2_train.conditioning.tiny import TAPS_FILE
from krea2_train.errors import MissingPathError
from krea2_train.model.patchify import pack_latents, unpack_latents

QWEN_PIXELS_PER_TOKEN = 16  # Qwen-Image VAE (f8) with 2x2 patches: the unit of a stage's nominal resolution


@dataclass(frozen=True)
class TokenGrid:
    """The token grid of one image size."""

    height: int
    width: int

    @property
    def num_tokens(self) -> int:
        return self.height * self.width


class Conditioner:
    """Frozen autoencoder (replicated) and text-encoder taps.

    Args:
        autoencoder: any :class:`LatentAutoencoder`.
        text_taps: the Qwen3-VL taps.
        patch_size: latent patch side (2 in Krea 2).
    """

    def __init__(self, autoencoder: LatentAutoencoder, text_taps: Qwen3VLTextTaps, patch_size: int = 2) -> None:
        self.autoencoder = autoencoder
        self.text_taps = text_taps
        self.patch_size = patch_size

    @property
    def pixels_per_token(self) -> int:
        return self.autoencoder.spatial_factor * self.patch_size

    def image_side(self, nominal_resolution: int) -> int:
        """Image side in pixels giving the token grid of ``nominal_resolution`` with the Qwen VAE."""
        return nominal_resolution * self.pixels_per_token // QWEN_PIXELS_PER_TOKEN

    def grid(self, height_px: int, width_px: int) -> TokenGrid:
        unit = self.pixels_per_token
        if height_px % unit or width_px % unit:
            raise ValueError(f"image size {width_px}x{height_px} is not a multiple of {unit} px per token")
        return TokenGrid(height_px // unit, width_px // unit)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, TokenGrid]:
        """images ``[B, 3, H, W]`` in [-1, 1] -> (tokens ``[B, N, C * p * p]``, grid)."""
        latents = self.autoencoder.encode(images)
        grid = TokenGrid(latents.shape[-2] // self.patch_size, latents.shape[-1] // self.patch_size)
        return pack_latents(latents, self.patch_size), grid

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
        """tokens ``[B, N, C * p * p]`` -> images ``[B, 3, H, W]`` in [-1, 1]."""
        latents = unpack_latents(tokens.float(), grid.height, grid.width, self.patch_size)
        return self.autoencoder.decode(latents).clamp(-1, 1)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> (states ``[B, L, K, T]``, mask ``[B, L]`` bool), compacted (:func:`compact_text`)."""
        tokens = self.text_taps.tokenize([prompt.strip() for prompt in prompts])  # on the host
        states, mask = self.text_taps.encode_tokens(tokens)
        # the length is read from the host copy of the mask: no device sync before the DiT runs
        longest = int(self.text_taps.prompt_part(tokens.attention_mask).sum(dim=1).max())
        return compact_text(states, mask, longest=longest)


TEXT_LENGTH_MULTIPLE = 64


def text_length(num_real_tokens: int, multiple: int = TEXT_LENGTH_MULTIPLE) -> int:
    """The padded text length for a batch whose longest prompt has ``num_real_tokens`` tokens."""
    return max(multiple, -(-num_real_tokens // multiple) * multiple)


def compact_text(
    states: torch.Tensor, mask: torch.Tensor, multiple: int = TEXT_LENGTH_MULTIPLE, longest: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each prompt's real tokens to the front (in order) and cut the padding to a multiple.

    The Krea 2 template pads between the prompt and its suffix, to 512 tokens. Every text token
    sits at rotary position (0, 0, 0) and padded tokens are masked out as keys, so the DiT's
    output does not depend on where the real tokens are or how much padding follows them: only
    the work does (training FLOPs per image of the 12.9B model at 256 px halve with 128 real
    tokens out of 512). Lengths are rounded up to ``multiple`` to bound compiled shapes.

    Args:
        states: ``[B, L, K, T]``; mask: ``[B, L]`` bool.
        longest: the batch's most real tokens, when the caller knows it on the host (reading it
            from a device mask would synchronise the host with the device).
    Returns:
        states ``[B, L', K, T]`` and mask ``[B, L']`` with ``L' = text_length(max real tokens)``.
    """
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # real tokens first, in order
    if longest is None:
        longest = int(mask.sum(dim=1).max())
    length = min(mask.shape[1], text_length(longest))
    order = order[:, :length]
    compacted = torch.gather(states, 1, order[:, :, None, None].expand(-1, -1, *states.shape[2:]))
    return compacted, torch.gather(mask, 1, order)


def build_conditioner(
    autoencoder: str,
    text_encoder: str | Path,
    *,
    autoencoder_path: str | None = None,
    text_select_layers: list[int] | tuple[int, ...] | None = None,
    max_text_tokens: int = 512,
    patch_size: int = 2,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Conditioner:
    """Build the conditioning networks from local directories (never from a hub).

    ``text_encoder`` is a local Qwen3-VL directory (``krea2_train.conditioning.tiny`` builds a tiny
    random one for CPU runs).
    """
    from krea2_train.conditioning.text import DEFAULT_SELECT_LAYERS

    text_dir = Path(text_encoder)
    if not text_dir.is_dir():
        raise MissingPathError(f"conditioning.text_encoder={text_encoder!r}: the text encoder directory does not exist")
    if autoencoder_path is not None and not Path(autoencoder_path).is_dir():  # before the text encoder loads
        raise MissingPathError(f"conditioning.autoencoder_path={autoencoder_path!r}: the VAE directory does not exist")
    select = tuple(text_select_layers) if text_select_layers else None
    if select is None:
        taps_file = text_dir / TAPS_FILE
        select = tuple(json.loads(taps_file.read_text())["select_layers"]) if taps_file.exists() else DEFAULT_SELECT_LAYERS
    taps = Qwen3VLTextTaps.from_pretrained(
        text_dir, select_layers=select, max_sequence_length=max_text_tokens, dtype=dtype, device=device
    )
    ae = build_autoencoder(autoencoder, autoencoder_path, device=device)
    return Conditioner(ae, taps, patch_size)
