"""LoRA for the Krea 2 DiT: a frozen base plus a trained low-rank update, ``W x + s B A x``.

A :class:`LoRALinear` *is* an ``nn.Linear`` (its frozen ``weight``/``bias`` keep their names) with
two children, ``lora_A`` (``[r, in]``, Kaiming-uniform) and ``lora_B`` (``[out, r]``, zeros, so an
injected model computes exactly what the base computes), and ``s = alpha / r`` as in PEFT. Its
state-dict keys are therefore the base model's keys plus ``<module>.lora_A.weight`` and
``<module>.lora_B.weight``, the names diffusers/PEFT use (without PEFT's ``base_layer`` level):

- the base checkpoint loads into an injected model unchanged, and :func:`lora_state_dict` is the
  PEFT layout minus the ``transformer.`` prefix (``krea2_train.model.lora_formats`` adds it);
- FSDP2 wraps blocks that hold frozen and trainable parameters together (it requires one dtype
  only among the trainable ones, which LoRA keeps in fp32); activation checkpointing and
  ``torch.compile`` see plain tensor code.

Tensor parallelism is not supported: the TP styles shard an ``nn.Linear``'s own parameters only.

The frozen base can be held in fp32, bf16 or float8 (``base_dtype``): float8 stores each wrapped
weight as ``float8_e4m3fn`` with one fp32 scale per output row and dequantises it in the forward,
a weight-only format that works on any device and halves the bf16 footprint.

Memory of LoRA training at scale: :func:`estimate_lora_training_memory` (meta device, no weights).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from krea2_train.errors import Krea2Error, compile_patterns

# Attention q/k/v/out/gate and the SwiGLU of every transformer block.
DEFAULT_TARGETS: tuple[str, ...] = (
    r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|to_gate)",
    r"transformer_blocks\.\d+\.ff\.(gate|up|down)",
)
BASE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "float8": torch.float8_e4m3fn}
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
_FLOAT8_MAX = torch.finfo(torch.float8_e4m3fn).max


class LoRAError(Krea2Error, ValueError):
    """A LoRA that does not fit a model, or a LoRA setting that cannot work."""


@dataclass(frozen=True)
class LoRASpec:
    """Where LoRA goes and how large it is.

    Attributes:
        rank: ``r``, the inner dimension of ``B A``.
        alpha: the update is scaled by ``alpha / r`` (PEFT's convention).
        dropout: dropout on the LoRA branch's input (training only).
        targets: regular expressions, each matched in full against module names
            (``transformer_blocks.3.attn.to_q``); every matching ``nn.Linear`` gets LoRA.
    """

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise LoRAError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise LoRAError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoRAError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        compile_targets(self.targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """``y = x W^T + b + (alpha / r) * B(A(dropout(x)))``; ``W`` and ``b`` frozen.

    When ``weight`` is float8, ``weight_scale`` (``[out, 1]`` fp32) dequantises it row by row.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, alpha: float, dropout: float = 0.0,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank = rank
        self.alpha = alpha
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=torch.float32)
        self.register_buffer("weight_scale", None)
        self.merged = False
        self.reset_lora_parameters()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A as ``nn.Linear`` initialises weights (Kaiming-uniform), B zeros: the update starts at 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @classmethod
    def wrap(cls, linear: nn.Linear, spec: LoRASpec) -> LoRALinear:
        """A LoRALinear holding ``linear``'s own weight and bias tensors (no copy), frozen."""
        weight = linear.weight
        with torch.device("meta"):  # the base tensors are taken over, not allocated
            lora = cls(linear.in_features, linear.out_features, linear.bias is not None, spec.rank, spec.alpha,
                       spec.dropout, dtype=weight.dtype)
        lora.weight = linear.weight
        lora.bias = linear.bias
        lora.weight.requires_grad_(False)
        if lora.bias is not None:
            lora.bias.requires_grad_(False)
        lora.lora_A.to_empty(device=weight.device)
        lora.lora_B.to_empty(device=weight.device)
        if weight.device.type != "meta":
            lora.reset_lora_parameters()
        return lora

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The frozen weight ``[out, in]``, dequantised when stored in float8."""
        if self.weight_scale is None:
            return self.weight if dtype is None else self.weight.to(dtype)
        return (self.weight.to(torch.float32) * self.weight_scale).to(dtype or torch.float32)

    def delta_weight(self) -> torch.Tensor:
        """``(alpha / r) B A`` ``[out, in]`` in fp32."""
        return self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.base_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if self.merged:
            return out
        update = self.lora_B(self.lora_A(self.lora_dropout(x).to(self.lora_A.weight.dtype)))
        return out + (update * self.scale).to(out.dtype)

    @torch.no_grad()
    def quantize_base_float8(self) -> None:
        """Store the frozen weight as float8_e4m3fn with one fp32 scale per output row."""
        if self.weight_scale is not None:
            return
        weight = self.weight.float()
        scale = (weight.abs().amax(dim=1, keepdim=True) / _FLOAT8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
        self.weight = nn.Parameter((weight / scale).to(torch.float8_e4m3fn), requires_grad=False)
        self.weight_scale = scale

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base weight (the LoRA branch is then skipped)."""
        self._fold(+1.0)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract a merged update again."""
        self._fold(-1.0)

    def _fold(self, sign: float) -> None:
        if self.weight_scale is not None:
            raise LoRAError("cannot merge LoRA into a float8 base weight (it would be re-quantised); use a bf16 or fp32 base")
        if self.merged == (sign > 0):
            raise LoRAError(f"LoRA is already {'merged' if self.merged else 'unmerged'}")
        self.weight.add_((sign * self.delta_weight()).to(self.weight.dtype))
        self.merged = sign > 0

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


# ----------------------------------------------------------------------------------------------
# Injection and state-dict views
# ----------------------------------------------------------------------------------------------


def compile_targets(targets: Iterable[str]) -> list[re.Pattern]:
    """The LoRA target patterns (regular expressions over module names), compiled.

    Raises:
        LoRAError: none given, or one that is not a regular expression (named).
    """
    compiled = compile_patterns(targets, "LoRA targets", LoRAError)
    if not compiled:
        raise LoRAError("LoRA targets are empty: give at least one regular expression over module names")
    return compiled


def matching_linear_names(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules whose full name matches one of ``targets``."""
    compiled = compile_targets(targets)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear)
        and not name.startswith("auxiliary.") and any(pattern.fullmatch(name) for pattern in compiled)
    ]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def inject_lora(model: nn.Module, spec: LoRASpec) -> list[str]:
    """Replace every targeted ``nn.Linear`` of ``model`` with a :class:`LoRALinear` (in place).

    Returns the wrapped module names. Raises :class:`LoRAError` when no module matches.
    """
    names = matching_linear_names(model, spec.targets)
    if not names:
        raise LoRAError(
            f"no nn.Linear module name matches the LoRA targets {list(spec.targets)} "
            f"(module names look like 'transformer_blocks.0.attn.to_q', 'transformer_blocks.0.ff.up')"
        )
    for name in names:
        _set_submodule(model, name, LoRALinear.wrap(model.get_submodule(name), spec))
    return names


def freeze_base(model: nn.Module) -> None:
    """Every parameter that is not a LoRA parameter stops requiring grad."""
    for name, param in model.named_parameters():
        param.requires_grad_(bool(LORA_KEY.match(name)))


def cast_base(model: nn.Module, base_dtype: str, *, unwrapped_dtype: str | None = None) -> None:
    """Hold the frozen parameters in ``base_dtype`` ("fp32", "bf16", "float8"); LoRA stays fp32.

    float8 applies to the LoRA-wrapped weights; the other frozen parameters go to bf16, or to
    ``unwrapped_dtype`` when given: a LoRA layer casts its base weight to its input's dtype, a
    plain layer computes with its weight as stored (see LoRAStage.prepare_model).
    """
    if base_dtype not in BASE_DTYPES or unwrapped_dtype not in (None, "fp32", "bf16"):
        raise LoRAError(f"LoRA base dtype {base_dtype!r} (unwrapped {unwrapped_dtype!r}); accepted: {', '.join(BASE_DTYPES)}")
    wrapped = {f"{name}.{key}" for name in lora_modules(model) for key in ("weight", "bias")}
    wrapped_dtype = torch.bfloat16 if base_dtype == "float8" else BASE_DTYPES[base_dtype]
    plain = BASE_DTYPES[unwrapped_dtype] if unwrapped_dtype is not None else wrapped_dtype
    for name, param in model.named_parameters():
        if not LORA_KEY.match(name) and param.dtype.is_floating_point:
            param.data = param.data.to(wrapped_dtype if name in wrapped else plain)
    if base_dtype == "float8":
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.quantize_base_float8()


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA weights: ``{<module>.lora_A.weight: [r, in], <module>.lora_B.weight: [out, r]}``."""
    return {key: tensor for key, tensor in model.state_dict().items() if LORA_KEY.match(key)}


def split_lora_weights(weights: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a LoRA run's state dict into (base weights of a plain model, LoRA weights).

    A float8 base (``<module>.weight`` with ``<module>.weight_scale``) is dequantised to bf16.
    """
    base, lora = {}, {}
    for key, tensor in weights.items():
        (lora if LORA_KEY.match(key) else base)[key] = tensor
    for scale_key in [key for key in base if key.endswith(".weight_scale")]:
        weight_key = scale_key[: -len("_scale")]
        scale = base.pop(scale_key)
        base[weight_key] = (base[weight_key].float() * scale.float()).to(torch.bfloat16)
    return base, lora


def merge_all(model: nn.Module) -> None:
    for module in lora_modules(model).values():
        module.merge()


def unmerge_all(model: nn.Module) -> None:
    for module in lora_modules(model).values():
        module.unmerge()


# ----------------------------------------------------------------------------------------------
# LoRA weights independent of a model: pairs of (down, up) with alpha
# ----------------------------------------------------------------------------------------------


@dataclass
class LoRAPair:
    """One module's update ``(alpha / r) up @ down``; ``down`` ``[r, in]`` (A), ``up`` ``[out, r]`` (B)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    def __post_init__(self) -> None:
        if self.down.ndim != 2 or self.up.ndim != 2 or self.down.shape[0] != self.up.shape[1]:
            raise LoRAError(f"LoRA A {tuple(self.down.shape)} and B {tuple(self.up.shape)} do not form a rank-r product")

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """``[out, in]`` fp32."""
        return self.up.float() @ self.down.float() * (self.alpha / self.rank)


def pairs_from_state_dict(lora_weights: Mapping[str, torch.Tensor], alpha: float | Mapping[str, float]) -> dict[str, LoRAPair]:
    """``{<module>.lora_A.weight, <module>.lora_B.weight}`` -> ``{module: LoRAPair}``.

    ``alpha`` is one value for every module or a mapping module -> alpha.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in lora_weights.items():
        match = LORA_KEY.match(key)
        if match is None:
            raise LoRAError(f"{key!r} is not a LoRA weight (expected '<module>.lora_A.weight' or '.lora_B.weight')")
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    pairs = {}
    for module, found in parts.items():
        if set(found) != {"lora_A", "lora_B"}:
            raise LoRAError(f"LoRA for {module!r} has only {sorted(found)}; both lora_A and lora_B are needed")
        module_alpha = alpha[module] if isinstance(alpha, Mapping) else alpha
        pairs[module] = LoRAPair(found["lora_A"], found["lora_B"], float(module_alpha))
    return pairs


def pairs_of_model(model: nn.Module) -> dict[str, LoRAPair]:
    """The LoRA of an injected model as pairs (detached CPU fp32 copies)."""
    return {
        name: LoRAPair(module.lora_A.weight.detach().float().cpu().clone(), module.lora_B.weight.detach().float().cpu().clone(), module.alpha)
        for name, module in lora_modules(model).items()
    }


def _check_pair_fits(name: str, pair: LoRAPair, weight_shape: Sequence[int]) -> None:
    if tuple(weight_shape) != (pair.up.shape[0], pair.down.shape[1]):
        raise LoRAError(
            f"LoRA for {name!r} is {pair.up.shape[0]}x{pair.down.shape[1]}, the model's weight is "
            f"{tuple(weight_shape)[0]}x{tuple(weight_shape)[1]} (another model config?)"
        )


@torch.no_grad()
def load_pairs_into_model(model: nn.Module, pairs: Mapping[str, LoRAPair]) -> None:
    """Set an injected model's LoRA weights from ``pairs`` (the same modules, any rank/alpha).

    Ranks must match the model's; a different alpha is absorbed into B, so the update is exact.
    """
    modules = lora_modules(model)
    missing, unexpected = sorted(set(modules) - set(pairs)), sorted(set(pairs) - set(modules))
    if missing or unexpected:
        raise LoRAError(f"LoRA modules differ from the model's: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, pair in pairs.items():
        module = modules[name]
        _check_pair_fits(name, pair, module.weight.shape)
        if pair.rank != module.rank:
            raise LoRAError(f"LoRA for {name!r} has rank {pair.rank}, the model's LoRA has rank {module.rank}")
        module.lora_A.weight.copy_(pair.down)
        module.lora_B.weight.copy_(pair.up.float() * ((pair.alpha / pair.rank) / module.scale))


@torch.no_grad()
def bake_pairs(
    weights: dict[str, torch.Tensor], pairs: Mapping[str, LoRAPair], strength: float = 1.0, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """``W += strength * (alpha / r) B A`` for every pair, on a diffusers-keyed state dict (in place).

    The sum is formed in fp32 and stored in ``dtype``, or back in each weight's dtype (a small
    LoRA baked into bf16 weights loses much of its effect to rounding: sampling in fp32 from a
    bf16 checkpoint passes ``dtype=float32``).
    """
    for name, pair in pairs.items():
        key = f"{name}.weight"
        if key not in weights:
            raise LoRAError(f"LoRA targets {name!r}, which is not a linear layer of this checkpoint")
        _check_pair_fits(name, pair, weights[key].shape)
        weights[key] = (weights[key].float() + strength * pair.delta()).to(dtype or weights[key].dtype)
    return weights


# ----------------------------------------------------------------------------------------------
# Memory of LoRA training (meta device)
# ----------------------------------------------------------------------------------------------

GIB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one LoRA training step, by item (see :func:`estimate_lora_training_memory`)."""

    base_params: int
    lora_params: int
    lora_grads: int
    optimizer_state: int
    activations: int
    num_base_parameters: int
    num_lora_parameters: int

    @property
    def total(self) -> int:
        return self.base_params + self.lora_params + self.lora_grads + self.optimizer_state + self.activations

    def rows(self) -> list[tuple[str, float]]:
        """(item, GiB) rows, the total last."""
        items = ("base_params", "lora_params", "lora_grads", "optimizer_state", "activations")
        return [*((item, getattr(self, item) / GIB) for item in items), ("total", self.total / GIB)]


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def estimate_lora_training_memory(
    preset: str = "krea2_medium",
    *,
    spec: LoRASpec = LoRASpec(),
    base_dtype: str = "bf16",
    image_tokens: int = 4096,
    text_tokens: int = 512,
    batch_size: int = 1,
    activation_dtype: torch.dtype = torch.bfloat16,
) -> MemoryEstimate:
    """Memory of LoRA training with full activation checkpointing, one device, no sharding.

    The model is built and injected on the meta device, so parameter counts and dtypes are exact:

    - base parameters in ``base_dtype`` (float8: the wrapped weights in 1 byte plus their row
      scales; everything else bf16); LoRA parameters, their gradients and AdamW's two moments in
      fp32 (16 bytes per LoRA parameter in all).
    - activations (an estimate, ``E = activation_dtype`` bytes, ``S = text + image tokens``):
      full checkpointing keeps each block's input, ``num_layers * B * S * D * E``; the block being
      recomputed holds its own intermediates, counted as q, k, v, gate, attention output and
      the attention input (``B * S * (4D + 2 Dkv) * E``), the SwiGLU gate/up/product
      (``3 * B * S * F * E``), two residual/normalised copies (``2 * B * S * D * E``) and the
      LoRA branches' rank-r inputs; attention itself uses a memory-efficient SDPA kernel
      (no ``S x S`` matrix). The text fusion (frozen) saves nothing for backward unless LoRA
      targets it; then each of its block passes (layerwise blocks run on ``K`` layers per token)
      is counted like a block. Allocator fragmentation, the CUDA context and the text encoder are not
      included: add 1 to 2 GiB.
    """
    from krea2_train.model.presets import build_model

    model = build_model(preset, device="meta")
    inject_lora(model, spec)
    freeze_base(model)
    cast_base(model, base_dtype)
    lora = [p for p in model.parameters() if p.requires_grad]
    base = [p for p in model.parameters() if not p.requires_grad]
    scales = [m.weight_scale for m in lora_modules(model).values() if m.weight_scale is not None]
    num_lora = sum(p.numel() for p in lora)
    config = model.config
    width = config["attention_head_dim"] * config["num_attention_heads"]
    kv_width = config["attention_head_dim"] * config["num_key_value_heads"]
    hidden = config["intermediate_size"]
    element = torch.empty((), dtype=activation_dtype).element_size()
    tokens = batch_size * (image_tokens + text_tokens)
    block_inputs = config["num_layers"] * tokens * width * element
    one_block = tokens * element * ((4 * width + 2 * kv_width) + 3 * hidden + 2 * width)
    lora_branches = tokens * element * spec.rank * len(lora_modules(model)) // config["num_layers"]
    text_width = config["text_hidden_dim"]
    text_block = batch_size * text_tokens * element * (6 * text_width + 3 * config["text_intermediate_size"])
    text_block_passes = config["num_layerwise_text_blocks"] * config["num_text_layers"] + config["num_refiner_text_blocks"]
    adapts_text = any(name.startswith("text_fusion.") for name in lora_modules(model))
    text_saved = text_block_passes * text_block if adapts_text else 0
    activations = block_inputs + one_block + lora_branches + text_saved
    return MemoryEstimate(
        base_params=_tensor_bytes(base) + _tensor_bytes(scales),
        lora_params=_tensor_bytes(lora),
        lora_grads=_tensor_bytes(lora),
        optimizer_state=2 * _tensor_bytes(lora),
        activations=activations,
        num_base_parameters=sum(p.numel() for p in base),
        num_lora_parameters=num_lora,
    )
