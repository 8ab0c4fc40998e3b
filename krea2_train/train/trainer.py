"""The trainer: one loop for every stage.

A stage (``krea2_train.stages``) supplies the loss; the trainer owns the rest: the device mesh
and sharding, precision, the optimizer and schedule, data, checkpoints and exact resume, skipped
steps and rollback, signals, metrics and sample grids.

Order of work in one step::

    batch (this data-parallel rank's slice of the global batch)
      -> micro-batches (gradient accumulation; FSDP gradient sync only on the last)
      -> stage.loss -> backward
      -> clip (global norm over every mesh) -> finite? step : skip
      -> lr schedule -> metrics -> checkpoint (async) -> signals -> sample grid

A stage with ``update_phases`` (TDM: the fake score, then the student) runs the micro-batches,
clip and step once per phase, so each phase's losses see the previous phase's update.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import signal
import time
import warnings
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from krea2_train.config.load import ConfigError, to_record, to_yaml
from krea2_train.config.schema import RunConfig
from krea2_train.devices import compute_precision, to_device
from krea2_train.files import write_text
from krea2_train.logs import setup_logging as setup_process_logging
from krea2_train.model.presets import build_model, count_parameters, model_config
from krea2_train.parallel.attention import attention_backends, check_attention_backends
from krea2_train.parallel.compile_cache import COMPILE_CACHE_NAME, CompileCacheWriter, compile_cache_counts, load_compile_cache
from krea2_train.parallel.distributed import (
    DistInfo,
    any_rank_on_host,
    broadcast_object,
    destroy_distributed,
    host_barrier,
    init_distributed,
)
from krea2_train.parallel.grads import clip_grad_norm_, skip_steps_when, steps_take_grad_scale
from krea2_train.parallel.mesh import build_parallel_dims, data_parallel_rank_size, tp_mesh
from krea2_train.parallel.parallelize import parallelize_dit, shard_frozen_module
from krea2_train.stages import StageConfigError, StepContext, build_stage
from krea2_train.train.checkpoint import (
    CHECKPOINTS_DIR,
    MODEL_CONFIG_NAME,
    CheckpointManager,
    CheckpointVerificationError,
    ModelOptimizerState,
    NoCheckpointError,
    TrainState,
    check_model_digests,
    check_same_model_config,
    find_run_checkpoint,
    load_checkpoint_weights,
    load_model_config,
    model_config_differences,
    read_checkpoint_config,
    records_model_config,
    reseed_rng,
    resumable_checkpoints,
    write_model_config,
)
from krea2_train.train.faults import FaultInjector
from krea2_train.train.metrics import HostSyncCounter, MetricsLogger, peak_memory_gib
from krea2_train.train.runlog import RunInProgressError, Supervision, another_start_running, heartbeat_dir_of, start_supervision

logger = logging.getLogger("krea2_train")

# Signals that make the trainer checkpoint: SIGUSR1 then continue (Slurm's warning before the
# time limit), SIGTERM then exit (preemption, torchrun shutting the group down).
CHECKPOINT_AND_CONTINUE, CHECKPOINT_AND_EXIT = 1, 2


def tp_local_rank(parallel_dims) -> int:
    mesh = tp_mesh(parallel_dims)
    return 0 if mesh is None else mesh.get_local_rank()


def setup_logging(rank: int) -> None:
    setup_process_logging(rank)
    # The root's output is a view (a Linear on [B, N, D]); nothing modifies it in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def config_hash(config: RunConfig) -> str:
    return hashlib.sha256(to_yaml(config).encode()).hexdigest()[:16]


def changed_settings(before_yaml: str, after_yaml: str) -> list[str]:
    """``["stage.steps: 6 -> 8", ...]``: the keys whose values differ between two written configs."""
    import yaml

    def flat(node, prefix=""):
        if isinstance(node, dict):
            return {key: value for name, child in node.items() for key, value in flat(child, f"{prefix}{name}.").items()}
        return {prefix[:-1]: node}

    before, after = flat(yaml.safe_load(before_yaml) or {}), flat(yaml.safe_load(after_yaml) or {})
    return [f"{key}: {before.get(key, '(unset)')} -> {after.get(key, '(unset)')}"
            for key in sorted(before.keys() | after.keys()) if before.get(key) != after.get(key)]


def compute_dtype(config: RunConfig, device: torch.device) -> torch.dtype:
    bf16 = compute_precision(config.parallel.mixed_precision, device.type) == "bf16"
    return torch.bfloat16 if bf16 else torch.float32


def uses_deterministic_algorithms(config: RunConfig, device: torch.device) -> bool:
    """``parallel.deterministic``, where null means on for CPU and off on CUDA (see the schema)."""
    setting = config.parallel.deterministic
    return device.type != "cuda" if setting is None else bool(setting)


def trained_networks(model: torch.nn.Module, lr_scales: dict[str, float] | None = None) -> list[list[torch.Tensor]]:
    """The trained parameters of ``model``, one list per network: every ``lr_scales`` prefix is a
    network of its own (e.g. TDM's fake score), the rest is the model."""
    prefixes = list(lr_scales or {})
    networks: dict[str, list[torch.Tensor]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            networks.setdefault(next((prefix for prefix in prefixes if name.startswith(prefix)), ""), []).append(parameter)
    return list(networks.values())


def clip_networks(networks: list[list[torch.Tensor]], max_norm: float, optimizers=None) -> torch.Tensor:
    """Clip the gradients of each network (:func:`trained_networks`) to ``max_norm`` on its own, so
    a large gradient of one never shrinks another's step; return the norm of all of them together
    (before clipping).

    One network trained by ``optimizers`` whose step takes a grad scale (fused AdamW, the CUDA
    default) is clipped inside that step (:func:`~krea2_train.parallel.grads.clip_grad_norm_`'s
    ``into``); several networks share one step, so their gradients are scaled in place.
    """
    if len(networks) == 1 and optimizers is not None and steps_take_grad_scale(optimizers):
        return clip_grad_norm_(networks[0], max_norm, into=optimizers)
    norms = [clip_grad_norm_(parameters, max_norm) for parameters in networks]
    return norms[0] if len(norms) == 1 else torch.stack([norm.float() for norm in norms]).square().sum().sqrt()


def build_optimizer(model: torch.nn.Module, config: RunConfig, device: torch.device, lr_scales: dict[str, float] | None = None):
    """AdamW through torchtitan's container: decay on weights and norm weights, none on biases.

    ``lr_scales`` maps a parameter-name prefix to a multiplier of ``optim.lr`` (e.g. TDM's fake
    score trains 5x faster than its student); the schedule scales every group alike.
    """
    from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig
    from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer

    optim = config.optim
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    groups = []
    # first match wins: scaled prefixes before the rest, biases (no decay) before weights
    for prefix, scale in [*(lr_scales or {}).items(), ("", 1.0)]:
        adamw = dict(lr=optim.lr * scale, betas=tuple(optim.betas), eps=optim.eps)
        head = "^" + re.escape(prefix)
        # torchtitan refuses a group that matches nothing (e.g. a LoRA run trains no bias)
        if any(name.startswith(prefix) and name.endswith(".bias") for name in trained):
            groups.append(ParamGroupConfig(pattern=head + r".*\.bias$", optimizer_name="AdamW", optimizer_kwargs=dict(adamw, weight_decay=0.0)))
        if any(name.startswith(prefix) and not name.endswith(".bias") for name in trained):
            groups.append(ParamGroupConfig(pattern=head, optimizer_name="AdamW", optimizer_kwargs=dict(adamw, weight_decay=optim.weight_decay)))
    implementation = "fused" if device.type == "cuda" else "foreach"
    optimizers = OptimizersContainer.Config(param_groups=groups, implementation=implementation).build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(
        warmup_steps=min(optim.warmup_steps, config.stage.steps),  # what torchtitan would cut it to, with a warning
        decay_ratio=optim.decay_ratio,
        decay_type=optim.decay_type,
        min_lr_factor=optim.min_lr_factor,
    ).build(optimizers=optimizers, training_steps=config.stage.steps)
    return optimizers, schedulers


INIT_FROM_RECORD = "init_from.json"


def pinned_init_checkpoint(config: RunConfig, runs_root: Path, run_dir: Path, is_main: bool) -> Path | None:
    """The checkpoint ``stage.init_from`` stood for when this run started.

    A run name resolves to that run's newest checkpoint, which moves if the run trains on. The
    first start records what it resolved to in ``run_dir/init_from.json``, and every restart
    reads the record, so the frozen copies a stage rebuilds on each start (a reference, a teacher)
    are always the weights the run began from. A changed ``stage.init_from`` is resolved afresh.
    Rank 0 resolves and every rank takes its answer (or its error), so a checkpoint the source
    run commits meanwhile cannot give ranks different weights.
    """
    if config.stage.init_from is None:
        return None
    checkpoint = error = None
    if is_main:
        try:
            checkpoint = _resolve_and_record_init_from(config.stage.init_from, runs_root, run_dir / INIT_FROM_RECORD)
        except Exception as raised:  # every rank must reach the broadcast
            error = raised
    checkpoint, error = broadcast_object((checkpoint, error))
    if error is not None:
        raise error
    return checkpoint


def _resolve_and_record_init_from(init_from: str, runs_root: Path, record: Path) -> Path:
    if record.is_file():
        pinned = json.loads(record.read_text())
        if pinned["init_from"] == init_from:
            checkpoint = Path(pinned["checkpoint"])
            if not checkpoint.exists():
                raise NoCheckpointError(
                    f"{checkpoint}, the checkpoint this run started from (stage.init_from={init_from!r}, pinned in "
                    f"{record}), no longer exists: its run's retention (checkpoint.keep_last / keep_every) may have "
                    "pruned it. Restore it, or set stage.init_from to the path of the checkpoint to use instead"
                )
            return checkpoint
        logger.warning("stage.init_from changed from %r to %r: resolving it again", pinned["init_from"], init_from)
    try:
        checkpoint = find_run_checkpoint(init_from, runs_root).resolve()
    except NoCheckpointError as error:  # the message names the setting, not only the path
        raise NoCheckpointError(f"stage.init_from={init_from!r}: {error}") from error
    check_model_digests(checkpoint)  # once, when pinned: every rank then loads it unchecked, on every start
    write_text(record, json.dumps({"init_from": init_from, "checkpoint": str(checkpoint)}))
    return checkpoint


def load_initial_weights(checkpoint: Path | None, model_config: Mapping) -> dict[str, torch.Tensor] | None:
    """The weights of ``stage.init_from``'s checkpoint (see :func:`pinned_init_checkpoint`).

    Raises:
        CheckpointError: the checkpoint is another model: its weights' shapes differ from the
            run's ``model_config`` (the keywords no shape shows, such as ``rope_theta``, may change).
    """
    if checkpoint is None:
        return None
    from krea2_train.model.layouts import SHAPELESS_KEYS

    shaped = lambda config: {key: value for key, value in config.items() if key not in SHAPELESS_KEYS}  # noqa: E731
    checkpoint_config = read_checkpoint_config(checkpoint)  # before reading any weight
    check_same_model_config(shaped(checkpoint_config), shaped(model_config), f"stage.init_from's checkpoint {checkpoint}", "this run's model")
    changed = [f"{key} {recorded!r} -> {ours!r}" for key, (recorded, ours) in model_config_differences(checkpoint_config, model_config).items()
               if key in SHAPELESS_KEYS]  # both configs hold tuples (read_checkpoint_config, model_config)
    if changed and records_model_config(checkpoint):  # an inferred config holds Krea 2's defaults, not the checkpoint's values
        logger.warning("stage.init_from's checkpoint %s was trained with other settings than this run's model: %s. The weights "
                       "load (no shape shows these), but the model computes another function until it adapts; if this is not "
                       "a deliberate change, set model.overrides to the checkpoint's values", checkpoint, "; ".join(changed))
    # a LoRA run's adapters: whole in the fp32 master weights; digests: checked when it was pinned
    weights, _ = load_checkpoint_weights(checkpoint, lora_dtype=torch.float32, check_digests=False)
    return weights


HOST_SYNC_CHECK_STEP = 3  # the step of each start whose host syncs are counted on CUDA
TORCHRUN_SHUTDOWN_TIMEOUT_S = 30.0  # torchrun's default, without --shutdown-timeout


def exit_windows_s(environ: Mapping[str, str] = os.environ, checkpoint_timeout_s: float | None = None) -> dict[str, float]:
    """The time a checkpoint asked for by a signal has before the process is killed, by setting:
    torchrun's wait after passing a SIGTERM on (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, which the
    launchers set and pass as ``--shutdown-timeout``; 30 s without it), the Slurm script's wait
    after USR1 before it requeues the job at its time limit (``KREA2_CHECKPOINT_GRACE_S``), and the
    watchdog's limit on a save and the wait for the one before it (``checkpoint_timeout_s``)."""
    windows = {} if checkpoint_timeout_s is None else {"resilience.checkpoint_timeout_s": checkpoint_timeout_s}
    settings = {}
    if "TORCHELASTIC_RUN_ID" in environ:
        settings["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(TORCHRUN_SHUTDOWN_TIMEOUT_S))
    if "KREA2_CHECKPOINT_GRACE_S" in environ:
        settings["KREA2_CHECKPOINT_GRACE_S"] = environ["KREA2_CHECKPOINT_GRACE_S"]
    for name, value in settings.items():
        try:
            windows[name] = float(value)
        except ValueError:
            logger.warning("%s=%r is not a number of seconds", name, value)
    return windows


def exit_checkpoint_problem(write_s: float, step_s: float, windows_s: Mapping[str, float]) -> str | None:
    """Why a signal's checkpoint may not commit before the process is killed, or None.

    After the signal the trainers finish their step, wait for a save still being written, then
    write their checkpoint: about ``step_s + 2 * write_s`` (each save as long as the last one).
    """
    needed_s = step_s + 2 * write_s
    short = {name: window for name, window in windows_s.items() if window < needed_s}
    if not short:
        return None
    settings = " and ".join(f"{name}={window:.0f}" for name, window in short.items())
    remedies = "; ".join(EXIT_WINDOW_REMEDIES[name] for name in short)
    return (
        f"a checkpoint takes {write_s:.0f} s to write, so a signal's checkpoint (after the step and a save still being "
        f"written) needs about {needed_s:.0f} s, more than {settings} s allow before the trainers are killed, losing "
        f"the steps since the last checkpoint. Raise it above {needed_s:.0f}: "
        f"{remedies} (docs/operations.md)"
    )


EXIT_WINDOW_REMEDIES = {
    "resilience.checkpoint_timeout_s": "set resilience.checkpoint_timeout_s (the watchdog would call the save a hang)",
    "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "set KREA2_SHUTDOWN_TIMEOUT_S (launch/env.sh), and Slurm's KillWait and preemption GraceTime above it",
    "KREA2_CHECKPOINT_GRACE_S": "set KREA2_CHECKPOINT_GRACE_S, and sbatch --signal=B:USR1@SECONDS above it plus Slurm's KillWait",
}


def metric_reduction(name: str) -> str:
    """How a stage metric combines over micro-batches and ranks: ``max`` for names ending in
    ``_max``, ``min`` for ``_min``, else ``mean``."""
    return "max" if name.endswith("_max") else "min" if name.endswith("_min") else "mean"


def accumulate_metric(name: str, total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """Fold one micro-batch's metric into the step's: summed (averaged later), or the extreme."""
    if total is None:
        return value
    kind = metric_reduction(name)
    return torch.maximum(total, value) if kind == "max" else torch.minimum(total, value) if kind == "min" else total + value


def reduce_step_values(
    loss: torch.Tensor, metrics: dict[str, torch.Tensor], signals: tuple[bool, ...], grad_norm: torch.Tensor
) -> dict:
    """Every rank's step values in one host sync (the step's only sync).

    The loss and the stage's metrics (0-dim tensors, the same names on every rank) are averaged
    over ranks, except ``*_max`` and ``*_min`` metrics, which take the extreme over ranks (a
    second all-reduce, MAX, only when a stage reports one); the signals any rank received are
    counted, so every rank decides alike whether to step and whether to checkpoint (and exit).
    The clipped gradient norm is already global.

    Returns ``{"loss", "grad_norm", **metrics}`` as floats and ``"signals"``: one bool per signal.
    """
    device = loss.device
    as_scalar = lambda name: metrics[name].float().reshape(()).to(device)  # noqa: E731
    mean_names = sorted(n for n in metrics if metric_reduction(n) == "mean")
    extreme_names = sorted(n for n in metrics if metric_reduction(n) != "mean")
    averaged = torch.stack([loss.float(), *(as_scalar(name) for name in mean_names)])
    counted = to_device(torch.tensor([float(flag) for flag in signals]), device)
    summed = torch.cat([averaged, counted])
    # min as the max of the negation: one MAX all-reduce for both
    extremes = torch.stack([as_scalar(n) if metric_reduction(n) == "max" else -as_scalar(n) for n in extreme_names]) if extreme_names else None
    if dist.is_initialized():
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        summed[: len(averaged)] /= dist.get_world_size()
        if extremes is not None:
            dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    parts = [summed, grad_norm.float().reshape(1).to(device)] + ([extremes] if extremes is not None else [])
    values = torch.cat(parts).tolist()
    result = {"loss": values[0], **dict(zip(mean_names, values[1 : len(averaged)]))}
    result["signals"] = tuple(count > 0 for count in values[len(averaged) : len(averaged) + len(signals)])
    result["grad_norm"] = values[len(averaged) + len(signals)]
    for index, name in enumerate(extreme_names):
        value = values[len(averaged) + len(signals) + 1 + index]
        result[name] = value if metric_reduction(name) == "max" else -value
    return result


class Trainer:
    _config_after_load: str | None = None  # a restart's config.yaml, written once its checkpoint loaded (rank 0)
    _exit_window_checked = False  # see _check_exit_window
    _compile_cache = None  # rank 0's CompileCacheWriter, with compiled blocks

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.stage = build_stage(config)  # a stage's bad settings fail before any heavy work
        self.dist: DistInfo = init_distributed(config.parallel.collective_timeout_s)
        setup_logging(self.dist.rank)
        self.device = self.dist.device
        self.dtype = compute_dtype(config, self.device)
        if uses_deterministic_algorithms(config, self.device):
            if self.device.type == "cuda":  # cuBLAS is deterministic only with a fixed workspace
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=self.device.type == "cuda")
        self.runs_root = Path(config.runs_root)
        self.run_dir = self.runs_root / config.run_name
        self._refuse_a_second_start()
        self.model_config = model_config(config.model.preset, **config.model.overrides)  # Krea2DiT keywords
        self.fresh_start = self._fresh_start()
        self._prepare_run_dir()
        # init_from's weights are read on a fresh start, and on every start by a stage with frozen copies
        needs_init = self.fresh_start or hasattr(self.stage, "frozen_models")
        self.init_checkpoint = pinned_init_checkpoint(config, self.runs_root, self.run_dir, self.dist.is_main) if needs_init else None

        self.parallel_dims = self._build_parallel_dims()
        self.dp_rank, self.dp_size = data_parallel_rank_size(self.parallel_dims)
        self.local_batch_size = config.data.global_batch_size // self.dp_size

        check_attention_backends(config.parallel.attention_backends, self.device, self.dtype, self.model_config)
        self.conditioner = self._build_conditioner()
        self._open_conditioning_cache()
        self.model = self._build_model()
        self.frozen = self._build_frozen_models()
        lr_scales = getattr(self.stage, "lr_scales", None)
        self.optimizers, self.lr_schedulers = build_optimizer(self.model, config, self.device, lr_scales=lr_scales)
        self.networks = trained_networks(self.model, lr_scales)  # clipped apart, every step
        self.train_state = TrainState()
        self.loader = self._build_loader()
        self.checkpointer = CheckpointManager(
            self.run_dir,
            interval=config.checkpoint.interval,
            keep_last=config.checkpoint.keep_last,
            keep_every=config.checkpoint.keep_every,
            async_mode=config.checkpoint.async_mode,
            seed=config.seed,
            config_hash=config_hash(config),
            tolerated_failures=config.checkpoint.tolerated_failures,
        )
        self.metrics = MetricsLogger(
            self.run_dir,
            rank=self.dist.rank,
            total_steps=config.stage.steps,
            wandb_mode=config.logging.wandb,
            wandb_project=config.logging.wandb_project,
            run_name=config.run_name,
            config=to_record(config),
        )
        self._signal = 0
        self.supervision: Supervision | None = None  # run log + watchdog, from the first step on

    # -- construction ---------------------------------------------------------------------------

    def _prepare_run_dir(self) -> None:
        """Write the run's config and model config. A restart must build the model its checkpoints
        hold: every rank compares the recorded model config first (the run directory is shared),
        so a changed ``model`` setting fails naming the keys instead of loading a partial model.
        A restart's ``config.yaml`` is written once its checkpoint has loaded (:meth:`resume`): a
        start the checkpoint refuses (another ``lora.rank``, batch size or data) leaves the run's
        recorded settings, which ``lora export`` and ``sample`` read, as they were."""
        if not self.fresh_start and (self.run_dir / MODEL_CONFIG_NAME).is_file():
            check_same_model_config(
                self.model_config, load_model_config(self.run_dir), "this start's model",
                f"the checkpoints of {self.run_dir} (start a new run_name to train another model)",
            )
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            written = to_yaml(self.config)
            if (self.run_dir / "config.yaml").is_file() and not self.fresh_start:
                changed = changed_settings((self.run_dir / "config.yaml").read_text(), written)
                if changed:
                    logger.warning("this start changes the run's settings: %s", "; ".join(changed))
            if self.fresh_start or not (self.run_dir / "config.yaml").is_file():
                write_text(self.run_dir / "config.yaml", written)
            else:
                self._config_after_load = written
            write_model_config(self.run_dir, self.model_config)
        self._barrier()

    def _open_conditioning_cache(self) -> None:
        """Rank 0 checks the stage's conditioning cache first (and empties it if what produced it
        changed); the others open it after, so no rank clears entries another is writing."""
        cache = getattr(self.stage, "cache", None)
        if cache is None:
            return
        if self.dist.is_main:
            cache.open()
        self._barrier()
        cache.open()

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def _build_parallel_dims(self):
        """The run's mesh on this world size, refusing before any heavy work (as a setting to fix,
        on every start: a restart on fewer nodes meets them too) parallel degrees that do not
        multiply to the world size and a batch that does not split into the stage's micro-batches."""
        parallel, world_size = self.config.parallel, self.dist.world_size
        try:
            dims = build_parallel_dims(parallel.dp_replicate, parallel.dp_shard, parallel.tp, world_size)
        except ValueError as error:
            raise ConfigError(f"config keys 'parallel.*' do not fit this start's {world_size} rank(s): {error}") from None
        _, dp_size = data_parallel_rank_size(dims)
        batch, accumulation = self.config.data.global_batch_size, self.config.optim.grad_accum_steps
        if batch % (dp_size * accumulation):
            raise ConfigError(
                f"config key 'data.global_batch_size': {batch} is not divisible by {dp_size} data-parallel rank(s) x "
                f"{accumulation} accumulation step(s) (optim.grad_accum_steps) on this start's {world_size} rank(s)"
            )
        multiple, why = getattr(self.stage, "micro_batch_multiple", (1, ""))
        micro_batch = batch // (dp_size * accumulation)
        if micro_batch % multiple:
            raise StageConfigError(
                f"a micro-batch of {micro_batch} sample(s) per rank (data.global_batch_size={batch} / {dp_size} data-parallel "
                f"rank(s) / {accumulation} accumulation step(s)) must be a multiple of {multiple}: {why}"
            )
        return dims

    def _build_conditioner(self):
        from krea2_train.conditioning.conditioner import build_conditioner

        cond = self.config.conditioning
        text_encoder = cond.text_encoder
        if text_encoder == "tiny":
            text_encoder = self.run_dir / "text_encoder"
            if self.dist.is_main and not text_encoder.exists():
                from krea2_train.conditioning.tiny import build_tiny_text_encoder

                build_tiny_text_encoder(text_encoder, seed=0)
            self._barrier()
        conditioner = build_conditioner(
            cond.autoencoder,
            text_encoder,
            autoencoder_path=cond.autoencoder_path,
            text_select_layers=cond.text_select_layers,
            max_text_tokens=cond.max_text_tokens,
            patch_size=cond.patch_size,
            device=self.device,
            dtype=self.dtype if self.device.type == "cuda" else None,
        )
        in_channels = self.model_config["in_channels"]
        if conditioner.autoencoder.latent_channels * cond.patch_size**2 != in_channels:
            raise StageConfigError(
                f"conditioning.autoencoder={cond.autoencoder} gives {conditioner.autoencoder.latent_channels} latent channels: "
                f"with conditioning.patch_size={cond.patch_size} the model needs in_channels="
                f"{conditioner.autoencoder.latent_channels * cond.patch_size**2}, model.preset={self.config.model.preset} has {in_channels}"
            )
        taps = conditioner.text_taps
        wanted = (self.model_config["num_text_layers"], self.model_config["text_hidden_dim"])
        if (taps.num_taps, taps.hidden_size) != wanted:  # before the DiT is built: a 12.9B model would fail only at its first forward
            raise StageConfigError(
                f"conditioning.text_encoder={cond.text_encoder} gives {taps.num_taps} tapped layers of width {taps.hidden_size}; "
                f"model.preset={self.config.model.preset} reads {wanted[0]} of width {wanted[1]} "
                f"(for the krea2 presets use conditioning=qwen with a Qwen3-VL-4B text encoder)"
            )
        if self.dist.world_size > 1 and self.dp_size > 1:
            shard_frozen_module(conditioner.text_taps.text_model, self.parallel_dims)
            cache = getattr(self.stage, "cache", None)
            if cache is not None:  # the sharded encoder's forward is collective: ranks miss together
                cache.any_rank_misses = any_rank_on_host(self.config.parallel.collective_timeout_s)
        return conditioner

    def _build_model(self) -> torch.nn.Module:
        config = self.config
        torch.manual_seed(config.seed)  # identical initial weights on every rank and world size
        model = build_model(config.model.preset, **config.model.overrides)
        initial = load_initial_weights(self.init_checkpoint, self.model_config) if self.fresh_start else None
        if initial is not None:
            model.load_state_dict(initial, strict=True)
            logger.info("initialised from %s", config.stage.init_from)
        if hasattr(self.stage, "prepare_model"):  # e.g. LoRA injection, auxiliary heads
            model = self.stage.prepare_model(model)
        logger.info("model %s: %.2fM parameters", config.model.preset, count_parameters(model) / 1e6)
        model.to(self.device)
        return parallelize_dit(
            model,
            self.parallel_dims,
            activation_checkpoint=config.parallel.activation_checkpoint,
            compile=config.parallel.compile,
            param_dtype=self.dtype,
            reduce_dtype=torch.float32,
            float8=config.float8,
        )

    def _build_frozen_models(self) -> dict[str, torch.nn.Module]:
        """The stage's frozen networks (a reference policy, a teacher), built from ``stage.init_from``
        on every start (fresh or resumed: they are never checkpointed), held on the device in the
        compute dtype and sharded like the DiT."""
        if not hasattr(self.stage, "frozen_models"):
            return {}
        if self.parallel_dims.tp_enabled:
            raise ValueError(f"stage kind {self.config.stage.kind!r} does not support tensor parallelism (parallel.tp={self.config.parallel.tp}); use parallel.tp=1")
        frozen = self.stage.frozen_models(load_initial_weights(self.init_checkpoint, self.model_config))
        for name, module in frozen.items():
            module.requires_grad_(False)
            module.to(self.device)
            frozen[name] = parallelize_dit(
                module, self.parallel_dims, activation_checkpoint="none", compile=self.config.parallel.compile,
                param_dtype=self.dtype, reduce_dtype=torch.float32,
            ).eval()
            logger.info("frozen %s: %.2fM parameters", name, count_parameters(module) / 1e6)
        return frozen

    def _build_loader(self):
        from krea2_train.train.data import build_train_loader

        return build_train_loader(
            self.config,
            self.run_dir,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            image_side=self.conditioner.image_side(self.config.data.resolution),
            pixel_multiple=self.conditioner.pixels_per_token,
            is_main=self.dist.is_main,
            barrier=host_barrier(self.config.data.prepare_timeout_s),
            holds_lease=tp_local_rank(self.parallel_dims) == 0,
            fresh_start=self.fresh_start,
        )

    # -- state ----------------------------------------------------------------------------------

    def checkpoint_state(self, with_loader: bool = True) -> dict:
        state = {
            "model_optim": ModelOptimizerState(self.model, self.optimizers.optimizers),
            "lr_schedulers": self.lr_schedulers,
            "train_state": self.train_state,
        }
        if with_loader:
            state["dataloader"] = self.loader
        if hasattr(self.stage, "state_dict"):  # e.g. rollouts a stage trains on over several steps
            state["stage"] = self.stage
        return state

    def resume(self) -> None:
        """Load the newest checkpoint; on a fresh start, give each rank generators of its own.

        The weights were built from one seed on every rank. What draws from the global generators
        from here on (LoRA dropout; the losses' noise is keyed by slot) must differ between ranks,
        as it does after a resume (each rank's saved state) or on another world size (reseeded by
        rank): seeded from ``(seed, step 0, rank)``.
        """
        loaded = self.checkpointer.load(self.checkpoint_state())
        if self._config_after_load is not None:  # rank 0, a restart: its settings are the run's now
            write_text(self.run_dir / "config.yaml", self._config_after_load)
            self._config_after_load = None
        if loaded is not None:
            self.metrics.event(self.train_state.step, "resume", checkpoint=str(loaded.path))
        else:
            reseed_rng(self.config.seed, 0, self.dist.rank)

    def rollback(self) -> None:
        """Reload weights, optimizer and schedule from the newest checkpoint; the data goes on.

        The stretch of data that produced the non-finite steps is not replayed.
        """
        step = self.train_state.step
        counters = self.train_state.state_dict()
        self.checkpointer.wait(tolerate=True)
        self._record_failed_saves(step)
        state = self.checkpoint_state(with_loader=False)
        del state["train_state"]
        loaded = self.checkpointer.load(state)
        self.train_state.load_state_dict(counters)
        self.metrics.event(step, "rollback", to=None if loaded is None else str(loaded.path))
        self.train_state.consecutive_skips = 0

    def _open_compile_cache(self) -> None:
        """With compiled blocks: load the run's compile cache on every rank (a restart on another
        node starts warm); rank 0 writes it (``self._compile_cache.save()``)."""
        if not (self.config.parallel.compile and self.config.parallel.compile_cache):
            return
        load_compile_cache(self.run_dir / COMPILE_CACHE_NAME)
        if self.dist.is_main:
            self._compile_cache = CompileCacheWriter(self.run_dir / COMPILE_CACHE_NAME)

    def _check_exit_window(self, step: int, step_time: float) -> None:
        """Once per start, with the first save whose predecessor finished (its write time known):
        an alarm when a signal's checkpoint would not commit before the process is killed."""
        write_s = self.checkpointer.last_write_s
        if self._exit_window_checked or write_s is None:
            return
        self._exit_window_checked = True
        resilience = self.config.resilience
        problem = exit_checkpoint_problem(
            write_s, step_time, exit_windows_s(checkpoint_timeout_s=resilience.checkpoint_timeout_s if resilience.watchdog else None)
        )
        if problem is not None:
            self.metrics.event(step, "alarm", warn=True, message=problem)

    def _record_failed_saves(self, step: int) -> None:
        """The saves that failed and were tolerated (the checkpointer logged them), in the metrics
        and the run log, at their own step (an asynchronous save's failure is found at ``step``)."""
        for failed_step, error in self.checkpointer.failed_saves:
            self.metrics.event(failed_step, "checkpoint_failed", error=error, found_at=step)
            self.supervision.checkpoint_failed(failed_step, error)
        self.checkpointer.failed_saves.clear()

    # -- signals --------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        """SIGTERM and Ctrl-C (SIGINT): checkpoint at the end of the step and stop; a second
        Ctrl-C stops at once, without a checkpoint. SIGUSR1: checkpoint and go on. Every rank's
        signals are agreed at the step's end (a signal on one rank acts on all of them)."""

        def on_signal(signum, _frame):  # flags only: the loop logs (a handler may interrupt a write to the log)
            if signum == signal.SIGINT:
                if self._interrupted:
                    raise KeyboardInterrupt
                self._interrupted = True
            self._signal = max(self._signal, CHECKPOINT_AND_CONTINUE if signum == signal.SIGUSR1 else CHECKPOINT_AND_EXIT)

        self._interrupted = self._interrupt_said = False
        self._previous_handlers = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}

    def _say_interrupted(self) -> None:
        if self._interrupted and not self._interrupt_said:
            self._interrupt_said = True
            logger.warning("interrupted: saving a checkpoint at the end of this step, then stopping "
                           "(interrupt again to stop at once, without one)")

    def _restore_signal_handlers(self) -> None:
        for signum, handler in getattr(self, "_previous_handlers", {}).items():
            if handler is not None:  # None: a handler installed outside Python, which cannot be put back from here
                signal.signal(signum, handler)

    # -- the loop -------------------------------------------------------------------------------

    def train_step(self, batch: dict) -> dict[str, float]:
        accum = self.config.optim.grad_accum_steps
        micro = self.local_batch_size // accum
        losses: list[torch.Tensor] = []
        metric_sums: dict[str, torch.Tensor] = {}
        micro_steps = [
            (
                StepContext(
                    model=self.model,
                    conditioner=self.conditioner,
                    device=self.device,
                    seed=self.config.seed,
                    step=self.train_state.step,
                    first_slot=self.dp_rank * self.local_batch_size + index * micro,
                    dtype=self.dtype,
                    frozen=self.frozen,
                    micro_index=index,
                ),
                {k: v[index * micro : (index + 1) * micro] if isinstance(v, (torch.Tensor, list)) else v for k, v in batch.items()},
            )
            for index in range(accum)
        ]
        if hasattr(self.stage, "begin_step"):
            self.stage.begin_step(micro_steps)
        phases = getattr(self.stage, "update_phases", (None,))
        phased = len(phases) > 1
        phase_norms, phases_finite = [], True
        # a fused optimizer skips a phase that is not finite in its own step: no host read per phase
        skip_on_device = phased and steps_take_grad_scale(self.optimizers)
        not_finite_yet = None  # 1 once a phase of this step was not finite (on the device)
        for phase in phases:  # one update per phase; a one-phase stage steps after the step's reduce below
            for index, (ctx, part) in enumerate(micro_steps):
                last = index == accum - 1
                if hasattr(self.model, "set_requires_gradient_sync"):
                    self.model.set_requires_gradient_sync(last)
                loss, metrics = self.stage.loss(ctx, part) if phase is None else self.stage.loss(ctx, part, phase)
                if self.faults.poison_loss(self.train_state.step + 1):
                    loss = loss * float("nan")
                (loss / accum).backward()
                losses.append(loss.detach())
                for name, value in metrics.items():
                    metric_sums[name] = accumulate_metric(name, metric_sums.get(name), value.detach().float().to(self.device))
            phase_norms.append(clip_networks(self.networks, self.config.optim.grad_clip, self.optimizers))
            if phased:  # this phase's update now, so the next phase's losses see it
                # the norm is global, so every rank agrees; after a phase that was not finite, the
                # later phases do not step either; only the parameters that got gradients in this phase move
                if skip_on_device:
                    phase_not_finite = (~torch.isfinite(phase_norms[-1])).float()
                    not_finite_yet = phase_not_finite if not_finite_yet is None else torch.maximum(not_finite_yet, phase_not_finite)
                    skip_steps_when(self.optimizers, not_finite_yet)
                    self.optimizers.step()
                else:  # one host read per phase
                    phases_finite = phases_finite and math.isfinite(phase_norms[-1].item())
                    if phases_finite:
                        self.optimizers.step()
                self.optimizers.zero_grad()
        if skip_on_device:
            skip_steps_when(self.optimizers, None)
        # summed in float64: two finite phase norms above 1.3e19 would overflow float32's squares
        grad_norm = torch.stack([norm.double() for norm in phase_norms]).square().sum().sqrt().float() if phased else phase_norms[0]
        values = reduce_step_values(
            torch.stack(losses).sum() / accum if phased else torch.stack(losses).mean(),
            {name: total / accum if metric_reduction(name) == "mean" else total for name, total in metric_sums.items()},
            signals=(
                self._signal == CHECKPOINT_AND_CONTINUE, self._signal == CHECKPOINT_AND_EXIT,
                self.loader.fenced,
            ),
            grad_norm=grad_norm,
        )
        # a phased stage has stepped already: the step counts as skipped when a phase did not step,
        # which is when a phase's norm, and so the step's, was not finite
        if phased:
            finite = math.isfinite(values["grad_norm"]) if skip_on_device else phases_finite
        else:
            finite = math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])
        values["lr"] = self.lr_schedulers.schedulers[0].get_last_lr()[-1]  # this step's, of the unscaled weights' group (built last)
        if not phased:
            if finite:
                self.optimizers.step()
            self.optimizers.zero_grad()
        self.lr_schedulers.step()
        any_continue, any_exit, any_fenced = values.pop("signals")
        agreed_signal = CHECKPOINT_AND_EXIT if any_exit else CHECKPOINT_AND_CONTINUE if any_continue else 0
        return {**values, "finite": finite, "signal": agreed_signal, "fenced": any_fenced}

    def train(self) -> str:
        """Train to ``stage.steps``; returns how this start ended (:class:`RunResult`'s ``ending``)."""
        with attention_backends(self.config.parallel.attention_backends):
            return self._train()

    def _train(self) -> str:
        config = self.config
        self._install_signal_handlers()
        self.resume()
        self.supervision = start_supervision(
            config, self.run_dir, rank=self.dist.rank, world_size=self.dist.world_size, step=self.train_state.step,
            dsn=getattr(self.loader, "dsn", None),
        )
        self.faults = FaultInjector(self.dist.rank, incarnation=self.supervision.incarnation)
        self._open_compile_cache()
        data = iter(self.loader)
        total = config.stage.steps
        steps_this_start = 0
        if self.train_state.step >= total:
            logger.info("run %s finished already (step %d of %d): nothing to train; its samples and loss curve are in %s",
                        config.run_name, self.train_state.step, total, self.run_dir)
        while self.train_state.step < total:
            start = time.perf_counter()
            batch = next(data)
            for shard_id, error in batch["new_bad_shards"].items():
                self.metrics.event(self.train_state.step + 1, "quarantine", shard_id=shard_id, error=error, total=batch["bad_shards_total"])
            tokens_per_image = self.conditioner.grid(*batch["images"].shape[-2:]).num_tokens  # the step's bucket
            steps_this_start += 1
            # once per start, after compilation and warm-up, count the step's host syncs (CUDA)
            with HostSyncCounter(self.device, enabled=steps_this_start == HOST_SYNC_CHECK_STEP) as syncs:
                result = self.train_step(batch)
            if syncs.count is not None:
                result["host_syncs"] = syncs.count
                logger.info("host syncs in one training step: %d (1 is the step's own read of its all-reduce; a stage with"
                            " several update phases adds one per phase unless its optimizer is fused)", syncs.count)
            if steps_this_start == HOST_SYNC_CHECK_STEP and config.parallel.compile:  # compiled by now
                counts = compile_cache_counts()
                logger.info("compiled graphs of this start: %d from the cache, %d compiled", counts["hits"], counts["misses"])
                if self._compile_cache is not None:
                    self._compile_cache.save()
            if result.pop("fenced"):  # every rank agrees: stop at once, write nothing (the newer start owns the run)
                logger.error(
                    "a newer start of run %s holds its data lease: this process is a leftover of an older "
                    "start and stops without checkpointing (step %d)", config.run_name, self.train_state.step + 1,
                )
                self.checkpointer.abandon()  # its save in flight, if any, is not committed
                self.metrics.event(self.train_state.step + 1, "fenced")
                self.supervision.stopped(self.train_state.step, "fenced")
                return "fenced"
            self.train_state.step += 1
            self.train_state.samples_seen += config.data.global_batch_size
            self.train_state.tokens_seen += config.data.global_batch_size * tokens_per_image
            signal_now = result.pop("signal")
            self._say_interrupted()
            if not result.pop("finite"):
                self.train_state.skipped_steps += 1
                self.train_state.consecutive_skips += 1
                self.metrics.event(self.train_state.step, "skip", loss=result["loss"], grad_norm=result["grad_norm"])
            else:
                self.train_state.consecutive_skips = 0
            step_time = time.perf_counter() - start
            step = self.train_state.step
            metrics = {
                **result,
                "images_per_s": config.data.global_batch_size / step_time,
                "tokens_per_s": config.data.global_batch_size * tokens_per_image / step_time,
                "memory_gib": peak_memory_gib(self.device),
                "skipped": int(self.train_state.consecutive_skips > 0),
                "skipped_total": self.train_state.skipped_steps,
            }
            self.metrics.log_step(step, metrics, step_time=step_time, print_line=step % config.logging.log_interval == 0 or step == total)
            if hasattr(self.stage, "end_step"):  # alarms a stage raises on the step's reduced metrics
                for message in self.stage.end_step(step, metrics):
                    self.metrics.event(step, "alarm", warn=True, message=message)
            self.supervision.step_done(step, batch)
            self.faults.after_step(step)
            # a rollback, a save that blocks (sync mode, or the previous write still going) and the
            # exit's wait are not a slow next step for the watchdog; its no-progress rule still
            # holds, at resilience.checkpoint_timeout_s (a large model's save outlasts a step's limit)
            with self.supervision.slow_section(config.resilience.checkpoint_timeout_s):
                if self.train_state.consecutive_skips >= config.optim.max_consecutive_skips:
                    self.rollback()
                # no periodic checkpoint inside a streak of skipped steps: rollback must reach a
                # state from before the instability
                if self.train_state.consecutive_skips == 0 or step == total or signal_now > 0:
                    # the run's last save and an exit's must succeed; a periodic one may fail
                    # (checkpoint.tolerated_failures in a row) and the next one tries again
                    last = step == total or signal_now == CHECKPOINT_AND_EXIT
                    started = self.checkpointer.save(step, self.checkpoint_state(), force=step == total or signal_now > 0, may_fail=not last)
                    self._record_failed_saves(step)
                    if started:
                        self.metrics.event(step, "checkpoint", blocked_s=round(self.checkpointer.last_blocked_s, 4))
                        self._check_exit_window(step, step_time)
                        if self._compile_cache is not None:  # graphs compiled since (another bucket's shape)
                            self._compile_cache.save()
                if signal_now == CHECKPOINT_AND_EXIT:
                    self.checkpointer.wait()
            if signal_now == CHECKPOINT_AND_EXIT:
                self.metrics.event(step, "signal_exit", resume="run the same command again to resume from this step")
                self.supervision.stopped(step, "signal")
                return "signal"
            if signal_now == CHECKPOINT_AND_CONTINUE and self._signal == CHECKPOINT_AND_CONTINUE:
                self._signal = 0  # handled; a SIGTERM that came during the save stays for the next step
            if config.logging.sample_interval and step % config.logging.sample_interval == 0 and step < total:
                with self.supervision.slow_section():
                    self.write_samples(step)
        with self.supervision.slow_section(config.resilience.checkpoint_timeout_s):
            self.checkpointer.wait()
            if steps_this_start:  # a start that trained nothing has nothing new to show
                self.write_samples(self.train_state.step)
                self.write_loss_curve()
        self.supervision.stopped(self.train_state.step, "completed")
        return "completed"

    # -- outputs --------------------------------------------------------------------------------

    def write_samples(self, step: int) -> Path | None:
        """A sample grid of the logging prompts at the stage's resolution (every rank samples)."""
        from krea2_train.flow.generate import generate, image_grid, to_pil
        from krea2_train.flow.sampler import resolve_sampler_settings

        logging_config = self.config.logging
        side = self.conditioner.image_side(self.config.data.resolution)
        grid = self.conditioner.grid(side, side)
        if hasattr(self.stage, "sample_settings"):
            settings = self.stage.sample_settings(grid.num_tokens)
        else:
            settings = resolve_sampler_settings(
                logging_config.sample_preset,
                grid.num_tokens,
                num_steps=logging_config.sample_steps,
                guidance_scale=logging_config.sample_guidance,
            )
        self.model.eval()
        images = generate(
            self.model, self.conditioner, list(logging_config.sample_prompts), side, side, settings,
            seed=self.config.seed, device=self.device, dtype=self.dtype,
        )
        self.model.train()
        if not self.dist.is_main:
            return None
        path = self.run_dir / "samples" / f"step-{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(to_pil(images)).save(path)
        self.metrics.log_image(step, "samples", path)
        logger.info("samples written to %s", path)
        return path

    def write_loss_curve(self) -> Path | None:
        if not self.dist.is_main:
            return None
        from krea2_train.train.metrics import read_metrics
        from krea2_train.train.plots import plot_curve

        # the stage's curve (GRPO: its mean reward), else its own objective when it reports one
        # (the total may include auxiliary terms, e.g. iREPA's negative cosine in the first epoch)
        # steps run again after a restart or a rollback: the last run of each step is the run's history
        records = sorted({r["step"]: r for r in read_metrics(self.run_dir)}.values(), key=lambda r: r["step"])
        metric, name = getattr(self.stage, "curve", ("loss_fm", "flow-matching loss"))
        if not (records and all(metric in r for r in records)):
            metric, name = "loss", f"{self.stage.name} loss"
        path = plot_curve([r["step"] for r in records], [r[metric] for r in records], self.run_dir / "loss.png",
                          title=f"{self.config.run_name}: {name}", log_y=metric.startswith("loss"))  # a reward: linear
        self.metrics.log_image(self.train_state.step, "loss_curve", path)
        return path

    def _refuse_a_second_start(self) -> None:
        """Every rank refuses, before anything touches the run (its config, its data lease), when
        another start of the run is alive on this host (run twice by mistake): training beside it
        would fence it out and record its stop as a failure."""
        running = None
        if self.dist.is_main:
            resilience = self.config.resilience
            running = another_start_running(heartbeat_dir_of(resilience, self.run_dir), resilience.heartbeat_stale_s, self.config.run_name)
        running = broadcast_object(running)
        if running is not None:
            raise RunInProgressError(running)

    def _fresh_start(self) -> bool:
        """Whether the run has no checkpoint yet, as rank 0 sees it (every rank agrees, and refuses
        alike a run whose checkpoints all fail to verify: :func:`resumable_checkpoints`)."""
        verdict = None
        if self.dist.is_main:
            try:
                verdict = not resumable_checkpoints(self.run_dir / CHECKPOINTS_DIR)
            except CheckpointVerificationError as error:
                verdict = str(error)
        verdict = broadcast_object(verdict)
        if isinstance(verdict, str):
            raise CheckpointVerificationError(verdict)
        return verdict

    def close(self) -> None:
        """Stop supervision, finish the save in flight, close the metrics and the loader: each
        even when one before it raises (a failed save must not leave the loader's workers)."""
        self._restore_signal_handlers()
        with ExitStack() as closing:  # callbacks run last-registered first
            if hasattr(self.loader, "close"):
                closing.callback(self.loader.close)
            closing.callback(self.metrics.close)
            closing.callback(self.checkpointer.close)
            if self.supervision is not None:
                closing.callback(self.supervision.close)


@dataclass(frozen=True)
class RunResult:
    """How one start of a stage ended (``ending``): ``completed`` at ``stage.steps``; ``signal``,
    stopped at ``step`` after a checkpoint (run the same command again to resume); ``fenced``, a
    leftover of an older start that stopped without writing because a newer start owns the run."""

    run_dir: Path
    step: int
    steps: int
    ending: str

    @property
    def completed(self) -> bool:
        return self.ending == "completed"


def run(config: RunConfig) -> RunResult:
    """Train one stage, resuming from the run's newest checkpoint."""
    trainer = Trainer(config)
    try:
        ending = trainer.train()
    except BaseException as error:
        try:
            if trainer.supervision is not None:
                trainer.supervision.failed(trainer.train_state.step, error)
        finally:
            try:
                trainer.close()
            except Exception as close_error:  # the error that stopped training is the one to report
                logger.error("while stopping after %s: %s: %s", type(error).__name__, type(close_error).__name__, close_error)
        raise
    else:
        trainer.close()
        return RunResult(trainer.run_dir, trainer.train_state.step, config.stage.steps, ending)
    finally:
        destroy_distributed()
