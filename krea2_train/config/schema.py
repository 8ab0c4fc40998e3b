"""The typed run configuration.

Hydra composes YAML files from ``configs/`` (groups: stage, model, data, conditioning, parallel,
optim, checkpoint, logging); the result is merged into :class:`RunConfig` so that an unknown key
or a wrong type fails before any heavy work, and :func:`validate` checks the values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

STAGE_KINDS = ("pretrain", "midtrain", "sft", "stpo", "grpo", "tdm", "lora")


@dataclass
class StageConfig:
    name: str = "pretrain_256"
    kind: str = "pretrain"  # one of STAGE_KINDS: selects the loss in krea2_train.stages
    steps: int = 100
    # The run this stage continues from: a run name under runs_root, a run directory, a
    # checkpoint directory, or a weights file/directory in the diffusers or original layout.
    init_from: Optional[str] = None
    description: str = ""


@dataclass
class ModelConfig:
    preset: str = "tiny"  # krea2_train.model.PRESETS
    overrides: dict[str, Any] = field(default_factory=dict)  # Krea2DiT keywords


@dataclass
class ConditioningConfig:
    autoencoder: str = "pixel"  # "pixel" (lossless, CPU runs) | "qwen_image"
    autoencoder_path: Optional[str] = None  # local diffusers directory for qwen_image
    text_encoder: str = "tiny"  # "tiny" (random tiny Qwen3-VL built in the run dir) | a local directory
    text_select_layers: Optional[list[int]] = None  # None: the encoder's default taps
    max_text_tokens: int = 64
    caption_dropout: float = 0.1  # prompts replaced by "" during training, for CFG
    patch_size: int = 2


@dataclass
class DataConfig:
    source: str = "shapes"  # "shapes" (generated in the run dir) | "registry" (PostgreSQL shards)
    dataset: str = "shapes"
    num_samples: int = 2048  # shapes world size
    # Nominal stage resolution: the image side with the Qwen-Image VAE (16 px per token). With
    # another autoencoder the image is scaled to give the same token grid.
    resolution: int = 256
    buckets: list[str] = field(default_factory=lambda: ["1:1"])
    global_batch_size: int = 8
    num_workers: int = 1
    caption_mix: dict[str, float] = field(default_factory=lambda: {"long": 0.8, "medium": 0.1, "short": 0.1})
    dsn: Optional[str] = None  # PostgreSQL; None: KREA2_PG_DSN or the embedded server


@dataclass
class FlowConfig:
    loc: float = 0.0  # logit-normal location
    scale: float = 1.0  # logit-normal scale
    shift: str = "resolution"  # "resolution" | "fixed" | "none"
    mu: Optional[float] = None  # for shift = "fixed"


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: the rest of the world
    tp: int = 1
    activation_checkpoint: str = "none"  # none | selective | full
    compile: bool = False
    mixed_precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    collective_timeout_s: float = 600.0
    deterministic: bool = True  # deterministic algorithms (CPU resume tests need it)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.01  # on weights and zero-centred norm weights, as the report does
    warmup_steps: int = 10
    decay_ratio: Optional[float] = 0.2  # warmup-stable-decay: the last 20% decay
    decay_type: str = "linear"  # linear | sqrt | cosine
    min_lr_factor: float = 0.0
    grad_clip: float = 1.0
    grad_accum_steps: int = 1
    max_consecutive_skips: int = 3  # non-finite steps in a row before rolling back to the last checkpoint


@dataclass
class CheckpointConfig:
    interval: int = 50
    keep_last: int = 3
    keep_every: int = 0
    async_mode: str = "async"  # async | sync


@dataclass
class LoggingConfig:
    log_interval: int = 1
    wandb: str = "offline"  # offline | online | disabled
    wandb_project: str = "krea2_train"
    sample_interval: int = 0  # steps between sample grids; 0: only at the end
    sample_prompts: list[str] = field(
        default_factory=lambda: [
            "a red circle on a white background",
            "a large blue square to the left of a small yellow triangle",
            "two green circles above a purple square",
            "an orange triangle on a black background",
        ]
    )
    sample_preset: str = "raw"  # krea2_train.flow.sampler presets
    sample_steps: Optional[int] = 20
    sample_guidance: Optional[float] = None


@dataclass
class RunConfig:
    run_name: str = "${stage.name}"
    runs_root: str = "runs"
    seed: int = 0
    stage: StageConfig = field(default_factory=StageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    data: DataConfig = field(default_factory=DataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
