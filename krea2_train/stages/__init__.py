"""Every stage of the recipe, by kind. A kind mapped to None is not implemented yet."""

from __future__ import annotations

from krea2_train.config.schema import RunConfig
from krea2_train.stages.base import Stage, StageNotImplementedError, StepContext

# kind -> (module, class); None: the objective is not implemented yet.
STAGE_KINDS: dict[str, tuple[str, str] | None] = {
    "pretrain": ("krea2_train.stages.flow_matching", "FlowMatchingStage"),
    "midtrain": ("krea2_train.stages.flow_matching", "FlowMatchingStage"),
    "sft": ("krea2_train.stages.flow_matching", "FlowMatchingStage"),
    "stpo": None,
    "grpo": None,
    "tdm": None,
    "lora": ("krea2_train.stages.lora", "LoRAStage"),
}


def build_stage(config: RunConfig) -> Stage:
    import importlib

    entry = STAGE_KINDS[config.stage.kind]
    if entry is None:
        raise StageNotImplementedError(
            f"stage {config.stage.name!r} (kind {config.stage.kind!r}) is not implemented yet: its objective has not "
            f"landed in krea2_train.stages. Refusing to start rather than train a different objective."
        )
    module, cls = entry
    return getattr(importlib.import_module(module), cls)(config)


__all__ = ["STAGE_KINDS", "Stage", "StageNotImplementedError", "StepContext", "build_stage"]
