"""iREPA (krea2_train.stages.irepa): projector grid layout, spatial z-score, the teacher, the
flow-matching stage's weighted term and its switch-off, the FSDP2 path, and config checks."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from krea2_train.config import load_config
from krea2_train.config.load import ConfigError
from krea2_train.model.presets import build_model
from krea2_train.stages.base import StepContext
from krea2_train.stages.flow_matching import FlowMatchingStage
from krea2_train.stages.irepa import (
    BlockOutputCapture,
    ConvProjector,
    IrepaAlignment,
    VisionTeacher,
    alignment_loss,
    build_tiny_dinov2,
    default_block,
    ensure_tiny_dinov2,
    resample_grid,
    spatial_zscore,
)

# ---------------------------------------------------------------------------------------------
# Projector layout
# ---------------------------------------------------------------------------------------------


def delta_projector(offset: tuple[int, int], kernel_size: int = 3) -> ConvProjector:
    """A 1 -> 1 channel projector whose output at (r, c) is the input at (r + dr, c + dc)."""
    projector = ConvProjector(1, 1, kernel_size)
    with torch.no_grad():
        projector.conv.weight.zero_()
        projector.conv.bias.zero_()
        centre = kernel_size // 2
        projector.conv.weight[0, 0, centre + offset[0], centre + offset[1]] = 1.0
    return projector


@pytest.mark.parametrize("offset", [(0, 1), (1, 0), (-1, 1)])
def test_delta_kernel_reads_the_row_major_neighbour_on_a_non_square_grid(offset):
    grid_h, grid_w = 3, 5
    token_index = torch.arange(grid_h * grid_w, dtype=torch.float32).view(1, -1, 1)  # [1, N, 1]
    shifted = delta_projector(offset)(token_index, grid_h, grid_w)[0, :, 0]
    expected = []
    for n in range(grid_h * grid_w):
        row, col = n // grid_w + offset[0], n % grid_w + offset[1]
        inside = 0 <= row < grid_h and 0 <= col < grid_w
        expected.append(float(row * grid_w + col) if inside else 0.0)  # zero padding at the border
    assert shifted.tolist() == expected


def test_ones_kernel_counts_neighbours_with_zero_padding():
    projector = ConvProjector(1, 1, 3)
    with torch.no_grad():
        projector.conv.weight.fill_(1.0)
        projector.conv.bias.zero_()
    counts = projector(torch.ones(1, 6, 1), 2, 3)[0, :, 0]
    assert counts.tolist() == [4.0, 6.0, 4.0, 4.0, 6.0, 4.0]


def test_kernel_one_projector_is_a_linear_layer():
    torch.manual_seed(0)
    projector, linear = ConvProjector(8, 5, kernel_size=1), nn.Linear(8, 5)
    with torch.no_grad():
        linear.weight.copy_(projector.conv.weight[:, :, 0, 0])
        linear.bias.copy_(projector.conv.bias)
    tokens = torch.randn(2, 12, 8)
    torch.testing.assert_close(projector(tokens, 3, 4), linear(tokens))


def test_projector_rejects_bad_grids_and_kernels():
    with pytest.raises(ValueError, match="positive odd"):
        ConvProjector(4, 4, kernel_size=2)
    with pytest.raises(ValueError, match="12 tokens do not fill a 3x5 grid"):
        ConvProjector(4, 4)(torch.zeros(1, 12, 4), 3, 5)


# ---------------------------------------------------------------------------------------------
# Normalisation, resampling, loss
# ---------------------------------------------------------------------------------------------


def test_spatial_zscore_per_image_and_channel():
    features = torch.randn(3, 20, 6) * torch.arange(1, 7) + torch.arange(6) * 5.0
    normalised = spatial_zscore(features, gamma=1.0)
    torch.testing.assert_close(normalised.mean(dim=1), torch.zeros(3, 6), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalised.std(dim=1), torch.ones(3, 6), atol=1e-4, rtol=0)
    # gamma < 1 keeps (1 - gamma) of the mean, in units of the (unbiased) std
    partial = spatial_zscore(features, gamma=0.6)
    mean, std = features.mean(dim=1), features.std(dim=1)
    torch.testing.assert_close(partial.mean(dim=1), 0.4 * mean / (std + 1e-6), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(partial.std(dim=1), torch.ones(3, 6), atol=1e-4, rtol=0)


def test_resample_grid_keeps_axes_and_is_identity_on_equal_grids():
    column_ramp = torch.arange(4.0).repeat(2).view(1, 8, 1)  # 2x4 grid, value = column
    assert resample_grid(column_ramp, (2, 4), (2, 4)) is column_ramp
    up = resample_grid(column_ramp, (2, 4), (3, 8)).view(3, 8)
    torch.testing.assert_close(up, up[:1].expand(3, 8))  # constant along height
    assert bool((up[0, 1:] >= up[0, :-1]).all()) and up[0, -1] > up[0, 0]  # increasing along width
    down = resample_grid(torch.full((2, 64, 3), 2.5), (8, 8), (3, 5))
    torch.testing.assert_close(down, torch.full((2, 15, 3), 2.5))


def test_alignment_loss_is_negative_cosine():
    target = torch.randn(2, 10, 4)
    scales = torch.rand(2, 10, 1) + 0.1
    assert alignment_loss(target * scales, target).item() == pytest.approx(-1.0, abs=1e-6)
    assert alignment_loss(-target, target).item() == pytest.approx(1.0, abs=1e-6)
    random = alignment_loss(torch.randn(2, 10, 4), target).item()
    assert -1.0 < random < 1.0
    with pytest.raises(ValueError, match="differ"):
        alignment_loss(torch.zeros(2, 10, 3), target)


# ---------------------------------------------------------------------------------------------
# The teacher
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_teacher_dir(tmp_path_factory):
    return build_tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "tiny", seed=0)


def test_tiny_teacher_is_deterministic_and_built_once(tmp_path, tiny_teacher_dir):
    from safetensors.torch import load_file

    again = ensure_tiny_dinov2(tmp_path / "teacher", seed=0)
    first, second = load_file(tiny_teacher_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    stamp = (again / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_dinov2(again, seed=1) == again and (again / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["teacher"]  # no staging directory left behind


def test_teacher_patch_features_on_a_non_square_grid(tiny_teacher_dir):
    teacher = VisionTeacher.from_pretrained(tiny_teacher_dir, torch.device("cpu"), torch.float32)
    images = torch.rand(2, 3, 24, 40) * 2 - 1
    features = teacher.patch_features(images, 3, 5)
    assert features.shape == (2, 15, teacher.hidden_size) and features.dtype == torch.float32
    # the same as running the model by hand on the resized, ImageNet-normalised image
    pixels = F.interpolate((images + 1) / 2, size=(12, 20), mode="bicubic", antialias=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        reference = teacher.model(pixel_values=(pixels - mean) / std).last_hidden_state[:, 1:]
    torch.testing.assert_close(features, reference)
    assert not any(p.requires_grad for p in teacher.model.parameters()) and not teacher.model.training


def test_teacher_rejects_other_models(tmp_path):
    from transformers import BertConfig

    from krea2_train.errors import UsageError

    with pytest.raises(FileNotFoundError, match="no config.json"):
        VisionTeacher.from_pretrained(tmp_path, torch.device("cpu"), torch.float32)
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8).save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="is a 'bert' model"):  # a user error: one line, recorded for the launcher
        VisionTeacher.from_pretrained(tmp_path, torch.device("cpu"), torch.float32)


def test_encoder_patches_resamples_the_teacher_grid(tiny_teacher_dir):
    irepa = IrepaAlignment(tiny_teacher_dir, encoder_patches=8, gamma=1.0)
    assert irepa.teacher_grid(4, 6) == (5, 8) and IrepaAlignment(tiny_teacher_dir).teacher_grid(4, 6) == (4, 6)
    images = torch.rand(2, 3, 16, 24) * 2 - 1
    targets = irepa.targets(images, 4, 6, torch.device("cpu"), torch.float32)
    features = irepa.teacher(torch.device("cpu"), torch.float32).patch_features(images, 5, 8)
    expected = spatial_zscore(F.interpolate(features.view(2, 5, 8, -1).permute(0, 3, 1, 2), size=(4, 6), mode="bilinear",
                                            antialias=True).flatten(2).transpose(1, 2), 1.0)
    torch.testing.assert_close(targets, expected)


# ---------------------------------------------------------------------------------------------
# The stage: hook, weighted term, separate metrics, switch-off
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def conditioner(tmp_path_factory):
    from krea2_train.conditioning.conditioner import build_conditioner
    from krea2_train.conditioning.tiny import build_tiny_text_encoder

    text_dir = build_tiny_text_encoder(tmp_path_factory.mktemp("text_encoder"), seed=0)
    return build_conditioner("pixel", text_dir, max_text_tokens=16)


def stage_config(tmp_path, *overrides):
    return load_config("stage/pretrain_256", [f"runs_root={tmp_path}", "model.overrides={num_layers: 3}", *overrides])


def prepared(config):
    stage = FlowMatchingStage(config)
    torch.manual_seed(0)
    return stage, stage.prepare_model(build_model("tiny", num_layers=3))


def batch(epoch=0, fraction=0.5, height=24, width=40):
    generator = torch.Generator().manual_seed(3)
    return {
        "images": torch.rand(2, 3, height, width, generator=generator) * 2 - 1,
        "captions": ["a red circle", "two blue squares"],
        "epoch": epoch,
        "epoch_fraction": fraction,
    }


def as_floats(result):
    """(loss, metrics) with the stage's 0-dim metric tensors read as floats."""
    loss, metrics = result
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in metrics.values())
    return loss, {name: value.item() for name, value in metrics.items()}


def context(model, conditioner, step=0):
    return StepContext(model=model, conditioner=conditioner, device=torch.device("cpu"), seed=0, step=step, first_slot=0)


def test_stage_adds_weighted_term_and_reports_both_losses(tmp_path, conditioner):
    stage, model = prepared(stage_config(tmp_path, "irepa.weight=0.5"))
    assert stage.irepa.block == default_block(3) == 1 and isinstance(model.auxiliary["irepa"], ConvProjector)
    assert (tmp_path / "pretrain_256" / "irepa_encoder" / "config.json").is_file()
    block_output = {}
    model.transformer_blocks[0].register_forward_hook(lambda m, a, out: block_output.setdefault("x", out))
    loss, metrics = as_floats(stage.loss(context(model, conditioner), batch()))
    assert set(metrics) == {"t_mean", "loss_fm", "loss_irepa"} and -1 < metrics["loss_irepa"] < 1
    assert loss.item() == pytest.approx(metrics["loss_fm"] + 0.5 * metrics["loss_irepa"], rel=1e-6)

    # the term is the cosine between the projected image tokens of block 1 and the teacher targets
    text_len = block_output["x"].shape[1] - 60  # 24x40 px with the pixel AE: a 6x10 token grid
    projected = model.auxiliary["irepa"](block_output["x"][:, text_len:], 6, 10)
    targets = stage.irepa.targets(batch()["images"], 6, 10, torch.device("cpu"), torch.float32)
    assert metrics["loss_irepa"] == pytest.approx(alignment_loss(projected, targets).item(), rel=1e-6)

    loss.backward()
    assert model.auxiliary["irepa"].conv.weight.grad.abs().sum() > 0
    assert model.transformer_blocks[0].ff.down.weight.grad is not None


def test_switch_off_gives_exactly_the_flow_matching_loss(tmp_path, conditioner, caplog):
    caplog.set_level("INFO", logger="krea2_train.stages.irepa")
    stage, model = prepared(stage_config(tmp_path, "irepa.switch_off_epochs=0.75"))
    plain_stage = FlowMatchingStage(stage_config(tmp_path / "plain", "irepa.enabled=false"))
    plain_model = copy.deepcopy(model)
    del plain_model.auxiliary["irepa"]

    _, metrics = as_floats(stage.loss(context(model, conditioner), batch(fraction=0.5)))
    assert "loss_irepa" in metrics and stage.irepa._teacher is not None
    model.zero_grad()
    loss, metrics = as_floats(stage.loss(context(model, conditioner, step=1), batch(fraction=0.75)))
    plain_loss, plain_metrics = as_floats(plain_stage.loss(context(plain_model, conditioner, step=1), batch(fraction=0.75)))
    assert set(metrics) == {"t_mean", "loss_fm"} and torch.equal(loss, plain_loss) and metrics == plain_metrics
    assert stage.irepa._teacher is None and stage.irepa.capture._image_tokens is None  # no teacher, no capture
    loss.backward()
    assert model.auxiliary["irepa"].conv.weight.grad is None
    # a later epoch stays off; the switch-off was said once (the printed loss drops the term there)
    assert not stage.irepa.active({"epoch": 1, "epoch_fraction": 0.1})
    assert caplog.text.count("iREPA switched off after 0.75 epoch(s)") == 1


def test_capture_fires_once_per_arming():
    capture = BlockOutputCapture()
    hidden = torch.randn(2, 7, 4)
    capture(hidden)  # not armed: nothing kept
    with pytest.raises(RuntimeError, match="did not run"):
        capture.take()
    with capture.armed(text_len=3, num_image_tokens=4):
        capture(hidden)
        capture(hidden * 2)  # a second forward inside the arming: ignored
    assert torch.equal(capture.take(), hidden[:, 3:])
    with pytest.raises(RuntimeError, match=r"expected 3 text \+ 8 image tokens"), capture.armed(text_len=3, num_image_tokens=8):
        capture(hidden)


# ---------------------------------------------------------------------------------------------
# FSDP2: the projector is sharded with the root unit and trained
# ---------------------------------------------------------------------------------------------




@pytest.mark.parametrize(
    ("activation_checkpoint", "compile"), [("none", False), ("full", False), ("selective", True)]
)
def test_fsdp_wrapped_model_matches_plain_model(tmp_path, conditioner, world_of_one, activation_checkpoint, compile):
    from torch.distributed.tensor import DTensor

    from krea2_train.parallel.mesh import build_parallel_dims
    from krea2_train.parallel.parallelize import parallelize_dit

    stage, model = prepared(stage_config(tmp_path))
    reference_stage, reference = prepared(stage_config(tmp_path))  # same seed: identical weights
    # compiled checkpointed blocks are parallel=cluster's setting: the capture must stay outside them
    parallelize_dit(model, build_parallel_dims(1, -1, 1, 1), activation_checkpoint=activation_checkpoint, compile=compile, fsdp=True)
    assert isinstance(model.auxiliary["irepa"].conv.weight, DTensor)

    loss, metrics = as_floats(stage.loss(context(model, conditioner), batch()))
    loss.backward()
    reference_loss, reference_metrics = as_floats(reference_stage.loss(context(reference, conditioner), batch()))
    reference_loss.backward()
    assert metrics == pytest.approx(reference_metrics, rel=1e-6)
    grads = {name.replace("._checkpoint_wrapped_module", ""): p.grad for name, p in model.named_parameters()}
    for name, param in reference.named_parameters():
        grad = grads[name].full_tensor()
        torch.testing.assert_close(grad, param.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert grads["auxiliary.irepa.conv.weight"].full_tensor().abs().sum() > 0


def test_one_rank_low_precision_runs_the_projector_under_autocast_too(tmp_path, conditioner, world_of_one):
    """On one rank bf16 is autocast around forward (no FSDP2 casts the weights): the projector, called
    by the stage outside the DiT's forward, must compute in bf16 like the blocks whose output it
    reads, and its loss stay close to the fp32 one."""
    from krea2_train.parallel.mesh import build_parallel_dims
    from krea2_train.parallel.parallelize import parallelize_dit

    stage, model = prepared(stage_config(tmp_path))
    reference_stage, reference = prepared(stage_config(tmp_path))
    parallelize_dit(model, build_parallel_dims(1, -1, 1, 1), param_dtype=torch.bfloat16)
    projected = {}
    model.auxiliary["irepa"].register_forward_hook(lambda module, args, output: projected.update(dtype=output.dtype))
    loss, metrics = as_floats(stage.loss(context(model, conditioner), batch()))
    loss.backward()
    assert projected["dtype"] == torch.bfloat16
    _, reference_metrics = as_floats(reference_stage.loss(context(reference, conditioner), batch()))
    assert metrics == pytest.approx(reference_metrics, rel=0.05, abs=0.02)
    projector_grad = model.auxiliary["irepa"].conv.weight.grad
    assert projector_grad.dtype == torch.float32 and projector_grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


def test_only_pretrain_256_enables_irepa_by_default(tmp_path):
    config = load_config("stage/pretrain_256", [f"runs_root={tmp_path}"])
    assert config.irepa.enabled and config.irepa.encoder == "tiny" and config.irepa.switch_off_epochs == 1.0
    assert config.irepa.kernel_size == 3
    for stage in ("pretrain_512", "pretrain_1024", "midtrain", "sft"):
        assert not load_config(f"stage/{stage}", [f"runs_root={tmp_path}"]).irepa.enabled, stage


@pytest.mark.parametrize(
    "override, message",
    [
        ("irepa.block=3", r"must be in 1..2"),
        ("irepa.kernel_size=2", "positive odd"),
        ("irepa.spatial_norm_gamma=1.5", r"in \[0, 1\]"),
        ("irepa.switch_off_epochs=0", "must be positive"),
    ],
)
def test_bad_irepa_config_is_refused(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("stage/pretrain_256", [f"runs_root={tmp_path}", override])


# ---------------------------------------------------------------------------------------------
# End to end: two ranks (FSDP2, then tensor parallel), iREPA on for a quarter epoch, then off
# ---------------------------------------------------------------------------------------------


def run_two_ranks(tmp_path, dsn, name, *overrides):
    import json
    import subprocess
    import sys

    # 48 samples, global batch 4: 12 batches per epoch; 0.25 epochs -> steps 1 and 2 use iREPA
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "krea2_train",
        "--config", "stage/pretrain_256", f"runs_root={tmp_path / 'runs'}", f"run_name={name}", "stage.steps=4",
        "checkpoint.interval=2", "logging.wandb=disabled", "logging.sample_steps=2", "logging.sample_prompts=[a red circle]",
        "data.num_samples=48", "data.num_workers=0", "data.global_batch_size=4", "irepa.switch_off_epochs=0.25", *overrides,
    ]
    result = subprocess.run(command, cwd=tmp_path, env={**os.environ, "KREA2_PG_DSN": dsn},
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "runs" / name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, {r["step"]: r for r in records if "event" not in r}


@pytest.mark.slow
@pytest.mark.postgres
def test_two_rank_runs_log_both_losses_switch_off_and_agree_across_fsdp_and_tp(tmp_path, fresh_database_dsn):
    from krea2_train.train.checkpoint import load_model_weights

    run_dir, steps = run_two_ranks(tmp_path, fresh_database_dsn, "fsdp")
    assert sorted(steps) == [1, 2, 3, 4] and all("loss_fm" in r for r in steps.values())
    assert [("loss_irepa" in steps[s]) for s in (1, 2, 3, 4)] == [True, True, False, False]
    before, after = (load_model_weights(run_dir / "checkpoints" / f"step-0000000{s}") for s in (2, 4))
    assert torch.equal(before["auxiliary.irepa.conv.weight"], after["auxiliary.irepa.conv.weight"])  # off: not trained
    assert not torch.equal(before["img_in.weight"], after["img_in.weight"])
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".irepa_encoder")] == []  # the ranks' build race

    # tensor parallel: the hooked block's sequence-sharded output is gathered; the same trajectory
    _, tp_steps = run_two_ranks(tmp_path, fresh_database_dsn, "tp", "parallel.tp=2")
    assert [("loss_irepa" in tp_steps[s]) for s in (1, 2, 3, 4)] == [True, True, False, False]
    for step in (1, 2, 3, 4):
        assert tp_steps[step]["loss"] == pytest.approx(steps[step]["loss"], rel=1e-5), step
