"""Krea2DiT computes the same function as diffusers' Krea2Transformer2DModel, with the same keys."""

import inspect

import pytest
import torch
from diffusers import Krea2Transformer2DModel

from krea2_train.model import Krea2DiT, PRESETS, build_model, count_parameters
from krea2_train.model.dit import DEFAULT_CONFIG
from krea2_train.model.patchify import position_ids
from helpers import randomise_

TINY = PRESETS["tiny"]

CASES = {
    # name: (config overrides, batch, text_len, grid_h, grid_w, mask?)
    "gqa2_masked_square": (dict(), 2, 7, 4, 4, True),
    "gqa2_unmasked_nonsquare": (dict(), 3, 5, 3, 5, False),
    "mha_masked_nonsquare": (dict(num_key_value_heads=4, text_num_key_value_heads=4), 2, 6, 5, 2, True),
    "gqa4_masked_tall": (dict(num_attention_heads=4, num_key_value_heads=1, num_layers=3), 2, 9, 6, 3, True),
}


def _inputs(config, batch, text_len, grid_h, grid_w, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_tokens = grid_h * grid_w
    hidden = torch.randn(batch, num_tokens, config["in_channels"], generator=g)
    text = torch.randn(batch, text_len, config["num_text_layers"], config["text_hidden_dim"], generator=g)
    t = torch.rand(batch, generator=g)
    mask = None
    if masked:
        lengths = torch.randint(1, text_len + 1, (batch,), generator=g)
        lengths[0] = text_len - 2  # at least one sample with padding
        mask = torch.arange(text_len)[None, :] < lengths[:, None]
    return hidden, text, t, position_ids(text_len, grid_h, grid_w), mask




def test_constructor_matches_diffusers_keywords():
    ours = inspect.signature(Krea2DiT.__init__).parameters
    theirs = inspect.signature(Krea2Transformer2DModel.__init__).parameters
    assert [n for n in ours if n != "self"] == [n for n in theirs if n != "self"]
    for name in DEFAULT_CONFIG:
        assert ours[name].default == theirs[name].default or tuple(ours[name].default) == tuple(theirs[name].default)


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradients_match_diffusers(case):
    overrides, batch, text_len, grid_h, grid_w, masked = CASES[case]
    config = dict(TINY, **overrides)
    torch.manual_seed(0)
    reference = Krea2Transformer2DModel(**config).float()
    randomise_(reference, seed=1)
    ours = Krea2DiT(**config)
    ours.load_state_dict(reference.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(reference.state_dict())

    inputs = _inputs(config, batch, text_len, grid_h, grid_w, masked)
    expected = reference(*inputs[:4], encoder_attention_mask=inputs[4], return_dict=False)[0]
    actual = ours(*inputs)
    assert actual.shape == inputs[0].shape
    scale = expected.abs().max()
    assert (actual - expected).abs().max() <= 1e-5 * scale

    # gradients of the same scalar agree, parameter by parameter
    weights = torch.randn_like(expected)
    (expected * weights).sum().backward()
    (actual * weights).sum().backward()
    ref_grads = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        ref_grad = ref_grads[name].grad
        tolerance = 1e-4 * ref_grad.abs().max() + 1e-7
        assert (param.grad - ref_grad).abs().max() <= tolerance, name


def test_text_padding_is_ignored():
    """Changing the states of padded text tokens must not change the output."""
    config = TINY
    model = Krea2DiT(**config)
    randomise_(model, seed=3)
    hidden, text, t, pos, mask = _inputs(config, 2, 8, 4, 4, True)
    out = model(hidden, text, t, pos, mask)
    garbage = torch.where(mask[:, :, None, None], text, torch.randn_like(text) * 10)
    assert torch.allclose(model(hidden, garbage, t, pos, mask), out, atol=1e-6)


def test_fresh_init_predicts_zero_and_has_open_gradients():
    model = build_model("tiny")
    hidden, text, t, pos, mask = _inputs(PRESETS["tiny"], 2, 5, 4, 4, True)
    out = model(hidden, text, t, pos, mask)
    assert torch.count_nonzero(out) == 0
    loss = (model(hidden, text, t, pos, mask) - torch.randn_like(out)).pow(2).mean()
    model.zero_grad()
    loss.backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_presets_sizes():
    assert count_parameters(build_model("tiny")) < 1_000_000
    small = count_parameters(build_model("small", device="meta"))
    assert 0.4e9 < small < 0.6e9
    medium = build_model("krea2_medium", device="meta")
    assert all(p.is_meta for p in medium.parameters())
    # The released model: 28 blocks of ~434M, text fusion ~0.34B, shared modulation ~0.23B.
    assert 12.7e9 < count_parameters(medium) < 12.9e9
    block = count_parameters(medium.transformer_blocks[0])
    assert 430e6 < block < 440e6
    with torch.device("meta"):
        reference = Krea2Transformer2DModel()
    ours_shapes = {k: tuple(v.shape) for k, v in medium.state_dict().items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in reference.state_dict().items()}


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="axes_dims_rope"):
        Krea2DiT(**dict(TINY, axes_dims_rope=(8, 8, 8)))
    with pytest.raises(ValueError, match="unknown model preset"):
        build_model("huge")
    with pytest.raises(ValueError, match="unknown Krea2DiT config keys"):
        build_model("tiny", hidden_size=3)
