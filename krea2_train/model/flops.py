"""Model FLOPs of a Krea2DiT, from its configuration: the numerator of MFU.

Only matrix multiplications are counted (a multiply-add is 2 FLOPs); norms, rotary embedding,
activations, gating products and the loss are element-wise and left out, as in the usual MFU
convention (PaLM appendix B). Notation: ``B`` batch, ``N`` image tokens, ``L`` text tokens (the
padded length: the kernels compute the padding too), ``S = L + N`` the joint sequence, ``D`` width,
``H``/``Hkv`` query/key-value heads of head dim ``d`` (``H d = D``), ``F`` MLP width, ``C`` latent
channels per token, ``E`` timestep-embedding width; text fusion: ``K`` tapped layers of width
``T``, ``Ht``/``Hkvt`` heads of dim ``dt`` (``Ht dt = T``), MLP width ``Ft``.

One forward, per component:

- ``attention_projections`` (every transformer block): q and out ``2 D D`` each, k and v
  ``2 D Hkv d`` each, per joint token: ``blocks * B S (4 D^2 + 4 D Hkv d)``.
- ``attention_gate``: the sigmoid gate's projection, ``blocks * B S 2 D^2``.
- ``attention_scores_values``: ``Q K^T`` and ``P V`` over the whole joint sequence, each
  ``2 S^2 H d`` per sample: ``blocks * B 4 S^2 D``. Grouped-query attention shares key/value heads
  but every query head still scores every key, so GQA does not reduce this term.
- ``mlp``: SwiGLU gate, up and down, ``blocks * B S 6 D F``.
- ``text_fusion``: its blocks (projections, gate, MLP and attention as above at width ``T``),
  ``layerwise`` ones over ``B L`` sequences of ``K`` tokens, ``refiner`` ones over ``B`` sequences of
  ``L`` tokens, plus the ``Linear(K, 1)`` projector (``2 K T`` per text token).
- ``embeddings``: ``img_in`` and the final linear (``2 C D`` per image token each) and the text
  projection into the DiT width (``2 T D + 2 D D`` per text token).
- ``modulation``: the timestep MLP (``2 E D + 2 D D``) and the shared ``time_mod_proj``
  (``2 D 6D``), once per sample.

Training counts ``3x`` the forward (the backward computes gradients of both operands of every
matmul); recomputation by activation checkpointing is not counted (model FLOPs, not hardware
FLOPs), so MFU does not reward recomputing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

__all__ = ["PIXELS_PER_TOKEN", "ForwardFlops", "forward_flops", "image_tokens_at", "training_flops"]

# Qwen-Image VAE (8x downsampling) with 2x2 patches: one image token per 16x16 pixels.
PIXELS_PER_TOKEN = 16


@dataclass(frozen=True)
class ForwardFlops:
    """Matmul FLOPs of one Krea2DiT forward, by component (see the module docstring)."""

    attention_projections: int
    attention_gate: int
    attention_scores_values: int
    mlp: int
    text_fusion: int
    embeddings: int
    modulation: int

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def image_tokens_at(resolution: int, pixels_per_token: int = PIXELS_PER_TOKEN) -> int:
    """Image tokens of a square image at a nominal ``resolution`` (256 -> 256 tokens)."""
    if resolution <= 0 or resolution % pixels_per_token:
        raise ValueError(f"resolution {resolution} is not a positive multiple of {pixels_per_token} px per token")
    side = resolution // pixels_per_token
    return side * side


def _transformer_layer_flops(
    tokens: int, seq_len: int, width: int, num_heads: int, num_kv_heads: int, mlp_width: int
) -> tuple[int, int, int, int]:
    """(projections, gate, scores+values, mlp) FLOPs of one attention+SwiGLU layer.

    ``tokens`` rows in sequences of ``seq_len`` (``tokens / seq_len`` sequences).
    """
    kv_width = num_kv_heads * (width // num_heads)
    projections = tokens * (4 * width * width + 4 * width * kv_width)
    gate = tokens * 2 * width * width
    scores_values = tokens * 4 * seq_len * width  # (tokens / seq_len) sequences x 4 S^2 D
    mlp = tokens * 6 * width * mlp_width
    return projections, gate, scores_values, mlp


def _check_sizes(image_tokens: int, text_tokens: int, batch: int) -> None:
    for name, value in (("image_tokens", image_tokens), ("text_tokens", text_tokens), ("batch", batch)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if image_tokens == 0 or batch == 0:
        raise ValueError(f"need at least one image token and one sample, got image_tokens={image_tokens}, batch={batch}")


def forward_flops(config: Mapping, image_tokens: int, text_tokens: int, batch: int = 1) -> ForwardFlops:
    """Matmul FLOPs of one forward of a Krea2DiT with ``config`` (its constructor keywords).

    Args:
        config: Krea2DiT keywords (``krea2_train.model.model_config(preset)``).
        image_tokens: ``N`` per sample.
        text_tokens: ``L`` per sample, padding included.
        batch: ``B``.
    """
    _check_sizes(image_tokens, text_tokens, batch)
    width = config["attention_head_dim"] * config["num_attention_heads"]
    blocks = config["num_layers"]
    joint = text_tokens + image_tokens
    projections, gate, scores_values, mlp = _transformer_layer_flops(
        batch * joint, joint, width, config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]
    )

    text_width, text_layers = config["text_hidden_dim"], config["num_text_layers"]
    text_block = dict(
        width=text_width,
        num_heads=config["text_num_attention_heads"],
        num_kv_heads=config["text_num_key_value_heads"],
        mlp_width=config["text_intermediate_size"],
    )
    text_rows = batch * text_tokens
    layerwise = sum(_transformer_layer_flops(text_rows * text_layers, text_layers, **text_block))
    refiner = sum(_transformer_layer_flops(text_rows, text_tokens, **text_block)) if text_tokens else 0
    text_fusion = (
        config["num_layerwise_text_blocks"] * layerwise
        + text_rows * 2 * text_layers * text_width
        + config["num_refiner_text_blocks"] * refiner
    )

    channels = config["in_channels"]
    embeddings = batch * image_tokens * 2 * (2 * channels * width) + text_rows * (2 * text_width * width + 2 * width * width)
    modulation = batch * (2 * config["timestep_embed_dim"] * width + 2 * width * width + 2 * width * 6 * width)
    return ForwardFlops(
        attention_projections=blocks * projections,
        attention_gate=blocks * gate,
        attention_scores_values=blocks * scores_values,
        mlp=blocks * mlp,
        text_fusion=text_fusion,
        embeddings=embeddings,
        modulation=modulation,
    )


def training_flops(config: Mapping, image_tokens: int, text_tokens: int, batch: int = 1) -> int:
    """Model FLOPs of one training step (forward + backward): ``3x`` :func:`forward_flops`."""
    return 3 * forward_flops(config, image_tokens, text_tokens, batch).total
