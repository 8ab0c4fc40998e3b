"""Latent autoencoders: images in [-1, 1] <-> DiT-ready latents with 16 channels.

Two implementations of one interface (:class:`LatentAutoencoder`):

- :class:`QwenImageAutoencoder`: the frozen Qwen-Image VAE (f8) used by Krea 2, with the
  per-channel normalisation of ``Krea2Pipeline``: ``latents = (z - mean) / std`` on encode and
  ``z = latents * std + mean`` on decode.
- :class:`PixelAutoencoder`: a lossless, parameter-free map for small CPU runs (f2): a 2x2
  ``pixel_unshuffle`` (3 * 4 = 12 channels) scaled by a fixed affine map, plus 4 zero channels so
  the DiT's 16-channel / 64-features-per-token layout is unchanged. Decoding reads back only the 12
  image channels, so whatever a model puts in the 4 padding channels is ignored. With the default
  affine map (``(x - 0) / 0.5``, a power of two) the round trip is bit-exact; pixel values land in
  [-2, 2], about unit scale for natural images (std of pixel values ~0.5 in [-1, 1]).

Both are ``nn.Module``s (so ``.to(device)`` moves them) and are frozen: encode runs without grad;
decode keeps autograd so a loss can reach the latents through it. Latents and images are float32
at the interface whatever the VAE's own dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from krea2_train.errors import MissingPathError

if TYPE_CHECKING:
    from diffusers import AutoencoderKLQwenImage

LATENT_CHANNELS = 16


@runtime_checkable
class LatentAutoencoder(Protocol):
    """What the trainer and the sampler need from an autoencoder."""

    latent_channels: int
    spatial_factor: int

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [-1, 1] -> normalised latents ``[B, latent_channels, H / f, W / f]``."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``[B, latent_channels, h, w]`` -> images ``[B, 3, h * f, w * f]`` in [-1, 1]."""
        ...


def _check_images(images: torch.Tensor, spatial_factor: int) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if height % spatial_factor or width % spatial_factor:
        raise ValueError(f"image size {height}x{width} is not divisible by the spatial factor {spatial_factor}")


def _check_latents(latents: torch.Tensor, channels: int) -> None:
    if latents.ndim != 4 or latents.shape[1] != channels:
        raise ValueError(f"expected latents [B, {channels}, h, w], got shape {tuple(latents.shape)}")


class _FrozenModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.eval()

    def train(self, mode: bool = True) -> _FrozenModule:
        """Frozen: stays in eval mode whatever the mode asked for."""
        return super().train(False)


class PixelAutoencoder(_FrozenModule):
    """Lossless f2 autoencoder: ``pixel_unshuffle(2)`` -> 12 channels, affine-scaled, + 4 zero channels.

    Args:
        scale, shift: image channels of the latent are ``(pixels - shift) / scale``.
    """

    spatial_factor = 2
    latent_channels = LATENT_CHANNELS
    image_latent_channels = 3 * 2 * 2

    def __init__(self, scale: float = 0.5, shift: float = 0.0):
        super().__init__()
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.scale = float(scale)
        self.shift = float(shift)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [-1, 1] -> ``[B, 16, H / 2, W / 2]`` float32."""
        _check_images(images, self.spatial_factor)
        image_part = (F.pixel_unshuffle(images.float(), self.spatial_factor) - self.shift) / self.scale
        padding = image_part.new_zeros(
            image_part.shape[0], self.latent_channels - self.image_latent_channels, *image_part.shape[-2:]
        )
        return torch.cat([image_part, padding], dim=1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, 16, h, w]`` -> ``[B, 3, 2h, 2w]`` float32; channels 12..15 are ignored. Not clamped."""
        _check_latents(latents, self.latent_channels)
        image_part = latents[:, : self.image_latent_channels].float() * self.scale + self.shift
        return F.pixel_shuffle(image_part, self.spatial_factor)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, shift={self.shift}"


class QwenImageAutoencoder(_FrozenModule):
    """The Qwen-Image VAE with Krea 2's latent normalisation; images are single frames.

    Args:
        vae: a ``diffusers.AutoencoderKLQwenImage`` (its ``latents_mean``/``latents_std`` config
            entries give the normalisation).
        sample_posterior: encode draws ``z ~ N(mean, std)`` instead of taking the posterior mean.
    """

    def __init__(self, vae: AutoencoderKLQwenImage, sample_posterior: bool = False):
        super().__init__()
        self.vae = vae
        self.vae.requires_grad_(False)
        self.vae.eval()
        self.sample_posterior = sample_posterior
        self.latent_channels = int(vae.config.z_dim)
        self.spatial_factor = int(vae.spatial_compression_ratio)
        stats_shape = (1, self.latent_channels, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32)
        std = torch.tensor(vae.config.latents_std, dtype=torch.float32)
        if mean.numel() != self.latent_channels or std.numel() != self.latent_channels:
            raise ValueError(
                f"VAE config has {mean.numel()} latents_mean and {std.numel()} latents_std entries "
                f"for {self.latent_channels} latent channels"
            )
        self.register_buffer("latents_mean", mean.view(stats_shape), persistent=False)
        self.register_buffer("latents_std", std.view(stats_shape), persistent=False)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        subfolder: str | None = None,
        dtype: torch.dtype | None = None,
        sample_posterior: bool = False,
    ) -> QwenImageAutoencoder:
        """Load ``AutoencoderKLQwenImage`` from a local directory (a pipeline's ``vae`` folder, or
        the pipeline root with ``subfolder="vae"``). Nothing is downloaded."""
        from diffusers import AutoencoderKLQwenImage

        if not Path(path).is_dir():
            raise MissingPathError(f"VAE directory {path} does not exist")
        vae = AutoencoderKLQwenImage.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype, local_files_only=True)
        return cls(vae, sample_posterior=sample_posterior)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[B, 3, H, W]`` in [-1, 1] -> ``(z - mean) / std`` ``[B, 16, H / 8, W / 8]`` float32.

        ``z`` is the posterior mean, or a sample drawn with ``generator`` when ``sample_posterior``.
        """
        _check_images(images, self.spatial_factor)
        frames = images.to(self.vae.dtype).unsqueeze(2)  # [B, 3, 1, H, W]
        posterior = self.vae.encode(frames).latent_dist
        raw = posterior.sample(generator=generator) if self.sample_posterior else posterior.mode()
        return (raw[:, :, 0].float() - self.latents_mean) / self.latents_std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, 16, h, w]`` normalised latents -> ``[B, 3, 8h, 8w]`` float32, clamped to [-1, 1]."""
        _check_latents(latents, self.latent_channels)
        raw = latents.float() * self.latents_std + self.latents_mean
        frames = self.vae.decode(raw.to(self.vae.dtype).unsqueeze(2), return_dict=False)[0]
        return frames[:, :, 0].float()


AUTOENCODER_KINDS = ("pixel", "qwen_image")


def build_autoencoder(
    kind: str,
    path: str | Path | None = None,
    *,
    subfolder: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    sample_posterior: bool = False,
    pixel_scale: float = 0.5,
    pixel_shift: float = 0.0,
) -> PixelAutoencoder | QwenImageAutoencoder:
    """Build an autoencoder by name.

    Args:
        kind: ``"pixel"`` (no weights; ``path`` must be None) or ``"qwen_image"`` (``path`` = a
            local ``AutoencoderKLQwenImage`` directory, optionally with ``subfolder``).
        dtype: weight dtype of the Qwen-Image VAE (ignored by "pixel", which has no weights).
    """
    if kind == "pixel":
        if path is not None:
            raise ValueError(f"the pixel autoencoder has no weights, but path={path!r} was given")
        autoencoder = PixelAutoencoder(scale=pixel_scale, shift=pixel_shift)
    elif kind == "qwen_image":
        if path is None:
            raise ValueError("the qwen_image autoencoder needs path= a local AutoencoderKLQwenImage directory")
        autoencoder = QwenImageAutoencoder.from_pretrained(
            path, subfolder=subfolder, dtype=dtype, sample_posterior=sample_posterior
        )
    else:
        raise ValueError(f"unknown autoencoder kind {kind!r}; expected one of {AUTOENCODER_KINDS}")
    return autoencoder.to(device) if device is not None else autoencoder
