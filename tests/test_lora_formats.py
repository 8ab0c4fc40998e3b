"""LoRA files: diffusers/PEFT, ComfyUI and ai-toolkit layouts load into diffusers' Krea 2 model and
back into ours with the same function; extraction by SVD; LoRAs baked at sampling and merge time."""

import json
from pathlib import Path

import pytest
import torch

from krea2_train.model.layouts import load_state_dict, read_safetensors_header, read_tensors, save_model, write_safetensors
from krea2_train.model.lora import LoRAError, LoRAPair, LoRASpec, bake_pairs, freeze_base, inject_lora, load_pairs_into_model, pairs_of_model
from krea2_train.model.lora_commands import extract_lora
from krea2_train.model.lora_formats import LAYOUTS, METADATA_KEY, PEFT_METADATA_KEY, parse_lora_argument, read_lora, save_lora
from krea2_train.model.patchify import position_ids
from krea2_train.model.presets import PRESETS
from helpers import krea2_error, random_tiny_model




def _lora_model(rank=4, alpha=2.0, seed=0):
    """A random tiny model with a random LoRA (B != 0)."""
    model = random_tiny_model(seed)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, LoRASpec(rank=rank, alpha=alpha))
    freeze_base(model)
    g = torch.Generator().manual_seed(seed + 9)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model, base


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return (torch.randn(2, 12, 64, generator=g), torch.randn(2, 5, 4, 64, generator=g), torch.rand(2, generator=g),
            position_ids(5, 3, 4), mask)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(our LoRA model, its base weights, {layout: LoRA file})."""
    model, base = _lora_model()
    directory = tmp_path_factory.mktemp("loras")
    files = {layout: save_lora(pairs_of_model(model), directory / f"{layout}.safetensors", layout) for layout in LAYOUTS}
    return model, base, files


def test_layouts_use_the_documented_keys_and_record_rank_and_alpha(trained):
    _, _, files = trained
    prefixes = {"diffusers": "transformer.transformer_blocks.0.attn.to_q", "comfyui": "diffusion_model.blocks.0.attn.wq",
                "ai-toolkit": "base_model.model.blocks.0.mlp.down"}
    for layout, path in files.items():
        stored, metadata = read_safetensors_header(path)
        assert any(key.startswith(prefixes[layout] + ".lora_A.weight") for key in stored), layout
        assert all(key.endswith((".lora_A.weight", ".lora_B.weight")) for key in stored)
        assert json.loads(metadata[METADATA_KEY])["rank"] == 4 and json.loads(metadata[METADATA_KEY])["alpha"] == 2.0
    peft = json.loads(read_safetensors_header(files["diffusers"])[1]["lora_adapter_metadata"])
    assert peft["transformer.r"] == 4 and peft["transformer.lora_alpha"] == 2.0


def test_a_bf16_lora_stays_one_dtype_in_every_layout(tmp_path):
    """Folding alpha / r into B (ComfyUI, ai-toolkit) is done in fp32 but stored in B's dtype."""
    from dataclasses import replace

    model, _ = _lora_model()
    pairs = {name: replace(pair, down=pair.down.bfloat16(), up=pair.up.bfloat16()) for name, pair in pairs_of_model(model).items()}
    for layout in LAYOUTS:
        path = save_lora(pairs, tmp_path / f"{layout}.safetensors", layout)
        stored, _ = read_safetensors_header(path)
        assert {tensor.dtype for tensor in stored.values()} == {torch.bfloat16}, layout
        read = read_lora(path).pairs
        assert {t.dtype for pair in read.values() for t in (pair.down, pair.up)} == {torch.bfloat16}, layout
        torch.testing.assert_close(read["transformer_blocks.0.attn.to_q"].up, pairs["transformer_blocks.0.attn.to_q"].up,
                                   rtol=1e-2, atol=0)


def test_each_layout_loads_into_diffusers_with_the_same_output(trained):
    pytest.importorskip("peft", reason="diffusers loads LoRAs through PEFT")
    from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline, Krea2Transformer2DModel

    ours, base, files = trained
    inputs = _inputs()
    expected = ours(*inputs)
    for layout, path in files.items():
        transformer = Krea2Transformer2DModel(**PRESETS["tiny"]).float()
        transformer.load_state_dict(base)
        pipeline = Krea2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                                 transformer=transformer)
        plain = transformer(*inputs[:4], encoder_attention_mask=inputs[4], return_dict=False)[0]
        pipeline.load_lora_weights(str(path))
        adapted = transformer(*inputs[:4], encoder_attention_mask=inputs[4], return_dict=False)[0]
        assert (plain - expected).abs().max() > 0.1, "the LoRA must change the output"
        torch.testing.assert_close(adapted, expected, rtol=1e-4, atol=1e-4, msg=layout)


def test_each_layout_loads_back_into_our_trainer(trained):
    ours, base, files = trained
    expected = ours(*_inputs())
    for layout, path in files.items():
        lora = read_lora(path)
        assert lora.layout == layout and {pair.alpha for pair in lora.pairs.values()} == {2.0}
        model, _ = _lora_model(rank=4, alpha=8.0, seed=3)  # another alpha: absorbed into B
        model.load_state_dict(base, strict=False)
        load_pairs_into_model(model, lora.pairs)
        torch.testing.assert_close(model(*_inputs()), expected, rtol=1e-5, atol=1e-5, msg=layout)


def test_peft_own_files_read_as_diffusers_names(trained, tmp_path):
    """PEFT's ``save_pretrained`` (``base_model.model.`` over diffusers names, alpha in the
    ``adapter_config.json`` beside it) and a bare ``get_peft_model_state_dict`` (no prefix, with
    diffusers' metadata) read as the same pairs as the diffusers layout (alpha 2, rank 4)."""
    _, _, files = trained
    expected = read_lora(files["diffusers"])
    tensors, metadata = read_tensors_and_metadata(files["diffusers"])
    peft_config = {key.removeprefix("transformer."): value for key, value in json.loads(metadata[PEFT_METADATA_KEY]).items()}
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(peft_config))
    for prefix, path, stored_metadata in (("base_model.model.", tmp_path / "peft" / "adapter_model.safetensors", None),
                                          ("", tmp_path / "bare.safetensors", metadata)):
        renamed = {prefix + key.removeprefix("transformer."): tensor for key, tensor in tensors.items()}
        lora = read_lora(write_safetensors(path, renamed, stored_metadata))
        assert lora.pairs.keys() == expected.pairs.keys(), prefix
        for name, pair in lora.pairs.items():
            torch.testing.assert_close(pair.delta(), expected.pairs[name].delta(), msg=f"{prefix}{name}")
    beside = write_safetensors(tmp_path / "peft" / "another.safetensors", tensors)  # no metadata: alpha = rank,
    assert {pair.alpha for pair in read_lora(beside).pairs.values()} == {4.0}  # not the adapter_config.json of another file
    from_directory = read_lora(tmp_path / "peft")  # the directory itself, as users pass it
    assert {name: pair.alpha for name, pair in from_directory.pairs.items()} == {name: pair.alpha for name, pair in expected.pairs.items()}


def read_tensors_and_metadata(path):
    stored, metadata = read_safetensors_header(path)
    return dict(read_tensors(stored)), metadata


def test_kohya_style_ai_toolkit_names_and_alpha_tensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 128, generator=g), torch.randn(256, 2, generator=g)
    path = write_safetensors(tmp_path / "kohya.safetensors", {
        "base_model.model.blocks.1.mlp.up.lora_down.weight": down,
        "base_model.model.blocks.1.mlp.up.lora_up.weight": up,
        "base_model.model.blocks.1.mlp.up.alpha": torch.tensor(1.0),
    })
    pair = read_lora(path).pairs["transformer_blocks.1.ff.up"]
    torch.testing.assert_close(pair.delta(), up @ down * 0.5)


def test_convert_keeps_the_source_files_other_metadata(tmp_path):
    """kohya's ss_* entries and trigger words survive `krea2 lora convert`; the layout's own entries
    are the new layout's (before: all of the source's metadata was dropped)."""
    from krea2_train.cli import main

    g = torch.Generator().manual_seed(0)
    source = write_safetensors(tmp_path / "kohya.safetensors", {
        "base_model.model.blocks.1.mlp.up.lora_down.weight": torch.randn(2, 128, generator=g),
        "base_model.model.blocks.1.mlp.up.lora_up.weight": torch.randn(256, 2, generator=g),
    }, {"ss_output_name": "my_style", "trigger_words": "mystyle", "format": "pt"})
    for layout in LAYOUTS:
        out = tmp_path / f"{layout}.safetensors"
        assert main(["lora", "convert", str(source), "--layout", layout, "--out", str(out)]) == 0
        _, metadata = read_safetensors_header(out)
        assert metadata["ss_output_name"] == "my_style" and metadata["trigger_words"] == "mystyle"
        assert json.loads(metadata[METADATA_KEY])["rank"] == 2
        assert (PEFT_METADATA_KEY in metadata) == (layout == "diffusers")


def test_bad_lora_files_fail_clearly(tmp_path):
    foreign = write_safetensors(tmp_path / "foreign.safetensors", {"unet.down.lora_A.weight": torch.zeros(2, 3)})
    with pytest.raises(LoRAError, match="not a Krea 2 LoRA"):
        read_lora(foreign)
    half = write_safetensors(tmp_path / "half.safetensors", {"diffusion_model.blocks.0.attn.wq.lora_A.weight": torch.zeros(2, 128)})
    with pytest.raises(LoRAError, match="lacks its B"):
        read_lora(half)
    orphan = write_safetensors(tmp_path / "orphan.safetensors", {"diffusion_model.blocks.0.attn.wq.lora_A.weight": torch.zeros(2, 128),
                                                                  "diffusion_model.blocks.0.attn.wq.lora_B.weight": torch.zeros(64, 2),
                                                                  "diffusion_model.blocks.0.attn.qw.alpha": torch.tensor(1.0)})
    with pytest.raises(LoRAError, match="'.alpha' of 'blocks.0.attn.qw' has no LoRA A/B"):
        read_lora(orphan)
    twice = write_safetensors(tmp_path / "twice.safetensors", {"diffusion_model.blocks.0.attn.wq.lora_A.weight": torch.zeros(2, 128),
                                                                "diffusion_model.blocks.0.attn.wq.lora_down.weight": torch.ones(2, 128),
                                                                "diffusion_model.blocks.0.attn.wq.lora_B.weight": torch.zeros(64, 2)})
    with pytest.raises(LoRAError, match="'blocks.0.attn.wq' stores its A \\(down\\) matrix twice"):
        read_lora(twice)
    ranks = write_safetensors(tmp_path / "ranks.safetensors", {"diffusion_model.blocks.0.attn.wq.lora_A.weight": torch.zeros(2, 128),
                                                                "diffusion_model.blocks.0.attn.wq.lora_B.weight": torch.zeros(64, 3)})
    with pytest.raises(LoRAError, match="ranks.safetensors: LoRA for 'blocks.0.attn.wq': LoRA A \\(2, 128\\) and B \\(64, 3\\)"):
        read_lora(ranks)
    model, _ = _lora_model(rank=2)
    with pytest.raises(LoRAError, match="rank 4"):
        load_pairs_into_model(model, pairs_of_model(_lora_model(rank=4)[0]))
    (tmp_path / "runs" / "my_style" / "checkpoints").mkdir(parents=True)
    with pytest.raises(LoRAError, match="is a training run, not a LoRA file; `krea2 lora export .*runs/my_style --out FILE`"):
        read_lora(tmp_path / "runs" / "my_style")
    with pytest.raises(LoRAError, match="runs is a directory, not a LoRA .safetensors file"):
        read_lora(tmp_path / "runs")
    assert parse_lora_argument("a/b:c.safetensors:0.75") == (Path("a/b:c.safetensors"), 0.75)
    assert parse_lora_argument("x.safetensors")[1] == 1.0


def test_a_peft_rslora_lora_reads_at_peft_scale(tmp_path):
    """diffusers/PEFT with use_rslora scale by alpha / sqrt(r); our pairs give the same delta.
    Options the pair cannot express (DoRA, a LoRA bias) are refused, not read as plain LoRA."""
    pytest.importorskip("peft")
    from diffusers import Krea2Pipeline, Krea2Transformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    base = random_tiny_model(0).state_dict()
    transformer = Krea2Transformer2DModel(**PRESETS["tiny"]).float()
    transformer.load_state_dict(base)
    config = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["to_q", "to_v"], init_lora_weights=False)
    transformer.add_adapter(config)
    expected = transformer(*_inputs()[:4], encoder_attention_mask=_inputs()[4], return_dict=False)[0]
    Krea2Pipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                    transformer_lora_adapter_metadata=config.to_dict())
    lora = read_lora(tmp_path / "pytorch_lora_weights.safetensors")
    pair = lora.pairs["transformer_blocks.0.attn.to_q"]
    assert pair.alpha / pair.rank == pytest.approx(8 / 2)  # alpha / sqrt(r), not alpha / r = 2
    model = random_tiny_model(0)
    model.load_state_dict(bake_pairs({k: v.clone() for k, v in base.items()}, lora.pairs))
    torch.testing.assert_close(model(*_inputs()), expected, rtol=1e-4, atol=1e-4)

    stored, metadata = read_safetensors_header(tmp_path / "pytorch_lora_weights.safetensors")
    tensors = dict(read_tensors(stored))
    for option in ("use_dora", "lora_bias"):
        peft = json.loads(metadata["lora_adapter_metadata"]) | {f"transformer.{option}": True}
        path = write_safetensors(tmp_path / f"{option}.safetensors", tensors, {"lora_adapter_metadata": json.dumps(peft)})
        with pytest.raises(LoRAError, match="cannot express"):
            read_lora(path)


def test_loras_of_other_architectures_are_refused_by_module_name(tmp_path, capsys):
    """Names that only share a prefix with Krea 2's (another DiT's blocks, a fused qkv) are
    refused on reading, so `krea2 lora convert` cannot turn them into 'Krea 2' files."""
    down, up = torch.zeros(2, 128), torch.zeros(128, 2)
    for key in ("diffusion_model.blocks.0.self_attn.q", "transformer.transformer_blocks.0.attn.qkv",
                "transformer.transformer_blocks.0.attn.to_q.lora_magnitude"):
        path = write_safetensors(tmp_path / "foreign.safetensors", {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up})
        with pytest.raises(LoRAError, match="not linear layers of the Krea 2 DiT"):
            read_lora(path)
    path = write_safetensors(tmp_path / "wan.safetensors", {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": down,
                                                            "diffusion_model.blocks.0.self_attn.q.lora_B.weight": up})
    assert "self_attn" in krea2_error(["lora", "convert", str(path), "--layout", "diffusers", "--out", str(tmp_path / "out.safetensors")], capsys)
    assert not (tmp_path / "out.safetensors").exists()


def test_sampling_in_fp32_keeps_a_small_lora_on_a_bf16_checkpoint(tmp_path):
    """Baking in the checkpoint's bf16 rounds a small LoRA away; sampling in fp32 bakes in fp32."""
    from krea2_train.train.sample import load_for_sampling

    model, base = _lora_model(rank=2, alpha=2.0)
    pairs = pairs_of_model(model)
    for pair in pairs.values():
        pair.up = pair.up * 0.01  # ||delta|| ~ 0.5% of ||W||
    save_model(random_tiny_model(0).bfloat16(), tmp_path / "base.safetensors", layout="original")
    lora = save_lora(pairs, tmp_path / "small.safetensors", "comfyui")
    key, name = "transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.attn.to_q"
    bf16_base = base[key].bfloat16().float()
    sampled, _ = load_for_sampling(str(tmp_path / "base.safetensors"), loras=[(lora, 1.0)], dtype=torch.float32)
    torch.testing.assert_close(sampled.state_dict()[key], bf16_base + pairs[name].delta(), rtol=1e-6, atol=1e-6)
    rounded, _ = load_for_sampling(str(tmp_path / "base.safetensors"), loras=[(lora, 1.0)])  # in the checkpoint's dtype
    lost = (rounded.state_dict()[key].float() - bf16_base - pairs[name].delta()).norm() / pairs[name].delta().norm()
    assert lost > 0.1  # what fp32 sampling no longer loses


def test_a_lora_run_with_a_bf16_base_keeps_its_small_lora_in_fp32_sample_export_and_merge(tmp_path, capsys):
    """A lora-stage run holds a bf16 base and fp32 adapters: asked for fp32, sampling, export and
    merge bake the adapters in fp32 (rounding them into the bf16 base first would lose most of a
    small update); so does ``merge --lora`` on a bf16 checkpoint."""
    from krea2_train.cli import main
    from krea2_train.model.lora import cast_base
    from krea2_train.train.checkpoint import CheckpointManager, ModelOptimizerState, TrainState, write_model_config
    from krea2_train.train.sample import load_for_sampling

    model, _ = _lora_model(rank=4, alpha=8.0)
    cast_base(model, "bf16")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(0.01)  # ||delta|| ~ 0.2% of ||W||: below bf16's resolution
    run_dir = tmp_path / "runs" / "lora"
    write_model_config(run_dir, model.config)
    (run_dir / "config.yaml").write_text("lora:\n  rank: 4\n  alpha: 8.0\n")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    CheckpointManager(run_dir, interval=1, async_mode="sync").save(3, {"model": ModelOptimizerState(model, optimizer), "train_state": TrainState(step=3)})

    key, name = "transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.attn.to_q"
    pair = pairs_of_model(model)[name]
    bf16_base = model.state_dict()[key].float()
    exact = bf16_base + pair.delta()

    def lost(weight):  # the share of the LoRA's update missing from a baked weight
        return ((weight.float() - exact).norm() / pair.delta().norm()).item()

    sampled, _ = load_for_sampling(str(run_dir), runs_root=str(tmp_path / "runs"), dtype=torch.float32)
    assert sampled.state_dict()[key].dtype == torch.float32 and lost(sampled.state_dict()[key]) < 1e-6
    rounded, _ = load_for_sampling(str(run_dir), runs_root=str(tmp_path / "runs"))  # the checkpoint's bf16
    assert lost(rounded.state_dict()[key]) > 0.1  # what asking for fp32 keeps
    for command, out in (("export", tmp_path / "export"), ("merge", tmp_path / "merged")):
        assert main([command, str(run_dir), "--layout", "diffusers", "--dtype", "fp32", "--out", str(out)]) == 0
        assert lost(load_state_dict(out)[0][key]) < 1e-6, command

    save_model(sampled.to(torch.bfloat16), tmp_path / "bf16.safetensors", layout="original")  # a plain bf16 checkpoint
    lora = save_lora({name: pair}, tmp_path / "small.safetensors", "comfyui")
    baked_twice = tmp_path / "twice.safetensors"
    assert main(["merge", str(tmp_path / "bf16.safetensors"), "--lora", str(lora), "--dtype", "fp32", "--layout", "original",
                 "--out", str(baked_twice)]) == 0
    expected = sampled.state_dict()[key].bfloat16().float() + pair.delta()
    torch.testing.assert_close(load_state_dict(baked_twice)[0][key], expected, rtol=1e-6, atol=1e-6)


def test_extract_recovers_a_low_rank_difference_and_reports_error(tmp_path):
    raw = random_tiny_model(0).state_dict()
    g = torch.Generator().manual_seed(4)
    turbo = {key: value.clone() for key, value in raw.items()}
    for key in raw:
        if key.startswith("transformer_blocks.") and key.endswith(("to_q.weight", "ff.down.weight")):
            turbo[key] += torch.randn(raw[key].shape[0], 2, generator=g) @ torch.randn(2, raw[key].shape[1], generator=g)
    exact = extract_lora(raw, turbo, rank=2)
    assert exact.relative_error < 1e-5 and len(exact.pairs) == 4 and exact.identical_layers == 12
    assert exact.untargeted_fraction == 0.0
    rough = extract_lora(raw, turbo, rank=1)
    assert 0.05 < rough.relative_error < 1.0
    turbo["img_in.bias"] += 1.0
    assert extract_lora(raw, turbo, rank=2).untargeted_fraction > 0


def test_extract_cli_then_sample_and_merge_apply_the_lora_on_another_checkpoint(tmp_path, capsys):
    from krea2_train.cli import main
    from krea2_train.train.sample import load_for_sampling

    raw, turbo = random_tiny_model(0), random_tiny_model(0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for block in turbo.transformer_blocks:
            block.attn.to_v.weight += torch.randn(64, 3, generator=g) @ torch.randn(3, 128, generator=g) * 0.1
    save_model(raw, tmp_path / "raw.safetensors", layout="original")
    save_model(turbo, tmp_path / "turbo", layout="diffusers")
    lora_path = tmp_path / "turbo_lora.safetensors"
    assert main(["lora", "extract", "--from", str(tmp_path / "raw.safetensors"), "--to", str(tmp_path / "turbo"),
                 "--rank", "3", "--targets", "(", "--out", str(lora_path)]) == 1
    assert "LoRA targets: '(' is not a regular expression" in capsys.readouterr().err and not lora_path.exists()
    assert main(["lora", "extract", "--from", str(tmp_path / "raw.safetensors"), "--to", str(tmp_path / "turbo"),
                 "--rank", "3", "--layout", "comfyui", "--out", str(lora_path)]) == 0
    assert "relative error" in capsys.readouterr().out

    model, _ = load_for_sampling(str(tmp_path / "raw.safetensors"), loras=[(lora_path, 1.0)])
    torch.testing.assert_close(model(*_inputs()), turbo(*_inputs()), rtol=1e-4, atol=1e-4)

    merged = tmp_path / "merged.safetensors"
    assert main(["merge", str(tmp_path / "raw.safetensors"), "--lora", f"{lora_path}:0.5", "--layout", "original",
                 "--out", str(merged)]) == 0
    weights, _ = load_state_dict(merged)
    key = "transformer_blocks.1.attn.to_v.weight"
    expected = (raw.state_dict()[key] + turbo.state_dict()[key]) / 2
    torch.testing.assert_close(weights[key], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights["img_in.weight"], raw.state_dict()["img_in.weight"])

    # of several --lora files, the one that does not fit the checkpoint is named
    wide = save_lora({"transformer_blocks.0.attn.to_q": LoRAPair(torch.zeros(2, 256), torch.zeros(64, 2), 2.0)},
                     tmp_path / "wide.safetensors", "comfyui")
    message = krea2_error(["merge", str(tmp_path / "raw.safetensors"), "--lora", str(lora_path), "--lora", str(wide),
                           "--layout", "original", "--out", str(tmp_path / "never.safetensors")], capsys)
    assert "wide.safetensors: " in message and "turbo_lora" not in message and not (tmp_path / "never.safetensors").exists()
