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
class BalanceConfig:
    """Train on a balanced selection of the dataset (hierarchical k-means, krea2 data balance)."""

    enabled: bool = False
    target: int = 0  # images in the selection; 0: `fraction` of the selectable images (of those semantic dedup leaves)
    fraction: float = 0.5
    levels: list[int] = field(default_factory=lambda: [64, 8])  # clusters per level, bottom-up
    resample_steps: int = 3
    points_per_cluster: int = 8
    train_points_per_cluster: int = 256  # a level's first k-means run (k clusters) trains on at most k times this many random items
    leaf_pick: str = "random"  # random | nearest (to the level-1 centroid)
    semantic_dedup: Optional[float] = None  # cosine similarity: leave out near-duplicates inside level-1 clusters (SemDeDup)
    embedder: str = "small"  # "small" | a local SigLIP, SigLIP 2, DINOv2 or DINOv3 transformers directory
    # a concept list (one a line, optional TAB weight, e.g. PageRank over Wikipedia): the images whose
    # captions name its rare concepts are selected first (krea2_train.curate.concepts); None: off
    concepts: Optional[str] = None
    images_per_concept: int = 100  # the most images a concept is given
    concept_share: float = 0.25  # the most of the target chosen for concepts; the balanced sample fills the rest


@dataclass
class CurateConfig:
    """Train on the top images of the dataset by a filter score (krea2 data curate)."""

    enabled: bool = False
    top: int = 0  # images in the selection; 0: `fraction` of the selectable images
    fraction: float = 0.25
    by: str = "rgb_entropy"  # a score column written by the filters job
    order: Optional[str] = None  # asc | desc (best first); None: the score's own direction


@dataclass
class QualityConfig:
    """Drop extreme images before training (krea2 data filter): bounds on the filter scores,
    inclusive; applied before data.balance / data.curate."""

    enabled: bool = False
    minimum: dict[str, float] = field(default_factory=dict)  # score -> lowest kept value, e.g. rgb_entropy: 1.0
    maximum: dict[str, float] = field(default_factory=dict)  # score -> highest kept value, e.g. white_ratio: 0.95


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
    num_workers: int = 1  # loader processes per rank, at most the CPUs the process may run on
    caption_mix: dict[str, float] = field(default_factory=lambda: {"long": 0.8, "medium": 0.1, "short": 0.1})
    dsn: Optional[str] = None  # PostgreSQL; None: KREA2_PG_DSN or the embedded server
    # how long the other ranks wait for rank 0 to prepare the data on a run's first start (decode,
    # dedup, selections, pack of what is not yet packed), on the host, beyond the collective timeout
    prepare_timeout_s: float = 86400.0
    balance: BalanceConfig = field(default_factory=BalanceConfig)  # midtraining: a balanced selection
    curate: CurateConfig = field(default_factory=CurateConfig)  # SFT: a curated subset
    quality: QualityConfig = field(default_factory=QualityConfig)  # any stage: extremes dropped


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
    # with compile: keep the compiled graphs and kernels in run_dir/compile_cache.bin (rank 0
    # writes, every rank loads), so a restart on any node starts warm (krea2_train.parallel.compile_cache)
    compile_cache: bool = True
    mixed_precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    collective_timeout_s: float = 1200.0
    # deterministic algorithms; null: on for CPU (bit-exact resume), off on CUDA, where
    # torch.use_deterministic_algorithms slows every step (fills each new allocation, no Inductor
    # autotuning) and cannot make SDPA's backward deterministic. true on CUDA also pins cuBLAS's workspace.
    deterministic: Optional[bool] = None
    # SDPA kernels for the DiT's attention, in priority order (cudnn, flash, efficient, math);
    # null: torch's own choice. See krea2_train/parallel/attention.py and docs/benchmarks.md.
    attention_backends: Optional[list[str]] = None


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
    # periodic saves in a row that may fail (a flaky or briefly full disk) while training goes on
    # from the checkpoint before; the save at the end of a run or before an exit must succeed
    tolerated_failures: int = 1


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
class Float8Config:
    """8-bit training of the transformer blocks' Linear layers (krea2_train.parallel.float8)."""

    enabled: bool = False
    backend: str = "torchao"  # torchao | transformer_engine
    recipe: str = "tensorwise"  # tensorwise | rowwise (torchao's recipe names)
    # A Linear is converted when its module path matches an include regex and no exclude regex
    # (re.search). Default: the attention and SwiGLU projections of every transformer block.
    include: list[str] = field(
        default_factory=lambda: [r"^transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_gate|to_out\.0)|ff\.(gate|up|down))$"]
    )
    # Kept in high precision even if an include matches: first and last layers, modulation,
    # text path, norms.
    exclude: list[str] = field(
        default_factory=lambda: [
            r"(^|\.)img_in$", r"(^|\.)final_layer\.", r"(^|\.)time_embed\.", r"(^|\.)time_mod_proj$",
            r"(^|\.)txt_in\.", r"(^|\.)text_fusion\.", r"norm",
        ]
    )
    keep_first_last_blocks: bool = False  # also keep transformer blocks 0 and N-1 in high precision
    fsdp_float8_all_gather: bool = True  # tensorwise + FSDP2 sharding: all-gather weights in float8
    # No capable GPU (CUDA sm89+): true runs in the base precision with a warning, false refuses.
    allow_fallback: bool = True


@dataclass
class IrepaConfig:
    """iREPA (krea2_train.stages.irepa): align DiT block outputs with a frozen DINOv2/DINOv3."""

    enabled: bool = False
    # "tiny" (random tiny DINOv2 built in the run dir, for CPU runs) | a local transformers
    # DINOv2/DINOv3 directory (real runs: irepa.encoder=/path/to/dinov2)
    encoder: str = "tiny"
    block: Optional[int] = None  # 1-based block whose output is aligned; None: a third of the depth, at most 8
    weight: float = 1.0  # lambda
    spatial_norm_gamma: float = 0.6  # teacher z-score: (y - gamma * mean) / std
    switch_off_epochs: float = 1.0  # off once epoch + epoch_fraction reaches this (1.0: after the first epoch)
    kernel_size: int = 3  # the projector's Conv2d kernel (iREPA's published 3x3)
    encoder_patches: int = 0  # teacher grid's longer side in patches; 0: the DiT's token grid


@dataclass
class ResilienceConfig:
    """Hang detection and failure accounting (krea2_train.train.watchdog, krea2_train.train.runlog)."""

    watchdog: bool = True
    # No step finished for this long: a hang. Must stay below parallel.collective_timeout_s, so the
    # watchdog (stacks dumped, failure recorded) acts before the collective times out.
    hang_timeout_s: float = 300.0
    first_step_timeout_s: float = 900.0  # the same for the first step of a start (compile, warm-up)
    # the same while a checkpoint is saved, waited for or rolled back to between steps (a large
    # model's save may outlast hang_timeout_s); at least hang_timeout_s, below the collective timeout
    checkpoint_timeout_s: float = 900.0
    slow_step_factor: float = 10.0  # k: a step running k x the recent median step time is a hang ...
    slow_step_min_s: float = 60.0  # ... once it has also run this long
    poll_interval_s: float = 1.0  # the watchdog thread's period; it also writes this rank's heartbeat
    heartbeat_stale_s: float = 30.0  # a rank whose heartbeat is older than this is named as stopped
    heartbeat_dir: Optional[str] = None  # None: run_dir/heartbeats (every node must see it)
    hang_exit_code: int = 75  # the watchdog's exit status (the launcher restarts the group)
    record_sample_ids: bool = False  # run_dir/sample_ids/rank-N.jsonl: the samples of every step


@dataclass
class LoRAConfig:
    """LoRA fine-tuning (the lora stage, krea2_train.stages.lora; krea2_train.model.lora)."""

    rank: int = 16
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0
    # Regular expressions matched in full against module names; default: attention q/k/v/out/gate
    # and the SwiGLU of every transformer block.
    targets: list[str] = field(
        default_factory=lambda: [
            r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|to_gate)",
            r"transformer_blocks\.\d+\.ff\.(gate|up|down)",
        ]
    )
    base_dtype: str = "auto"  # frozen base: auto (the compute dtype) | fp32 | bf16 | float8
    init_lora: Optional[str] = None  # a LoRA file (diffusers, ComfyUI or ai-toolkit layout) to start from


@dataclass
class ConditioningCacheConfig:
    """Cache of image latents and text-encoder taps on disk (krea2_train.data.cache), for small datasets."""

    enabled: bool = False
    directory: Optional[str] = None  # None: run_dir/conditioning_cache


@dataclass
class StpoConfig:
    """STPO preference optimisation (krea2_train.stages.preference; docs/recipe.md, "STPO")."""

    beta: float = 500.0  # DPO temperature on per-element-mean velocity errors
    # Krea's auxiliary terms against "both likelihoods go down" (our stand-in; STPO's formula is unpublished):
    positive_weight: float = 1.0  # DPO-Positive: penalise the winner's error rising above the reference's
    sft_weight: float = 0.1  # an SFT anchor on the winner's error
    safeguard: bool = True  # Diffusion-SDPO: scale the loser's gradient so the winner's error cannot rise
    safeguard_mu: float = 0.0  # the safeguard's winner-preserving margin
    # Where the loser of each pair comes from (the winner is the dataset image):
    #   policy: the policy's own sample for the caption (on-policy), drawn each step without grad
    #   artifacts: the winner with synthetic high-frequency artifacts (no sampling)
    #   dataset: the loser of a human preference pair (calibration; krea2 data ingest-pairs, stage/stpo_human)
    loser: str = "policy"
    loser_steps: int = 8  # sampler steps of an on-policy loser
    loser_guidance: float = 0.0  # CFG scale of an on-policy loser (Krea's g; 0: off)
    artifact_strength: float = 0.25  # amplitude of the synthetic artifacts, in [-1, 1] pixel units


@dataclass
class GrpoConfig:
    """Multi-reward GRPO without CFG (krea2_train.stages.grpo; algorithms.md section 3).

    Defaults follow Flow-GRPO (SD3.5-M) adapted to Krea's RL: no CFG anywhere, the Flow-GRPO-Fast
    SDE window, 2 optimizer steps per rollout so that clipping acts, rubric + artifact rewards.
    """

    group_size: int = 8  # images per prompt; the per-rank micro-batch must be a multiple of it
    num_steps: int = 10  # sampler steps of a rollout (Flow-GRPO trains with 10, evaluates with 40)
    mu: Optional[float] = None  # the rollout sampler's time shift; None: resolution-aware (mu_for_tokens)
    sde_type: str = "sde"  # sde (Flow-GRPO) | cps (coefficient-preserving)
    noise_level: float = 0.7  # a: 0.7 for sde, 0.8 recommended for cps
    sde_window_size: int = 2  # consecutive SDE (trained) steps; ODE elsewhere. 0: SDE on every step but the last
    sde_window_range: list[int] = field(default_factory=lambda: [0, 4])  # first step, drawn in [lo, hi]; hi + size < num_steps
    same_initial_noise: bool = False  # the G images of a group start from the same noise (DanceGRPO init_same_noise)
    clip_range: float = 1.0e-4  # PPO epsilon on exp(logp_new - logp_old) (per-dim-mean log-probs)
    adv_clip_max: float = 5.0
    std_scope: str = "global"  # advantage std: global (batch, all-reduced; flow_grpo) | group (DanceGRPO/MixGRPO)
    beta_kl: float = 0.04  # weight of the per-step KL to the frozen init_from policy (flow_grpo's scale: sde.policy_kl); 0: none
    updates_per_rollout: int = 2  # optimizer steps (trainer steps) on one rollout buffer
    rewards: dict[str, float] = field(default_factory=lambda: {"rubric": 1.0, "artifact": 0.5})  # name: weight
    aggregation: str = "advantage_aggr"  # advantage_aggr (each reward normalised per group) | reward_aggr
    # prompt re-weighting from live per-prompt statistics (krea2_train.rewards.prompt_weights)
    reweight_prompts: bool = True
    reweight_ema: float = 0.9
    reweight_min_visits: int = 2
    reweight_saturation_margin: float = 0.1  # success rates within this of 0 or 1 count as hopeless / too easy
    reweight_min_std: float = 0.05  # group stds below this count as low-variance
    reweight_min_weight: float = 0.1


@dataclass
class TdmConfig:
    """TDM distillation into a few-step student (krea2_train.stages.tdm)."""

    student_steps: int = 8  # K: the student's steps (Krea 2 Turbo: 8, the "turbo" sampler preset)
    mu: float = 1.15  # the student's fixed time shift (the turbo preset's, flow.timesteps.MAX_SHIFT)
    guidance: float = 3.5  # the teacher's Krea CFG scale g (v = c + g (c - u)) baked into the student
    fake_lr_scale: float = 5.0  # the fake score's lr = fake_lr_scale x optim.lr (TDM demo: lr_G = lr_fake / 5)
    snr_clip: float = 5.0  # the fake-score loss weight min(SNR(tau), snr_clip)
    is_clip: float = 10.0  # the importance weight w_IS is clipped at this value
    huber_c: float = 1.0e-3  # pseudo-Huber constant of the generator loss
    use_separate: bool = True  # tau inside the sampled step's own interval (else up to 1 - interval_margin)
    use_randmid: bool = False  # intermediate s drawn in the step's interval (else its lower end)
    min_sigma: float = 0.02  # the lowest s and tau (TDM: 20 of 1000 steps)
    interval_margin: float = 0.01  # tau stays this far below the step's upper sigma (TDM: 10 of 1000)
    min_normaliser: float = 1.0e-6  # guard of the generator loss's denominator mean|x0_k - x0_cfg|


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
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    float8: Float8Config = field(default_factory=Float8Config)
    irepa: IrepaConfig = field(default_factory=IrepaConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    stpo: StpoConfig = field(default_factory=StpoConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    tdm: TdmConfig = field(default_factory=TdmConfig)
    conditioning_cache: ConditioningCacheConfig = field(default_factory=ConditioningCacheConfig)
