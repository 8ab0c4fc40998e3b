"""Every stage of the recipe, by kind (``stage.kind``): the module and class of its objective."""

from __future__ import annotations

from krea2_train.config.schema import RunConfig
from krea2_train.stages.base import Stage, StageConfigError, StepContext

STAGE_KINDS: dict[str, tuple[str, str]] = {
    "pretrain": ("krea2_train.stages.flow_matching", "FlowMatchingStage"),
    "midtrain": ("krea2_train.stages.flow_matching", "FlowMatchingStage"),
    "sft": ("krea2_train.stages.flow_matching", "FlowMatchingStage"),
    "stpo": ("krea2_train.stages.preference", "PreferenceStage"),
    "grpo": ("krea2_train.stages.grpo", "GrpoStage"),
    "tdm": ("krea2_train.stages.tdm", "TdmStage"),
    "lora": ("krea2_train.stages.lora", "LoRAStage"),
}


def build_stage(config: RunConfig) -> Stage:
    import importlib

    module, cls = STAGE_KINDS[config.stage.kind]
    return getattr(importlib.import_module(module), cls)(config)


__all__ = ["STAGE_KINDS", "Stage", "StageConfigError", "StepContext", "build_stage"]
