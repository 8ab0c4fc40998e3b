"""``krea2 bench train`` on CPU: the tiny preset, a short run, ours against diffusers' model."""

import argparse
import math

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from krea2_train.bench import BENCHES
from krea2_train.bench import train as bench_train
from krea2_train.cli import main
from krea2_train.model import model_config
from krea2_train.model.flops import training_flops
from krea2_train.parallel.distributed import destroy_distributed, init_distributed
from krea2_train.parallel.float8 import Float8UnavailableError

# 9 real caption tokens: the reference computes the 80 padded ones, ours (compacted) 64
SHORT = ["--device", "cpu", "--preset", "tiny", "--res", "64", "--batch", "2", "--text-len", "80", "--caption-tokens", "9",
         "--warmup", "1", "--steps", "2"]


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    return parser.parse_args([*SHORT, *extra])


def _by_metric(rows: list[dict]) -> dict[str, dict]:
    return {row["metric"]: row for row in rows}


def test_cli_runs_ours_and_diffusers_and_prints_one_table(capsys):
    assert BENCHES["train"] == ["krea2_train.bench.train"]
    had_process_group = dist.is_initialized()
    assert main(["bench", "train", *SHORT, "--ac", "full"]) == 0
    table = capsys.readouterr().out
    rows = table.splitlines()
    assert rows[0].split()[:3] == ["bench", "metric", "value"]
    for metric in ("ours_images_per_s", "diffusers_images_per_s", "speedup_ours_vs_diffusers", "ours_mfu_vs_measured_matmul"):
        assert any(line.split()[1] == metric for line in rows[2:]), metric
    assert dist.is_initialized() == had_process_group  # the bench cleans up the group it made


@pytest.mark.parametrize("text, ours_text_tokens", [("compact", 64), ("padded", 80)])
def test_rows_are_consistent_with_the_formula_and_each_other(text, ours_text_tokens):
    rows = _by_metric(bench_train.run(_args("--reference", "diffusers", "--text", text)))
    for name, text_tokens in (("ours", ours_text_tokens), ("diffusers", 80)):
        assert rows[f"{name}_text_tokens"]["value"] == text_tokens
        flops = training_flops(model_config("tiny"), image_tokens=16, text_tokens=text_tokens, batch=2)
        assert rows[f"{name}_model_flops_per_step"]["value"] == flops / 1e12
        step_s = rows[f"{name}_step_time"]["value"] / 1e3
        assert step_s > 0 and math.isfinite(step_s)
        assert rows[f"{name}_images_per_s"]["value"] == pytest.approx(2 / step_s)
        assert rows[f"{name}_joint_tokens_per_s"]["value"] == pytest.approx(2 * (text_tokens + 16) / step_s)
        assert rows[f"{name}_achieved"]["value"] == pytest.approx(flops / step_s / 1e12)
        phases = sum(rows[f"{name}_{phase}_time"]["value"] for phase in ("forward", "backward", "optimizer"))
        assert 0 < phases <= rows[f"{name}_step_time"]["value"] * 1.001
        compute_s = (rows[f"{name}_forward_time"]["value"] + rows[f"{name}_backward_time"]["value"]) / 1e3
        matmul_rate = rows[f"{name}_achieved"]["value"] / rows[f"{name}_mfu_vs_measured_matmul"]["value"]
        assert rows[f"{name}_mfu_forward_backward_vs_measured_matmul"]["value"] == pytest.approx(flops / compute_s / 1e12 / matmul_rate)
        assert rows[f"{name}_mfu_forward_backward_vs_measured_matmul"]["value"] > rows[f"{name}_mfu_vs_measured_matmul"]["value"]
        assert rows[f"{name}_peak_memory_process_rss"]["value"] > 0
        assert f"{name}_host_syncs_per_step" not in rows  # counted on CUDA only
    speedup = rows["speedup_ours_vs_diffusers"]
    assert speedup["value"] == pytest.approx(rows["diffusers_step_time"]["value"] / rows["ours_step_time"]["value"])
    assert speedup["met"] is None and "none at this setting" in speedup["target"]  # the targets are bf16 at 1024 px on GPU
    assert ("compacted text" if text == "compact" else "equal work") in speedup["target"]
    assert rows["krea2_medium_parameters"]["value"] == pytest.approx(12.8, abs=0.1)
    assert rows["setup"]["value"].startswith(f"cpu preset=tiny res=64 batch=2 dtype=fp32 text=9/80 ours_text={text} sdpa=default ac=none")


def test_compacted_inputs_are_the_padded_inputs_cut():
    settings = bench_train.resolve_settings(_args())
    padded, compact = (bench_train.make_inputs(model_config("tiny"), settings, n) for n in (80, 64))
    assert torch.equal(padded.latents, compact.latents) and torch.equal(padded.target, compact.target)
    assert torch.equal(padded.text_states[:, :64], compact.text_states)
    assert compact.text_mask.sum().item() == padded.text_mask.sum().item() == 2 * 9
    assert compact.position_ids.shape == (64 + 16, 3)


def test_sdpa_choice_applies_to_ours_and_is_checked_before_building():
    rows = _by_metric(bench_train.run(_args("--reference", "none", "--sdpa", "flash,math")))
    assert "sdpa=flash,math" in rows["setup"]["value"] and rows["ours_step_time"]["value"] > 0
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()  # restored after
    with pytest.raises(ValueError, match="efficient.*none of these SDPA kernels runs"):
        bench_train.resolve_settings(_args("--sdpa", "efficient"))
    with pytest.raises(ValueError, match="unknown attention backend"):
        bench_train.resolve_settings(_args("--sdpa", "fast"))


def _final_weight(model: torch.nn.Module) -> torch.Tensor:
    weight = dict(model.named_parameters())["final_layer.linear.weight"].detach()
    return weight.full_tensor() if isinstance(weight, DTensor) else weight.clone()


@pytest.mark.parametrize("builder", [bench_train.build_ours, bench_train.build_reference])
def test_a_timed_step_trains_the_model(builder):
    """Both trainees run a real step: a zeroed output weight moves (weight decay alone cannot move it)."""
    settings = bench_train.resolve_settings(_args())
    inputs = bench_train.make_inputs(model_config("tiny"), settings)
    owns = not dist.is_initialized()
    init_distributed()
    try:
        trainee = builder(settings)
        with torch.no_grad():
            dict(trainee.model.named_parameters())["final_layer.linear.weight"].zero_()
        bench_train.train_step(trainee, inputs, bench_train.PhaseClock(settings.device))
        assert _final_weight(trainee.model).abs().min() > 0
    finally:
        if owns:
            destroy_distributed()


@pytest.mark.parametrize("extra, sharded", [((), False), (("--fsdp",), True)])
def test_ours_runs_as_one_rank_of_the_trainer_or_fsdp_wrapped_when_asked(extra, sharded):
    settings = bench_train.resolve_settings(_args(*extra))
    assert f"fsdp={sharded}" in settings.describe()
    owns = not dist.is_initialized()
    init_distributed()
    try:
        trainee = bench_train.build_ours(settings)
        assert all(isinstance(p, DTensor) == sharded for p in trainee.model.parameters())
    finally:
        if owns:
            destroy_distributed()


@pytest.mark.parametrize("ac, expected", [("none", False), ("selective", True), ("full", True)])
def test_reference_checkpoints_gradients_when_ours_checkpoints_activations(ac, expected):
    trainee = bench_train.build_reference(bench_train.resolve_settings(_args("--ac", ac)))
    assert trainee.model.gradient_checkpointing is expected


@pytest.mark.parametrize(
    "extra, error, match",
    [
        (["--caption-tokens", "90"], ValueError, "exceeds --text-len"),
        (["--res", "100"], ValueError, "multiple of 16"),
        (["--fp8"], Float8UnavailableError, "float8 training needs a CUDA GPU"),
        (["--lora", "4", "--reference", "diffusers"], ValueError, "--lora times ours only"),
    ],
)
def test_bad_settings_are_refused_before_any_model_is_built(extra, error, match):
    with pytest.raises(error, match=match):
        bench_train.resolve_settings(_args(*extra))


def test_lora_trains_only_the_adapters_on_a_frozen_base_and_counts_no_weight_gradients():
    settings = bench_train.resolve_settings(_args("--lora", "4"))
    assert settings.reference == "none" and "lora=4" in settings.describe()
    owns = not dist.is_initialized()
    init_distributed()
    try:
        trainee = bench_train.build_ours(settings)
        trained = {name for name, p in trainee.model.named_parameters() if p.requires_grad}
        assert trained and all(".lora_A." in name or ".lora_B." in name for name in trained)
        assert {id(p) for p in trainee.parameters} == {id(p) for p in trainee.model.parameters() if p.requires_grad}
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():  # a fresh init predicts exactly zero and passes no gradient back: a random base
            for p in trainee.model.parameters():
                if not p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
        base = {name: p.detach().clone() for name, p in trainee.model.named_parameters() if not p.requires_grad}
        inputs = bench_train.make_inputs(model_config("tiny"), settings)
        for _ in range(2):
            bench_train.train_step(trainee, inputs, bench_train.PhaseClock(settings.device))
        lora_b = [p for name, p in trainee.model.named_parameters() if ".lora_B." in name]
        assert lora_b and all(p.detach().abs().sum() > 0 for p in lora_b)  # B starts at zero: it trained
        assert all(torch.equal(p.detach(), base[name]) for name, p in trainee.model.named_parameters() if not p.requires_grad)
    finally:
        if owns:
            destroy_distributed()
    rows = _by_metric(bench_train.run(_args("--lora", "4")))
    full = training_flops(model_config("tiny"), image_tokens=16, text_tokens=64, batch=2)
    assert rows["ours_model_flops_per_step"]["value"] == pytest.approx(full * 2 / 3 / 1e12)
    assert "diffusers_images_per_s" not in rows and rows["ours_images_per_s"]["value"] > 0
