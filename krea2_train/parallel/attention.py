"""Which SDPA kernels the DiT's attention may use, in priority order.

The DiT's attention is one ``F.scaled_dot_product_attention`` call on the joint text + image
sequence with a key-padding mask (``model.dit.grouped_query_attention``). PyTorch picks a kernel
per call from the backends enabled and their priority: with a mask, flash attention is out on
CUDA, which leaves cuDNN attention and the memory-efficient kernel, whose speed depends on the
GPU, the torch/cuDNN versions and the shapes. ``parallel.attention_backends`` (and ``krea2 bench
train --sdpa``) fixes the list and its order, so the fastest one measured on a machine is the one
used; ``None`` keeps torch's own choice.

The choice is process-wide (torch's SDPA flags are global, so the backward pass follows it) and
is read when a compiled block is traced, so it is set once, around the whole run.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def parse_backends(names: Sequence[str] | str | None) -> list[SDPBackend] | None:
    """``["cudnn", "efficient"]`` or ``"cudnn,efficient"`` -> SDPBackends in that order; None stays None."""
    if names is None:
        return None
    if isinstance(names, str):
        names = [name.strip() for name in names.split(",") if name.strip()]
    if not names:
        raise ValueError(f"attention backends: name at least one of {', '.join(SDPA_BACKENDS)} (or leave it unset)")
    unknown = [name for name in names if name not in SDPA_BACKENDS]
    if unknown:
        raise ValueError(f"unknown attention backend(s) {unknown}; accepted: {', '.join(SDPA_BACKENDS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"attention backends repeat a name: {list(names)}")
    return [SDPA_BACKENDS[name] for name in names]


@contextmanager
def attention_backends(names: Sequence[str] | str | None) -> Iterator[None]:
    """Restrict SDPA to ``names``, tried in that order (no-op for None)."""
    backends = parse_backends(names)
    if backends is None:
        yield
        return
    with sdpa_kernel(backends, set_priority=True):
        yield


def attention_shapes(model_config: dict) -> list[tuple[int, int, int]]:
    """(head dim, query heads, key/value heads) of the DiT's attentions: the joint blocks and the
    text-fusion blocks (which run at the text encoder's width)."""
    text_heads = model_config["text_num_attention_heads"]
    return [
        (model_config["attention_head_dim"], model_config["num_attention_heads"], model_config["num_key_value_heads"]),
        (model_config["text_hidden_dim"] // text_heads, text_heads, model_config["text_num_key_value_heads"]),
    ]


def check_attention_backends(
    names: Sequence[str] | str | None, device: torch.device, dtype: torch.dtype, model_config: dict
) -> None:
    """Raise ValueError before training unless ``names`` run every masked attention of the DiT
    (forward and backward) on ``device`` in ``dtype``."""
    if parse_backends(names) is None:
        return
    from krea2_train.model.dit import grouped_query_attention

    for head_dim, num_heads, num_kv_heads in dict.fromkeys(attention_shapes(model_config)):
        generator = torch.Generator().manual_seed(0)
        make = lambda heads: torch.randn(1, 8, heads, head_dim, generator=generator).to(device, dtype).requires_grad_()  # noqa: E731
        query, key, value = make(num_heads), make(num_kv_heads), make(num_kv_heads)
        mask = torch.tensor([[True] * 6 + [False] * 2], device=device)
        try:
            with warnings.catch_warnings(record=True) as caught, attention_backends(names):
                warnings.simplefilter("always")  # torch says why each kernel declined, as warnings
                grouped_query_attention(query, key, value, mask).sum().backward()
        except RuntimeError as error:
            said = dict.fromkeys(" ".join(str(w.message).split()) for w in caught)
            reason = "; ".join([*said, " ".join(str(error).split())])[:600]
            raise ValueError(
                f"parallel.attention_backends={names}: none of these SDPA kernels runs the DiT's masked attention "
                f"on {device.type} in {dtype} with head dim {head_dim} ({num_heads} query / {num_kv_heads} key-value "
                f"heads); torch says: {reason}. Add 'math' as a last resort, or leave it unset for torch's choice"
            ) from error
