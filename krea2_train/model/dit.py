"""Krea2DiT: the Krea 2 single-stream diffusion transformer, written for training.

It takes exactly the configuration keywords of ``diffusers.Krea2Transformer2DModel`` (diffusers
0.42.1), has exactly its state-dict keys and computes the same function; a test checks both on
random weights. What it adds for a trainer:

- every transformer block is a self-contained module (FSDP2 wraps them one by one; activation
  checkpointing and ``torch.compile`` apply per block) whose inputs are plain tensors;
- attention goes through PyTorch SDPA without repeating key/value heads: the query heads that
  share a key/value head are folded into the query-sequence axis, which is exact (each query row
  attends independently) and works with every SDPA backend, masked or not;
- the head counts are read from the projected tensors, so a tensor-parallel plan that shards the
  projections column-wise needs no change here;
- :meth:`Krea2DiT.init_weights` initialises for training from scratch (see its docstring).

Shapes: ``B`` batch, ``N`` image tokens, ``L`` text tokens, ``S = L + N`` joint sequence, ``D``
width, ``K`` tapped text-encoder layers, ``T`` text width, ``H``/``Hkv`` query/key-value heads,
``d`` head dim.

Sequence layout: ``[text; image]``. Time convention: ``t = 1`` is noise, ``t = 0`` is data; the
model predicts the velocity ``eps - x0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# The configuration keywords of diffusers.Krea2Transformer2DModel, with its defaults (the released
# 12.9B "Krea 2 Medium" model).
DEFAULT_CONFIG: dict = dict(
    in_channels=64,
    num_layers=28,
    attention_head_dim=128,
    num_attention_heads=48,
    num_key_value_heads=12,
    intermediate_size=16384,
    timestep_embed_dim=256,
    text_hidden_dim=2560,
    num_text_layers=12,
    text_num_attention_heads=20,
    text_num_key_value_heads=20,
    text_intermediate_size=6912,
    num_layerwise_text_blocks=2,
    num_refiner_text_blocks=2,
    axes_dims_rope=(32, 48, 48),
    rope_theta=1000.0,
    norm_eps=1e-5,
)


class ZeroCenteredRMSNorm(nn.Module):
    """RMSNorm whose effective scale is ``1 + weight`` (weight starts at 0), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (self.dim,), weight=self.weight.float() + 1.0, eps=self.eps)
        return normed.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Rotary position embedding over (t, h, w)
# ---------------------------------------------------------------------------------------------


def rotary_cos_sin(position_ids: torch.Tensor, axes_dims: Sequence[int], theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines of the 3-axis rotary embedding.

    Each axis ``i`` rotates ``axes_dims[i]`` channels of every head; within an axis, channel pair
    ``(2j, 2j + 1)`` turns at frequency ``theta ** (-2j / axes_dims[i])`` times the position.

    Args:
        position_ids: ``[S, 3]`` (t, h, w) coordinates.
    Returns:
        ``(cos, sin)``, each ``[S, d]`` float32, every frequency repeated for its channel pair.
    """
    freq_dtype = torch.float32 if position_ids.device.type in ("mps", "npu") else torch.float64
    positions = position_ids.float()
    cos_parts, sin_parts = [], []
    for axis, axis_dim in enumerate(axes_dims):
        inv_freq = 1.0 / theta ** (torch.arange(0, axis_dim, 2, dtype=freq_dtype, device=position_ids.device) / axis_dim)
        angles = torch.outer(positions[:, axis].to(freq_dtype), inv_freq)  # [S, axis_dim / 2]
        cos_parts.append(angles.cos().repeat_interleave(2, dim=-1))
        sin_parts.append(angles.sin().repeat_interleave(2, dim=-1))
    return torch.cat(cos_parts, dim=-1).float(), torch.cat(sin_parts, dim=-1).float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of ``x [B, S, heads, d]`` by ``cos``/``sin [S, d]`` (fp32 math)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, S, heads, d/2, 2]
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (x.float() * cos + rotated * sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Attention and MLP
# ---------------------------------------------------------------------------------------------


def grouped_query_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: torch.Tensor | None
) -> torch.Tensor:
    """SDPA for grouped-query attention without repeating key/value heads.

    Query head ``h`` reads key/value head ``h // G`` (``G = H / Hkv``). The ``G`` query heads of
    one group are folded into the query-sequence axis, so keys and values keep ``Hkv`` heads.

    Args:
        query: ``[B, S, H, d]``; key, value: ``[B, S_kv, Hkv, d]``.
        key_padding_mask: ``[B, S_kv]`` bool (True = attend) or None.
    Returns:
        ``[B, S, H * d]``.
    """
    batch, seq_len, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    groups = num_heads // num_kv_heads
    # [B, S, Hkv, G, d] -> [B, Hkv, G * S, d]
    q = query.view(batch, seq_len, num_kv_heads, groups, head_dim).permute(0, 2, 3, 1, 4)
    q = q.reshape(batch, num_kv_heads, groups * seq_len, head_dim)
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask)
    # [B, Hkv, G * S, d] -> [B, S, Hkv * G * d]
    out = out.view(batch, num_kv_heads, groups, seq_len, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(batch, seq_len, num_heads * head_dim)


class GatedAttention(nn.Module):
    """GQA self-attention with per-head QK RMSNorm, rotary embedding and a sigmoid output gate.

    ``out = W_o (SDPA(q, k, v) * sigmoid(W_gate x))``; no biases.
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, eps: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads are not divisible by {num_kv_heads} key/value heads")
        self.head_dim = dim // num_heads
        self.to_q = nn.Linear(dim, num_heads * self.head_dim, bias=False)
        self.to_k = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.to_v = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.to_gate = nn.Linear(dim, dim, bias=False)
        self.norm_q = ZeroCenteredRMSNorm(self.head_dim, eps)
        self.norm_k = ZeroCenteredRMSNorm(self.head_dim, eps)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x ``[B, S, D]`` -> ``[B, S, D]``; ``key_padding_mask [B, S]``; ``rotary`` cos/sin ``[S, d]``."""
        query = self.norm_q(self.to_q(x).unflatten(-1, (-1, self.head_dim)))
        key = self.norm_k(self.to_k(x).unflatten(-1, (-1, self.head_dim)))
        value = self.to_v(x).unflatten(-1, (-1, self.head_dim))
        if rotary is not None:
            query = apply_rotary(query, *rotary)
            key = apply_rotary(key, *rotary)
        attended = grouped_query_attention(query, key, value, key_padding_mask)
        return self.to_out[0](attended * torch.sigmoid(self.to_gate(x)))


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, no biases."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden_dim, bias=False)
        self.up = nn.Linear(dim, hidden_dim, bias=False)
        self.down = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


# ---------------------------------------------------------------------------------------------
# Text fusion: 12 tapped text-encoder layers -> one token sequence
# ---------------------------------------------------------------------------------------------


class TextFusionBlock(nn.Module):
    """Pre-norm transformer block without rotary embedding or time modulation."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, hidden_dim: int, eps: float) -> None:
        super().__init__()
        self.norm1 = ZeroCenteredRMSNorm(dim, eps)
        self.norm2 = ZeroCenteredRMSNorm(dim, eps)
        self.attn = GatedAttention(dim, num_heads, num_kv_heads, eps)
        self.ff = SwiGLU(dim, hidden_dim)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_padding_mask)
        return x + self.ff(self.norm2(x))


class TextFusion(nn.Module):
    """Fuse the stack of tapped text-encoder states into one sequence of text features.

    ``layerwise_blocks`` attend across the K tapped layers of each token (no mask, no rotary), a
    ``Linear(K, 1)`` projector collapses that axis, ``refiner_blocks`` attend across the tokens
    with the padding mask.
    """

    def __init__(
        self,
        num_text_layers: int,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        hidden_dim: int,
        num_layerwise_blocks: int,
        num_refiner_blocks: int,
        eps: float,
    ) -> None:
        super().__init__()
        make_block = lambda: TextFusionBlock(dim, num_heads, num_kv_heads, hidden_dim, eps)  # noqa: E731
        self.layerwise_blocks = nn.ModuleList([make_block() for _ in range(num_layerwise_blocks)])
        self.projector = nn.Linear(num_text_layers, 1, bias=False)
        self.refiner_blocks = nn.ModuleList([make_block() for _ in range(num_refiner_blocks)])

    def forward(self, text_states: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        """text_states ``[B, L, K, T]``, text_mask ``[B, L]`` -> fused ``[B, L, T]``."""
        batch, text_len, num_layers, width = text_states.shape
        per_token = text_states.reshape(batch * text_len, num_layers, width)
        for block in self.layerwise_blocks:
            per_token = block(per_token)
        per_token = per_token.reshape(batch, text_len, num_layers, width).transpose(2, 3)  # [B, L, T, K]
        fused = self.projector(per_token).squeeze(-1)
        for block in self.refiner_blocks:
            fused = block(fused, text_mask)
        return fused


# ---------------------------------------------------------------------------------------------
# Time conditioning
# ---------------------------------------------------------------------------------------------


class TimestepEmbedding(nn.Module):
    """Sinusoid of ``1000 t`` (cosines first) -> Linear -> GELU(tanh) -> Linear."""

    def __init__(self, embed_dim: int, dim: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.linear_1 = nn.Linear(embed_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """timestep ``[B]`` in [0, 1] -> ``[B, 1, D]``."""
        half = self.embed_dim // 2
        freqs = torch.exp(-math.log(1e4) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half)
        angles = (timestep.float() * 1e3)[:, None, None] * freqs  # [B, 1, half]
        sinusoid = torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype)
        return self.linear_2(F.gelu(self.linear_1(sinusoid), approximate="tanh"))


class TextProjection(nn.Module):
    """RMSNorm -> Linear(T, D) -> GELU(tanh) -> Linear(D, D): fused text features into the DiT width."""

    def __init__(self, text_dim: int, dim: int, eps: float) -> None:
        super().__init__()
        self.norm = ZeroCenteredRMSNorm(text_dim, eps)
        self.linear_1 = nn.Linear(text_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(self.norm(text)), approximate="tanh"))


# ---------------------------------------------------------------------------------------------
# The transformer block and the output layer
# ---------------------------------------------------------------------------------------------


class Krea2Block(nn.Module):
    """One single-stream block with light modulation.

    The six modulation vectors are the shared ``time_modulation [B, 1, 6D]`` plus this block's
    learned ``scale_shift_table [6, D]``:

        x += gate_attn * Attn((1 + scale_attn) * RMSNorm(x) + shift_attn)
        x += gate_mlp  * MLP((1 + scale_mlp) * RMSNorm(x) + shift_mlp)
    """

    def __init__(self, dim: int, hidden_dim: int, num_heads: int, num_kv_heads: int, eps: float) -> None:
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.zeros(6, dim))
        self.norm1 = ZeroCenteredRMSNorm(dim, eps)
        self.norm2 = ZeroCenteredRMSNorm(dim, eps)
        self.attn = GatedAttention(dim, num_heads, num_kv_heads, eps)
        self.ff = SwiGLU(dim, hidden_dim)

    def forward(
        self,
        x: torch.Tensor,
        time_modulation: torch.Tensor,
        rotary_cos: torch.Tensor,
        rotary_sin: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x ``[B, S, D]``, time_modulation ``[B, 1, 6D]``, rotary ``[S, d]``, mask ``[B, S]`` -> ``[B, S, D]``."""
        modulation = time_modulation.unflatten(-1, (6, -1)) + self.scale_shift_table  # [B, 1, 6, D]
        scale_attn, shift_attn, gate_attn, scale_mlp, shift_mlp, gate_mlp = modulation.unbind(-2)
        attn_in = (1.0 + scale_attn) * self.norm1(x) + shift_attn
        x = x + gate_attn * self.attn(attn_in, key_padding_mask, (rotary_cos, rotary_sin))
        mlp_in = (1.0 + scale_mlp) * self.norm2(x) + shift_mlp
        return x + gate_mlp * self.ff(mlp_in)


class FinalLayer(nn.Module):
    """``Linear((1 + scale) * RMSNorm(x) + shift)`` with (scale, shift) = temb + a learned ``[2, D]`` table."""

    def __init__(self, dim: int, out_channels: int, eps: float) -> None:
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.zeros(2, dim))
        self.norm = ZeroCenteredRMSNorm(dim, eps)
        self.linear = nn.Linear(dim, out_channels)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x ``[B, N, D]``, temb ``[B, 1, D]`` -> ``[B, N, C]``."""
        scale, shift = (temb + self.scale_shift_table).chunk(2, dim=1)  # each [B, 1, D]
        return self.linear((1.0 + scale) * self.norm(x) + shift)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


AUXILIARY_PREFIX = "auxiliary."


class Krea2DiT(nn.Module):
    """The Krea 2 DiT. Keywords and defaults are those of ``diffusers.Krea2Transformer2DModel``."""

    def __init__(
        self,
        in_channels: int = 64,
        num_layers: int = 28,
        attention_head_dim: int = 128,
        num_attention_heads: int = 48,
        num_key_value_heads: int = 12,
        intermediate_size: int = 16384,
        timestep_embed_dim: int = 256,
        text_hidden_dim: int = 2560,
        num_text_layers: int = 12,
        text_num_attention_heads: int = 20,
        text_num_key_value_heads: int = 20,
        text_intermediate_size: int = 6912,
        num_layerwise_text_blocks: int = 2,
        num_refiner_text_blocks: int = 2,
        axes_dims_rope: Sequence[int] = (32, 48, 48),
        rope_theta: float = 1000.0,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if sum(axes_dims_rope) != attention_head_dim:
            raise ValueError(f"sum(axes_dims_rope)={sum(axes_dims_rope)} must equal attention_head_dim={attention_head_dim}")
        self.config = dict(
            in_channels=in_channels,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            intermediate_size=intermediate_size,
            timestep_embed_dim=timestep_embed_dim,
            text_hidden_dim=text_hidden_dim,
            num_text_layers=num_text_layers,
            text_num_attention_heads=text_num_attention_heads,
            text_num_key_value_heads=text_num_key_value_heads,
            text_intermediate_size=text_intermediate_size,
            num_layerwise_text_blocks=num_layerwise_text_blocks,
            num_refiner_text_blocks=num_refiner_text_blocks,
            axes_dims_rope=tuple(axes_dims_rope),
            rope_theta=rope_theta,
            norm_eps=norm_eps,
        )
        dim = attention_head_dim * num_attention_heads
        self.hidden_size = dim
        self.axes_dims_rope = tuple(axes_dims_rope)
        self.rope_theta = rope_theta

        self.img_in = nn.Linear(in_channels, dim)
        self.time_embed = TimestepEmbedding(timestep_embed_dim, dim)
        self.time_mod_proj = nn.Linear(dim, 6 * dim)
        self.text_fusion = TextFusion(
            num_text_layers,
            text_hidden_dim,
            text_num_attention_heads,
            text_num_key_value_heads,
            text_intermediate_size,
            num_layerwise_text_blocks,
            num_refiner_text_blocks,
            norm_eps,
        )
        self.txt_in = TextProjection(text_hidden_dim, dim, norm_eps)
        self.transformer_blocks = nn.ModuleList(
            [Krea2Block(dim, intermediate_size, num_attention_heads, num_key_value_heads, norm_eps) for _ in range(num_layers)]
        )
        self.final_layer = FinalLayer(dim, in_channels, norm_eps)
        # Training-only modules a stage attaches (e.g. the iREPA projector). Empty by default, so
        # the state dict is exactly diffusers'; exports drop these keys (AUXILIARY_PREFIX).
        self.auxiliary = nn.ModuleDict()
        # Observers of a block's output ``[B, L + N, D]``, by block index (e.g. iREPA's capture).
        # They run in this loop, outside the blocks, so compiled and checkpointed blocks never
        # trace them.
        self.block_output_taps: dict[int, Callable[[torch.Tensor], None]] = {}
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise for training from scratch.

        - Linear layers: Xavier-uniform weights, zero biases (as in DiT).
        - Zero-centred norm weights and every modulation table: 0 (effective norm scale 1).
        - ``time_mod_proj`` and the final linear layer: 0, so at step 0 every block's gates are 0
          (each block is the identity, adaLN-Zero style) and the predicted velocity is 0; the
          gates open through the learned tables and ``time_mod_proj`` on the first steps.
        - ``time_embed``: normal(0, 0.02), so the time signal is present from the start.
        - The text-fusion projector averages the tapped layers (weights ``1 / K``).
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, ZeroCenteredRMSNorm):
                nn.init.zeros_(module.weight)
        for block in self.transformer_blocks:
            nn.init.zeros_(block.scale_shift_table)
        nn.init.zeros_(self.final_layer.scale_shift_table)
        for linear in (self.time_embed.linear_1, self.time_embed.linear_2):
            nn.init.normal_(linear.weight, std=0.02)
        nn.init.zeros_(self.time_mod_proj.weight)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.constant_(self.text_fusion.projector.weight, 1.0 / self.text_fusion.projector.in_features)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        position_ids: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow-matching velocity of the image tokens.

        Args:
            hidden_states: ``[B, N, C]`` packed noisy latents.
            encoder_hidden_states: ``[B, L, K, T]`` tapped text-encoder states.
            timestep: ``[B]`` flow time in [0, 1] (1 is noise).
            position_ids: ``[L + N, 3]`` rotary (t, h, w) coordinates.
            encoder_attention_mask: ``[B, L]`` bool, True for real text tokens; None if all are real.
        Returns:
            velocity ``[B, N, C]``.
        """
        if position_ids.ndim != 2 or position_ids.shape[-1] != 3:
            raise ValueError(f"position_ids must have shape (sequence_length, 3), got {tuple(position_ids.shape)}")
        batch, num_image_tokens, _ = hidden_states.shape
        text_len = encoder_hidden_states.shape[1]
        if position_ids.shape[0] != text_len + num_image_tokens:
            raise ValueError(
                f"position_ids has {position_ids.shape[0]} rows for {text_len} text + {num_image_tokens} image tokens"
            )

        temb = self.time_embed(timestep, dtype=hidden_states.dtype)  # [B, 1, D]
        time_modulation = self.time_mod_proj(F.gelu(temb, approximate="tanh"))  # [B, 1, 6D]

        text_mask = joint_mask = None
        if encoder_attention_mask is not None:
            text_mask = encoder_attention_mask.bool()
            joint_mask = torch.cat([text_mask, text_mask.new_ones(batch, num_image_tokens)], dim=1)

        text = self.txt_in(self.text_fusion(encoder_hidden_states, text_mask))  # [B, L, D]
        x = torch.cat([text, self.img_in(hidden_states)], dim=1)  # [B, S, D]
        rotary_cos, rotary_sin = rotary_cos_sin(position_ids, self.axes_dims_rope, self.rope_theta)

        for index, block in enumerate(self.transformer_blocks):
            x = block(x, time_modulation, rotary_cos, rotary_sin, joint_mask)
            if index in self.block_output_taps:
                self.block_output_taps[index](x)

        return self.final_layer(x[:, text_len:], temb)
