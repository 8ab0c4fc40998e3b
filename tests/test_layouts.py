"""Checkpoint layouts: key maps, round trips, interop with diffusers, clear errors, streaming."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import Krea2Transformer2DModel
from diffusers.loaders.single_file_utils import convert_krea2_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file

from krea2_train.model import layouts
from krea2_train.model.presets import PRESETS, build_model

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def model():
    """The tiny Krea2DiT with every parameter random (norms and tables are zero at init)."""
    torch.manual_seed(0)
    model = build_model("tiny")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()
    return model


@pytest.fixture(scope="module")
def state_dict(model):
    return {key: tensor.clone() for key, tensor in model.state_dict().items()}


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected), set(actual) ^ set(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


# ---------------------------------------------------------------------------------------------
# Key maps
# ---------------------------------------------------------------------------------------------


def test_key_maps_invert_each_other(state_dict):
    original_keys = [layouts.diffusers_to_original_key(key) for key in state_dict]
    assert len(set(original_keys)) == len(original_keys)
    assert [layouts.original_to_diffusers_key(key) for key in original_keys] == list(state_dict)


def test_original_names_and_shapes(state_dict):
    original = layouts.diffusers_to_original(state_dict)
    dim = TINY["attention_head_dim"] * TINY["num_attention_heads"]
    assert torch.equal(original["first.weight"], state_dict["img_in.weight"])
    assert torch.equal(original["blocks.1.attn.wq.weight"], state_dict["transformer_blocks.1.attn.to_q.weight"])
    assert torch.equal(original["blocks.0.attn.wo.weight"], state_dict["transformer_blocks.0.attn.to_out.0.weight"])
    same_tensor = {
        "blocks.0.attn.qknorm.qnorm.scale": "transformer_blocks.0.attn.norm_q.weight",
        "blocks.0.prenorm.scale": "transformer_blocks.0.norm1.weight",
        "txtfusion.refiner_blocks.1.mlp.down.weight": "text_fusion.refiner_blocks.1.ff.down.weight",
        "txtfusion.layerwise_blocks.0.attn.gate.weight": "text_fusion.layerwise_blocks.0.attn.to_gate.weight",
        "txtmlp.0.scale": "txt_in.norm.weight",
        "tproj.1.weight": "time_mod_proj.weight",
        "last.norm.scale": "final_layer.norm.weight",
    }
    for original_key, diffusers_key in same_tensor.items():
        assert torch.equal(original[original_key], state_dict[diffusers_key]), original_key
    # Block modulation tables are stored flat; the final layer's keeps (2, D), as diffusers expects.
    assert original["blocks.0.mod.lin"].shape == (6 * dim,)
    assert torch.equal(original["blocks.0.mod.lin"], state_dict["transformer_blocks.0.scale_shift_table"].flatten())
    assert original["last.modulation.lin"].shape == (2, dim)


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", ""])
def test_original_layout_is_what_diffusers_converter_reads(state_dict, prefix):
    original = layouts.diffusers_to_original(state_dict, prefix)
    assert all(key.startswith(prefix) for key in original)
    assert_same_tensors(convert_krea2_transformer_checkpoint_to_diffusers(dict(original)), state_dict)
    assert_same_tensors(layouts.original_to_diffusers(original), state_dict)


@pytest.mark.parametrize("prefix", layouts.ORIGINAL_PREFIXES)
def test_detect_layout(state_dict, prefix):
    assert layouts.detect_layout(state_dict) == layouts.Layout("diffusers", "")
    original = layouts.diffusers_to_original(state_dict, prefix)
    assert layouts.detect_layout(original) == layouts.Layout("original", prefix)


def test_detect_layout_rejects_another_architecture():
    keys = ["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight", "time_embedding.linear_1.weight"]
    with pytest.raises(layouts.CheckpointError, match="not a Krea 2 DiT checkpoint") as error:
        layouts.detect_layout(keys)
    assert "'text_fusion.projector.weight'" in str(error.value)
    assert "'conv_in.weight'" in str(error.value) and "found 3 keys" in str(error.value)


# ---------------------------------------------------------------------------------------------
# Files: round trips and diffusers interop
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", layouts.ORIGINAL_PREFIXES)
def test_round_trip_diffusers_original_diffusers(tmp_path, model, state_dict, prefix):
    layouts.save_diffusers(state_dict, tmp_path / "diffusers", model.config, max_shard_size=300_000)
    from_directory, directory_config = layouts.load_state_dict(tmp_path / "diffusers")
    assert_same_tensors(from_directory, state_dict)
    assert directory_config == model.config

    layouts.save_original(from_directory, tmp_path / "original.safetensors", directory_config, prefix=prefix)
    from_file, file_config = layouts.load_state_dict(tmp_path / "original.safetensors")
    assert_same_tensors(from_file, state_dict)
    assert file_config == model.config

    layouts.save_diffusers(from_file, tmp_path / "again", file_config)
    assert_same_tensors(layouts.load_state_dict(tmp_path / "again")[0], state_dict)


@pytest.mark.parametrize("max_shard_size", ["10GB", 200_000])
def test_written_directory_loads_in_diffusers(tmp_path, model, state_dict, max_shard_size):
    files = layouts.save_diffusers(state_dict, tmp_path, model.config, max_shard_size=max_shard_size)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "Krea2Transformer2DModel" and "_diffusers_version" in config
    if max_shard_size == "10GB":
        assert [path.name for path in files] == ["diffusion_pytorch_model.safetensors"]
    else:
        count = len(files)
        assert count > 2
        expected_names = [f"diffusion_pytorch_model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        assert [path.name for path in files] == expected_names
        for path in files:  # a shard stays under the limit unless it holds one tensor larger than it
            stored = layouts.read_safetensors_header(path)[0].values()
            assert len(stored) == 1 or sum(entry.nbytes for entry in stored) <= 200_000
        index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(state_dict)
    reference = Krea2Transformer2DModel.from_pretrained(tmp_path)
    assert_same_tensors(reference.state_dict(), state_dict)
    assert layouts.load_model(tmp_path).config == model.config


def test_rewriting_a_directory_drops_stale_shards(tmp_path, model, state_dict):
    layouts.save_diffusers(state_dict, tmp_path, model.config, max_shard_size=200_000)
    layouts.save_diffusers(state_dict, tmp_path, model.config)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_directory_saved_by_diffusers_loads_into_krea2dit(tmp_path):
    torch.manual_seed(1)
    reference = Krea2Transformer2DModel(**TINY)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_()
    reference.save_pretrained(tmp_path / "pipeline" / "transformer", max_shard_size="100KB")
    loaded = layouts.load_model(tmp_path / "pipeline")
    assert loaded.config == TINY
    assert_same_tensors(loaded.state_dict(), reference.state_dict())


def test_original_file_loads_with_diffusers_from_single_file(tmp_path, model, state_dict):
    layouts.save_diffusers(state_dict, tmp_path / "config_dir", model.config)
    path = layouts.save_original(state_dict, tmp_path / "krea2.safetensors", model.config)
    reference = Krea2Transformer2DModel.from_single_file(str(path), config=str(tmp_path / "config_dir"))
    assert_same_tensors(reference.state_dict(), state_dict)


def test_load_model_casts_and_places(tmp_path, model, state_dict):
    path = layouts.save_model(model, tmp_path / "krea2.safetensors", layout="original", dtype=torch.bfloat16)
    written = load_file(path)  # safetensors' own reader agrees with our writer
    expected_original = layouts.diffusers_to_original(state_dict, "model.diffusion_model.")
    assert_same_tensors(written, {key: tensor.to(torch.bfloat16) for key, tensor in expected_original.items()})
    loaded = layouts.load_model(path, device="cpu", dtype=torch.float16)
    # the RMSNorm scales stay fp32 (as diffusers' _keep_in_fp32_modules keeps them)
    norm = re.compile(r"(^|\.)norm[^.]*\.weight$")
    assert any(norm.search(key) for key in state_dict)
    expected = {
        key: tensor.to(torch.bfloat16).to(torch.float32 if norm.search(key) else torch.float16) for key, tensor in state_dict.items()
    }
    assert_same_tensors(loaded.state_dict(), expected)
    assert all(parameter.requires_grad for parameter in loaded.parameters())
    layouts.save_diffusers(state_dict, tmp_path / "diffusers", model.config)
    reference = Krea2Transformer2DModel.from_pretrained(tmp_path / "diffusers", torch_dtype=torch.float16)
    assert {key: tensor.dtype for key, tensor in loaded.state_dict().items()} == {key: tensor.dtype for key, tensor in reference.state_dict().items()}


@pytest.mark.parametrize("preset", ["small", "krea2_medium"])
def test_infer_config_from_shapes(preset):
    shapes = {key: tensor.shape for key, tensor in build_model(preset, device="meta").state_dict().items()}
    assert layouts.infer_config(shapes) == PRESETS[preset]


def test_file_without_config_needs_one_for_a_non_krea2_head_dim(tmp_path, state_dict):
    path = layouts.save_original(state_dict, tmp_path / "bare.safetensors")
    assert layouts.load_state_dict(path)[1] is None
    with pytest.raises(layouts.CheckpointError, match="axes_dims_rope is unknown; pass config="):
        layouts.load_model(path)
    assert_same_tensors(layouts.load_model(path, config=TINY).state_dict(), state_dict)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_another_architecture_is_named(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 4, 3, 3), "conv_in.bias": torch.zeros(4)}, path)
    expected = "not a Krea 2 DiT checkpoint.*found 2 keys: 'conv_in.bias', 'conv_in.weight'"
    with pytest.raises(layouts.CheckpointError, match=expected):
        layouts.load_model(path)
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    expected = "describes a UNet2DConditionModel, not a Krea2Transformer2DModel"
    with pytest.raises(layouts.CheckpointError, match=expected):
        layouts.load_state_dict(tmp_path / "unet")


@pytest.mark.parametrize("keep_fraction", [0.5, 0.0001])
def test_truncated_file_is_reported(tmp_path, state_dict, keep_fraction):
    path = layouts.save_original(state_dict, tmp_path / "krea2.safetensors", TINY)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(layouts.CheckpointError, match="krea2.safetensors is truncated or not a safetensors file"):
        layouts.load_model(path)


@pytest.mark.parametrize("damage", ["truncated config", "truncated index", "index without weight_map"])
def test_a_damaged_json_file_of_a_diffusers_directory_is_named(tmp_path, model, state_dict, damage):
    layouts.save_diffusers(state_dict, tmp_path, model.config, max_shard_size=200_000)
    name = "config.json" if damage == "truncated config" else "diffusion_pytorch_model.safetensors.index.json"
    text = (tmp_path / name).read_text()
    (tmp_path / name).write_text('{"metadata": {}}' if damage == "index without weight_map" else text[: len(text) // 2])
    expected = "is not valid JSON" if damage.startswith("truncated") else "lacks weight_map"
    with pytest.raises(layouts.CheckpointError, match=f"{name} {expected}"):
        layouts.load_model(tmp_path)


def test_non_safetensors_file_is_reported(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("this is a text file, not a checkpoint\n")
    with pytest.raises(layouts.CheckpointError, match="is truncated or not a safetensors file"):
        layouts.load_state_dict(path)


def test_shape_mismatch_names_key_and_shapes(tmp_path, state_dict):
    path = layouts.save_original(state_dict, tmp_path / "krea2.safetensors", TINY)
    narrower = dict(TINY, intermediate_size=128)
    with pytest.raises(layouts.CheckpointError) as error:
        layouts.load_model(path, config=narrower)
    message = str(error.value)
    stored_as = "(stored as 'model.diffusion_model.blocks.0.mlp.gate.weight')"
    assert f"'transformer_blocks.0.ff.gate.weight' {stored_as}" in message
    assert "checkpoint (256, 128), model (128, 128)" in message


def test_missing_and_unexpected_keys_are_listed(tmp_path, state_dict):
    damaged = dict(state_dict)
    del damaged["transformer_blocks.1.attn.to_gate.weight"]
    damaged["transformer_blocks.1.attn.to_extra.weight"] = torch.zeros(2)
    path = layouts.save_original(damaged, tmp_path / "krea2.safetensors", prefix="")  # no config: not checked
    with pytest.raises(layouts.CheckpointError) as error:
        layouts.load_model(path, config=TINY)
    message = str(error.value)
    assert "missing keys: 'transformer_blocks.1.attn.to_gate.weight'" in message
    assert "unexpected keys: 'transformer_blocks.1.attn.to_extra.weight'" in message


def test_writers_refuse_weights_that_are_not_their_configs_model(tmp_path, state_dict):
    """save_diffusers / save_original with a config write exactly that model's parameters: an
    extra key (a LoRA or training-only tensor) or a wrong shape is named, and nothing is written."""
    extra = dict(state_dict, **{"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 128)})
    with pytest.raises(layouts.CheckpointError, match="unexpected keys: 'transformer_blocks.0.attn.to_q.lora_A.weight'"):
        layouts.save_diffusers(extra, tmp_path / "out", TINY)
    with pytest.raises(layouts.CheckpointError, match="shape mismatch for 'transformer_blocks.0.ff.gate.weight'"):
        layouts.save_original(state_dict, tmp_path / "out.safetensors", dict(TINY, intermediate_size=128))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.safetensors").exists()


def test_save_model_leaves_training_only_modules_out(tmp_path, model):
    """An iREPA projector or TDM fake score under model.auxiliary is not part of an export."""
    with_auxiliary = build_model("tiny")
    with_auxiliary.load_state_dict(model.state_dict())
    with_auxiliary.auxiliary["irepa"] = torch.nn.Linear(4, 4)
    for layout, path in (("diffusers", tmp_path / "export"), ("original", tmp_path / "export.safetensors")):
        layouts.save_model(with_auxiliary, path, layout=layout)
        loaded = layouts.load_model(path)
        assert_same_tensors(loaded.state_dict(), model.state_dict())


def test_parse_size():
    assert layouts.parse_size("10GB") == 10 * 10**9
    assert layouts.parse_size("500MiB") == 500 * 2**20
    assert layouts.parse_size(123) == 123
    with pytest.raises(ValueError, match="cannot read '10 parsecs' as a size"):
        layouts.parse_size("10 parsecs")


# ---------------------------------------------------------------------------------------------
# Memory: loading peaks near 1x the checkpoint, writing adds about one tensor
# ---------------------------------------------------------------------------------------------

# About 57M parameters: 230 MB in float32.
_RSS_CONFIG = dict(
    TINY,
    attention_head_dim=64,
    num_attention_heads=16,
    num_key_value_heads=4,
    intermediate_size=4096,
    num_layers=3,
    axes_dims_rope=(16, 24, 24),
)

_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from krea2_train.model import layouts
    from krea2_train.model.presets import build_model

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    path, out_path = sys.argv[1], sys.argv[2]
    build_model("tiny", device="meta")  # one-time cost of torch's meta kernels, whatever the model size
    rss_before_load = status("VmRSS")
    model = layouts.load_model(path)
    load_increase = status("VmHWM") - rss_before_load
    checksum = sum(float(p.detach().double().sum()) for p in model.parameters())

    open("/proc/self/clear_refs", "w").write("5")  # reset the peak
    rss_before_save = status("VmRSS")
    layouts.save_model(model, out_path, layout="original", dtype=torch.float16)
    save_increase = status("VmHWM") - rss_before_save
    print(json.dumps(dict(load_increase=load_increase, save_increase=save_increase, checksum=checksum)))
    """
)


def test_load_and_save_stream(tmp_path):
    torch.manual_seed(0)
    source = build_model(_RSS_CONFIG)
    path = layouts.save_model(source, tmp_path / "big.safetensors", layout="original")
    expected_checksum = sum(float(p.detach().double().sum()) for p in source.parameters())
    del source
    file_size = path.stat().st_size
    assert file_size > 200e6

    result = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(path), str(tmp_path / "half.safetensors")],
        capture_output=True,
        text=True,
        check=True,
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["checksum"] == pytest.approx(expected_checksum, rel=1e-9)
    assert measured["load_increase"] < 1.25 * file_size, measured
    # A non-streaming float16 export would hold a half-size copy of the model.
    assert measured["save_increase"] < 0.2 * file_size, measured
