"""Flow matching: shift, inference grid and Euler sampler against diffusers; training-time sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline, Krea2Transformer2DModel
from diffusers.pipelines.krea2.pipeline_krea2 import calculate_shift, retrieve_timesteps

from krea2_train.flow.sampler import SAMPLER_PRESETS, guided_velocity, pad_text, resolve_sampler_settings, sample
from krea2_train.flow.timesteps import (
    TimestepSampling,
    flow_matching_loss,
    inference_sigmas,
    interpolate,
    mu_for_tokens,
    sample_training_times,
    shift_time,
    velocity_target,
)
from krea2_train.model import PRESETS, Krea2DiT

TINY_DIT = PRESETS["tiny"]
GRID_HEIGHT, GRID_WIDTH = 3, 4
PIXELS_PER_TOKEN = 16  # VAE factor 8 x patch 2: the pipeline's height and width per token


def krea2_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The scheduler as the Krea 2 pipeline expects it."""
    return FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        time_shift_type="exponential",
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=6400,
    )


@pytest.fixture(scope="module")
def tiny_transformer() -> Krea2Transformer2DModel:
    torch.manual_seed(0)
    model = Krea2Transformer2DModel(**TINY_DIT).eval()
    # Several tensors start at zero (norm gains, modulation tables): randomise all so every path matters.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.1, generator=generator)
    return model


@pytest.fixture(scope="module")
def tiny_dit(tiny_transformer) -> Krea2DiT:
    """Our DiT with the reference transformer's weights."""
    model = Krea2DiT(**TINY_DIT).eval()
    model.load_state_dict(tiny_transformer.state_dict(), strict=True)
    return model


def text_conditioning(batch: int, length: int, valid: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, length, TINY_DIT["num_text_layers"], TINY_DIT["text_hidden_dim"], generator=generator)
    mask = torch.arange(length)[None, :] < torch.tensor(valid)[:, None]
    return states, mask


# ---------------------------------------------------------------- shift and inference grid


@pytest.mark.parametrize("num_tokens", [16, 256, 1024, 4096, 6400, 16384])
def test_mu_matches_pipeline_calculate_shift(num_tokens):
    config = krea2_scheduler().config
    expected = calculate_shift(
        num_tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
    )
    assert mu_for_tokens(num_tokens) == pytest.approx(expected, abs=1e-12)


def test_mu_endpoints():
    assert mu_for_tokens(256) == pytest.approx(0.5)
    assert mu_for_tokens(6400) == pytest.approx(1.15)


def test_shift_time_formula_and_endpoints():
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    shifted = shift_time(t, 0.8)
    inner = t[1:-1]
    expected = math.exp(0.8) / (math.exp(0.8) + (1 / inner - 1))
    torch.testing.assert_close(shifted[1:-1], expected, rtol=0, atol=1e-15)
    assert shifted[0] == 0 and shifted[-1] == 1
    torch.testing.assert_close(shift_time(t, 0.0), t)  # mu = 0 is the identity
    assert shift_time(0.5, math.log(3.0)).item() == pytest.approx(0.75)


@pytest.mark.parametrize("num_steps", [1, 2, 8, 28, 52])
@pytest.mark.parametrize("num_tokens", [64, 256, 1024, 4096])
@pytest.mark.parametrize("distilled", [False, True])
def test_inference_sigmas_match_diffusers_scheduler(num_steps, num_tokens, distilled):
    mu = 1.15 if distilled else mu_for_tokens(num_tokens)
    scheduler = krea2_scheduler()
    # As Krea2Pipeline.__call__ does: default sigma grid, mu passed to set_timesteps.
    retrieve_timesteps(scheduler, num_steps, sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    sigmas = inference_sigmas(num_steps, mu)
    assert sigmas.shape == (num_steps + 1,) and sigmas.dtype == torch.float32
    assert sigmas[-1] == 0
    torch.testing.assert_close(sigmas, scheduler.sigmas, rtol=0, atol=1e-6)
    torch.testing.assert_close(sigmas[:-1] * 1000, scheduler.timesteps, rtol=0, atol=1e-3)  # 1e-6 in [0, 1] units


def test_inference_sigmas_reject_zero_steps():
    with pytest.raises(ValueError, match="num_steps"):
        inference_sigmas(0, 0.5)


# ---------------------------------------------------------------- presets


def test_presets():
    assert SAMPLER_PRESETS["raw"].num_steps == 52 and SAMPLER_PRESETS["raw"].guidance_scale == 3.5
    raw = resolve_sampler_settings("raw", 4096)
    assert (raw.num_steps, raw.guidance_scale) == (52, 3.5)
    assert raw.mu == pytest.approx(mu_for_tokens(4096))
    assert resolve_sampler_settings("raw", 1024).mu < raw.mu  # resolution-aware
    turbo = resolve_sampler_settings("turbo", 4096)
    assert (turbo.num_steps, turbo.guidance_scale, turbo.mu) == (8, 0.0, 1.15)
    assert resolve_sampler_settings("turbo", 256).mu == 1.15  # fixed
    overridden = resolve_sampler_settings("raw", 4096, num_steps=28, guidance_scale=4.5, mu=0.9)
    assert (overridden.num_steps, overridden.guidance_scale, overridden.mu) == (28, 4.5, 0.9)


def test_presets_reject_bad_input():
    with pytest.raises(ValueError, match="unknown sampler preset 'fast'.*raw.*turbo"):
        resolve_sampler_settings("fast", 1024)
    with pytest.raises(ValueError, match="guidance_scale"):
        resolve_sampler_settings("raw", 1024, guidance_scale=-1.0)
    with pytest.raises(ValueError, match="num_steps"):
        resolve_sampler_settings("turbo", 1024, num_steps=0)


# ---------------------------------------------------------------- Euler sampler vs Krea2Pipeline


def run_pipeline(transformer, noise, states, mask, negative, *, num_steps, guidance_scale, distilled):
    pipe = Krea2Pipeline(
        scheduler=krea2_scheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
        is_distilled=distilled,
    )
    pipe.set_progress_bar_config(disable=True)
    negative_states, negative_mask = negative if negative is not None else (None, None)
    return pipe(
        prompt_embeds=states,
        prompt_embeds_mask=mask,
        negative_prompt_embeds=negative_states,
        negative_prompt_embeds_mask=negative_mask,
        latents=noise,
        height=GRID_HEIGHT * PIXELS_PER_TOKEN,
        width=GRID_WIDTH * PIXELS_PER_TOKEN,
        num_inference_steps=num_steps,
        guidance_scale=guidance_scale,
        output_type="latent",
    ).images


@pytest.mark.parametrize(
    "preset, num_steps, guidance_scale, negative_length",
    [
        ("raw", 6, 3.5, 7),  # CFG, cond and uncond batched into one forward
        ("raw", 5, 2.0, 4),  # CFG, shorter negative: two forwards
        ("raw", 5, 0.0, None),  # no guidance
        ("turbo", 8, 0.0, None),  # fixed mu = 1.15
    ],
)
def test_sampler_matches_krea2_pipeline(tiny_transformer, tiny_dit, preset, num_steps, guidance_scale, negative_length):
    batch = 2
    num_tokens = GRID_HEIGHT * GRID_WIDTH
    noise = torch.randn(batch, num_tokens, TINY_DIT["in_channels"], generator=torch.Generator().manual_seed(2))
    states, mask = text_conditioning(batch, 7, [7, 5], seed=3)
    negative = None if negative_length is None else text_conditioning(batch, negative_length, [3, 2], seed=4)

    # The pipeline needs equal text lengths; a shorter negative is padded there with masked tokens,
    # which (text positions are all zero) leaves the velocity unchanged.
    padded_negative = None if negative is None else pad_text(*negative, length=states.shape[1])
    expected = run_pipeline(
        tiny_transformer, noise, states, mask, padded_negative,
        num_steps=num_steps, guidance_scale=guidance_scale, distilled=preset == "turbo",
    )
    settings = resolve_sampler_settings(preset, num_tokens, num_steps=num_steps, guidance_scale=guidance_scale)
    negative_states, negative_mask = negative if negative is not None else (None, None)
    ours = sample(
        tiny_dit, noise, states, mask, GRID_HEIGHT, GRID_WIDTH,
        num_steps=settings.num_steps, guidance_scale=settings.guidance_scale, mu=settings.mu,
        negative_text_states=negative_states, negative_text_mask=negative_mask,
    )
    assert ours.shape == noise.shape and ours.dtype == noise.dtype
    assert (ours - noise).abs().max() > 0.1  # the model moved the latents
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_guidance_changes_the_sample_and_needs_negative_states(tiny_dit):
    model = tiny_dit
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(1, GRID_HEIGHT * GRID_WIDTH, TINY_DIT["in_channels"], generator=generator)
    states, mask = text_conditioning(1, 6, [6], seed=6)
    negative_states, negative_mask = text_conditioning(1, 6, [2], seed=7)
    common = dict(num_steps=3, mu=0.5, negative_text_states=negative_states, negative_text_mask=negative_mask)
    unguided = sample(model, noise, states, mask, GRID_HEIGHT, GRID_WIDTH, guidance_scale=0.0, **common)
    guided = sample(model, noise, states, mask, GRID_HEIGHT, GRID_WIDTH, guidance_scale=3.0, **common)
    assert (guided - unguided).abs().max() > 1e-3
    with pytest.raises(ValueError, match="negative_text_states"):
        sample(model, noise, states, mask, GRID_HEIGHT, GRID_WIDTH, num_steps=2, guidance_scale=1.0, mu=0.5)


def test_guided_velocity_formula_and_batch_one_negative():
    """v = c + g (c - u), with a batch-1 negative (the empty prompt) broadcast to the batch."""

    def model(*, hidden_states, encoder_hidden_states, timestep, position_ids, encoder_attention_mask):
        assert position_ids.shape == (encoder_hidden_states.shape[1] + hidden_states.shape[1], 3)
        text_summary = (encoder_hidden_states * encoder_attention_mask[:, :, None, None]).sum(dim=(1, 2, 3))
        return hidden_states * timestep[:, None, None] + text_summary[:, None, None]

    latents = torch.randn(3, 4, 2)
    t = torch.tensor(0.25)
    states, mask = torch.randn(3, 5, 2, 3), torch.ones(3, 5, dtype=torch.bool)
    negative_states, negative_mask = torch.randn(1, 5, 2, 3), torch.tensor([[True, True, False, False, False]])
    conditional = latents * 0.25 + states.sum(dim=(1, 2, 3))[:, None, None]
    unconditional = latents * 0.25 + negative_states[:, :2].sum()
    velocity = guided_velocity(
        model, latents, t, states, mask, 2, 2,
        guidance_scale=1.5, negative_text_states=negative_states, negative_text_mask=negative_mask,
    )
    torch.testing.assert_close(velocity, conditional + 1.5 * (conditional - unconditional))


def test_sampler_callback_and_bad_input(tiny_dit):
    model = tiny_dit
    noise = torch.randn(1, GRID_HEIGHT * GRID_WIDTH, TINY_DIT["in_channels"])
    states, mask = text_conditioning(1, 4, [4], seed=8)
    seen = []
    result = sample(
        model, noise, states, mask, GRID_HEIGHT, GRID_WIDTH, num_steps=4, guidance_scale=0.0, mu=1.15,
        callback=lambda step, t, latents: seen.append((step, t, latents.clone())),
    )
    assert [step for step, _, _ in seen] == [0, 1, 2, 3]
    torch.testing.assert_close(torch.tensor([t for _, t, _ in seen]), inference_sigmas(4, 1.15)[1:])
    torch.testing.assert_close(seen[-1][2], result)
    with pytest.raises(ValueError, match="do not form a 4x4 grid"):
        sample(model, noise, states, mask, 4, 4, num_steps=2, guidance_scale=0.0, mu=0.5)
    with pytest.raises(ValueError, match="text_states must be"):
        sample(model, noise, states[:, :, 0], mask, GRID_HEIGHT, GRID_WIDTH, num_steps=2, guidance_scale=0.0, mu=0.5)
    with pytest.raises(ValueError, match="guidance_scale"):
        sample(model, noise, states, mask, GRID_HEIGHT, GRID_WIDTH, num_steps=2, guidance_scale=-1.0, mu=0.5)


# ---------------------------------------------------------------- training-time sampling


def draw(config: TimestepSampling, num_tokens: int = 1024, n: int = 200_000, seed: int = 0) -> torch.Tensor:
    return sample_training_times(n, num_tokens, config, generator=torch.Generator().manual_seed(seed))


def test_unshifted_logit_normal_statistics():
    t = draw(TimestepSampling(shift="none"))
    assert t.dtype == torch.float32 and t.shape == (200_000,)
    assert 0 < t.min() and t.max() < 1
    assert t.median().item() == pytest.approx(0.5, abs=0.005)
    logits = torch.logit(t.double())
    assert logits.std().item() == pytest.approx(1.0, abs=0.01)
    located = draw(TimestepSampling(shift="none", loc=0.7, scale=0.5))
    assert torch.logit(located.double()).median().item() == pytest.approx(0.7, abs=0.01)


def test_shift_moves_mass_toward_noise():
    medians = [draw(TimestepSampling(shift="fixed", mu=mu)).median().item() for mu in (0.0, 0.5, 1.0, 2.0)]
    assert medians == sorted(medians) and medians[-1] > medians[0] + 0.3
    # The median of a shifted distribution is the shifted median: sigmoid(loc) -> shift_time(., mu).
    assert medians[2] == pytest.approx(shift_time(0.5, 1.0).item(), abs=0.005)


def test_resolution_aware_versus_fixed_shift():
    resolution = TimestepSampling(shift="resolution")
    low, high = draw(resolution, num_tokens=256), draw(resolution, num_tokens=4096)
    assert low.median().item() == pytest.approx(shift_time(0.5, 0.5).item(), abs=0.005)
    assert high.median().item() == pytest.approx(shift_time(0.5, mu_for_tokens(4096)).item(), abs=0.005)
    fixed = TimestepSampling(shift="fixed", mu=1.15)
    torch.testing.assert_close(draw(fixed, num_tokens=256), draw(fixed, num_tokens=4096))
    custom = TimestepSampling(shift="resolution", base_shift=1.0, max_shift=3.0)
    assert custom.mu_for(256) == pytest.approx(1.0) and custom.mu_for(6400) == pytest.approx(3.0)


def test_uniform_kind():
    t = draw(TimestepSampling(kind="uniform", shift="none"))
    assert t.mean().item() == pytest.approx(0.5, abs=0.005)
    assert (t < 0.1).float().mean().item() == pytest.approx(0.1, abs=0.005)


def test_training_times_are_seeded():
    config = TimestepSampling()
    torch.testing.assert_close(draw(config, n=64, seed=3), draw(config, n=64, seed=3), rtol=0, atol=0)
    assert not torch.equal(draw(config, n=64, seed=3), draw(config, n=64, seed=4))


def test_timestep_sampling_rejects_bad_config():
    with pytest.raises(ValueError, match="needs a value for mu"):
        TimestepSampling(shift="fixed")
    with pytest.raises(ValueError, match="only used with shift='fixed'"):
        TimestepSampling(shift="resolution", mu=1.0)
    with pytest.raises(ValueError, match="kind"):
        TimestepSampling(kind="cosine")
    with pytest.raises(ValueError, match="shift"):
        TimestepSampling(shift="sd3")
    with pytest.raises(ValueError, match="scale"):
        TimestepSampling(scale=0.0)


# ---------------------------------------------------------------- interpolation, target, loss


def test_interpolation_endpoints_and_velocity():
    generator = torch.Generator().manual_seed(9)
    x0 = torch.randn(3, 5, 4, generator=generator, dtype=torch.float64)
    noise = torch.randn(3, 5, 4, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(interpolate(x0, noise, torch.zeros(3, dtype=torch.float64)), x0)
    torch.testing.assert_close(interpolate(x0, noise, torch.ones(3, dtype=torch.float64)), noise)
    t = torch.tensor([0.1, 0.5, 0.8], dtype=torch.float64, requires_grad=True)
    # v = d x_t / d t, per sample: the Jacobian of x_t in t is block-diagonal with the target on it.
    jacobian = torch.autograd.functional.jacobian(lambda times: interpolate(x0, noise, times), t)
    for i in range(3):
        torch.testing.assert_close(jacobian[i, :, :, i], velocity_target(x0, noise)[i])
    torch.testing.assert_close(velocity_target(x0, noise), noise - x0)


def test_flow_matching_loss_per_sample():
    x0, noise = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    prediction = torch.ones(2, 3, 4)
    prediction[1] += 2.0
    torch.testing.assert_close(flow_matching_loss(prediction, x0, noise), torch.tensor([0.0, 4.0]))
    weighted = flow_matching_loss(prediction, x0, noise, weights=torch.tensor([3.0, 0.5]))
    torch.testing.assert_close(weighted, torch.tensor([0.0, 2.0]))
    assert flow_matching_loss(prediction.bfloat16(), x0, noise).dtype == torch.float32
    with pytest.raises(ValueError, match="weights must have shape"):
        flow_matching_loss(prediction, x0, noise, weights=torch.ones(2, 3))
    with pytest.raises(ValueError, match="pred_velocity"):
        flow_matching_loss(prediction[:, :2], x0, noise)
    with pytest.raises(ValueError, match="one time per sample"):
        interpolate(x0, noise, torch.zeros(3))
