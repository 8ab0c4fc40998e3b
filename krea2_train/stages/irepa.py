"""iREPA: align DiT hidden states with a frozen vision encoder's patch features (arXiv 2512.10794).

The image-token hidden states after DiT block ``k`` (1-based, REPA's ``encoder_depth``) go through
a 3x3 convolution on the token grid and are pulled towards the spatially normalised patch features
of the *clean* image by a negative cosine similarity::

    L = L_fm + lambda * L_irepa
    L_irepa = -mean_{b, n} cos(z(y)_{b, n}, Conv(H_k)_{b, n})
    z(y) = (y - gamma * mean_n(y)) / (std_n(y) + 1e-6)      per image and channel, over the tokens

Krea 2 trains with it only during the first epoch of the 256 px stage, so the term has a switch-off
point in epochs; after it, neither the teacher nor the hook does any work.

- The teacher is DINOv2 (``dinov2``, ``dinov2_with_registers``) or DINOv3 (``dinov3_vit``) loaded by
  transformers from a local directory, frozen, in eval, replicated on every rank, run under
  ``no_grad``. ``"tiny"`` builds a random tiny DINOv2 (deterministic) into the run directory.
- Images (``[-1, 1]``) are resized (bicubic, antialiased) so that the teacher's patch grid equals
  the DiT's token grid, or a grid whose longer side is ``encoder_patches`` (features are then
  resampled bilinearly to the DiT's grid), and ImageNet-normalised.
- Token order is row-major on both sides: token ``n`` sits at ``(n // grid_w, n % grid_w)``;
  non-square grids work.
- The projector lives under ``model.auxiliary["irepa"]``: trained and checkpointed with the model
  (inside FSDP2's root unit; on one rank under its own autocast hooks), never exported. A tap
  (``Krea2DiT.block_output_taps[k - 1]``) keeps block k's image tokens for one forward when armed.
  Taps run in the model's block loop, outside the blocks, so compiled and activation-checkpointed
  blocks (``parallel=cluster``) never trace them and recomputation in backward captures nothing.
- Under tensor parallelism the block stream is sequence-sharded; the TP plan wraps the tap so it
  sees the all-gathered sequence (``full_tensor``): every TP rank projects the same full sequence
  and the gradient returns to each rank's shard. The projector is replicated across TP ranks like
  the model's other non-block modules.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from krea2_train.errors import MissingPathError, UsageError

logger = logging.getLogger(__name__)

TEACHER_MODEL_TYPES = ("dinov2", "dinov2_with_registers", "dinov3_vit")
TINY_TEACHER_DIR = "irepa_encoder"  # under the run directory
SPATIAL_NORM_EPS = 1e-6


def default_block(num_layers: int) -> int:
    """The block (1-based) whose output is aligned when the config leaves it unset: a third of the
    depth, at most 8, as REPA's ablations suggest (8 of 24 or 28 blocks for SiT-L/XL and Krea 2's 28,
    4 of 12 for SiT-B)."""
    return min(8, max(1, num_layers // 3))


# ---------------------------------------------------------------------------------------------
# Token grids, the projector, normalisation and the loss
# ---------------------------------------------------------------------------------------------


def tokens_to_grid(tokens: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Row-major tokens ``[B, grid_h * grid_w, C]`` -> feature map ``[B, C, grid_h, grid_w]``."""
    batch, num_tokens, channels = tokens.shape
    if num_tokens != grid_h * grid_w:
        raise ValueError(f"{num_tokens} tokens do not fill a {grid_h}x{grid_w} grid")
    return tokens.reshape(batch, grid_h, grid_w, channels).permute(0, 3, 1, 2)


def grid_to_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """Feature map ``[B, C, H, W]`` -> row-major tokens ``[B, H * W, C]``."""
    return feature_map.flatten(2).transpose(1, 2)


class ConvProjector(nn.Module):
    """iREPA's projector: ``Conv2d(hidden_size, out_channels, k, padding=k // 2)`` on the token grid.

    Zero padding, stride 1; border tokens see fewer neighbours, as in the reference.
    """

    def __init__(self, hidden_size: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"the projector's kernel_size must be a positive odd number, got {kernel_size}")
        self.conv = nn.Conv2d(hidden_size, out_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, tokens: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """tokens ``[B, grid_h * grid_w, D]`` (row-major) -> ``[B, grid_h * grid_w, out_channels]``."""
        return grid_to_tokens(self.conv(tokens_to_grid(tokens, grid_h, grid_w)))


def spatial_zscore(features: torch.Tensor, gamma: float, eps: float = SPATIAL_NORM_EPS) -> torch.Tensor:
    """``(y - gamma * mean_n y) / (std_n y + eps)`` per image and channel over the tokens.

    features ``[B, N, C]`` -> ``[B, N, C]``; ``std`` is the unbiased one, as in iREPA's reference.
    With ``gamma < 1`` the result keeps part of the mean (iREPA's tuned default is 0.6).
    """
    mean = features.mean(dim=1, keepdim=True)
    std = features.std(dim=1, keepdim=True)
    return (features - gamma * mean) / (std + eps)


def resample_grid(tokens: torch.Tensor, source: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resample row-major tokens ``[B, h * w, C]`` from grid ``source`` to ``target``
    (antialiased when shrinking); the identity when the grids are equal."""
    if tuple(source) == tuple(target):
        return tokens
    feature_map = tokens_to_grid(tokens, *source)
    shrinking = target[0] < source[0] or target[1] < source[1]
    resampled = F.interpolate(feature_map, size=target, mode="bilinear", align_corners=False, antialias=shrinking)
    return grid_to_tokens(resampled)


def alignment_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative cosine similarity per token, averaged: ``[B, N, C] x [B, N, C]`` -> scalar in [-1, 1]."""
    if projected.shape != target.shape:
        raise ValueError(f"projected features {tuple(projected.shape)} and teacher features {tuple(target.shape)} differ")
    return -F.cosine_similarity(projected.float(), target.float(), dim=-1).mean()


# ---------------------------------------------------------------------------------------------
# The teacher
# ---------------------------------------------------------------------------------------------


def tiny_dinov2_config():
    """A 2-layer DINOv2 of width 32 with 4-pixel patches (a 64 px image gives a 16x16 grid)."""
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        patch_size=4,
        image_size=64,
    )


def build_tiny_dinov2(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a random tiny ``Dinov2Model`` to ``out_dir``; deterministic given ``seed``, the global
    RNG state is left untouched."""
    from transformers import Dinov2Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2Model(tiny_dinov2_config())
    model.save_pretrained(out_dir)
    return Path(out_dir)


def ensure_tiny_dinov2(out_dir: str | Path, seed: int = 0) -> Path:
    """:func:`build_tiny_dinov2` into ``out_dir`` unless it exists. Safe when several ranks race:
    each builds into its own temporary directory and renames it into place; the losers discard theirs."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    build_tiny_dinov2(staging, seed)
    try:
        os.rename(staging, out_dir)
    except OSError:
        if not out_dir.exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def load_teacher_config(path: str | Path):
    """The transformers config of a local DINOv2/DINOv3 directory, with a clear error otherwise."""
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise MissingPathError(
            f"irepa.encoder={str(path)!r} is not a local transformers model directory (no config.json); "
            f"use 'tiny' or a directory holding DINOv2/DINOv3 weights"
        )
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type not in TEACHER_MODEL_TYPES:
        raise UsageError(f"irepa.encoder {str(path)!r} is a {config.model_type!r} model; accepted: {TEACHER_MODEL_TYPES}")
    return config


class VisionTeacher:
    """Frozen DINOv2/DINOv3: clean images -> final-norm patch features on a chosen grid.

    Args:
        model: a transformers ``Dinov2Model``, ``Dinov2WithRegistersModel`` or ``DINOv3ViTModel``.
    """

    def __init__(self, model: nn.Module) -> None:
        config = model.config
        self.model = model.eval().requires_grad_(False)
        self.patch_size = int(config.patch_size)
        self.hidden_size = int(config.hidden_size)
        self.num_prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0))  # CLS (+ registers)
        from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        self.pixel_mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
        self.pixel_std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device, dtype: torch.dtype) -> VisionTeacher:
        from transformers import AutoModel

        load_teacher_config(path)
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)
        return cls(model.to(device))

    @torch.no_grad()
    def patch_features(self, images: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """images ``[B, 3, H, W]`` in [-1, 1] -> patch features ``[B, grid_h * grid_w, C]`` (fp32).

        The images are resized to ``grid * patch_size`` pixels, so the teacher's patch grid is
        ``(grid_h, grid_w)``; CLS and register tokens are dropped.
        """
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        size = (grid_h * self.patch_size, grid_w * self.patch_size)
        pixels = (images.to(device, torch.float32) + 1.0) / 2.0
        if tuple(pixels.shape[-2:]) != size:
            pixels = F.interpolate(pixels, size=size, mode="bicubic", align_corners=False, antialias=True)
        if self.pixel_mean.device != device:  # once: a host copy every step would sync
            self.pixel_mean, self.pixel_std = self.pixel_mean.to(device), self.pixel_std.to(device)
        pixels = (pixels - self.pixel_mean) / self.pixel_std
        hidden = self.model(pixel_values=pixels.to(dtype)).last_hidden_state
        patches = hidden[:, self.num_prefix_tokens :]
        if patches.shape[1] != grid_h * grid_w:
            raise RuntimeError(f"teacher returned {patches.shape[1]} patch tokens for a {grid_h}x{grid_w} grid")
        return patches.float()


# ---------------------------------------------------------------------------------------------
# Capturing a block's output
# ---------------------------------------------------------------------------------------------


class BlockOutputCapture:
    """A tap (``Krea2DiT.block_output_taps``) that keeps the image tokens of a block's output
    ``[B, L + N, D]`` once armed.

    It fires at most once per arming (then disarms itself); a forward outside :meth:`armed`
    (sampling) does nothing.
    """

    def __init__(self) -> None:
        self._expected: tuple[int, int] | None = None  # (text_len, num_image_tokens) while armed
        self._image_tokens: torch.Tensor | None = None

    def __call__(self, output: torch.Tensor) -> None:
        if self._expected is None:
            return
        text_len, num_image_tokens = self._expected
        self._expected = None
        if output.shape[1] != text_len + num_image_tokens:
            raise RuntimeError(
                f"iREPA captured a block output of {output.shape[1]} tokens, expected {text_len} text + "
                f"{num_image_tokens} image tokens"
            )
        self._image_tokens = output[:, text_len:]

    @contextmanager
    def armed(self, text_len: int, num_image_tokens: int) -> Iterator[BlockOutputCapture]:
        """Capture the next forward of the block (inside the ``with``)."""
        self._expected, self._image_tokens = (text_len, num_image_tokens), None
        try:
            yield self
        finally:
            self._expected = None

    def take(self) -> torch.Tensor:
        """The captured image tokens ``[B, N, D]`` (released here)."""
        tokens, self._image_tokens = self._image_tokens, None
        if tokens is None:
            raise RuntimeError("iREPA's hooked block did not run during the armed forward")
        return tokens


# ---------------------------------------------------------------------------------------------
# The stage component
# ---------------------------------------------------------------------------------------------


class IrepaAlignment:
    """iREPA for a flow-matching stage: attach, arm, compute the term, switch off.

    Args:
        encoder: a local DINOv2/DINOv3 directory.
        block: 1-based block whose output is aligned; None: :func:`default_block` of the model.
        weight: lambda.
        gamma: spatial-normalisation strength.
        switch_off_epochs: the term is used while ``epoch + epoch_fraction`` (the progress after
            the batch) is below this.
        kernel_size: the projector's convolution kernel.
        encoder_patches: the teacher grid's longer side in patches; 0: the DiT's token grid.
        tiny_seed: when set, :meth:`attach` first builds a tiny random DINOv2 with this seed at
            ``encoder`` (unless it exists).
    """

    def __init__(
        self,
        encoder: str | Path,
        *,
        block: int | None = None,
        weight: float = 1.0,
        gamma: float = 0.6,
        switch_off_epochs: float = 1.0,
        kernel_size: int = 3,
        encoder_patches: int = 0,
        tiny_seed: int | None = None,
    ) -> None:
        self.encoder = Path(encoder)
        self.tiny_seed = tiny_seed
        self.block = block
        self.weight = weight
        self.gamma = gamma
        self.switch_off_epochs = switch_off_epochs
        self.kernel_size = kernel_size
        self.encoder_patches = encoder_patches
        self.capture = BlockOutputCapture()
        self._projector: ConvProjector | None = None
        self._teacher: VisionTeacher | None = None
        self._switched_off = False  # said once, when the first batch past the switch-off arrives

    @classmethod
    def from_config(cls, config) -> IrepaAlignment:
        """From a :class:`~krea2_train.config.schema.RunConfig`; ``encoder="tiny"`` means a tiny
        teacher built into the run directory (seeded by the run's seed)."""
        section = config.irepa
        tiny = section.encoder == "tiny"
        return cls(
            Path(config.runs_root) / config.run_name / TINY_TEACHER_DIR if tiny else section.encoder,
            block=section.block,
            weight=section.weight,
            gamma=section.spatial_norm_gamma,
            switch_off_epochs=section.switch_off_epochs,
            kernel_size=section.kernel_size,
            encoder_patches=section.encoder_patches,
            tiny_seed=config.seed if tiny else None,
        )

    def attach(self, model: nn.Module) -> nn.Module:
        """Add the projector as ``model.auxiliary["irepa"]`` and tap the aligned block's output
        (before parallelisation)."""
        if self.tiny_seed is not None:
            ensure_tiny_dinov2(self.encoder, self.tiny_seed)
        blocks = model.transformer_blocks
        block = default_block(len(blocks)) if self.block is None else self.block
        if not 1 <= block <= len(blocks):
            raise ValueError(f"irepa.block={block} is outside the model's 1..{len(blocks)} blocks")
        teacher_channels = int(load_teacher_config(self.encoder).hidden_size)
        self._projector = ConvProjector(model.hidden_size, teacher_channels, self.kernel_size)
        model.auxiliary["irepa"] = self._projector
        model.block_output_taps[block - 1] = self.capture
        self.block = block
        return model

    def active(self, batch: dict[str, Any]) -> bool:
        """Whether this batch trains with iREPA; after the switch-off the teacher is released."""
        on = float(batch["epoch"]) + float(batch["epoch_fraction"]) < self.switch_off_epochs
        if not on and not self._switched_off:
            self._switched_off = True
            logger.info("iREPA switched off after %g epoch(s): the loss is the flow-matching loss alone from here "
                        "(before, it included the alignment term, which is negative)", self.switch_off_epochs)
        if not on:
            self._teacher = None
        return on

    def armed(self, text_len: int, num_image_tokens: int):
        """Context manager around the DiT forward whose hidden states are aligned."""
        return self.capture.armed(text_len, num_image_tokens)

    def teacher_grid(self, grid_h: int, grid_w: int) -> tuple[int, int]:
        if self.encoder_patches == 0:
            return grid_h, grid_w
        longer = max(grid_h, grid_w)
        return (max(1, round(grid_h * self.encoder_patches / longer)), max(1, round(grid_w * self.encoder_patches / longer)))

    def teacher(self, device: torch.device, dtype: torch.dtype) -> VisionTeacher:
        if self._teacher is None:
            self._teacher = VisionTeacher.from_pretrained(self.encoder, device, dtype)
        return self._teacher

    def targets(self, images: torch.Tensor, grid_h: int, grid_w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Clean images ``[B, 3, H, W]`` -> normalised teacher features on the DiT grid ``[B, N, C]``."""
        source = self.teacher_grid(grid_h, grid_w)
        features = self.teacher(device, dtype).patch_features(images, *source)
        return spatial_zscore(resample_grid(features, source, (grid_h, grid_w)), self.gamma)

    def loss(self, images: torch.Tensor, grid_h: int, grid_w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The iREPA term of the forward just run under :meth:`armed` (unweighted)."""
        if self._projector is None:
            raise RuntimeError("IrepaAlignment.attach(model) must run before the loss (the stage's prepare_model)")
        hidden = self.capture.take()
        projected = self._projector(hidden, grid_h, grid_w)
        return alignment_loss(projected, self.targets(images, grid_h, grid_w, device, dtype))
