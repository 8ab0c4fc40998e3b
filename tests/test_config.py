"""Stage configs compose, validate, and bad input names the key."""

import pytest

from krea2_train.config import ConfigError, load_config, to_yaml
from krea2_train.config.load import CONFIG_DIR

STAGES = ["pretrain_256", "pretrain_512", "pretrain_1024", "midtrain", "sft", "stpo", "grpo", "tdm", "lora"]


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_a_config(stage):
    config = load_config(f"stage/{stage}")
    assert config.stage.name == stage
    assert config.run_name == stage
    assert "???" not in to_yaml(config)


def test_progressive_chain_is_linked_by_init_from():
    chain = [load_config(f"stage/{name}") for name in ["pretrain_256", "pretrain_512", "pretrain_1024", "midtrain", "sft"]]
    assert chain[0].stage.init_from is None
    for previous, current in zip(chain, chain[1:]):
        assert current.stage.init_from == previous.stage.name
    assert [c.data.resolution for c in chain[:3]] == [256, 512, 1024]


def test_overrides_apply():
    config = load_config("stage/pretrain_256", ["optim.lr=1e-3", "model.overrides.num_layers=3", "parallel=cluster"])
    assert config.optim.lr == 1e-3
    assert config.model.overrides == {"num_layers": 3}
    assert config.parallel.tp == 1 and config.parallel.compile
    assert config.parallel.attention_backends == ["cudnn", "efficient", "math"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1"], "unknown config key 'optim.lrr'; accepted keys in 'optim': lr"),
        (["bogus=1"], "unknown config key 'bogus'"),
        (["optim.lr=abc"], "config key 'optim.lr'"),
        (["parallel.activation_checkpoint=some"], "accepted: none, selective, full"),
        (["parallel=cluster", "parallel.tp=2"], "'parallel.compile': compiled blocks with activation checkpointing and tp > 1"),
        (["model.overrides.hidden=3"], "unknown Krea2DiT config keys"),
        (["data.caption_mix.long=0.5"], "must sum to 1"),
        (["conditioning=qwen"], "conditioning.autoencoder_path"),
        (["model=huge"], "model/huge"),
        (["conditioning=qwen", "conditioning.autoencoder_path=/x"], "config keys 'conditioning.text_encoder' are required"),
        (["flow.mu=1.0"], "'flow.mu': only used with flow.shift=fixed"),
        (["optim.betas=[0.9,1.5]"], "'optim.betas': two values in"),
        (["conditioning.patch_size=3"], "'conditioning.patch_size'"),
        (["model.overrides.num_layers=0", "irepa.enabled=false"], "num_layers must be >= 1"),
        (["logging.sample_preset=bogus"], "unknown sampler preset 'bogus'"),
        (["logging.sample_steps=0"], "num_steps must be at least 1"),
        (["conditioning.text_encoder=/models/qwen3-vl-4b"], "'irepa.encoder': 'tiny' is a random tiny DINOv2"),
        (["parallel.collective_timeout_s=600"], "'resilience.first_step_timeout_s': must be positive and below"),
        (["resilience.checkpoint_timeout_s=100"], "'resilience.checkpoint_timeout_s': must be at least resilience.hang_timeout_s=300"),
        (["data.buckets=[1x1]"], "'data.buckets': aspect ratio '1x1' is not of the form 'W:H'"),
        (["data.buckets=[]"], "'data.buckets': at least one aspect ratio"),
        (["data.resolution=0"], "'data.resolution': must be a positive multiple of 16"),
        (["data.resolution=-16"], "'data.resolution': must be a positive multiple of 16"),
        (["data.num_workers=-1"], "'data.num_workers': must be >= 0"),
        (["data.num_samples=0"], "'data.num_samples': must be >= 1"),
        (["checkpoint.keep_last=0"], "'checkpoint.keep_last': must be >= 1"),
        (["checkpoint.keep_every=-1"], "'checkpoint.keep_every': must be >= 0"),
        (["run_name="], "'run_name': must name one directory under runs_root, got ''"),
        (["run_name=../../etc"], "'run_name': must name one directory under runs_root"),
        (["run_name=.."], "'run_name': must name one directory"),
    ],
)
def test_bad_input_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config("stage/pretrain_256", overrides)


def test_an_unknown_group_option_lists_the_options_and_not_hydras_search_path():
    with pytest.raises(ConfigError) as caught:
        load_config("stage/pretrain_256", ["model=huge"])
    assert "Available options in 'model'" in str(caught.value) and "tiny" in str(caught.value)
    assert "search path" not in str(caught.value)


def test_unknown_stage_lists_the_stages():
    with pytest.raises(ConfigError, match="stage configs: grpo"):
        load_config("stage/pretrain_2048")
    assert (CONFIG_DIR / "config.yaml").exists()


def test_the_config_accepts_exactly_the_stage_kinds_that_have_a_class():
    from krea2_train.config.schema import STAGE_KINDS
    from krea2_train.stages import STAGE_KINDS as STAGE_CLASSES

    assert tuple(STAGE_CLASSES) == STAGE_KINDS


def test_deterministic_algorithms_default_to_cpu_only():
    """null (the default) keeps CPU runs bit-exact and leaves CUDA runs fast; true or false wins."""
    import torch

    from krea2_train.train.trainer import uses_deterministic_algorithms

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    default = load_config("stage/pretrain_256")
    assert default.parallel.deterministic is None
    assert uses_deterministic_algorithms(default, cpu) and not uses_deterministic_algorithms(default, cuda)
    assert uses_deterministic_algorithms(load_config("stage/pretrain_256", ["parallel.deterministic=true"]), cuda)
    assert not uses_deterministic_algorithms(load_config("stage/pretrain_256", ["parallel.deterministic=false"]), cpu)
    assert load_config("stage/pretrain_256", ["parallel=cluster"]).parallel.deterministic is False


def test_a_list_override_of_the_model_matches_its_recorded_config(tmp_path):
    """A Hydra override gives a list; model_config.json reads back a tuple: a resume must not see
    a different model (it refused every restart of such a run)."""
    from krea2_train.model.presets import model_config
    from krea2_train.train.checkpoint import check_same_model_config, load_model_config, write_model_config

    config = load_config("stage/pretrain_256", ["++model.overrides.axes_dims_rope=[16,24,24]", "++model.overrides.attention_head_dim=64"])
    resolved = model_config(config.model.preset, **config.model.overrides)
    write_model_config(tmp_path, resolved)
    check_same_model_config(resolved, load_model_config(tmp_path), "this start's model", "the checkpoints")
    assert resolved["axes_dims_rope"] == (16, 24, 24)


def test_a_dsn_password_is_never_written_or_printed():
    """runs/<run>/config.yaml, wandb's config and --print-config show data.dsn without its
    password; the run itself keeps the real DSN."""
    from krea2_train.config import to_yaml
    from krea2_train.config.load import to_record

    config = load_config("stage/pretrain_256", ["data.dsn=postgresql://krea2:s3cret@db.internal:5433/krea2"])
    written = to_yaml(config)
    assert "s3cret" not in written and "password=***" in written and "host=db.internal" in written
    assert "s3cret" not in str(to_record(config))  # what wandb is given
    assert config.data.dsn == "postgresql://krea2:s3cret@db.internal:5433/krea2"
    passwordless = load_config("stage/pretrain_256", ["data.dsn=postgresql://krea2@db.internal/krea2"])
    assert "dsn: postgresql://krea2@db.internal/krea2" in to_yaml(passwordless)


def test_a_stage_file_outside_configs_composes_like_a_built_in_stage(tmp_path):
    """--config my_stage.yaml: a copy of a built-in stage, edited, with command-line overrides on top."""
    text = (CONFIG_DIR / "stage" / "sft.yaml").read_text().replace("name: sft", "name: my_sft")
    stage_file = tmp_path / "sft.yaml"  # the same file name as a built-in stage must not pick the built-in one
    stage_file.write_text(text)
    config = load_config(str(stage_file), ["optim.lr=3e-4"])
    assert (config.stage.name, config.run_name, config.optim.lr) == ("my_sft", "my_sft", 3e-4)
    assert config.data.resolution == load_config("stage/sft").data.resolution == 1024


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "does not exist"),
        ("# @package _global_\nstage: [1, 2\n", "expected ',' or ']'"),
        ("# @package _global_\nstage:\n  nmae: typo\n", "'stage.nmae'"),
    ],
)
def test_a_bad_stage_file_is_named(tmp_path, text, message):
    stage_file = tmp_path / "mine.yaml"
    if text is not None:
        stage_file.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(str(stage_file))


def test_a_restart_names_the_settings_it_changes():
    from krea2_train.train.trainer import changed_settings

    first = load_config("stage/pretrain_256", ["stage.steps=6"])
    before = to_yaml(first)
    after = to_yaml(load_config("stage/pretrain_256", ["stage.steps=8", "optim.lr=0.125", "logging.sample_prompts=[a]"]))
    changed = changed_settings(before, after)
    assert changed[1:] == [f"optim.lr: {first.optim.lr} -> 0.125", "stage.steps: 6 -> 8"]
    assert changed[0].startswith("logging.sample_prompts: [") and changed[0].endswith("-> ['a']")
    assert changed_settings(before, before) == []
