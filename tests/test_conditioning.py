"""Conditioning networks against the reference Krea2Pipeline (diffusers 0.42.1), on tiny random weights."""

from __future__ import annotations

import pytest
import torch

from krea2_train.conditioning.autoencoder import (
    LatentAutoencoder,
    PixelAutoencoder,
    QwenImageAutoencoder,
    build_autoencoder,
)
from krea2_train.conditioning.text import PROMPT_PREFIX, PROMPT_SUFFIX, Qwen3VLTextTaps
from krea2_train.conditioning.tiny import (
    TINY_TEXT_HIDDEN_SIZE,
    TINY_TEXT_SELECT_LAYERS,
    build_tiny_qwen_image_vae,
    build_tiny_text_encoder,
)
from krea2_train.model.patchify import pack_latents, unpack_latents

PROMPTS = [
    "a red circle",
    "three small blue squares above a yellow star in the top left corner, on a white background",
    "two green triangles",
]
LONG_PROMPT = " ".join(["four large purple hexagons left of a cyan ring near the bottom"] * 6)


def reference_pipeline(**components):
    from diffusers import Krea2Pipeline

    defaults = dict(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    return Krea2Pipeline(**{**defaults, **components})


@pytest.fixture(scope="module")
def tiny_text_dir(tmp_path_factory):
    return build_tiny_text_encoder(tmp_path_factory.mktemp("tiny_text_encoder"), seed=0)


@pytest.fixture(scope="module")
def taps(tiny_text_dir):
    return Qwen3VLTextTaps.from_pretrained(tiny_text_dir, select_layers=TINY_TEXT_SELECT_LAYERS, max_sequence_length=24)


@pytest.fixture(scope="module")
def tiny_vae():
    return build_tiny_qwen_image_vae(seed=0)


# ---------------------------------------------------------------- text taps


def test_tiny_text_encoder_is_deterministic_given_seed(tmp_path, tiny_text_dir):
    from transformers import Qwen3VLModel

    same = build_tiny_text_encoder(tmp_path / "same", seed=0)
    other = build_tiny_text_encoder(tmp_path / "other", seed=1)
    assert (same / "tokenizer.json").read_text() == (tiny_text_dir / "tokenizer.json").read_text()
    reference = Qwen3VLModel.from_pretrained(tiny_text_dir).state_dict()
    for directory, expect_equal in ((same, True), (other, False)):
        state = Qwen3VLModel.from_pretrained(directory).state_dict()
        assert all(torch.equal(state[k], reference[k]) for k in reference) == expect_equal


def test_template_token_counts_are_measured_on_the_tokenizer(taps):
    # The tiny tokenizer does not reproduce Qwen's 34/5 counts, so a hard-coded count would fail parity below.
    assert (taps.num_prefix_tokens, taps.num_suffix_tokens) != (34, 5)
    assert taps.prefix_ids == taps.tokenizer(PROMPT_PREFIX)["input_ids"]
    assert taps.suffix_ids == taps.tokenizer(PROMPT_SUFFIX)["input_ids"]


def test_taps_match_krea2_pipeline(taps, tiny_text_dir):
    from transformers import AutoTokenizer, Qwen3VLModel

    pipe = reference_pipeline(
        text_encoder=Qwen3VLModel.from_pretrained(tiny_text_dir).eval(),
        tokenizer=AutoTokenizer.from_pretrained(tiny_text_dir),
        text_encoder_select_layers=TINY_TEXT_SELECT_LAYERS,
    )
    pipe.prompt_template_encode_start_idx = taps.num_prefix_tokens
    pipe.prompt_template_encode_num_suffix_tokens = taps.num_suffix_tokens
    prompts = PROMPTS + [LONG_PROMPT]

    hidden, mask = taps.encode(prompts)
    with torch.no_grad():
        ref_hidden, ref_mask = pipe.get_text_hidden_states(prompts, max_sequence_length=24, device="cpu")

    assert hidden.shape == (4, 24, len(TINY_TEXT_SELECT_LAYERS), TINY_TEXT_HIDDEN_SIZE)
    assert hidden.dtype == torch.float32
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(hidden, ref_hidden, rtol=1e-6, atol=1e-6)
    # Layout: [prompt | padding | suffix]; the long prompt is truncated and fills every slot.
    suffix = taps.num_suffix_tokens
    assert mask[:, -suffix:].all() and mask[3].all()
    short_len = int(mask[0].sum()) - suffix
    assert mask[0, :short_len].all() and not mask[0, short_len:-suffix].any()


def test_real_token_features_do_not_depend_on_padding_length(taps, tiny_text_dir):
    """Positions count only real tokens, so a prompt's features are the same at any padded length."""
    longer = Qwen3VLTextTaps.from_pretrained(tiny_text_dir, select_layers=TINY_TEXT_SELECT_LAYERS, max_sequence_length=40)
    hidden, mask = taps.encode(PROMPTS[:1])
    hidden_long, mask_long = longer.encode(PROMPTS[:1])
    torch.testing.assert_close(hidden[mask], hidden_long[mask_long], rtol=1e-5, atol=1e-5)


def test_taps_are_frozen_and_gradient_free(taps):
    taps.train()
    assert not taps.training and not taps.text_model.training
    assert not any(p.requires_grad for p in taps.parameters())
    hidden, _ = taps.encode(["a red circle"])
    assert not hidden.requires_grad


def test_output_dtype_follows_the_encoder(tiny_text_dir):
    bf16 = Qwen3VLTextTaps.from_pretrained(
        tiny_text_dir, select_layers=TINY_TEXT_SELECT_LAYERS, max_sequence_length=16, dtype=torch.bfloat16
    )
    hidden, _ = bf16.encode(["a red circle"])
    assert bf16.dtype == hidden.dtype == torch.bfloat16


def test_tokenize_then_encode_tokens_equals_encode(taps):
    tokens = taps.tokenize(PROMPTS)
    assert tokens.input_ids.shape == (3, taps.num_prefix_tokens + 24)
    hidden, mask = taps.encode_tokens(tokens)
    ref_hidden, ref_mask = taps.encode(PROMPTS)
    assert torch.equal(hidden, ref_hidden) and torch.equal(mask, ref_mask)


def test_conditioner_compacts_with_the_host_mask_like_the_device_mask(tiny_text_dir):
    """encode_text reads the compacted length from the tokenizer's mask on the host: the same
    states and mask as compacting the encoder's output by its own mask."""
    from krea2_train.conditioning.autoencoder import PixelAutoencoder
    from krea2_train.conditioning.conditioner import Conditioner, compact_text

    taps = Qwen3VLTextTaps.from_pretrained(tiny_text_dir, select_layers=TINY_TEXT_SELECT_LAYERS, max_sequence_length=160)
    prompts = ["a red circle", " a red circle and a blue square on a green background", ""]
    states, mask = Conditioner(PixelAutoencoder(), taps).encode_text(prompts)
    expected_states, expected_mask = compact_text(*taps.encode([p.strip() for p in prompts]))
    assert torch.equal(mask, expected_mask) and torch.equal(states, expected_states)
    # 64 of 160: the host count skips the template prefix, as the device mask does
    assert mask.shape[1] == 64 and len(set(mask.sum(dim=1).tolist())) == 3


def test_prompt_that_changes_the_prefix_tokenization_is_rejected(taps):
    # A leading newline merges with the template's final "\n" (as with Qwen's tokenizer).
    with pytest.raises(ValueError, match="#1: '\\\\nthree"):
        taps.tokenize(["a red circle", "\nthree stars"])


def test_bad_text_configuration_errors(tiny_text_dir):
    from transformers import AutoTokenizer, Qwen3VLModel

    model = Qwen3VLModel.from_pretrained(tiny_text_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_text_dir)
    with pytest.raises(ValueError, match="select_layers"):
        Qwen3VLTextTaps(model, tokenizer, select_layers=(2, 6))
    with pytest.raises(ValueError, match="no room for the prompt"):
        Qwen3VLTextTaps(model, tokenizer, select_layers=(1,), max_sequence_length=len(tokenizer(PROMPT_SUFFIX)["input_ids"]))
    with pytest.raises(TypeError, match="Qwen3-VL"):
        Qwen3VLTextTaps(torch.nn.Linear(2, 2), tokenizer)
    with pytest.raises(TypeError, match="list of strings"):
        Qwen3VLTextTaps(model, tokenizer, select_layers=(1,)).tokenize("a red circle")


# ---------------------------------------------------------------- autoencoders


def test_pixel_autoencoder_round_trip_is_exact():
    ae = PixelAutoencoder()
    images = torch.rand(2, 3, 12, 20, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = ae.encode(images)
    assert isinstance(ae, LatentAutoencoder)
    assert latents.shape == (2, 16, 6, 10)
    assert torch.equal(latents[:, 12:], torch.zeros_like(latents[:, 12:]))
    assert torch.equal(ae.decode(latents), images)
    assert 0.4 < latents[:, :12].std() < 1.5  # about unit scale
    noisy_padding = latents.clone()
    noisy_padding[:, 12:] = torch.randn_like(noisy_padding[:, 12:])
    assert torch.equal(ae.decode(noisy_padding), images)


def test_pixel_autoencoder_bad_input():
    ae = PixelAutoencoder()
    with pytest.raises(ValueError, match="not divisible by the spatial factor 2"):
        ae.encode(torch.zeros(1, 3, 5, 4))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        ae.encode(torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"\[B, 16, h, w\]"):
        ae.decode(torch.zeros(1, 12, 4, 4))


def pipeline_decode(pipe, packed_latents, height, width):
    """Krea2Pipeline.__call__'s decoding lines: unpack, denormalise, VAE decode, drop the frame axis."""
    vae = pipe.vae
    latents = pipe._unpack_latents(packed_latents, height, width).to(vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    return vae.decode(latents / inv_std + mean, return_dict=False)[0][:, :, 0]


def test_qwen_image_decode_matches_pipeline(tiny_vae):
    ae = QwenImageAutoencoder(tiny_vae)
    assert isinstance(ae, LatentAutoencoder) and (ae.latent_channels, ae.spatial_factor) == (16, 8)
    pipe = reference_pipeline(vae=tiny_vae)
    latents = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    packed = pipe._pack_latents(latents, 2, 16, 4, 6)
    with torch.no_grad():
        images = ae.decode(latents)
        reference = pipeline_decode(pipe, packed, 32, 48)
    assert images.shape == (2, 3, 32, 48)
    torch.testing.assert_close(images, reference, rtol=1e-5, atol=1e-5)


def test_qwen_image_encode_normalises_and_packs_like_pipeline(tiny_vae):
    ae = QwenImageAutoencoder(tiny_vae)
    pipe = reference_pipeline(vae=tiny_vae)
    images = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = ae.encode(images)
    with torch.no_grad():
        raw = tiny_vae.encode(images[:, :, None]).latent_dist.mode()[:, :, 0]
    mean = torch.tensor(tiny_vae.config.latents_mean).view(1, 16, 1, 1)
    std = torch.tensor(tiny_vae.config.latents_std).view(1, 16, 1, 1)
    torch.testing.assert_close(latents, (raw - mean) / std)
    # Decoding inverts the normalisation: the pipeline's decode of our packed latents is the VAE's own reconstruction.
    with torch.no_grad():
        reference = tiny_vae.decode(raw[:, :, None], return_dict=False)[0][:, :, 0]
        decoded = pipeline_decode(pipe, pack_latents(latents), 32, 48)
    torch.testing.assert_close(decoded, reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(pack_latents(latents), pipe._pack_latents(latents, 2, 16, 4, 6))


def test_qwen_image_posterior_sampling_uses_generator(tiny_vae):
    mode = QwenImageAutoencoder(tiny_vae)
    sampler = QwenImageAutoencoder(tiny_vae, sample_posterior=True)
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    first = sampler.encode(images, generator=torch.Generator().manual_seed(3))
    again = sampler.encode(images, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert not torch.allclose(first, mode.encode(images))


def test_pack_unpack_match_pipeline_and_round_trip(tiny_vae):
    pipe = reference_pipeline(vae=tiny_vae)
    latents = torch.randn(2, 16, 6, 10)
    tokens = pack_latents(latents)
    assert torch.equal(tokens, pipe._pack_latents(latents, 2, 16, 6, 10))
    assert torch.equal(unpack_latents(tokens, 3, 5), pipe._unpack_latents(tokens, 48, 80)[:, :, 0])
    assert torch.equal(unpack_latents(tokens, 3, 5), latents)


def test_build_autoencoder(tmp_path, tiny_vae):
    assert isinstance(build_autoencoder("pixel"), PixelAutoencoder)
    tiny_vae.save_pretrained(tmp_path / "vae")
    loaded = build_autoencoder("qwen_image", tmp_path, subfolder="vae")
    assert isinstance(loaded, QwenImageAutoencoder)
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(loaded.encode(images), QwenImageAutoencoder(tiny_vae).encode(images))
    with pytest.raises(ValueError, match="unknown autoencoder kind 'flux'"):
        build_autoencoder("flux")
    with pytest.raises(ValueError, match="needs path"):
        build_autoencoder("qwen_image")
    with pytest.raises(ValueError, match="no weights"):
        build_autoencoder("pixel", tmp_path)


def test_text_taps_survive_fsdp_sharding(tmp_path, world_of_one):
    """The trainer shards the frozen text encoder; the taps must not change (transformers records
    hidden states by the root's class, which FSDP2 wrapping would rename)."""
    from krea2_train.parallel.mesh import build_parallel_dims
    from krea2_train.parallel.parallelize import shard_frozen_module

    taps = Qwen3VLTextTaps.from_pretrained(
        build_tiny_text_encoder(tmp_path / "enc"), select_layers=TINY_TEXT_SELECT_LAYERS, max_sequence_length=16
    )
    prompts = ["a red circle", "two blue squares above a green star"]
    expected, expected_mask = taps.encode(prompts)
    shard_frozen_module(taps.text_model, build_parallel_dims(1, -1, 1, 1))
    actual, actual_mask = taps.encode(prompts)
    assert torch.equal(actual, expected) and torch.equal(actual_mask, expected_mask)


def test_compacted_text_gives_the_same_velocity():
    """Real tokens moved to the front and padding cut: the DiT's output is unchanged."""
    from krea2_train.conditioning.conditioner import compact_text
    from krea2_train.model import build_model
    from krea2_train.model.patchify import position_ids

    torch.manual_seed(0)
    model = build_model("tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    # template layout: [prompt | padding | 3-token suffix], 200 tokens, different prompt lengths
    batch, length = 3, 200
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for row, prompt_len in enumerate([5, 70, 1]):
        mask[row, :prompt_len] = True
        mask[row, -3:] = True
    states = torch.randn(batch, length, 4, 64)
    compacted, compact_mask = compact_text(states, mask)
    assert compacted.shape[1] == 128 and torch.equal(compact_mask.sum(1), mask.sum(1))
    assert torch.equal(compacted[1, :73], states[1][mask[1]])  # real tokens first, in order
    latents, t = torch.randn(batch, 16, 64), torch.rand(batch)
    full = model(latents, states, t, position_ids(length, 4, 4), mask)
    short = model(latents, compacted, t, position_ids(128, 4, 4), compact_mask)
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-5 * full.abs().max().item())
