"""8-bit (float8) training of the DiT's transformer-block Linear layers.

The Krea 2 report trains at 256 px with tensorwise float8 scaling and at 512 px with rowwise
scaling (15-20% faster than bf16), and in bf16 from 1024 px on. This module turns a
:class:`~krea2_train.config.schema.Float8Config` into a converted model:

- **Selection** (:func:`select_float8_linears`): an ``nn.Linear`` is converted when its module path
  matches one ``include`` regex and no ``exclude`` regex (``re.search``). The defaults convert the
  attention projections (``to_q/to_k/to_v/to_gate/to_out.0``) and the SwiGLU (``gate/up/down``) of
  every transformer block and keep the image/text input projections, the final layer, the timestep
  MLP and shared modulation, the text fusion and every norm in high precision.
  ``keep_first_last_blocks`` also keeps blocks 0 and N-1. Float8 matmuls need both dims of a weight
  divisible by 16; with tensor parallelism ``tp`` the sharded dim must stay so, so a layer is
  converted only when both dims are multiples of ``16 * tp``. Selected layers that fail this are
  **skipped** (listed in :attr:`Float8Selection.skipped` and logged), not refused.
- **Backends**: ``torchao`` (``convert_to_float8_training`` with
  ``Float8LinearConfig.from_recipe_name(recipe)``; the recipe names are the report's) and
  ``transformer_engine`` (each selected Linear becomes a ``transformer_engine.pytorch.Linear`` with
  the same weights; the model's forward runs under ``fp8_autocast`` with ``Float8CurrentScaling``
  for ``tensorwise`` and ``Float8BlockScaling`` (1x128 / 128x128 blocks, TE's nearest to rowwise)
  for ``rowwise``). transformer_engine is optional and imported only when requested.
- **FSDP2 float8 all-gather** (torchao, tensorwise, data-parallel sharding): weights are
  all-gathered in float8. Their scales are precomputed with one all-reduce by a forward pre-hook
  on the root module, i.e. right before every forward from the weights as they are then. That is
  equivalent to torchao's "after each optimizer step" and stays correct after a skipped step, a
  rollback or a resume (which load weights in place). Rowwise all-gathers in the param dtype.
- **Capability and fallback** (:func:`apply_float8`): float8 training counts as available only on
  a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell). A CPU is *not* capable:
  torchao's float8 runs there (torch 2.13 has a CPU ``_scaled_mm``) and the tests use it through
  :func:`convert_to_float8`, but it is about 2x slower than fp32 on the tiny model, so a training
  run gains nothing. Without a capable GPU, ``allow_fallback=True`` logs a warning at start and
  trains in the base precision; ``allow_fallback=False`` refuses to start.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
from collections.abc import Sequence

import torch
from torch import nn

from krea2_train.config.schema import Float8Config
from krea2_train.errors import Krea2Error, compile_patterns

__all__ = [
    "FLOAT8_BACKENDS",
    "FLOAT8_RECIPES",
    "Float8Selection",
    "Float8UnavailableError",
    "apply_float8",
    "convert_to_float8",
    "float8_unavailable_reason",
    "import_transformer_engine",
    "select_float8_linears",
]

logger = logging.getLogger(__name__)

FLOAT8_BACKENDS = ("torchao", "transformer_engine")
FLOAT8_RECIPES = ("tensorwise", "rowwise")
MIN_COMPUTE_CAPABILITY = (8, 9)
FLOAT8_DIM_MULTIPLE = 16
# TE recipe class (in transformer_engine.common.recipe) for each torchao recipe name.
TRANSFORMER_ENGINE_RECIPES = {"tensorwise": "Float8CurrentScaling", "rowwise": "Float8BlockScaling"}


class Float8UnavailableError(Krea2Error, RuntimeError):
    """Float8 training was requested where it cannot run, and the config forbids the fallback."""


# ---------------------------------------------------------------------------------------------
# Capability
# ---------------------------------------------------------------------------------------------


def float8_unavailable_reason(device: torch.device) -> str | None:
    """Why float8 training cannot run on ``device``, or None when it can (CUDA, sm89+)."""
    if device.type != "cuda":
        return f"float8 training needs a CUDA GPU of compute capability >= 8.9; this run's device is {device.type!r}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_COMPUTE_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return f"float8 training needs compute capability >= 8.9; {name} has {major}.{minor}"
    return None


# ---------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Float8Selection:
    """Module paths of the Linear layers a config converts, and of those skipped for their dims."""

    converted: tuple[str, ...]
    skipped: tuple[str, ...]


def _edge_block_prefixes(model: nn.Module) -> tuple[str, ...]:
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is None or len(blocks) == 0:
        raise ValueError("float8.keep_first_last_blocks needs a model with transformer_blocks")
    return ("transformer_blocks.0.", f"transformer_blocks.{len(blocks) - 1}.")


def _dims_fit(linear: nn.Linear, tp: int) -> bool:
    multiple = FLOAT8_DIM_MULTIPLE * tp
    return linear.in_features % multiple == 0 and linear.out_features % multiple == 0


def select_float8_linears(model: nn.Module, config: Float8Config, *, tp: int = 1) -> Float8Selection:
    """The ``nn.Linear`` layers of ``model`` that ``config`` converts (see the module docstring).

    Args:
        model: the DiT before any wrapping (module paths as in its state dict).
        tp: tensor-parallel degree; both weight dims must be multiples of ``16 * tp``.
    """
    include = compile_patterns(config.include, "float8.include", ValueError)
    exclude = compile_patterns(config.exclude, "float8.exclude", ValueError)
    edge_blocks = _edge_block_prefixes(model) if config.keep_first_last_blocks else ()
    converted, skipped = [], []
    for fqn, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if not any(p.search(fqn) for p in include) or any(p.search(fqn) for p in exclude):
            continue
        if fqn.startswith(edge_blocks):
            continue
        (converted if _dims_fit(module, tp) else skipped).append(fqn)
    return Float8Selection(tuple(converted), tuple(skipped))


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------


def _float8_all_gather(config: Float8Config, fsdp_sharded: bool) -> bool:
    """FSDP2 all-gathers weights in float8: torchao, tensorwise, sharded, and the config allows it."""
    return config.backend == "torchao" and config.recipe == "tensorwise" and fsdp_sharded and config.fsdp_float8_all_gather


def _convert_torchao(model: nn.Module, fqns: set[str], recipe: str, fsdp_float8_all_gather: bool) -> None:
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    linear_config = Float8LinearConfig.from_recipe_name(recipe)
    if fsdp_float8_all_gather:
        linear_config = dataclasses.replace(linear_config, enable_fsdp_float8_all_gather=True)
    convert_to_float8_training(model, config=linear_config, module_filter_fn=lambda _module, fqn: fqn in fqns)
    if fsdp_float8_all_gather:
        model.register_forward_pre_hook(_precompute_float8_weight_scales)


def _precompute_float8_weight_scales(model: nn.Module, _args) -> None:
    """Forward pre-hook: float8 scales of the FSDP-sharded weights, one all-reduce for all."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)


def import_transformer_engine():
    """``transformer_engine.pytorch``, or an ImportError that says how to get it."""
    try:
        return importlib.import_module("transformer_engine.pytorch")
    except ImportError as error:
        raise ImportError(
            "float8.backend=transformer_engine, but transformer_engine.pytorch cannot be imported "
            f"({error}). It needs a CUDA build of torch: pip install 'transformer-engine[pytorch]', "
            "or use float8.backend=torchao"
        ) from error


def _transformer_engine_recipe(recipe: str):
    recipes = importlib.import_module("transformer_engine.common.recipe")
    class_name = TRANSFORMER_ENGINE_RECIPES[recipe]
    if not hasattr(recipes, class_name):
        raise ImportError(
            f"float8.recipe={recipe} needs transformer_engine.common.recipe.{class_name} "
            "(transformer-engine 2.3 or newer); upgrade transformer-engine or use float8.backend=torchao"
        )
    return getattr(recipes, class_name)()


def _swap_for_transformer_engine_linear(model: nn.Module, fqn: str, te_pytorch) -> None:
    parent_path, _, name = fqn.rpartition(".")
    parent = model.get_submodule(parent_path)
    linear = getattr(parent, name)
    replacement = te_pytorch.Linear(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        params_dtype=linear.weight.dtype,
        device=linear.weight.device,
    )
    with torch.no_grad():
        replacement.weight.copy_(linear.weight)
        if linear.bias is not None:
            replacement.bias.copy_(linear.bias)
    replacement.weight.requires_grad_(linear.weight.requires_grad)
    setattr(parent, name, replacement)


def _convert_transformer_engine(model: nn.Module, fqns: Sequence[str], recipe: str) -> None:
    te_pytorch = import_transformer_engine()
    fp8_recipe = _transformer_engine_recipe(recipe)
    for fqn in fqns:
        _swap_for_transformer_engine_linear(model, fqn, te_pytorch)
    forward = model.forward

    @functools.wraps(forward)
    def forward_in_fp8_autocast(*args, **kwargs):
        with te_pytorch.fp8_autocast(enabled=True, fp8_recipe=fp8_recipe):
            return forward(*args, **kwargs)

    model.forward = forward_in_fp8_autocast


def convert_to_float8(
    model: nn.Module, config: Float8Config, *, tp: int = 1, fsdp_sharded: bool = False
) -> Float8Selection:
    """Convert the selected Linear layers of ``model`` in place, on any device (no capability check).

    Args:
        model: the DiT, before tensor parallelism, activation checkpointing, compile and FSDP2.
        config: backend, recipe and filters (``enabled`` and ``allow_fallback`` are not read here).
        tp: tensor-parallel degree (dimension checks).
        fsdp_sharded: FSDP2 will shard the weights over more than one rank; with torchao tensorwise
            and ``config.fsdp_float8_all_gather`` the weights are then all-gathered in float8.
    Returns:
        the selection that was converted.
    Raises:
        ValueError: unknown backend or recipe, or nothing selected.
        ImportError: transformer_engine requested but not importable.
    """
    if config.backend not in FLOAT8_BACKENDS:
        raise ValueError(f"float8.backend must be one of {FLOAT8_BACKENDS}, got {config.backend!r}")
    if config.recipe not in FLOAT8_RECIPES:
        raise ValueError(f"float8.recipe must be one of {FLOAT8_RECIPES}, got {config.recipe!r}")
    selection = select_float8_linears(model, config, tp=tp)
    if selection.skipped:
        logger.warning(
            "float8: %d selected Linear layers keep their precision (a weight dim is not a multiple of %d): %s",
            len(selection.skipped), FLOAT8_DIM_MULTIPLE * tp, ", ".join(selection.skipped),
        )
    if not selection.converted:
        raise ValueError(
            "float8 is enabled but its filters select no convertible Linear layer "
            f"(include={list(config.include)}, exclude={list(config.exclude)}, "
            f"keep_first_last_blocks={config.keep_first_last_blocks}, skipped for dims: {list(selection.skipped)})"
        )
    if config.backend == "torchao":
        _convert_torchao(model, set(selection.converted), config.recipe, _float8_all_gather(config, fsdp_sharded))
    else:
        _convert_transformer_engine(model, selection.converted, config.recipe)
    return selection


# ---------------------------------------------------------------------------------------------
# Policy: what a training run does
# ---------------------------------------------------------------------------------------------


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def apply_float8(
    model: nn.Module,
    config: Float8Config | None,
    *,
    tp: int = 1,
    fsdp_sharded: bool = False,
    compile: bool = False,
    base_dtype: torch.dtype = torch.float32,
) -> Float8Selection | None:
    """Convert ``model`` for float8 training if ``config`` asks for it and the device can run it.

    Logs what it does. Without a capable GPU (see :func:`float8_unavailable_reason`) it falls back
    to ``base_dtype`` with a warning when ``config.allow_fallback``, else raises
    :class:`Float8UnavailableError`.

    Args:
        model: the DiT on its training device, before any parallelism.
        config: None or ``enabled=False``: nothing happens.
        tp, fsdp_sharded: as in :func:`convert_to_float8`.
        compile: the blocks will be compiled (refused with transformer_engine).
        base_dtype: the precision used instead (named in the fallback message).
    Returns:
        the converted selection, or None when nothing was converted.
    """
    if config is None or not config.enabled:
        return None
    if config.backend == "transformer_engine" and (tp > 1 or compile):
        raise ValueError(
            "float8.backend=transformer_engine does not compose with this trainer's tensor-parallel "
            "plan (DTensor styles need nn.Linear) or with compiled blocks; use float8.backend=torchao, "
            "or parallel.tp=1 and parallel.compile=false"
        )
    reason = float8_unavailable_reason(_model_device(model))
    if reason is not None:
        if not config.allow_fallback:
            raise Float8UnavailableError(
                f"float8 training requested (float8.enabled=true, recipe {config.recipe}) but {reason}. "
                "Set float8.allow_fallback=true to train in the base precision, or float8.enabled=false"
            )
        logger.warning(
            "FLOAT8 REQUESTED BUT NOT AVAILABLE: %s. Training in %s instead (float8.allow_fallback=true); "
            "this run does not measure 8-bit training",
            reason, str(base_dtype).removeprefix("torch."),
        )
        return None
    num_linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    selection = convert_to_float8(model, config, tp=tp, fsdp_sharded=fsdp_sharded)
    logger.info(
        "float8 training: %s %s scaling on %d Linear layers, %d kept in %s; FSDP float8 all-gather %s",
        config.backend, config.recipe, len(selection.converted), num_linears - len(selection.converted),
        str(base_dtype).removeprefix("torch."), "on" if _float8_all_gather(config, fsdp_sharded) else "off",
    )
    return selection
