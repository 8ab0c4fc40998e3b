"""LoRA injection, freezing, merging, base dtypes, AC/compile, and the meta-device memory estimate."""

import pytest
import torch

from krea2_train.model.lora import (
    LoRAError,
    LoRALinear,
    LoRASpec,
    cast_base,
    estimate_lora_training_memory,
    freeze_base,
    inject_lora,
    lora_state_dict,
    merge_all,
    unmerge_all,
)
from krea2_train.model.patchify import position_ids
from helpers import random_tiny_model

BLOCK_LINEARS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.to_gate", "ff.gate", "ff.up", "ff.down")




def _inputs(batch=2, text_len=5, grid=(3, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, grid[0] * grid[1], 64, generator=g)
    text = torch.randn(batch, text_len, 4, 64, generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[0, -2:] = False
    return hidden, text, torch.rand(batch, generator=g), position_ids(text_len, *grid), mask


def _randomise_lora(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_injection_targets_freezing_and_identity_at_init():
    model = random_tiny_model()
    inputs = _inputs()
    before = model(*inputs)
    base_keys = set(model.state_dict())
    names = inject_lora(model, LoRASpec(rank=4, alpha=8.0))
    freeze_base(model)
    assert sorted(names) == sorted(f"transformer_blocks.{b}.{n}" for b in range(2) for n in BLOCK_LINEARS)
    # base keys unchanged (the base checkpoint loads as is); LoRA adds exactly A and B per layer
    assert set(model.state_dict()) - base_keys == {f"{n}.lora_{p}.weight" for n in names for p in "AB"}
    assert base_keys <= set(model.state_dict())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora_state_dict(model))
    torch.testing.assert_close(model(*inputs), before, rtol=1e-5, atol=1e-5)  # B = 0: the base function
    layer = model.get_submodule(names[0])
    assert layer.lora_A.weight.shape == (4, 128) and layer.lora_B.weight.shape == (128, 4) and layer.scale == 2.0


def test_lora_forward_is_base_plus_scaled_low_rank_update():
    layer = torch.nn.Linear(6, 5, bias=True)
    lora = LoRALinear.wrap(layer, LoRASpec(rank=2, alpha=3.0))
    torch.nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(4, 6)
    expected = layer(x) + 1.5 * x @ lora.lora_A.weight.T @ lora.lora_B.weight.T
    torch.testing.assert_close(lora(x), expected)
    assert lora.weight is layer.weight  # shared, not copied


def test_custom_targets_and_clear_errors():
    model = random_tiny_model()
    names = inject_lora(model, LoRASpec(rank=2, targets=(r"transformer_blocks\.1\.attn\.to_q", r"text_fusion\.refiner_blocks\.\d+\.ff\.up")))
    assert sorted(names) == ["text_fusion.refiner_blocks.0.ff.up", "text_fusion.refiner_blocks.1.ff.up", "transformer_blocks.1.attn.to_q"]
    with pytest.raises(LoRAError, match="no nn.Linear module name matches"):
        inject_lora(random_tiny_model(), LoRASpec(targets=(r"blocks\.0\.attn\.wq",)))
    with pytest.raises(LoRAError, match="rank must be >= 1"):
        LoRASpec(rank=0)
    with pytest.raises(LoRAError, match="not a regular expression"):
        LoRASpec(targets=("(",))
    with pytest.raises(LoRAError, match="base dtype 'int8'"):
        cast_base(model, "int8")


def test_merge_and_unmerge_are_exact_inverses():
    model = random_tiny_model()
    inject_lora(model, LoRASpec(rank=3, alpha=6.0))
    _randomise_lora(model)
    inputs = _inputs()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = model(*inputs)
    merge_all(model)
    torch.testing.assert_close(model(*inputs), unmerged, rtol=1e-5, atol=1e-5)
    with pytest.raises(LoRAError, match="already merged"):
        merge_all(model)
    unmerge_all(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("base_dtype,tolerance", [("bf16", 0.03), ("float8", 0.1)])
def test_low_precision_base_keeps_lora_fp32_and_output_close(base_dtype, tolerance):
    model = random_tiny_model()
    inject_lora(model, LoRASpec(rank=3))
    _randomise_lora(model)
    freeze_base(model)
    inputs = _inputs()
    reference = model(*inputs)
    cast_base(model, base_dtype)
    lora = dict(model.named_parameters())
    assert all(p.dtype == torch.float32 for n, p in lora.items() if "lora_" in n)
    expected_weight_dtype = torch.bfloat16 if base_dtype == "bf16" else torch.float8_e4m3fn
    assert lora["transformer_blocks.0.attn.to_q.weight"].dtype == expected_weight_dtype
    assert lora["img_in.weight"].dtype == torch.bfloat16
    # the DiT runs in the compute dtype the trainer gives it (FSDP2 casts frozen params to it)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dtype == torch.bfloat16:
                param.data = param.data.float()
    out = model(*inputs)
    assert (out - reference).norm() / reference.norm() < tolerance
    if base_dtype == "float8":
        with pytest.raises(LoRAError, match="float8 base"):
            merge_all(model)


def test_gradients_under_activation_checkpointing_and_compile_match_eager():
    from krea2_train.parallel.parallelize import apply_activation_checkpointing

    def lora_grads(wrap):
        model = random_tiny_model()
        torch.manual_seed(7)
        inject_lora(model, LoRASpec(rank=2, dropout=0.0))
        _randomise_lora(model)
        freeze_base(model)
        wrap(model)
        out = model(*_inputs())
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    def checkpoint_and_compile(model):
        apply_activation_checkpointing(model.transformer_blocks, "full")
        model.transformer_blocks[0].compile(backend="aot_eager", fullgraph=True)  # one graph suffices

    eager = lora_grads(lambda model: None)
    wrapped = lora_grads(checkpoint_and_compile)
    assert set(eager) == {k.replace("._checkpoint_wrapped_module", "") for k in wrapped}
    for name, grad in wrapped.items():
        torch.testing.assert_close(grad, eager[name.replace("._checkpoint_wrapped_module", "")], rtol=1e-4, atol=1e-6)
    assert all(g.abs().sum() > 0 for n, g in eager.items() if "lora_A" in n)  # B != 0: A trains too


def test_memory_estimate_of_the_12b_model_on_meta():
    spec = LoRASpec(rank=16, alpha=16.0)
    estimate = estimate_lora_training_memory("krea2_medium", spec=spec, base_dtype="bf16")
    d, kv, f, layers, r = 6144, 1536, 16384, 28, 16
    # q, out, gate: d -> d (3 layers); k, v: d -> kv (2); ff gate/up: d -> f (2); ff down: f -> d (1)
    per_block = r * (3 * (d + d) + 2 * (d + kv) + 2 * (d + f) + (f + d))
    assert estimate.num_lora_parameters == layers * per_block
    assert 12.7e9 < estimate.num_base_parameters < 12.9e9
    assert estimate.base_params == 2 * estimate.num_base_parameters
    assert estimate.lora_params == estimate.lora_grads == 4 * estimate.num_lora_parameters
    assert estimate.optimizer_state == 8 * estimate.num_lora_parameters
    assert estimate.activations >= layers * (4096 + 512) * d * 2  # every block input is kept
    float8 = estimate_lora_training_memory("krea2_medium", spec=spec, base_dtype="float8")
    assert float8.base_params < 0.6 * estimate.base_params
