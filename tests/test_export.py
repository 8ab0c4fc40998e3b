"""`krea2 export | average | merge`: training checkpoints out to the diffusers and original layouts."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import Krea2Transformer2DModel

from krea2_train.cli import main as krea2
from krea2_train.model import PRESETS, build_model
from krea2_train.model import layouts
from krea2_train.train.checkpoint import (
    CheckpointManager,
    ModelOptimizerState,
    TrainState,
    find_run_checkpoint,
    write_model_config,
)
from krea2_train.train.commands import normalised_weights

from helpers import krea2_error

TINY = PRESETS["tiny"]


def random_model(seed: int, **overrides):
    torch.manual_seed(seed)
    model = build_model("tiny", **overrides)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.2)
    return model


def make_run(run_dir, seeds_by_step: dict[int, int], **overrides) -> dict[int, dict[str, torch.Tensor]]:
    """A run directory with one committed checkpoint (model + AdamW) per step; returns the weights saved."""
    model = random_model(0, **overrides)
    write_model_config(run_dir, model.config)
    optimizer = torch.optim.AdamW(model.parameters())
    saved = {}
    manager = CheckpointManager(run_dir, interval=1, keep_last=10, async_mode="sync")
    for step, seed in seeds_by_step.items():
        with torch.no_grad():
            for key, parameter in random_model(seed, **overrides).state_dict().items():
                model.get_parameter(key).copy_(parameter)
        manager.save(step, {"model": ModelOptimizerState(model, optimizer), "train_state": TrainState(step=step)})
        saved[step] = {key: value.clone() for key, value in model.state_dict().items()}
    return saved


def assert_same_weights(actual, expected, atol=0.0):
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=0, msg=key)


@pytest.fixture
def run(tmp_path):
    run_dir = tmp_path / "runs" / "exp"
    return run_dir, make_run(run_dir, {10: 1, 20: 2, 30: 3})


def test_export_diffusers_loads_in_diffusers_with_identical_weights(run, tmp_path):
    run_dir, saved = run
    out = tmp_path / "export"
    assert krea2(["export", str(run_dir), "--layout", "diffusers", "--out", str(out)]) == 0
    reference = Krea2Transformer2DModel.from_pretrained(out)
    assert {key: getattr(reference.config, key) for key in ("num_layers", "attention_head_dim")} == {
        "num_layers": TINY["num_layers"], "attention_head_dim": TINY["attention_head_dim"]
    }  # fmt: skip
    assert_same_weights(reference.state_dict(), saved[30])


def test_export_original_layout_of_a_chosen_step_by_run_name(run, tmp_path):
    run_dir, saved = run
    out = tmp_path / "krea2.safetensors"
    argv = ["export", "exp", "--runs-root", str(run_dir.parent), "--step", "20", "--layout", "original", "--out", str(out)]
    assert krea2(argv) == 0
    stored, _ = layouts.read_safetensors_header(out)
    assert "model.diffusion_model.blocks.0.attn.wq.weight" in stored
    weights, config = layouts.load_state_dict(out)
    assert config == build_model("tiny").config
    assert_same_weights(weights, saved[20])


def test_export_casts_to_the_requested_dtype(run, tmp_path):
    run_dir, saved = run
    out = tmp_path / "bf16"
    krea2(["export", str(run_dir), "--layout", "diffusers", "--dtype", "bf16", "--out", str(out)])
    weights, _ = layouts.load_state_dict(out)
    assert all(tensor.dtype == torch.bfloat16 for tensor in weights.values())
    assert_same_weights(weights, {key: value.bfloat16() for key, value in saved[30].items()})


def test_a_bf16_export_samples_in_the_chosen_dtype(run, tmp_path, capsys, monkeypatch, caplog):
    """Released weights are bf16: `krea2 sample` casts the DiT to its compute dtype (fp32 on CPU)."""
    import numpy as np
    from PIL import Image

    from krea2_train.conditioning.tiny import build_tiny_text_encoder
    from krea2_train.flow import generate as generate_module

    # record the dtype the DiT actually runs in: its weights, the dtype asked of generate(), and
    # the latents and text states of every forward pass of the DiT (the timestep stays fp32 by design)
    calls = []
    real_generate = generate_module.generate

    def recording_generate(model, *args, **kwargs):
        call = {"parameters": {parameter.dtype for parameter in model.parameters()}, "dtype": kwargs.get("dtype"), "inputs": set()}

        def record_inputs(module, inputs, kw_inputs):
            assert not inputs, "the sampler calls the DiT with keyword arguments"
            call["inputs"].update(kw_inputs[name].dtype for name in ("hidden_states", "encoder_hidden_states"))

        hook = model.register_forward_pre_hook(record_inputs, with_kwargs=True)
        try:
            images = real_generate(model, *args, **kwargs)
        finally:
            hook.remove()
        calls.append(call)
        return images

    monkeypatch.setattr(generate_module, "generate", recording_generate)

    run_dir, _ = run
    out = tmp_path / "released.safetensors"
    krea2(["export", str(run_dir), "--layout", "original", "--dtype", "bf16", "--out", str(out)])
    text_encoder = build_tiny_text_encoder(tmp_path / "text_encoder", seed=0)
    common = ["sample", "--checkpoint", str(out), "--prompt", "a red circle", "--steps", "2", "--resolution", "64",
              "--autoencoder", "pixel", "--text-encoder", str(text_encoder), "--max-text-tokens", "16"]
    monkeypatch.setattr(generate_module, "SAMPLING_PROGRESS_EVERY_S", 0.0)
    for dtype, expected in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        calls.clear()
        with caplog.at_level("INFO"):
            assert krea2([*common, "--dtype", dtype, "--out", str(tmp_path / dtype)]) == 0
        # the sampler says what it does, and how far it is on a long run
        assert "sampling 1 image(s) at 16x16 px: 2 steps" in caplog.text and "sampling 1 image(s): step 1/2" in caplog.text
        caplog.clear()
        assert len(calls) == 1, f"--dtype {dtype}: generate() called {len(calls)} times"
        assert calls[0]["parameters"] == {expected}, f"--dtype {dtype}: DiT weights in {calls[0]['parameters']}"
        assert calls[0]["dtype"] == expected, f"--dtype {dtype}: generate(dtype={calls[0]['dtype']})"
        assert calls[0]["inputs"] == {expected}, f"--dtype {dtype}: DiT forward inputs in {calls[0]['inputs']}"
    for dtype in ("fp32", "bf16"):  # 64 px nominal: 16 px with the pixel autoencoder
        assert np.asarray(Image.open(tmp_path / dtype / "sample-000.png")).shape == (16, 16, 3)

    # arguments that cannot work: named, no traceback
    for bad, expected in ((["--resolution", "250"], "250 is not a positive multiple of 16"), (["--preset", "fast"], "invalid choice: 'fast'")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:  # argparse: exit 2 with the message, one line, no usage block
            krea2([*common, *bad])
        printed = capsys.readouterr().err
        assert exited.value.code == 2 and expected in printed and printed.count("\n") == 1
        assert printed.startswith("krea2 sample: error: ") and printed.endswith("(krea2 sample --help: usage)\n")
    with pytest.raises(SystemExit):  # an unknown option is reported by the subcommand whose help lists the options
        krea2([*common, "--nope"])
    assert capsys.readouterr().err == "krea2 sample: error: unrecognized arguments: --nope (krea2 sample --help: usage)\n"
    assert krea2([*common, "--height", "30", "--width", "30"]) == 1  # found once the autoencoder is known
    assert "krea2: error: --height/--width gives 30x30 px: this autoencoder needs multiples of 4 px" in capsys.readouterr().err
    assert "no LoRA file nothere.safetensors" in krea2_error([*common, "--lora", "nothere.safetensors"], capsys)
    assert "'abc' is not a strength" in krea2_error([*common, "--lora", "nothere.safetensors:abc"], capsys)


def test_export_without_a_committed_checkpoint_fails_clearly(tmp_path, capsys):
    write_model_config(tmp_path / "empty", build_model("tiny").config)
    assert "no committed checkpoint" in krea2_error(["export", str(tmp_path / "empty"), "--layout", "diffusers", "--out", str(tmp_path / "out")], capsys)


def test_a_bit_flip_in_the_model_files_is_refused_by_export_and_init_from_naming_the_file(run, tmp_path, capsys):
    """A flipped byte keeps the file's size, so only the digests recorded at save time see it:
    export writes nothing, and a run starting from the checkpoint refuses it before pinning it."""
    from krea2_train.train.checkpoint import CheckpointVerificationError
    from krea2_train.train.trainer import _resolve_and_record_init_from

    run_dir, _ = run
    checkpoint = find_run_checkpoint(run_dir)
    data_file = next(checkpoint.glob("*.distcp"))
    data = bytearray(data_file.read_bytes())
    data[len(data) // 2] ^= 0x10
    data_file.write_bytes(bytes(data))
    out = tmp_path / "export"
    error = krea2_error(["export", str(run_dir), "--layout", "diffusers", "--out", str(out)], capsys)
    assert f"the bytes of {data_file.name} changed since they were written (SHA-256 mismatch)" in error and not out.exists()
    record = tmp_path / "child" / "init_from.json"
    with pytest.raises(CheckpointVerificationError, match=data_file.name):
        _resolve_and_record_init_from(str(checkpoint), tmp_path / "runs", record)
    assert not record.exists()
    assert krea2(["export", str(run_dir), "--step", "20", "--layout", "diffusers", "--out", str(out)]) == 0  # its other steps are whole


def test_an_output_that_is_the_input_is_refused_before_anything_is_written(run, tmp_path, capsys):
    run_dir, saved = run
    model = tmp_path / "model.safetensors"
    assert krea2(["export", str(run_dir), "--layout", "original", "--out", str(model)]) == 0
    before = model.read_bytes()
    for argv in (["export", str(model)], ["merge", str(model), str(run_dir)]):
        error = krea2_error([*argv, "--layout", "original", "--dtype", "bf16", "--out", str(model)], capsys)
        assert f"--out {model} is the checkpoint being read" in error
    assert model.read_bytes() == before


def test_average_of_the_last_k_checkpoints_is_their_mean(run, tmp_path, capsys):
    run_dir, saved = run
    out = tmp_path / "pma.safetensors"
    assert krea2(["average", str(run_dir), "--last", "2", "--layout", "original", "--out", str(out)]) == 0
    weights, _ = layouts.load_state_dict(out)
    expected = {key: (saved[20][key] + saved[30][key]) / 2 for key in saved[30]}
    assert_same_weights(weights, expected, atol=1e-7)
    assert "fewer than --last 4" in krea2_error(["average", str(run_dir), "--last", "4", "--out", str(tmp_path / "x")], capsys)


def test_merge_mixes_runs_and_files_of_either_layout_by_weight(run, tmp_path):
    run_dir, saved = run
    other = random_model(7)
    original_file = tmp_path / "other.safetensors"
    layouts.save_original(other.state_dict(), original_file, other.config)
    diffusers_dir = tmp_path / "third"
    third = random_model(8)
    layouts.save_diffusers(third.state_dict(), diffusers_dir, third.config)
    out = tmp_path / "merged"
    argv = ["merge", str(run_dir), str(original_file), str(diffusers_dir), "--weights", "1", "2", "1", "--out", str(out)]
    assert krea2(argv) == 0
    merged, config = layouts.load_state_dict(out)
    expected = {
        key: 0.25 * saved[30][key] + 0.5 * other.state_dict()[key] + 0.25 * third.state_dict()[key] for key in saved[30]
    }
    assert_same_weights(merged, expected, atol=1e-6)
    assert config == other.config


def test_merge_refuses_checkpoints_of_different_configs(run, tmp_path, capsys):
    run_dir, _ = run
    wider = random_model(9, intermediate_size=128)
    wider_file = tmp_path / "wider.safetensors"
    layouts.save_original(wider.state_dict(), wider_file, wider.config)
    message = krea2_error(["merge", str(run_dir), str(wider_file), "--out", str(tmp_path / "merged")], capsys)
    assert f"{wider_file} has a different model config than" in message and "intermediate_size: 128 vs 256" in message


def test_merge_weights_and_output_paths_are_validated_before_any_checkpoint_is_read(tmp_path, capsys):
    assert normalised_weights(None, 4) == [0.25] * 4
    assert normalised_weights([2, 6], 2) == [0.25, 0.75]
    missing = [str(tmp_path / "a"), str(tmp_path / "b")]  # never read: the arguments are refused first
    assert "--weights: got 1 weights for 2 checkpoints" in krea2_error(["merge", *missing, "--weights", "0.6", "--out", "m"], capsys)
    assert "--weights must be non-negative" in krea2_error(["merge", *missing, "--weights", "1", "-1", "--out", "m"], capsys)
    assert "names a .safetensors file, and the diffusers layout writes a directory" in krea2_error(
        ["merge", *missing, "--out", str(tmp_path / "g2.safetensors")], capsys)
    assert "names a directory, and the original layout writes one file" in krea2_error(
        ["export", missing[0], "--layout", "original", "--out", f"{tmp_path}/xdir/"], capsys)
    assert "names a directory" in krea2_error(
        ["average", missing[0], "--last", "2", "--layout", "original", "--out", str(tmp_path)], capsys)


def test_run_config_is_recorded_as_json(tmp_path):
    path = write_model_config(tmp_path, build_model("tiny").config)
    assert json.loads(path.read_text())["axes_dims_rope"] == list(TINY["axes_dims_rope"])


def test_a_run_directory_stays_the_run_after_an_export_into_it(run, tmp_path, capsys):
    """An export is refused as --out of a run directory; a diffusers export placed there anyway
    does not shadow the run: the run's newest checkpoint is still what its path stands for."""
    run_dir, saved = run
    assert "is a run directory" in krea2_error(["export", str(run_dir), "--layout", "diffusers", "--out", str(run_dir)], capsys)
    assert not (run_dir / "config.json").exists()
    layouts.save_diffusers(random_model(5).state_dict(), run_dir, TINY)  # copied in by hand
    assert find_run_checkpoint(run_dir).name == "step-00000030"
    out = tmp_path / "exported.safetensors"
    assert krea2(["export", str(run_dir), "--layout", "original", "--out", str(out)]) == 0
    assert_same_weights(layouts.load_state_dict(out)[0], saved[30], atol=0)
