"""Apply tensor parallelism, activation checkpointing, ``torch.compile`` and FSDP2 to a Krea2DiT.

Order as in torchtitan: float8 conversion -> TP -> activation checkpointing -> compile -> FSDP2
(with more than one rank; one rank keeps fp32 weights and autocasts its forward instead).
Float8 Linear layers (``krea2_train.parallel.float8``) take the plain TP styles below: their matmuls
run in float8, their TP collectives in the param dtype.

Tensor parallelism (Megatron style, with sequence parallelism) covers the ``transformer_blocks``,
where nearly all parameters and FLOPs are. Between the TP regions of a block the residual stream is
sharded on the sequence dim (``[B, S/tp, D]`` per rank):

    x (Shard(1)) -> norm1 (sequence parallel) -> modulate -> all-gather -> to_q/to_k/to_v/to_gate
    (column-wise: local heads) -> QK norms (weights replicated, heads sharded) -> SDPA on local heads
    -> to_out (row-wise) -> reduce-scatter -> gated residual (Shard(1)) -> the same for the SwiGLU
    (gate/up column-wise, down row-wise).

Inside a block every tensor that meets the sharded stream is a DTensor: the shared time modulation
``[B, 1, 6D]`` enters as a replicated DTensor and the block's ``scale_shift_table`` is a replicated
DTensor parameter, so their gradients (sums over the sharded sequence) are reduced across TP ranks
by DTensor, not silently left partial. The first block slices its replicated input into sequence
shards, the last block all-gathers its output. The sequence length ``S = L + N`` must be divisible
by ``tp``; the query and key/value head counts must be too.

Everything outside the blocks (text fusion, text/time/image projections, final layer) is small and
stays replicated across TP ranks (plain parameters, sharded by FSDP2 over the data-parallel mesh
only); its inputs and gradients are identical on the TP ranks of a data-parallel group.

``torch.compile`` composes with TP (checked on CPU) and with activation checkpointing (checked), not
with both at once: AOTAutograd in torch 2.13 then fails (it saves a DeviceMesh for backward), and
compiling inside the checkpoint instead gives wrong gradients, so that combination is refused.

Weights must be identical on every rank before :func:`parallelize_dit` (build the model from one
seed, or load a checkpoint afterwards); sequence-parallel norm weights are taken as they are.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torchtitan.distributed import ParallelDims

from krea2_train.config.schema import Float8Config
from krea2_train.parallel.float8 import apply_float8
from krea2_train.parallel.mesh import fsdp_mesh, tp_mesh

__all__ = [
    "ACTIVATION_CHECKPOINT_MODES", "apply_autocast", "apply_tensor_parallel", "auxiliary_dits", "parallelize_dit",
    "shard_frozen_module",
]

ACTIVATION_CHECKPOINT_MODES = ("none", "selective", "full")


# ---------------------------------------------------------------------------------------------
# Tensor parallelism
# ---------------------------------------------------------------------------------------------


class _ReplicateOwnParameters(ParallelStyle):
    """Make a module's direct parameters (not its children's) replicated DTensors on the TP mesh."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for name, param in list(module.named_parameters(recurse=False)):
            replicated = distribute_tensor(param.data, device_mesh, [Replicate()])
            module.register_parameter(name, nn.Parameter(replicated, requires_grad=param.requires_grad))
        return module


def _block_plan(is_first: bool, is_last: bool) -> dict[str, ParallelStyle]:
    """The TP plan of one Krea2Block, keyed by submodule path ("" is the block itself).

    Block inputs: ``(x, time_modulation, rotary_cos, rotary_sin, key_padding_mask)``.
    """
    stream_in = Replicate() if is_first else Shard(1)
    stream_out = Replicate() if is_last else Shard(1)
    return {
        "": PrepareModuleInputOutput(
            input_layouts=(stream_in, Replicate(), None, None, None),
            desired_input_layouts=(Shard(1), Replicate(), None, None, None),
            use_local_input=False,
            output_layouts=Shard(1),
            desired_output_layouts=stream_out,
            use_local_output=True,
        ),
        "norm1": SequenceParallel(),
        "norm2": SequenceParallel(),
        "attn": PrepareModuleInput(
            input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None)
        ),
        "attn.to_q": ColwiseParallel(),
        "attn.to_k": ColwiseParallel(),
        "attn.to_v": ColwiseParallel(),
        "attn.to_gate": ColwiseParallel(),
        "attn.norm_q": SequenceParallel(sequence_dim=2, use_local_output=True),
        "attn.norm_k": SequenceParallel(sequence_dim=2, use_local_output=True),
        "attn.to_out.0": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        "ff": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "ff.gate": ColwiseParallel(),
        "ff.up": ColwiseParallel(),
        "ff.down": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
    }


def _check_tp_divisibility(model: nn.Module, tp: int) -> None:
    config = model.config
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if config[key] % tp:
            raise ValueError(f"tensor parallelism {tp} does not divide the model's {key}={config[key]}")


def _check_sequence_divisible(tp: int, module: nn.Module, args: tuple) -> None:
    seq_len = args[0].shape[1]
    if seq_len % tp:
        raise ValueError(
            f"sequence parallelism needs the joint sequence length (text + image tokens = {seq_len}) "
            f"divisible by tp={tp}; pad the text to a multiple of {tp}"
        )


def apply_tensor_parallel(model: nn.Module, tp_device_mesh: DeviceMesh) -> None:
    """Shard every transformer block over ``tp_device_mesh`` (see the module docstring)."""
    tp = tp_device_mesh.size()
    _check_tp_divisibility(model, tp)
    blocks = list(model.transformer_blocks)
    for index, block in enumerate(blocks):
        plan = _block_plan(is_first=index == 0, is_last=index == len(blocks) - 1)
        parallelize_module(block, tp_device_mesh, plan.pop(""))
        parallelize_module(block, tp_device_mesh, _ReplicateOwnParameters())
        parallelize_module(block, tp_device_mesh, plan)
    blocks[0].register_forward_pre_hook(partial(_check_sequence_divisible, tp), prepend=True)
    # Between blocks the stream is this rank's sequence shard: a tap sees the whole sequence.
    taps = getattr(model, "block_output_taps", {})
    for index, tap in list(taps.items()):
        if index != len(blocks) - 1:  # the last block's output is already replicated
            taps[index] = partial(_tap_full_sequence, tap, tp_device_mesh)


def _tap_full_sequence(tap, mesh: DeviceMesh, local_stream: torch.Tensor) -> None:
    """Call ``tap`` with the full ``[B, S, D]`` of a block's sequence-sharded output (differentiable)."""
    tap(DTensor.from_local(local_stream, mesh, [Shard(1)]).full_tensor())


# ---------------------------------------------------------------------------------------------
# Activation checkpointing and compile
# ---------------------------------------------------------------------------------------------


class _BlocksAsLayers(nn.Module):
    """Presents a block list under the name torchtitan's checkpointing policies expect (``layers``).

    The list itself is shared, so the policy's wrappers land in the model's ``transformer_blocks``.
    """

    def __init__(self, blocks: nn.ModuleList) -> None:
        super().__init__()
        self.layers = blocks


def apply_activation_checkpointing(blocks: nn.ModuleList, mode: str) -> None:
    """Wrap every block in torchtitan's ``FullAC`` (``"full"``) or per-op ``SelectiveAC`` (``"selective"``).

    Selective AC (torchtitan's definition) saves the outputs of matmuls (every other one), SDPA and
    reduce-scatters, and recomputes the cheap element-wise ops in backward.
    """
    if mode not in ACTIVATION_CHECKPOINT_MODES:
        raise ValueError(f"activation_checkpoint must be one of {ACTIVATION_CHECKPOINT_MODES}, got {mode!r}")
    if mode == "none":
        return
    from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC

    policy = FullAC.Config().build() if mode == "full" else SelectiveAC.Config().build()
    policy.apply(_BlocksAsLayers(blocks))


def apply_compile(blocks: nn.ModuleList) -> None:
    """``torch.compile`` each block (the same graph for every block; compiled once, reused)."""
    for block in blocks:
        block.compile(fullgraph=True)


# ---------------------------------------------------------------------------------------------
# FSDP2
# ---------------------------------------------------------------------------------------------


def auxiliary_dits(model: nn.Module) -> list[nn.Module]:
    """Whole Krea2DiTs a stage attached under ``model.auxiliary`` (e.g. TDM's fake score)."""
    from krea2_train.model.dit import Krea2DiT

    auxiliary = getattr(model, "auxiliary", None)
    return [] if auxiliary is None else [module for module in auxiliary.values() if isinstance(module, Krea2DiT)]


def apply_fsdp(
    model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype, reduce_dtype: torch.dtype
) -> None:
    """``fully_shard`` each transformer block, each text-fusion block, then the root.

    Blocks and text-fusion blocks do not cast their inputs (activations arrive in ``param_dtype``
    already; the rotary tables stay fp32); the root casts the model inputs to ``param_dtype``.

    A whole Krea2DiT under ``model.auxiliary`` (TDM's fake score) is sharded the same way, blocks
    first, then itself as its own unit with the root's policy: a stage calls it directly, outside
    the root's forward, and its own pre-forward hook then gathers its parameters (left in the
    root's unit, they would stay sharded DTensors there). Its units share the root's lazy
    initialisation, so the root must run forward first (FSDP2 requires it).
    """
    inner_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    root_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=True)
    for dit in [*auxiliary_dits(model), model]:
        text_fusion = dit.text_fusion
        for block in [*dit.transformer_blocks, *text_fusion.layerwise_blocks, *text_fusion.refiner_blocks]:
            fully_shard(block, mesh=mesh, mp_policy=inner_policy)
        fully_shard(dit, mesh=mesh, mp_policy=root_policy)


def parallelize_dit(
    model: nn.Module,
    parallel_dims: ParallelDims,
    *,
    activation_checkpoint: str = "none",
    compile: bool = False,
    param_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype = torch.float32,
    float8: Float8Config | None = None,
    fsdp: bool | None = None,
) -> nn.Module:
    """Parallelize a Krea2DiT in place: float8, TP (tp > 1), activation checkpointing, compile, FSDP2.

    On one rank there is nothing to shard, and FSDP2 would still copy every weight into a gather
    buffer twice a step and every gradient through a reduce buffer (about a fifth of a full-width
    step on an H100, docs/benchmarks.md). So by default a one-rank model is not wrapped: its weights
    stay fp32 and a ``param_dtype`` other than fp32 is applied by ``torch.autocast`` around each
    forward (:func:`apply_autocast`), as torchtitan does on one device.

    Args:
        model: a Krea2DiT with identical weights on every rank, on this rank's device.
        parallel_dims: from :func:`krea2_train.parallel.mesh.build_parallel_dims`.
        activation_checkpoint: ``"none"``, ``"selective"`` (torchtitan's per-op policy) or ``"full"``
            (recompute every block).
        compile: ``torch.compile`` each transformer block (not combined with activation
            checkpointing when tp > 1: see the NotImplementedError below).
        param_dtype: compute dtype of the FSDP2 all-gathered parameters (bf16 on GPU, fp32 on CPU).
        reduce_dtype: dtype of the gradient reduce-scatter / all-reduce (fp32).
        float8: float8 training of the transformer blocks' Linear layers (see
            :func:`krea2_train.parallel.float8.apply_float8`: without a capable GPU it falls back to
            ``param_dtype`` or refuses, as the config says); None or disabled: no conversion.
        fsdp: wrap in FSDP2; None: when the run has more than one rank (True on one rank
            exercises the sharded code path in a single process).
    Returns:
        the same model: with FSDP2, an ``FSDPModule`` whose parameters are DTensors (HSDP when
        dp_replicate > 1) and whose gradients are averaged over data-parallel ranks; without it,
        plain fp32 parameters with forward autocast to ``param_dtype``.
    """
    if activation_checkpoint not in ACTIVATION_CHECKPOINT_MODES:
        raise ValueError(
            f"activation_checkpoint must be one of {ACTIVATION_CHECKPOINT_MODES}, got {activation_checkpoint!r}"
        )
    if compile and activation_checkpoint != "none" and parallel_dims.tp_enabled:
        raise NotImplementedError(
            "torch.compile with activation checkpointing and tensor parallelism fails in AOTAutograd "
            "(torch 2.13 saves a DeviceMesh for backward); use compile=False, activation_checkpoint='none' "
            "or tp=1"
        )
    if getattr(model, "_krea2_parallelized", False) or any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError("model is already parallelized (parallelize_dit ran on it, or it has DTensor parameters)")
    model._krea2_parallelized = True
    apply_float8(
        model, float8, tp=parallel_dims.tp, fsdp_sharded=parallel_dims.dp_shard_enabled, compile=compile,
        base_dtype=param_dtype,
    )
    tp_device_mesh = tp_mesh(parallel_dims)
    if tp_device_mesh is not None:
        apply_tensor_parallel(model, tp_device_mesh)
    apply_activation_checkpointing(model.transformer_blocks, activation_checkpoint)
    if compile:
        apply_compile(model.transformer_blocks)
    if fsdp is None:
        fsdp = parallel_dims.world_size > 1
    if fsdp:
        apply_fsdp(model, fsdp_mesh(parallel_dims), param_dtype, reduce_dtype)
    elif param_dtype != torch.float32:  # the root and whatever a stage calls outside its forward
        from krea2_train.model.dit import Krea2DiT

        for module in [*getattr(model, "auxiliary", {}).values(), model]:  # a DiT casts its inputs, as FSDP2's root
            apply_autocast(module, param_dtype, cast_inputs=isinstance(module, Krea2DiT))
    return model


class _AutocastForward:
    """Forward hooks that enter ``torch.autocast`` before a module's forward and leave it after."""

    def __init__(self, device_type: str, dtype: torch.dtype, cast_inputs: bool) -> None:
        self.device_type, self.dtype, self.cast_inputs = device_type, dtype, cast_inputs
        self.active: list[torch.autocast] = []

    def enter(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        context = torch.autocast(self.device_type, dtype=self.dtype)
        context.__enter__()
        self.active.append(context)
        if not self.cast_inputs:
            return None
        cast = lambda value: value.to(self.dtype) if torch.is_tensor(value) and value.is_floating_point() else value  # noqa: E731
        return tuple(cast(value) for value in args), {name: cast(value) for name, value in kwargs.items()}

    def leave(self, module: nn.Module, args: tuple, output: object) -> None:
        self.active.pop().__exit__(None, None, None)


def apply_autocast(model: nn.Module, dtype: torch.dtype, *, cast_inputs: bool = False) -> None:
    """Run ``model``'s forward under ``torch.autocast(dtype)``: fp32 master weights, matmuls in
    ``dtype``, each weight cast once per forward (the one-rank counterpart of FSDP2's
    ``param_dtype``). Hooks, not a wrapper module, so state-dict keys and copies are unchanged; the
    context is left even when forward raises. ``model`` must already be on its device.

    ``cast_inputs``: cast the floating-point tensor arguments to ``dtype`` first, as FSDP2's root
    policy (``cast_forward_inputs``) does for a DiT: the timestep then reaches the time embedding
    rounded to ``dtype`` on one rank as on many, and as the samplers (ours and diffusers') give it.
    """
    hooks = _AutocastForward(next(model.parameters()).device.type, dtype, cast_inputs)
    model.register_forward_pre_hook(hooks.enter, with_kwargs=True)
    model.register_forward_hook(hooks.leave, always_call=True)


# ---------------------------------------------------------------------------------------------
# Frozen networks
# ---------------------------------------------------------------------------------------------


def shard_frozen_module(
    module: nn.Module, parallel_dims: ParallelDims, *, param_dtype: torch.dtype | None = None
) -> nn.Module:
    """FSDP2-shard a frozen network (the text encoder) over the data-parallel mesh, in eval mode.

    Every child of every ``nn.ModuleList`` named ``layers`` (a decoder's layers) becomes its own FSDP
    unit, and so does every embedding table; parameters never require grad. Use it under
    ``torch.no_grad()``.

    The root module itself is not wrapped: ``fully_shard`` swaps a module's class for an FSDP
    subclass, and transformers finds which outputs a model can record (``output_hidden_states``,
    which the text taps need) by the root's class name. Its remaining parameters (final norm) are
    small and stay replicated.

    The autoencoder is not sharded: it is small and runs replicated on every rank.

    Args:
        param_dtype: compute dtype of the gathered parameters; None keeps the stored dtype.
    """
    layer_lists = [m for name, m in module.named_modules() if name.split(".")[-1] == "layers" and isinstance(m, nn.ModuleList)]
    if not layer_lists:
        raise ValueError(f"{type(module).__name__} has no nn.ModuleList named 'layers' to shard layer by layer")
    module.requires_grad_(False)
    module.eval()
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, cast_forward_inputs=param_dtype is not None)
    mesh = fsdp_mesh(parallel_dims)
    for layers in layer_lists:
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
    for embedding in [m for m in module.modules() if isinstance(m, nn.Embedding)]:
        fully_shard(embedding, mesh=mesh, mp_policy=policy)
    return module
