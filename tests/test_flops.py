"""The documented FLOP formula equals torch's count of the model's matmuls, exactly.

``FlopCounterMode`` does not see inside the fused CPU SDPA kernel, so the counts run under the
math SDPA backend, which computes attention with ``bmm`` ops the counter does see.
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from krea2_train.model import build_model, model_config
from krea2_train.model.flops import forward_flops, image_tokens_at, training_flops
from krea2_train.model.patchify import position_ids

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


CASES = {
    # name: (preset, overrides, device, batch, text_len, grid_h, grid_w)
    "tiny_gqa2_nonsquare": ("tiny", dict(), "cpu", 2, 7, 4, 5),
    "tiny_gqa4_mha_text": ("tiny", dict(num_key_value_heads=1, text_num_key_value_heads=4, num_layers=3), "cpu", 3, 6, 3, 3),
    "krea2_medium_meta": ("krea2_medium", dict(), "meta", 2, 16, 4, 6),
}


def _inputs(config, device, batch, text_len, grid_h, grid_w, requires_grad=False):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, grid_h * grid_w, config["in_channels"], generator=generator).to(device)
    text = torch.randn(batch, text_len, config["num_text_layers"], config["text_hidden_dim"], generator=generator).to(device)
    latents.requires_grad_(requires_grad)
    text.requires_grad_(requires_grad)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[0, text_len // 2 :] = False  # padding: the kernels still compute the padded positions
    timestep = torch.rand(batch, generator=generator).to(device)
    return latents, text, timestep, position_ids(text_len, grid_h, grid_w).to(device), mask.to(device)


def _counted_flops(model, inputs, backward=False) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        velocity = model(*inputs)
        if backward:
            velocity.square().sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_formula_equals_counted_matmul_flops(case):
    preset, overrides, device, batch, text_len, grid_h, grid_w = CASES[case]
    config = model_config(preset, **overrides)
    model = build_model(preset, device=device, **overrides)
    counted = _counted_flops(model, _inputs(config, device, batch, text_len, grid_h, grid_w))
    assert forward_flops(config, grid_h * grid_w, text_len, batch).total == counted


def test_training_formula_is_three_forwards_less_the_timestep_input_gradient():
    """Backward counts 2x every forward matmul except one input gradient nobody needs.

    The timestep sinusoid does not require grad, so autograd skips the input gradient of
    ``time_embed.linear_1``: ``B x 2 E D`` FLOPs. Model FLOPs keep it (``3x forward``), as usual.
    """
    config = model_config("tiny")
    batch, text_len, grid_h, grid_w = 2, 7, 4, 4
    model = build_model("tiny")
    counted = _counted_flops(model, _inputs(config, "cpu", batch, text_len, grid_h, grid_w, requires_grad=True), backward=True)
    width = config["attention_head_dim"] * config["num_attention_heads"]
    skipped = batch * 2 * config["timestep_embed_dim"] * width
    assert training_flops(config, grid_h * grid_w, text_len, batch) == counted + skipped


def test_block_matmul_flops_per_token_are_twice_the_block_linear_weights():
    """Independent of the counter: a Linear costs 2 FLOPs per weight per token (the 6N rule's basis)."""
    config = model_config("krea2_medium")
    model = build_model("krea2_medium", device="meta")
    block_linear_weights = sum(
        module.weight.numel() for module in model.transformer_blocks.modules() if isinstance(module, torch.nn.Linear)
    )
    flops = forward_flops(config, image_tokens=256, text_tokens=0)
    per_token = (flops.attention_projections + flops.attention_gate + flops.mlp) / 256
    assert per_token == 2 * block_linear_weights


def test_attention_term_grows_with_the_square_of_the_joint_sequence():
    config = model_config("krea2_medium")
    short = forward_flops(config, image_tokens=256, text_tokens=256).attention_scores_values
    long = forward_flops(config, image_tokens=768, text_tokens=256)  # joint sequence 2x
    assert long.attention_scores_values == 4 * short
    model = build_model("krea2_medium", device="meta")
    counted = _counted_flops(model, _inputs(config, "meta", 1, 256, 24, 32))
    assert long.as_dict()["total"] == counted


def test_image_tokens_at_nominal_resolution():
    assert [image_tokens_at(r) for r in (256, 512, 1024)] == [256, 1024, 4096]
    with pytest.raises(ValueError, match="multiple of 16"):
        image_tokens_at(250)


BAD_SIZES = [dict(image_tokens=0, text_tokens=4), dict(image_tokens=4, text_tokens=-1), dict(image_tokens=4, text_tokens=4, batch=0)]


@pytest.mark.parametrize("sizes", BAD_SIZES)
def test_bad_sizes_are_refused(sizes):
    with pytest.raises(ValueError):
        forward_flops(model_config("tiny"), **sizes)
