"""Tiny random conditioning networks for tests and CPU demos. Nothing here downloads anything.

- :func:`build_tiny_tokenizer`: a byte-level BPE tokenizer with Qwen's chat special tokens and
  Qwen2's pre-tokenizer pattern, trained on shapes-world style captions.
- :func:`build_tiny_text_encoder`: that tokenizer plus a randomly initialised Qwen3-VL (text
  hidden size 64, 5 decoder layers, a one-block vision tower) saved to a directory that
  :meth:`krea2_train.conditioning.text.Qwen3VLTextTaps.from_pretrained` loads. Tap it with
  :data:`TINY_TEXT_SELECT_LAYERS` (4 taps of width 64, the tiny DiT preset's text input).
- :func:`build_tiny_qwen_image_vae`: a randomly initialised ``AutoencoderKLQwenImage`` with the
  real layout (f8, 16 latent channels, the released latents mean/std) and very few channels.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import AutoencoderKLQwenImage
    from transformers import PreTrainedTokenizerFast

TINY_TEXT_HIDDEN_SIZE = 64
TINY_TEXT_NUM_LAYERS = 5
TINY_TEXT_SELECT_LAYERS = (2, 3, 4, 5)
TAPS_FILE = "krea2_taps.json"  # a text-encoder directory may name its own tapped layers

PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"

# Qwen2/Qwen3's pre-tokenizer split pattern: runs of newlines become their own pre-token, so a
# prompt that starts with a newline merges with the template's trailing "\n", as with the real
# tokenizer.
QWEN_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "cyan", "brown", "black", "white", "gray")
_SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "ring", "cross")
_RELATIONS = ("above", "below", "left of", "right of", "next to", "inside")
_PLACES = ("in the center", "in the top left corner", "in the top right corner", "in the bottom left corner",
           "in the bottom right corner", "near the top", "near the bottom")
_COUNTS = ("one", "two", "three", "four", "five", "1", "2", "3", "4", "5")
_SIZES = ("small", "large", "tiny", "big")


def shapes_caption_corpus(num_captions: int = 2000, seed: int = 0) -> list[str]:
    """Shapes-world style captions: colours, shape kinds, counts, sizes, relations, backgrounds.

    Every fourth caption has a second paragraph (separated by a blank line) so that the tokenizer
    learns a double-newline token, like Qwen's.
    """
    rng = random.Random(seed)
    captions = []
    for index in range(num_captions):
        colour_a, colour_b, background = rng.sample(_COLOURS, 3)
        shape_a, shape_b = rng.choice(_SHAPES), rng.choice(_SHAPES)
        count = rng.choice(_COUNTS)
        plural = "" if count in ("one", "1") else "s"
        caption = (
            f"{count} {rng.choice(_SIZES)} {colour_a} {shape_a}{plural} {rng.choice(_RELATIONS)} "
            f"a {colour_b} {shape_b} {rng.choice(_PLACES)}, on a {background} background"
        )
        if index % 4 == 0:
            caption += f"\n\nThe {shape_b} is {colour_b} and the background is plain {background}"
        captions.append(caption)
    return captions


def build_tiny_tokenizer(vocab_size: int = 512, seed: int = 0) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on :func:`shapes_caption_corpus`.

    Special tokens: ``<|endoftext|>`` (padding), ``<|im_start|>``, ``<|im_end|>``. No BOS/EOS is
    added, as with Qwen. Any text tokenizes (byte fallback through the byte-level alphabet).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(shapes_caption_corpus(seed=seed), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=PAD_TOKEN,
        eos_token=IM_END_TOKEN,
        additional_special_tokens=[IM_START_TOKEN],
        padding_side="right",
        truncation_side="right",
    )


def tiny_qwen3_vl_config(vocab_size: int, hidden_size: int = TINY_TEXT_HIDDEN_SIZE,
                         num_layers: int = TINY_TEXT_NUM_LAYERS):
    """A ``Qwen3VLConfig`` with a small text model (4 query heads, 2 KV heads, mRoPE) and a
    one-block vision tower."""
    from transformers import Qwen3VLConfig

    num_heads = 4
    head_dim = hidden_size // num_heads
    rotary_pairs = head_dim // 2
    spatial_pairs = rotary_pairs // 4
    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=4096,
        rope_parameters=dict(
            rope_type="default",
            rope_theta=10000.0,
            mrope_section=[rotary_pairs - 2 * spatial_pairs, spatial_pairs, spatial_pairs],
            mrope_interleaved=True,
        ),
    )
    vision_config = dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden_size,
        patch_size=4, num_position_embeddings=16, deepstack_visual_indexes=[0],
    )
    return Qwen3VLConfig(text_config=text_config, vision_config=vision_config)


def build_tiny_text_encoder(out_dir: str | Path, seed: int = 0, num_layers: int = TINY_TEXT_NUM_LAYERS,
                            hidden_size: int = TINY_TEXT_HIDDEN_SIZE) -> Path:
    """Write the tiny tokenizer and a random ``Qwen3VLModel`` to ``out_dir``; return it.

    Deterministic given ``seed``; the global torch RNG state is left untouched.
    """
    from transformers import Qwen3VLModel

    out_dir = Path(out_dir)
    tokenizer = build_tiny_tokenizer(seed=seed)
    config = tiny_qwen3_vl_config(len(tokenizer), hidden_size=hidden_size, num_layers=num_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3VLModel(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    select = [layer for layer in TINY_TEXT_SELECT_LAYERS if layer <= num_layers]
    (out_dir / TAPS_FILE).write_text(json.dumps({"select_layers": select}))
    return out_dir


def build_tiny_qwen_image_vae(seed: int = 0, base_dim: int = 8) -> AutoencoderKLQwenImage:
    """A random ``AutoencoderKLQwenImage``: spatial factor 8, 16 latent channels, the released
    per-channel latents mean/std, ``base_dim`` channels at every level, one residual block each.

    Deterministic given ``seed``; the global torch RNG state is left untouched.
    """
    from diffusers import AutoencoderKLQwenImage

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLQwenImage(
            base_dim=base_dim,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=[False, True, True],
        )
    return vae.eval()
