"""Named Krea2DiT configurations.

- ``tiny``: under 1M parameters; tests and the CPU demo (text width 64, 4 tapped layers).
- ``small``: about 0.5B; single-GPU experiments with the real Qwen3-VL-4B text width.
- ``krea2_medium``: the released 12.9B "Krea 2 Medium" configuration (diffusers' defaults).
- ``bench_full_width``: full-width Krea 2 blocks at a depth one GPU holds with AdamW state, so
  per-block speed matches the 12.9B model's.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from krea2_train.model.dit import DEFAULT_CONFIG, Krea2DiT

PRESETS: dict[str, dict] = {
    "tiny": dict(
        in_channels=64,
        num_layers=2,
        attention_head_dim=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        timestep_embed_dim=64,
        text_hidden_dim=64,
        num_text_layers=4,
        text_num_attention_heads=4,
        text_num_key_value_heads=2,
        text_intermediate_size=128,
        num_layerwise_text_blocks=2,
        num_refiner_text_blocks=2,
        axes_dims_rope=(8, 12, 12),
        rope_theta=1000.0,
        norm_eps=1e-5,
    ),
    "small": dict(
        DEFAULT_CONFIG,
        num_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        intermediate_size=4096,
        num_layerwise_text_blocks=1,
        num_refiner_text_blocks=1,
    ),
    "krea2_medium": dict(DEFAULT_CONFIG),
    "bench_full_width": dict(DEFAULT_CONFIG, num_layers=4),
}


def model_config(preset: str | Mapping, **overrides) -> dict:
    """Resolve a preset name (or a config mapping) plus overrides into Krea2DiT keywords."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown model preset {preset!r}; known presets: {', '.join(sorted(PRESETS))}")
        config = dict(PRESETS[preset])
    else:
        config = dict(preset)
    config.update(overrides)
    unknown = sorted(set(config) - set(DEFAULT_CONFIG))
    if unknown:
        raise ValueError(f"unknown Krea2DiT config keys {unknown}; accepted: {sorted(DEFAULT_CONFIG)}")
    # sequences as tuples, as a run's recorded model_config.json reads back (a Hydra override
    # gives a list, and [16, 24, 24] != (16, 24, 24) refused every resume of such a run)
    return {key: tuple(value) if isinstance(value, (list, tuple)) else value for key, value in config.items()}


def build_model(
    preset: str | Mapping, device: torch.device | str | None = None, dtype: torch.dtype | None = None, **overrides
) -> Krea2DiT:
    """Build a Krea2DiT from a preset or config; ``device="meta"`` allocates nothing."""
    config = model_config(preset, **overrides)
    with torch.device(device or "cpu"):
        model = Krea2DiT(**config)
    return model if dtype is None else model.to(dtype)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
