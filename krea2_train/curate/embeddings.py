"""Image embedders for balanced sampling: a pretrained vision encoder, or a small deterministic one.

``build_embedder(spec)``:
    "small"      ``SmallEmbedder``: colour histogram + downsampled pixels, no weights (tests, CPU)
    a directory  ``TransformersEmbedder``: a local SigLIP, SigLIP 2, DINOv2 or DINOv3 checkpoint
                 (transformers layout), its pooled image embedding, on the GPU when there is one

Every embedder maps a list of PIL images to float32 [n, dim] rows of unit L2 norm, and has a
``name`` that keys its embeddings in the store (a different model is a different name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from PIL import Image

from krea2_train.errors import MissingPathError, UsageError

SMALL = "small"


class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """[n, dim] float32, unit L2 norm per row."""


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


class SmallEmbedder:
    """A deterministic embedding without weights: a joint RGB histogram (``bins``^3 cells, as
    fractions of the pixels) next to the image downsampled to ``grid`` x ``grid`` RGB (in [0, 1]),
    each part L2-normalised, then the whole. Similar colours and layouts land close together.
    """

    def __init__(self, bins: int = 4, grid: int = 4):
        if bins < 1 or grid < 1:
            raise ValueError(f"bins and grid must be positive, got {bins}, {grid}")
        self.bins = bins
        self.grid = grid
        self.dim = bins**3 + 3 * grid * grid
        self.name = f"small-b{bins}-g{grid}"

    def embed_one(self, image: Image.Image) -> np.ndarray:
        rgb = image.convert("RGB")
        pixels = np.asarray(rgb, dtype=np.int64).reshape(-1, 3)
        cells = pixels * self.bins // 256
        flat_cells = (cells[:, 0] * self.bins + cells[:, 1]) * self.bins + cells[:, 2]
        histogram = np.bincount(flat_cells, minlength=self.bins**3) / len(pixels)
        small = rgb.resize((self.grid, self.grid), Image.Resampling.BOX)
        layout = np.asarray(small, dtype=np.float64).reshape(-1) / 255.0
        parts = [part / max(np.linalg.norm(part), 1e-12) for part in (histogram, layout)]
        return np.concatenate(parts)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return l2_normalise(np.stack([self.embed_one(image) for image in images]))


# transformers class that returns the pooled image embedding, per config model_type
VISION_MODELS = {
    "siglip": "SiglipVisionModel",
    "siglip2": "Siglip2VisionModel",
    "dinov2": "Dinov2Model",
    "dinov3_vit": "DINOv3ViTModel",
}


class TransformersEmbedder:
    """The pooled output (SigLIP's attention-pooling head, DINO's normalised CLS token) of a
    local transformers checkpoint, with its own image processor; float32 unless ``dtype`` says.
    """

    def __init__(self, path: str | Path, device: str = "cpu", dtype: str = "float32"):
        import torch
        import transformers

        path = Path(path)
        if not (path / "config.json").is_file():
            raise MissingPathError(f"embedding model directory {path} has no config.json (a transformers checkpoint)")
        config = transformers.AutoConfig.from_pretrained(path)
        if config.model_type not in VISION_MODELS:
            raise UsageError(
                f"{path} holds a {config.model_type!r} model; supported embedders: {sorted(VISION_MODELS)}"
            )
        model_class = getattr(transformers, VISION_MODELS[config.model_type])
        self.model = model_class.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
        self.processor = transformers.AutoImageProcessor.from_pretrained(path)
        self.device = device
        self.name = f"transformers:{config.model_type}:{path.resolve()}"
        vision_config = getattr(config, "vision_config", config)
        self.dim = vision_config.hidden_size

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        import torch

        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        inputs = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.no_grad():
            pooled = self.model(**inputs).pooler_output
        return l2_normalise(pooled.float().cpu().numpy())


def embedder_spec(spec: str, must_exist: bool = True) -> str:
    """``spec`` as stored in embed targets: ``"small"``, or the model directory's absolute path
    (which must be a directory unless ``must_exist`` is False: a target removed after its model)."""
    if spec == SMALL:
        return SMALL
    if must_exist and not Path(spec).is_dir():
        raise MissingPathError(f"embedder must be {SMALL!r} or a local model directory; {spec!r} is neither")
    return str(Path(spec).resolve())


def default_device() -> str:
    """Where a model embedder runs: the current CUDA device when there is one (one worker per GPU:
    ``CUDA_VISIBLE_DEVICES`` picks it), else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_embedder(spec: str, device: str | None = None) -> Embedder:
    """``"small"`` or the path of a local transformers checkpoint (see the module docstring);
    a model runs on ``device`` (default: :func:`default_device`)."""
    spec = embedder_spec(spec)
    if spec == SMALL:
        return SmallEmbedder()
    return TransformersEmbedder(spec, device=device or default_device())
