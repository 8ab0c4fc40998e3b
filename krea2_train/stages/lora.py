"""LoRA fine-tuning: flow matching on a frozen Krea 2 checkpoint with trained low-rank updates.

The objective is :class:`~krea2_train.stages.flow_matching.FlowMatchingStage`'s; what differs is
the model: ``stage.init_from`` (the released Raw weights in the original layout, a diffusers
directory, or a run) is loaded by the trainer, then :meth:`LoRAStage.prepare_model` freezes it,
casts it to ``lora.base_dtype`` and injects LoRA into the layers matching ``lora.targets``
(optionally starting from the weights of ``lora.init_lora``). Only the LoRA parameters train;
checkpoints hold the whole model, and ``krea2 lora export RUN`` writes the LoRA alone.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from krea2_train.config.schema import RunConfig
from krea2_train.devices import compute_precision
from krea2_train.errors import MissingPathError
from krea2_train.model.lora import LoRAError, LoRASpec, cast_base, freeze_base, inject_lora, load_pairs_into_model
from krea2_train.stages.base import StageConfigError
from krea2_train.stages.flow_matching import FlowMatchingStage

logger = logging.getLogger("krea2_train")


class LoRAStageError(StageConfigError):
    """A lora-stage configuration that cannot train."""


def resolve_base_dtype(config: RunConfig) -> str:
    """``lora.base_dtype``, with "auto" meaning the run's compute precision (bf16 on GPU, fp32 on CPU)."""
    auto = config.lora.base_dtype == "auto"
    return compute_precision(config.parallel.mixed_precision) if auto else config.lora.base_dtype


class LoRAStage(FlowMatchingStage):
    def __init__(self, config: RunConfig) -> None:
        if config.stage.init_from is None:
            raise LoRAStageError(
                f"stage {config.stage.name!r} (kind lora) needs stage.init_from: the checkpoint to fine-tune, e.g. "
                "stage.init_from=/path/krea2-raw.safetensors (original layout), a diffusers directory, or a run name"
            )
        if config.parallel.tp != 1:
            raise LoRAStageError(f"the lora stage does not support tensor parallelism (parallel.tp={config.parallel.tp}); use parallel.tp=1")
        if config.float8.enabled:  # the conversion would swap each LoRALinear for a plain Float8Linear, adapters and all
            raise LoRAStageError(
                "the lora stage does not support float8 training (float8.enabled=true); use float8.enabled=false "
                "(lora.base_dtype=float8 stores the frozen base in 8 bits)"
            )
        super().__init__(config)
        lora = config.lora
        self.spec = LoRASpec(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=tuple(lora.targets))
        self.base_dtype = resolve_base_dtype(config)
        self.compute_precision = compute_precision(config.parallel.mixed_precision)
        self.init_lora = lora.init_lora

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Freeze the loaded base, hold it in the base dtype, inject LoRA (B = 0: output unchanged)."""
        names = inject_lora(model, self.spec)
        freeze_base(model)
        # a layer LoRA does not wrap computes with its weight as stored: in fp32 compute on one rank
        # nothing casts a bf16 weight (FSDP's all-gather does on more ranks, autocast in bf16), so
        # there those weights stay fp32 and only the wrapped ones are held in the base dtype
        alone = not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)
        unwrapped = "fp32" if alone and self.compute_precision == "fp32" else None
        cast_base(model, self.base_dtype, unwrapped_dtype=unwrapped)
        if self.init_lora is not None:
            from krea2_train.model.lora_formats import read_lora

            try:
                load_pairs_into_model(model, read_lora(self.init_lora).pairs)
            except MissingPathError as error:
                raise MissingPathError(f"lora.init_lora={self.init_lora!r}: {error}") from error
            except LoRAError as error:  # another rank or other modules than this run's lora settings
                raise LoRAError(f"lora.init_lora={self.init_lora!r}: {error} (set lora.rank and lora.targets to the file's)") from error
            logger.info("LoRA weights initialised from %s", self.init_lora)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info(
            "LoRA rank %d alpha %g on %d layers: %.3fM trainable parameters, base frozen in %s",
            self.spec.rank, self.spec.alpha, len(names), trainable / 1e6, self.base_dtype,
        )
        return super().prepare_model(model)
