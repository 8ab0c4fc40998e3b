"""A disk cache of image latents and text-encoder taps, for fine-tuning on small datasets.

On a few hundred images, every epoch re-encodes the same images with the autoencoder and the
same captions with the 4B text encoder; the cache does each once and reads it back after:

- image tokens ``[N, C]`` per (sample id, image height, image width), from the autoencoder;
- text taps per caption string (the empty caption of caption dropout included), stored with
  their real tokens only (``[n, K, T]``: variable length, every tapped layer) and padded again
  per batch. Where padding sits does not change the DiT's output: text tokens all share rotary
  position (0, 0, 0) and padded tokens are masked.

Every entry belongs to one *identity*: the autoencoder and text encoder (kind, path, and the
name, size and modification time of each of their files), the tapped layers, the token limit,
the patch size, the compute dtype, the nominal resolution and the dataset (sample ids are its
row ids). Opening the cache under another
identity empties it, so a changed encoder or resolution never serves stale entries.

Files are written under a temporary name and renamed (:mod:`krea2_train.files`), so ranks that
write the same entry at once, or a process killed mid-write, leave only complete entries. Entries
skip the fsync (there are many, and each can be recomputed): one cut short by a node crash is read
as a miss, recomputed and written again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from krea2_train.devices import compute_precision, to_device
from krea2_train.files import write_text
from krea2_train.model.layouts import CheckpointError, read_safetensors_header, read_tensors, write_safetensors

IDENTITY_FILE = "identity.json"

logger = logging.getLogger(__name__)


def file_fingerprint(path: str | os.PathLike | None) -> list | None:
    """(relative name, size, mtime_ns) of every file under ``path`` (or of ``path`` itself)."""
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        stat = path.stat()
        return [[path.name, stat.st_size, stat.st_mtime_ns]]
    if not path.is_dir():
        return None
    return [
        [str(file.relative_to(path)), file.stat().st_size, file.stat().st_mtime_ns]
        for file in sorted(path.rglob("*"))
        if file.is_file()
    ]


def conditioning_identity(
    *,
    autoencoder: str,
    autoencoder_path: str | None,
    text_encoder: str | os.PathLike,
    text_select_layers: Sequence[int] | None,
    max_text_tokens: int,
    patch_size: int,
    resolution: int,
    dtype: str,
    dataset: str,
) -> dict[str, Any]:
    """What the cached tensors depend on (JSON-serialisable)."""
    return {
        "dataset": dataset,
        "autoencoder": autoencoder,
        "autoencoder_path": str(autoencoder_path) if autoencoder_path else None,
        "autoencoder_files": file_fingerprint(autoencoder_path),
        "text_encoder": str(Path(text_encoder).resolve()),
        "text_encoder_files": file_fingerprint(text_encoder),
        "text_select_layers": list(text_select_layers) if text_select_layers else None,
        "max_text_tokens": max_text_tokens,
        "patch_size": patch_size,
        "resolution": resolution,
        "dtype": dtype,
    }


def _read_entry(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """An entry's tensors and metadata; None when it is absent or unreadable (cut short by a crash),
    so the caller recomputes and rewrites it."""
    if not path.is_file():
        return None
    try:
        stored, metadata = read_safetensors_header(path)
        return dict(read_tensors(stored)), metadata
    except CheckpointError as error:
        logger.warning("conditioning cache: recomputing an unreadable entry: %s", error)
        return None


def caption_key(caption: str) -> str:
    return hashlib.sha256(caption.encode()).hexdigest()[:40]


def pad_text_states(states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Real-token taps ``[n_i, K, T]`` -> (states ``[B, L, K, T]`` zero-padded at the end, mask ``[B, L]``),
    with ``L`` the length :meth:`Conditioner.encode_text` gives the same batch."""
    from krea2_train.conditioning.conditioner import text_length

    length = text_length(max(state.shape[0] for state in states))
    batch = torch.zeros(len(states), length, *states[0].shape[1:], dtype=states[0].dtype)
    mask = torch.zeros(len(states), length, dtype=torch.bool)
    for row, state in enumerate(states):
        batch[row, : state.shape[0]] = state
        mask[row, : state.shape[0]] = True
    return batch, mask


class ConditioningCache:
    """Image tokens and text taps on disk under one identity (see the module docstring).

    Args:
        directory: where entries live (``latents/``, ``text/``, ``identity.json``).
        identity: a :func:`conditioning_identity`, or a callable giving it on first use (the
            text encoder of a run may not exist yet when the stage is built).
    """

    def __init__(self, directory: str | os.PathLike, identity: Mapping[str, Any] | Callable[[], Mapping[str, Any]]) -> None:
        self.directory = Path(directory)
        self._identity = identity
        self._opened = False
        self.hits = 0
        self.misses = 0
        # Set when the text encoder's forward is collective (FSDP-sharded over the ranks): given
        # whether this rank misses, whether any rank does (parallel.distributed.any_rank_on_host).
        self.any_rank_misses: Callable[[bool], bool] | None = None

    @classmethod
    def for_run(cls, config) -> ConditioningCache:
        """The cache of a run (``conditioning_cache.directory`` or ``run_dir/conditioning_cache``)."""
        run_dir = Path(config.runs_root) / config.run_name
        cond = config.conditioning
        text_encoder = run_dir / "text_encoder" if cond.text_encoder == "tiny" else Path(cond.text_encoder)
        dtype = compute_precision(config.parallel.mixed_precision)
        identity = lambda: conditioning_identity(  # noqa: E731
            autoencoder=cond.autoencoder,
            autoencoder_path=cond.autoencoder_path,
            text_encoder=text_encoder,
            text_select_layers=cond.text_select_layers,
            max_text_tokens=cond.max_text_tokens,
            patch_size=cond.patch_size,
            resolution=config.data.resolution,
            dtype=dtype,
            dataset=f"{config.data.source}:{config.data.dataset}",
        )
        return cls(config.conditioning_cache.directory or run_dir / "conditioning_cache", identity)

    # -- identity -------------------------------------------------------------------------------

    def open(self) -> None:
        """Check the stored identity; under another one, drop every entry (invalidation)."""
        if self._opened:
            return
        identity = dict(self._identity() if callable(self._identity) else self._identity)
        encoded = json.dumps(identity, sort_keys=True)
        identity_path = self.directory / IDENTITY_FILE
        stored = identity_path.read_text() if identity_path.is_file() else None
        if stored != encoded:
            for name in ("latents", "text"):
                shutil.rmtree(self.directory / name, ignore_errors=True)
            self.directory.mkdir(parents=True, exist_ok=True)
            write_text(identity_path, encoded)
        (self.directory / "latents").mkdir(exist_ok=True)
        (self.directory / "text").mkdir(exist_ok=True)
        self._opened = True

    def __len__(self) -> int:
        self.open()
        return sum(1 for _ in (self.directory / "latents").glob("*.safetensors")) + sum(
            1 for _ in (self.directory / "text").glob("*.safetensors")
        )

    # -- entries --------------------------------------------------------------------------------

    def image_tokens(
        self, sample_ids: Sequence[Any], images: torch.Tensor, encode: Callable[[torch.Tensor], tuple[torch.Tensor, Any]]
    ) -> tuple[torch.Tensor, Any]:
        """Tokens ``[B, N, C]`` and grid of ``images [B, 3, H, W]``; ``encode`` runs on the misses only.

        ``encode`` is :meth:`Conditioner.encode_images` (images -> (tokens, grid)).
        """
        self.open()
        height, width = images.shape[-2:]
        paths = [self.directory / "latents" / f"{int(sample_id)}-{height}x{width}.safetensors" for sample_id in sample_ids]
        entries = [_read_entry(path) for path in paths]
        missing = [row for row, entry in enumerate(entries) if entry is None]
        tokens: list[torch.Tensor | None] = [None if entry is None else entry[0]["tokens"] for entry in entries]
        grid = None
        if missing:
            encoded, grid = encode(images[missing])
            for row, sample_tokens in zip(missing, encoded):
                tokens[row] = sample_tokens
                write_safetensors(paths[row], {"tokens": sample_tokens}, {"grid": json.dumps([grid.height, grid.width])}, durable=False)
        else:
            grid = _grid(json.loads(entries[0][1]["grid"]))
        self.hits += len(paths) - len(missing)
        self.misses += len(missing)
        return torch.stack([t.to(images.device) for t in tokens]), grid

    def text_states(
        self, captions: Sequence[str], encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Taps ``[B, L, K, T]`` and mask ``[B, L]`` of ``captions``; ``encode`` runs on the misses only.

        With a collective encoder (``any_rank_misses`` set) every rank runs it when any rank
        misses: a rank without misses encodes its first caption and drops the result, so the
        sharded layers' all-gathers match on every rank.
        """
        self.open()
        paths = [self.directory / "text" / f"{caption_key(caption)}.safetensors" for caption in captions]
        entries = [_read_entry(path) for path in paths]
        missing = [row for row, entry in enumerate(entries) if entry is None]
        states: list[torch.Tensor | None] = [None if entry is None else entry[0]["states"] for entry in entries]
        collective = self.any_rank_misses is not None and self.any_rank_misses(bool(missing))
        if missing or collective:
            encoded, mask = encode([captions[row] for row in missing or [0]])
            for row, sample_states, sample_mask in zip(missing, encoded, mask):
                real = sample_states[sample_mask.to(sample_states.device)].cpu()  # [n, K, T]
                states[row] = real
                write_safetensors(paths[row], {"states": real}, durable=False)
        self.hits += len(paths) - len(missing)
        self.misses += len(missing)
        padded, mask = pad_text_states(states)
        return to_device(padded, device), to_device(mask, device)


def _grid(height_width: Sequence[int]):
    from krea2_train.conditioning.conditioner import TokenGrid

    return TokenGrid(*height_width)
