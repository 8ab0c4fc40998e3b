"""The lora stage end to end on CPU: from a tiny checkpoint in the original layout, train a few
steps (cached conditioning on), export the LoRA, and sample it on the base checkpoint."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import save_perturbed_tiny_base

from krea2_train.config import load_config
from krea2_train.stages import build_stage
from krea2_train.stages.lora import LoRAStageError


def test_lora_stage_requires_init_from_and_refuses_tensor_parallelism_and_float8_training(tmp_path):
    with pytest.raises(LoRAStageError, match="needs stage.init_from"):
        build_stage(load_config("stage/lora", [f"runs_root={tmp_path}"]))
    with pytest.raises(LoRAStageError, match="tensor parallelism"):
        build_stage(load_config("stage/lora", ["stage.init_from=x.safetensors", "parallel.tp=2"]))
    with pytest.raises(LoRAStageError, match="float8 training"):  # it would replace every adapted layer
        build_stage(load_config("stage/lora", ["stage.init_from=x.safetensors", "float8.enabled=true"]))


@pytest.mark.parametrize("base_dtype", ["bf16", "float8"])
def test_a_base_held_below_the_compute_dtype_trains_on_one_rank(base_dtype):
    """In fp32 compute on one rank nothing casts a stored bf16 weight (FSDP's all-gather does on more
    ranks): the layers LoRA does not wrap stay fp32 there, the wrapped ones are held in the base
    dtype, and the forward runs. Before, the first forward failed (Float and BFloat16)."""
    from helpers import random_tiny_model

    from krea2_train.model.patchify import position_ids

    stage = build_stage(load_config("stage/lora", ["stage.init_from=x.safetensors", f"lora.base_dtype={base_dtype}",
                                                   "parallel.mixed_precision=fp32"]))
    model = stage.prepare_model(random_tiny_model(seed=1))
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    wrapped = torch.float8_e4m3fn if base_dtype == "float8" else torch.bfloat16
    assert dtypes["transformer_blocks.0.attn.to_q.weight"] == wrapped
    assert dtypes["time_embed.linear_1.weight"] == torch.float32
    generator = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 64, generator=generator), torch.tensor([0.3, 0.8])
    states, mask = torch.randn(2, 5, 4, 64, generator=generator), torch.ones(2, 5, dtype=torch.bool)
    out = model(x, states, t, position_ids(5, 4, 4), mask)
    out.square().mean().backward()
    assert out.dtype == torch.float32 and all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_lora_init_that_is_missing_or_does_not_fit_names_the_setting(tmp_path):
    """lora.init_lora: a missing file is a lasting error (the launcher must not resubmit a typo:
    it was a plain FileNotFoundError, retried), and a file of another rank says what to set."""
    from helpers import random_tiny_model

    from krea2_train.errors import MissingPathError, is_lasting_error
    from krea2_train.model.lora import LoRAError, pairs_of_model
    from krea2_train.model.lora_formats import save_lora

    missing = tmp_path / "nofile.safetensors"
    stage = build_stage(load_config("stage/lora", ["stage.init_from=x.safetensors", f"lora.init_lora={missing}"]))
    with pytest.raises(MissingPathError, match=f"lora.init_lora='{missing}': no LoRA file") as raised:
        stage.prepare_model(random_tiny_model())
    assert is_lasting_error(raised.value)

    rank_8 = save_lora(pairs_of_model(build_stage(load_config("stage/lora", ["stage.init_from=x.safetensors", "lora.rank=8"]))
                                      .prepare_model(random_tiny_model())), tmp_path / "rank8.safetensors")
    stage = build_stage(load_config("stage/lora", ["stage.init_from=x.safetensors", f"lora.init_lora={rank_8}"]))
    with pytest.raises(LoRAError, match=r"lora.init_lora=.*has rank 8, the model's LoRA has rank 16 \(set lora.rank and lora.targets"):
        stage.prepare_model(random_tiny_model())


@pytest.mark.slow
@pytest.mark.postgres
def test_lora_stage_trains_exports_and_applies(tmp_path, fresh_database_dsn):
    from krea2_train.cli import main
    from krea2_train.model.lora_formats import read_lora
    from krea2_train.model.patchify import position_ids
    from krea2_train.train.checkpoint import find_run_checkpoint, load_model_weights
    from krea2_train.train.sample import load_for_sampling

    base = save_perturbed_tiny_base(tmp_path / "base.safetensors")
    command = [
        sys.executable, "-m", "krea2_train", "--config", "stage/lora", f"runs_root={tmp_path / 'runs'}",
        f"stage.init_from={tmp_path / 'base.safetensors'}", "stage.steps=3", "checkpoint.interval=3",
        "logging.wandb=disabled", "logging.sample_steps=2", "logging.sample_prompts=[a red circle]",
        "data.num_samples=16", "data.num_workers=0", "data.global_batch_size=4", "data.resolution=64",
        "lora.rank=4", "lora.alpha=8", "optim.lr=1e-2", "optim.warmup_steps=0", "conditioning_cache.enabled=true",
    ]
    result = subprocess.run(command, cwd=tmp_path, env={**os.environ, "KREA2_PG_DSN": fresh_database_dsn},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "lora"

    # the base stayed frozen, the LoRA trained
    weights = load_model_weights(find_run_checkpoint(run_dir))
    for key, value in base.state_dict().items():
        assert torch.equal(weights[key], value), key
    lora_b = [value for key, value in weights.items() if key.endswith("lora_B.weight")]
    assert len(lora_b) == 16 and all(value.abs().sum() > 0 for value in lora_b)
    assert len(list((run_dir / "conditioning_cache" / "latents").iterdir())) > 0

    # exported in both layouts, the same LoRA; applied on the base it is what the run samples with
    inputs = (torch.randn(1, 16, 64), torch.randn(1, 3, 4, 64), torch.rand(1), position_ids(3, 4, 4))
    own, _ = load_for_sampling(str(run_dir))
    for layout in ("diffusers", "comfyui"):
        out = tmp_path / f"lora_{layout}.safetensors"
        assert main(["lora", "export", str(run_dir), "--layout", layout, "--out", str(out)]) == 0
        assert {pair.alpha for pair in read_lora(out).pairs.values()} == {8.0}
        applied, _ = load_for_sampling(str(tmp_path / "base.safetensors"), loras=[(out, 1.0)])
        torch.testing.assert_close(applied(*inputs), own(*inputs), rtol=1e-5, atol=1e-5)
