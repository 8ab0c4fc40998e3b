"""Qwen3-VL text taps: the DiT's text conditioning, built as the Krea 2 pipeline builds it.

A prompt is wrapped in the Qwen chat template and tokenized as one fixed-length block::

    [ prefix (system prompt, "<|im_start|>user\\n") | prompt | padding | suffix ("<|im_end|>\\n<|im_start|>assistant\\n") ]

The prefix and the prompt are tokenized together, truncated and padded to
``max_sequence_length + prefix_tokens - suffix_tokens``; the separately tokenized suffix is
appended after the padding. Rotary positions count real tokens only (padding takes no position),
the same on the three mRoPE axes. The hidden states at ``select_layers`` (indices into the
encoder's ``hidden_states`` tuple, 0 being the embeddings) are stacked per token and the prefix
positions are dropped, leaving ``max_sequence_length`` tokens.

Reference: ``diffusers.Krea2Pipeline.get_text_hidden_states`` (diffusers 0.42.1). The pipeline
hard-codes 34 prefix and 5 suffix tokens (true of the Qwen3-VL tokenizer); here both counts are
measured on the tokenizer given, so any tokenizer with the chat special tokens works.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from krea2_train.devices import to_device
from krea2_train.errors import MissingPathError, UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_SELECT_LAYERS = (2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35)
DEFAULT_MAX_SEQUENCE_LENGTH = 512

PROMPT_PREFIX = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
)
PROMPT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"


@dataclass(frozen=True)
class TextTokens:
    """A tokenized batch in the fixed-length Krea 2 layout (prefix included).

    Attributes:
        input_ids: ``[B, prefix_tokens + max_sequence_length]`` int64.
        attention_mask: ``[B, prefix_tokens + max_sequence_length]`` bool, False on padding.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device: torch.device | str) -> TextTokens:
        return TextTokens(to_device(self.input_ids, device), to_device(self.attention_mask, device))


def real_token_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Rotary positions that count only real tokens, shared by the 3 mRoPE axes.

    Args:
        attention_mask: ``[B, L]`` bool.
    Returns:
        ``[3, B, L]`` int64; a padding token repeats the position of the last real token before it.
    """
    positions = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
    return positions.unsqueeze(0).expand(3, -1, -1)


def qwen3_vl_language_model(model: nn.Module) -> nn.Module:
    """The ``Qwen3VLTextModel`` inside a Qwen3-VL model (or the model itself if it is one)."""
    from transformers import Qwen3VLTextModel

    if isinstance(model, Qwen3VLTextModel):
        return model
    for candidate in (getattr(model, "language_model", None), getattr(getattr(model, "model", None), "language_model", None)):
        if isinstance(candidate, Qwen3VLTextModel):
            return candidate
    raise TypeError(
        f"expected a Qwen3-VL model (Qwen3VLTextModel, Qwen3VLModel or Qwen3VLForConditionalGeneration), "
        f"got {type(model).__name__}"
    )


def _token_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=True)["input_ids"]


class Qwen3VLTextTaps(nn.Module):
    """Frozen Qwen3-VL text encoder producing stacked per-layer hidden states for the DiT.

    Holds only the language model (the vision tower is not needed for text). Always in eval mode,
    parameters never require grad; :meth:`encode` runs under ``torch.no_grad`` (not inference mode,
    so its outputs can feed a module that is being trained).

    Args:
        model: a ``Qwen3VLTextModel``, ``Qwen3VLModel`` or ``Qwen3VLForConditionalGeneration``.
        tokenizer: its tokenizer; must have a pad token and know ``<|im_start|>``/``<|im_end|>``.
        select_layers: indices into the encoder's ``hidden_states`` tuple (0 = embeddings).
        max_sequence_length: number of text tokens handed to the DiT (prompt + padding + suffix).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        select_layers: tuple[int, ...] | list[int] = DEFAULT_SELECT_LAYERS,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    ):
        super().__init__()
        self.text_model = qwen3_vl_language_model(model)
        self.tokenizer = tokenizer
        self.select_layers = tuple(int(i) for i in select_layers)
        self.max_sequence_length = int(max_sequence_length)

        num_hidden_states = self.text_model.config.num_hidden_layers + 1
        if not self.select_layers or any(i < 0 or i >= num_hidden_states for i in self.select_layers):
            raise ValueError(
                f"select_layers {self.select_layers} must be non-empty indices into the encoder's "
                f"{num_hidden_states} hidden states (0 = embeddings, {num_hidden_states - 1} = last layer)"
            )
        if tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no pad token")
        if tokenizer.truncation_side != "right":
            raise ValueError(f"tokenizer truncates on the {tokenizer.truncation_side!r}; the Krea 2 layout needs 'right'")

        self.prefix_ids = _token_ids(tokenizer, PROMPT_PREFIX)
        self.suffix_ids = _token_ids(tokenizer, PROMPT_SUFFIX)
        if self.max_sequence_length <= self.num_suffix_tokens:
            raise ValueError(
                f"max_sequence_length={self.max_sequence_length} leaves no room for the prompt: the chat "
                f"suffix alone is {self.num_suffix_tokens} tokens"
            )

        self.text_model.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        tokenizer_path: str | Path | None = None,
        select_layers: tuple[int, ...] | list[int] = DEFAULT_SELECT_LAYERS,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Qwen3VLTextTaps:
        """Load a local Qwen3-VL directory (``Qwen3VLModel`` / ``...ForConditionalGeneration``
        checkpoint, or a bare ``Qwen3VLTextModel``) and its tokenizer (``tokenizer_path``, default
        ``path``). Local files only: nothing is downloaded."""
        from transformers import AutoConfig, AutoTokenizer, Qwen3VLModel, Qwen3VLTextModel

        path = Path(path)
        if not path.is_dir():
            raise MissingPathError(f"text encoder directory {path} does not exist")
        model_type = AutoConfig.from_pretrained(path, local_files_only=True).model_type
        model_class = {"qwen3_vl": Qwen3VLModel, "qwen3_vl_text": Qwen3VLTextModel}.get(model_type)
        if model_class is None:
            raise UsageError(f"{path} holds a {model_type!r} model, expected 'qwen3_vl' or 'qwen3_vl_text'")
        model = model_class.from_pretrained(path, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path, local_files_only=True)
        taps = cls(model, tokenizer, select_layers=select_layers, max_sequence_length=max_sequence_length)
        return taps.to(device) if device is not None else taps

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens of the chat-template prefix (34 for the Qwen3-VL tokenizer); dropped from the output."""
        return len(self.prefix_ids)

    @property
    def num_suffix_tokens(self) -> int:
        """Tokens of the chat-template suffix (5 for the Qwen3-VL tokenizer); kept after the padding."""
        return len(self.suffix_ids)

    @property
    def hidden_size(self) -> int:
        return self.text_model.config.hidden_size

    @property
    def num_taps(self) -> int:
        return len(self.select_layers)

    def train(self, mode: bool = True) -> Qwen3VLTextTaps:
        """The encoder is frozen: it stays in eval mode whatever the mode asked for."""
        super().train(False)
        return self

    def tokenize(self, prompts: list[str]) -> TextTokens:
        """Tokenize prompts into the fixed-length layout (CPU; safe in data-loader workers).

        Raises ValueError for a prompt that changes how the template prefix tokenizes (e.g. one
        starting with a newline that merges with the prefix's last token): dropping the prefix would
        otherwise silently cut the wrong tokens.
        """
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a list of strings")
        if not prompts:
            raise ValueError("prompts is empty")
        prompt_block = self.tokenizer(
            [PROMPT_PREFIX + prompt for prompt in prompts],
            truncation=True,
            padding="max_length",
            padding_side="right",
            max_length=self.max_sequence_length + self.num_prefix_tokens - self.num_suffix_tokens,
            return_tensors="pt",
        )
        suffix_block = self.tokenizer([PROMPT_SUFFIX] * len(prompts), return_tensors="pt")
        input_ids = torch.cat([prompt_block["input_ids"], suffix_block["input_ids"]], dim=1)
        attention_mask = torch.cat([prompt_block["attention_mask"], suffix_block["attention_mask"]], dim=1).bool()
        self._check_prefix(prompts, input_ids)
        return TextTokens(input_ids=input_ids, attention_mask=attention_mask)

    def _check_prefix(self, prompts: list[str], input_ids: torch.Tensor) -> None:
        expected = torch.tensor(self.prefix_ids, dtype=input_ids.dtype)
        broken = (input_ids[:, : self.num_prefix_tokens] != expected).any(dim=1).nonzero().flatten().tolist()
        if broken:
            examples = ", ".join(f"#{i}: {prompts[i][:40]!r}" for i in broken[:3])
            raise ValueError(
                f"{len(broken)} prompt(s) change the tokenization of the chat-template prefix ({examples}); "
                f"strip leading whitespace/newlines from captions"
            )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the encoder on tokens from :meth:`tokenize` and tap the selected hidden states.

        Args:
            input_ids: ``[B, P + L]`` (``P`` prefix tokens, ``L = max_sequence_length``).
            attention_mask: ``[B, P + L]`` bool.
        Returns:
            hidden_states ``[B, L, num_taps, hidden_size]`` in the encoder's dtype, and mask ``[B, L]`` bool.
        """
        outputs = self.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=real_token_position_ids(attention_mask),
            output_hidden_states=True,
            use_cache=False,
        )
        taps = torch.stack([outputs.hidden_states[i] for i in self.select_layers], dim=2)
        return self.prompt_part(taps), self.prompt_part(attention_mask)

    def prompt_part(self, per_token: torch.Tensor) -> torch.Tensor:
        """``[B, P + L, ...]`` -> ``[B, L, ...]``: the template prefix dropped, as the DiT sees text."""
        return per_token[:, self.num_prefix_tokens :]

    @torch.no_grad()
    def encode_tokens(self, tokens: TextTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` under ``no_grad`` on the encoder's device (the training-time batch path:
        loader workers call :meth:`tokenize`, the trainer calls this)."""
        tokens = tokens.to(self.device)
        return self(tokens.input_ids, tokens.attention_mask)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> ``(hidden_states [B, L, num_taps, hidden_size], mask [B, L] bool)``, no grad."""
        return self.encode_tokens(self.tokenize(prompts))

    @property
    def device(self) -> torch.device:
        return self.text_model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.get_input_embeddings().weight.dtype

    def extra_repr(self) -> str:
        return (
            f"select_layers={self.select_layers}, max_sequence_length={self.max_sequence_length}, "
            f"prefix_tokens={self.num_prefix_tokens}, suffix_tokens={self.num_suffix_tokens}"
        )
