"""Compose a run configuration with Hydra and validate it into :class:`RunConfig`.

``load_config("stage/pretrain_256", ["optim.lr=1e-4"])`` selects ``configs/stage/pretrain_256.yaml``
on top of ``configs/config.yaml``; overrides use Hydra's syntax (``key=value``, ``group=option``).
Any problem raises :class:`ConfigError` whose message names the key and what is accepted.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from krea2_train.config.schema import STAGE_KINDS, RunConfig
from krea2_train.errors import Krea2Error

CONFIG_DIR = Path(os.environ.get("KREA2_CONFIG_DIR", Path(__file__).resolve().parents[2] / "configs"))


class ConfigError(Krea2Error, ValueError):
    """A configuration that cannot be used; the message names the key."""


def _choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def compose(config: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose ``configs/config.yaml`` with the group option named by ``config`` ("group/option"),
    or with a stage YAML file given by its path ("my_stage.yaml")."""
    given = list(overrides or [])
    overrides = [_check_override_key(override) for override in given]
    if Path(config).suffix in (".yaml", ".yml"):
        return _compose_stage_file(Path(config), overrides, given)
    group, _, option = config.partition("/")
    if not option:
        raise ConfigError(f"--config must look like GROUP/NAME (e.g. stage/pretrain_256) or be a stage YAML file, got {config!r}")
    if option not in _choices(group):
        raise ConfigError(f"no config {config!r}; {group} configs: {', '.join(_choices(group)) or 'none'}")
    return _hydra_compose(config, [f"{group}={option}", *overrides], given)


def _compose_stage_file(path: Path, overrides: list[str], given: list[str]) -> DictConfig:
    """A stage written outside ``configs/`` (``--config my_stage.yaml``), composed as if it were in ``configs/stage/``.

    Hydra finds group options only on its search path, so the file is linked as ``stage/<option>.yaml``
    into a scratch directory added to that path for this one composition.
    """
    import tempfile

    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist (or is not a file)")
    option = f"file_{path.stem}"  # cannot shadow a built-in stage of the same name
    with tempfile.TemporaryDirectory(prefix="krea2_stage_") as search_dir:
        (Path(search_dir) / "stage").mkdir()
        (Path(search_dir) / "stage" / f"{option}.yaml").symlink_to(path.resolve())
        return _hydra_compose(str(path), [f"hydra.searchpath=[file://{search_dir}]", f"stage={option}", *overrides], given)


def _hydra_compose(config: str, overrides: list[str], given: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            return hydra_compose(config_name="config", overrides=overrides)
    except HydraException as error:
        reason = str(error).split("\nConfig search path:")[0].strip()  # where Hydra looked says nothing to a user
        raise ConfigError(f"cannot compose {config!r} with overrides {given}: {reason}") from None
    except (OmegaConfBaseException, yaml.YAMLError) as error:  # a YAML file that is not a mapping, or not YAML
        reason = " ".join(line.strip() for line in str(error).splitlines()[:4])
        raise ConfigError(f"cannot compose {config!r}: {reason}") from None


def _check_override_key(override: str) -> str:
    """Reject ``key=value`` overrides whose key is not in the schema, listing what is accepted.

    Returns the override as an add-or-override (``++``): a key the schema accepts may be absent
    from the YAML files (schema defaults), and Hydra would refuse a plain override of it.
    """
    key = override.split("=", 1)[0].lstrip("+~")
    if "=" not in override or key in _groups():
        return override
    node = OmegaConf.structured(RunConfig)
    walked = []
    for part in key.split("."):
        if not isinstance(node, DictConfig) or node._is_missing():
            return override
        if part not in node:
            if OmegaConf.get_type(node) is dict:  # free-form mappings such as model.overrides
                return "++" + override.lstrip("+")
            where = ".".join(walked) or "the top level"
            raise ConfigError(f"unknown config key {key!r}; accepted keys in {where!r}: {', '.join(node.keys())}")
        walked.append(part)
        node = node._get_node(part)
    return "++" + override.lstrip("+")


def _groups() -> set[str]:
    return {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()}


def to_run_config(composed: DictConfig) -> RunConfig:
    """Merge a composed config into the typed schema: unknown keys and wrong types fail here."""
    schema = OmegaConf.structured(RunConfig)
    try:
        missing = sorted(OmegaConf.missing_keys(composed))  # "???" in a config group: the merge would keep the default
    except OmegaConfBaseException:  # an interpolation that does not resolve: the merge below names the key behind it
        missing = []
    if missing:
        raise ConfigError(f"config keys {', '.join(repr(key) for key in missing)} are required by the chosen config groups and not set")
    try:
        merged = OmegaConf.merge(schema, composed)
        OmegaConf.resolve(merged)
        run_config: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        parent = key.rsplit(".", 1)[0] if "." in key else None
        accepted = ""
        if not isinstance(error, ConfigKeyError):
            pass
        elif parent is not None:
            node = OmegaConf.select(schema, parent)
            if isinstance(node, DictConfig) and not node._is_missing():
                accepted = f"; accepted keys in {parent!r}: {', '.join(node.keys())}"
        elif key != "?":
            accepted = f"; accepted top-level keys: {', '.join(schema.keys())}"
        message = str(error).splitlines()[0]
        raise ConfigError(f"config key {key!r}: {message}{accepted}") from None
    validate(run_config)
    return run_config


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key {key!r}: {message}")


def validate(config: RunConfig) -> None:
    """Value checks the type system cannot express."""
    from krea2_train.data.buckets import parse_aspect_ratio
    from krea2_train.flow.sampler import resolve_sampler_settings
    from krea2_train.model.presets import PRESETS, model_config
    from krea2_train.parallel.attention import parse_backends

    _require(config.stage.kind in STAGE_KINDS, "stage.kind", f"{config.stage.kind!r} is not one of {STAGE_KINDS}")
    _require(config.stage.steps > 0, "stage.steps", "must be positive")
    _require(config.model.preset in PRESETS, "model.preset", f"{config.model.preset!r}; accepted: {sorted(PRESETS)}")
    try:
        model_keywords = model_config(config.model.preset, **config.model.overrides)
    except ValueError as error:
        raise ConfigError(f"config key 'model.overrides': {error}") from None
    _require(model_keywords["num_layers"] >= 1, "model.overrides", "num_layers must be >= 1")
    patch_area = config.conditioning.patch_size**2
    _require(
        model_keywords["in_channels"] % patch_area == 0,
        "conditioning.patch_size",
        f"the model's in_channels={model_keywords['in_channels']} must be the latent channels x patch_size^2 (patch_size={config.conditioning.patch_size})",
    )
    _require(config.conditioning.autoencoder in ("pixel", "qwen_image"), "conditioning.autoencoder", "accepted: pixel, qwen_image")
    _require(
        config.conditioning.autoencoder != "qwen_image" or config.conditioning.autoencoder_path is not None,
        "conditioning.autoencoder_path",
        "required for the qwen_image autoencoder (a local diffusers directory)",
    )
    _require(0.0 <= config.conditioning.caption_dropout < 1.0, "conditioning.caption_dropout", "must be in [0, 1)")
    _require(config.data.source in ("shapes", "registry"), "data.source", "accepted: shapes, registry")
    _require(config.data.resolution > 0 and config.data.resolution % 16 == 0, "data.resolution",
             "must be a positive multiple of 16 (one token per 16 px)")
    _require(config.data.num_workers >= 0, "data.num_workers", "must be >= 0 (0: load in the training process)")
    _require(config.data.num_samples >= 1, "data.num_samples", "must be >= 1 (the images of the shapes world)")
    _require(config.data.global_batch_size > 0, "data.global_batch_size", "must be positive")
    _require(config.data.prepare_timeout_s > 0, "data.prepare_timeout_s", "must be positive")
    _require(set(config.data.caption_mix) <= {"long", "medium", "short"}, "data.caption_mix", "keys: long, medium, short")
    _require(abs(sum(config.data.caption_mix.values()) - 1.0) < 1e-6, "data.caption_mix", "weights must sum to 1")
    _require(len(config.data.buckets) > 0, "data.buckets", "at least one aspect ratio, e.g. [1:1]")
    for ratio in config.data.buckets:
        try:
            parse_aspect_ratio(ratio)
        except ValueError as error:
            _require(False, "data.buckets", str(error))
    balance, curate = config.data.balance, config.data.curate
    _require(not (balance.enabled and curate.enabled), "data.balance", "enable one of data.balance, data.curate")
    _require(balance.target >= 0 and 0 < balance.fraction <= 1, "data.balance", "target >= 0 and fraction in (0, 1]")
    _require(len(balance.levels) > 0 and min(balance.levels) > 0, "data.balance.levels", "positive cluster counts, bottom-up")
    _require(balance.leaf_pick in ("random", "nearest"), "data.balance.leaf_pick", "accepted: random, nearest")
    _require(balance.semantic_dedup is None or 0 < balance.semantic_dedup <= 1, "data.balance.semantic_dedup",
             "a cosine similarity in (0, 1], or null (off)")
    _require(balance.train_points_per_cluster >= 1, "data.balance.train_points_per_cluster", "must be >= 1")
    _require(curate.top >= 0 and 0 < curate.fraction <= 1, "data.curate", "top >= 0 and fraction in (0, 1]")
    _require(curate.order in (None, "asc", "desc"), "data.curate.order", "accepted: asc, desc, null")
    quality = config.data.quality
    _require(not quality.enabled or quality.minimum or quality.maximum, "data.quality", "enabled without a bound (minimum or maximum)")
    for score in set(quality.minimum) & set(quality.maximum):
        _require(quality.minimum[score] <= quality.maximum[score], f"data.quality.minimum.{score}", "above its maximum")
    _require(config.flow.shift in ("resolution", "fixed", "none"), "flow.shift", "accepted: resolution, fixed, none")
    _require(config.flow.shift != "fixed" or config.flow.mu is not None, "flow.mu", "required when flow.shift=fixed")
    _require(config.flow.shift == "fixed" or config.flow.mu is None, "flow.mu", f"only used with flow.shift=fixed (flow.shift={config.flow.shift})")
    _require(config.flow.scale > 0, "flow.scale", "must be positive")
    _require(
        config.parallel.activation_checkpoint in ("none", "selective", "full"),
        "parallel.activation_checkpoint",
        "accepted: none, selective, full",
    )
    _require(config.parallel.mixed_precision in ("auto", "bf16", "fp32"), "parallel.mixed_precision", "accepted: auto, bf16, fp32")
    _require(config.parallel.tp >= 1 and config.parallel.dp_replicate >= 1, "parallel", "tp and dp_replicate must be >= 1")
    _require(
        not (config.parallel.compile and config.parallel.activation_checkpoint != "none" and config.parallel.tp > 1),
        "parallel.compile",
        "compiled blocks with activation checkpointing and tp > 1 fail in AOTAutograd; drop one of the three",
    )
    try:
        parse_backends(config.parallel.attention_backends)
    except ValueError as error:
        _require(False, "parallel.attention_backends", str(error))
    _require(config.optim.lr > 0, "optim.lr", "must be positive")
    _require(len(config.optim.betas) == 2 and all(0 <= beta < 1 for beta in config.optim.betas), "optim.betas", "two values in [0, 1)")
    _require(config.optim.decay_type in ("linear", "sqrt", "cosine"), "optim.decay_type", "accepted: linear, sqrt, cosine")
    _require(config.optim.grad_accum_steps >= 1, "optim.grad_accum_steps", "must be >= 1")
    _require(config.checkpoint.interval > 0, "checkpoint.interval", "must be positive")
    _require(config.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1 (the checkpoint to resume from)")
    _require(config.checkpoint.keep_every >= 0, "checkpoint.keep_every", "must be >= 0 (0: off)")
    _require(config.checkpoint.tolerated_failures >= 0, "checkpoint.tolerated_failures", "must be >= 0 (0: every failed save ends the run)")
    _require(
        bool(config.run_name) and config.run_name not in (".", "..") and "/" not in config.run_name and "\\" not in config.run_name,
        "run_name", f"must name one directory under runs_root, got {config.run_name!r}",
    )
    _require(config.checkpoint.async_mode in ("async", "sync"), "checkpoint.async_mode", "accepted: async, sync")
    _require(config.logging.wandb in ("offline", "online", "disabled"), "logging.wandb", "accepted: offline, online, disabled")
    try:  # the sample grids come after training steps: a bad setting must not wait for them
        resolve_sampler_settings(
            config.logging.sample_preset, 256, num_steps=config.logging.sample_steps, guidance_scale=config.logging.sample_guidance
        )
    except ValueError as error:
        _require(False, "logging.sample_preset / sample_steps / sample_guidance", str(error))
    resilience = config.resilience
    _require(
        0 < resilience.hang_timeout_s < config.parallel.collective_timeout_s,
        "resilience.hang_timeout_s",
        f"must be positive and below parallel.collective_timeout_s={config.parallel.collective_timeout_s} "
        "(the watchdog must act before the collective times out)",
    )
    _require(
        0 < resilience.first_step_timeout_s < config.parallel.collective_timeout_s,
        "resilience.first_step_timeout_s",
        f"must be positive and below parallel.collective_timeout_s={config.parallel.collective_timeout_s} "
        "(the first step's collectives wait for the slowest rank's compile and warm-up)",
    )
    _require(
        resilience.hang_timeout_s <= resilience.checkpoint_timeout_s < config.parallel.collective_timeout_s,
        "resilience.checkpoint_timeout_s",
        f"must be at least resilience.hang_timeout_s={resilience.hang_timeout_s:g} and below "
        f"parallel.collective_timeout_s={config.parallel.collective_timeout_s} (ranks wait for each other's writes)",
    )
    _require(resilience.slow_step_factor > 1, "resilience.slow_step_factor", "must be above 1")
    _require(0 < resilience.poll_interval_s < resilience.heartbeat_stale_s, "resilience.poll_interval_s",
             "must be positive and below resilience.heartbeat_stale_s")
    _require(1 <= resilience.hang_exit_code <= 255, "resilience.hang_exit_code", "must be in [1, 255]")
    _require(config.float8.backend in ("torchao", "transformer_engine"), "float8.backend", "accepted: torchao, transformer_engine")
    _require(config.float8.recipe in ("tensorwise", "rowwise"), "float8.recipe", "accepted: tensorwise, rowwise")
    _validate_irepa(config, model_keywords["num_layers"])
    _validate_lora(config)


def _validate_irepa(config: RunConfig, num_layers: int) -> None:
    irepa = config.irepa
    if not irepa.enabled:
        return
    _require(config.stage.kind in ("pretrain", "midtrain", "sft"), "irepa.enabled", "only flow-matching stages (pretrain, midtrain, sft) use iREPA")
    _require(irepa.block is None or 1 <= irepa.block <= num_layers, "irepa.block", f"must be in 1..{num_layers} (the model's blocks) or null")
    _require(
        irepa.encoder != "tiny" or config.conditioning.text_encoder == "tiny",
        "irepa.encoder",
        "'tiny' is a random tiny DINOv2 for smoke runs; with a real text encoder "
        f"(conditioning.text_encoder={config.conditioning.text_encoder}) point it at a local DINOv2/DINOv3 directory, "
        "or set irepa.enabled=false",
    )
    _require(irepa.weight > 0, "irepa.weight", "must be positive")
    _require(0.0 <= irepa.spatial_norm_gamma <= 1.0, "irepa.spatial_norm_gamma", "must be in [0, 1]")
    _require(irepa.switch_off_epochs > 0, "irepa.switch_off_epochs", "must be positive")
    _require(irepa.kernel_size >= 1 and irepa.kernel_size % 2 == 1, "irepa.kernel_size", "must be a positive odd number")
    _require(irepa.encoder_patches >= 0, "irepa.encoder_patches", "must be >= 0 (0: the DiT's token grid)")


def _validate_lora(config: RunConfig) -> None:
    """The lora section (read by the lora stage only)."""
    from krea2_train.errors import compile_patterns

    lora = config.lora
    _require(lora.rank >= 1, "lora.rank", "must be >= 1")
    _require(lora.alpha > 0, "lora.alpha", "must be positive")
    _require(0.0 <= lora.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
    _require(lora.base_dtype in ("auto", "fp32", "bf16", "float8"), "lora.base_dtype", "accepted: auto, fp32, bf16, float8")
    _require(bool(lora.targets), "lora.targets", "give at least one regular expression over module names")
    compile_patterns(lora.targets, "config key 'lora.targets'", ConfigError)


def load_config(config: str, overrides: list[str] | None = None) -> RunConfig:
    return to_run_config(compose(config, overrides))


def to_record(config: RunConfig) -> dict:
    """The config as plain containers, as a run records it (``runs/<run>/config.yaml``, wandb)
    and ``--print-config`` shows it: a password in ``data.dsn`` is written as ``***``."""
    structured = OmegaConf.structured(config)
    if config.data.dsn:
        from krea2_train.store.db import redact_dsn

        structured.data.dsn = redact_dsn(config.data.dsn)
    return OmegaConf.to_container(structured, enum_to_str=True)


def to_yaml(config: RunConfig) -> str:
    """:func:`to_record` as YAML."""
    return OmegaConf.to_yaml(to_record(config))
