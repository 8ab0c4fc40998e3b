"""Checkpoint layouts of the Krea 2 DiT: diffusers and original (krea / ComfyUI).

Two layouts hold the same tensors under different names:

- diffusers: a directory with ``config.json`` and ``diffusion_pytorch_model.safetensors``, or
  shards ``diffusion_pytorch_model-0000i-of-0000n.safetensors`` listed in
  ``diffusion_pytorch_model.safetensors.index.json``; keys are those of
  ``diffusers.Krea2Transformer2DModel`` (and of :class:`Krea2DiT`).
- original: one safetensors file with the names of the released Krea 2 code (``first.``,
  ``blocks.N.attn.wq`` ...), optionally under a ``model.diffusion_model.`` or ``diffusion_model.``
  prefix. Each block's modulation table ``mod.lin`` is stored flat (``6 * D``); the final layer's
  ``last.modulation.lin`` keeps its ``(2, D)`` shape (diffusers' converter does not reshape it).
  Files written here record the model config as JSON in the safetensors metadata.

Everything streams, tensor by tensor: writing never holds a second copy of the weights (only the
tensor being converted), and :func:`load_model` reads each tensor straight from the file into the
memory it will keep, on a model built on the meta device, so loading peaks at about 1x the model
size. Plain reads are used rather than a memory map: touched pages of a mapping count as resident
memory until it closes, which would double the peak.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Literal, NamedTuple

import torch

from krea2_train.errors import Krea2Error, MissingPathError
from krea2_train.files import published, write_text
from krea2_train.model.dit import AUXILIARY_PREFIX, DEFAULT_CONFIG, Krea2DiT, ZeroCenteredRMSNorm
from krea2_train.model.presets import build_model

DIFFUSERS_CLASS_NAME = "Krea2Transformer2DModel"
DIFFUSERS_CONFIG_NAME = "config.json"
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
CONFIG_METADATA_KEY = "krea2_config"


class CheckpointError(Krea2Error, ValueError):
    """A checkpoint that cannot be read as a Krea 2 DiT: corrupt, foreign or mismatched."""


# ----------------------------------------------------------------------------------------------
# Key maps
# ----------------------------------------------------------------------------------------------

# (original, diffusers) name prefixes of the top-level modules; entries without a trailing dot
# are whole parameter names.
_TOP_LEVEL_RENAMES = (
    ("first.", "img_in."),
    ("tmlp.0.", "time_embed.linear_1."),
    ("tmlp.2.", "time_embed.linear_2."),
    ("tproj.1.", "time_mod_proj."),
    ("txtmlp.0.scale", "txt_in.norm.weight"),
    ("txtmlp.1.", "txt_in.linear_1."),
    ("txtmlp.3.", "txt_in.linear_2."),
    ("txtfusion.", "text_fusion."),
    ("blocks.", "transformer_blocks."),
    ("last.linear.", "final_layer.linear."),
    ("last.norm.scale", "final_layer.norm.weight"),
    ("last.modulation.lin", "final_layer.scale_shift_table"),
)
# (original, diffusers) names inside transformer blocks and text-fusion blocks.
_BLOCK_RENAMES = (
    (".attn.wq.", ".attn.to_q."),
    (".attn.wk.", ".attn.to_k."),
    (".attn.wv.", ".attn.to_v."),
    (".attn.wo.", ".attn.to_out.0."),
    (".attn.gate.", ".attn.to_gate."),
    (".attn.qknorm.qnorm.scale", ".attn.norm_q.weight"),
    (".attn.qknorm.knorm.scale", ".attn.norm_k.weight"),
    (".mlp.", ".ff."),
    (".prenorm.scale", ".norm1.weight"),
    (".postnorm.scale", ".norm2.weight"),
    (".mod.lin", ".scale_shift_table"),
)
_BLOCK_MODULATION = re.compile(r"transformer_blocks\.\d+\.scale_shift_table")
_MODULATION_ROWS = 6


def _rename(key: str, source: int) -> str | None:
    """Rename ``key`` from side ``source`` (0 original, 1 diffusers) of the tables; None if unknown."""
    target = 1 - source
    for pair in _TOP_LEVEL_RENAMES:
        if key.startswith(pair[source]):
            rest = key[len(pair[source]) :]
            for block_pair in _BLOCK_RENAMES:
                rest = rest.replace(block_pair[source], block_pair[target])
            return pair[target] + rest
    return None


def diffusers_to_original_key(key: str) -> str:
    """``transformer_blocks.3.attn.to_q.weight`` -> ``blocks.3.attn.wq.weight`` (no prefix)."""
    renamed = _rename(key, source=1)
    if renamed is None:
        raise CheckpointError(f"{key!r} is not a Krea 2 DiT parameter name in the diffusers layout")
    return renamed


def original_to_diffusers_key(key: str) -> str:
    """``blocks.3.attn.wq.weight`` (prefix already removed) -> ``transformer_blocks.3.attn.to_q.weight``."""
    renamed = _rename(key, source=0)
    if renamed is None:
        raise CheckpointError(f"{key!r} is not a Krea 2 DiT parameter name in the original layout")
    return renamed


def original_shape(diffusers_key: str, shape: Sequence[int]) -> tuple[int, ...]:
    """Shape a diffusers tensor is stored with in the original layout (block tables flattened)."""
    if _BLOCK_MODULATION.fullmatch(diffusers_key) and len(shape) == 2:
        return (shape[0] * shape[1],)
    return tuple(shape)


def diffusers_shape(diffusers_key: str, stored_shape: Sequence[int]) -> tuple[int, ...]:
    """Shape of an original-layout tensor once in the diffusers layout (block tables ``(6, D)``)."""
    flat = _BLOCK_MODULATION.fullmatch(diffusers_key) and len(stored_shape) == 1
    if flat and stored_shape[0] % _MODULATION_ROWS == 0:
        return (_MODULATION_ROWS, stored_shape[0] // _MODULATION_ROWS)
    return tuple(stored_shape)


def diffusers_to_original(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Rename and reshape a diffusers-keyed state dict into the original layout (views, no copies)."""
    return {
        prefix + diffusers_to_original_key(key): tensor.reshape(original_shape(key, tensor.shape))
        for key, tensor in state_dict.items()
    }


def original_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and reshape an original-layout state dict (any known prefix) into the diffusers layout.

    Keys outside the detected prefix (other models bundled in the same file) are left out.
    """
    layout = detect_layout(state_dict.keys())
    if layout.kind != "original":
        raise CheckpointError("this state dict is already in the diffusers layout")
    converted = {}
    for key, tensor in state_dict.items():
        if key.startswith(layout.prefix):
            new_key = original_to_diffusers_key(key[len(layout.prefix) :])
            converted[new_key] = tensor.reshape(diffusers_shape(new_key, tensor.shape))
    return converted


# ----------------------------------------------------------------------------------------------
# Layout detection
# ----------------------------------------------------------------------------------------------


class Layout(NamedTuple):
    kind: Literal["diffusers", "original"]
    prefix: str  # what every key of the DiT starts with; "" for diffusers


_DIFFUSERS_MARKERS = ("img_in.weight", "text_fusion.projector.weight")
_ORIGINAL_MARKERS = ("first.weight", "txtfusion.projector.weight")


def detect_layout(keys: Iterable[str]) -> Layout:
    """Tell the layout of a Krea 2 DiT state dict from its keys, or raise :class:`CheckpointError`."""
    keys = list(keys)
    present = set(keys)
    if all(marker in present for marker in _DIFFUSERS_MARKERS):
        return Layout("diffusers", "")
    for prefix in ORIGINAL_PREFIXES:
        if all(prefix + marker in present for marker in _ORIGINAL_MARKERS):
            return Layout("original", prefix)
    examples = ", ".join(repr(key) for key in sorted(keys)[:4]) or "none"
    raise CheckpointError(
        "not a Krea 2 DiT checkpoint (another model architecture?): expected the keys "
        f"{' and '.join(map(repr, _DIFFUSERS_MARKERS))} (diffusers layout) or "
        f"{' and '.join(map(repr, _ORIGINAL_MARKERS))} with an optional "
        f"{' or '.join(repr(p) for p in ORIGINAL_PREFIXES if p)} prefix (original layout); "
        f"found {len(keys)} keys: {examples}{' ...' if len(keys) > 4 else ''}"
    )


# ----------------------------------------------------------------------------------------------
# safetensors files, read and written one tensor at a time
# ----------------------------------------------------------------------------------------------

_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
_HEADER_ALIGNMENT = 8


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file."""

    file: Path
    name: str  # the key in the file
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _not_safetensors(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"{path} is truncated or not a safetensors file ({reason})")


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """Index a safetensors file without reading its tensors.

    Returns:
        (tensors by key in file order, the ``__metadata__`` strings).
    """
    path = Path(path)
    file_size = path.stat().st_size
    with open(path, "rb") as file:
        length_bytes = file.read(8)
        if len(length_bytes) < 8:
            raise _not_safetensors(path, f"{file_size} bytes, shorter than the 8-byte header length")
        (header_size,) = struct.unpack("<Q", length_bytes)
        if header_size > file_size - 8:
            raise _not_safetensors(path, f"header of {header_size} bytes announced, file has {file_size}")
        try:
            header = json.loads(file.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise _not_safetensors(path, f"header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise _not_safetensors(path, "header is not a JSON object")
    data_start = 8 + header_size
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, entry in header.items():
        if isinstance(entry, dict) and entry.get("dtype") not in (*_DTYPES_BY_NAME, None):
            raise CheckpointError(f"{path}: {name!r} has dtype {entry['dtype']}, which this reader does not support")
        try:
            dtype = _DTYPES_BY_NAME[entry["dtype"]]
            shape = tuple(int(size) for size in entry["shape"])
            begin, end = (int(offset) for offset in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _not_safetensors(path, f"bad header entry for {name!r}: {entry!r}") from None
        stored = StoredTensor(path, name, dtype, shape, data_start + begin)
        if end - begin != stored.nbytes:
            raise _not_safetensors(path, f"{name!r} spans {end - begin} bytes, its shape needs {stored.nbytes}")
        if data_start + end > file_size:
            raise _not_safetensors(path, f"{name!r} ends at byte {data_start + end}, the file has {file_size}")
        tensors[name] = stored
    return tensors, metadata


def read_tensors(stored: Mapping[str, StoredTensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, CPU tensor)`` pairs, each read straight into freshly allocated memory,
    file by file in on-disk order."""
    by_file: dict[Path, list[tuple[str, StoredTensor]]] = {}
    for key, entry in stored.items():
        by_file.setdefault(entry.file, []).append((key, entry))
    for path, entries in by_file.items():
        with open(path, "rb", buffering=0) as file:
            for key, entry in sorted(entries, key=lambda item: item[1].offset):
                tensor = torch.empty(entry.shape, dtype=entry.dtype)
                buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
                file.seek(entry.offset)
                while buffer:
                    count = file.readinto(buffer)
                    if not count:
                        raise _not_safetensors(path, f"unexpected end of file inside {entry.name!r}")
                    buffer = buffer[count:]
                yield key, tensor


def _stored_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def _stored_nbytes(tensor: torch.Tensor, dtype: torch.dtype | None) -> int:
    return tensor.numel() * _stored_dtype(tensor, dtype).itemsize


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
    *,
    durable: bool = True,
) -> Path:
    """Write a safetensors file tensor by tensor (extra memory: one converted tensor).

    Tensors may live on any device; floating tensors are cast to ``dtype`` when given. The file
    is published atomically, and fsynced when ``durable`` (:func:`krea2_train.files.published`).
    """
    path = Path(path)
    # Widest dtypes first, so every tensor starts at an offset aligned to its element size.
    names = sorted(tensors, key=lambda name: -_stored_dtype(tensors[name], dtype).itemsize)
    header: dict[str, object] = {}
    offset = 0
    for name in names:
        tensor = tensors[name]
        stored_dtype = _stored_dtype(tensor, dtype)
        if stored_dtype not in _DTYPE_NAMES:
            raise CheckpointError(f"cannot store {name!r}: dtype {stored_dtype} has no safetensors name")
        nbytes = _stored_nbytes(tensor, dtype)
        header[name] = {
            "dtype": _DTYPE_NAMES[stored_dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header["__metadata__"] = dict(metadata or {})
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % _HEADER_ALIGNMENT)
    with published(path, durable=durable) as partial, open(partial, "wb") as file:
        file.write(struct.pack("<Q", len(header_bytes)))
        file.write(header_bytes)
        for name in names:
            tensor = tensors[name].detach().to(device="cpu", dtype=_stored_dtype(tensors[name], dtype))
            file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return path


# ----------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------

_SIZE_UNITS = {
    **{"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12},
    **{"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40},
}


def parse_size(size: int | str) -> int:
    """``"10GB"`` -> 10**9 * 10 bytes (KB/MB/GB decimal, KiB/MiB/GiB binary); ints pass through."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", size)
    if match is None or match.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"cannot read {size!r} as a size; use bytes or e.g. '10GB', '500MiB'")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def _json_config(config: Mapping) -> dict:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}


def _plan_shards(
    state_dict: Mapping[str, torch.Tensor], max_shard_bytes: int, dtype: torch.dtype | None
) -> list[list[str]]:
    """Group keys, in order, into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for key, tensor in state_dict.items():
        nbytes = _stored_nbytes(tensor, dtype)
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(key)
        shard_bytes += nbytes
    return shards


def _remove_stale_weights(directory: Path, keep: Iterable[Path]) -> None:
    """Delete weight files of an earlier save that the latest one did not write."""
    pattern = re.compile(r"diffusion_pytorch_model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")
    kept_names = {path.name for path in keep}
    for path in directory.iterdir():
        if path.is_file() and pattern.fullmatch(path.name) and path.name not in kept_names:
            path.unlink()


def save_diffusers(
    state_dict: Mapping[str, torch.Tensor],
    directory: str | os.PathLike,
    config: Mapping,
    *,
    max_shard_size: int | str = "10GB",
    dtype: torch.dtype | None = None,
) -> list[Path]:
    """Write a diffusers ``Krea2Transformer2DModel`` directory, shard by shard.

    Args:
        state_dict: diffusers-keyed full (unsharded) tensors, e.g. ``model.state_dict()``, on any device.
        config: the model's constructor keywords (``model.config``).
        max_shard_size: bytes or a string like ``"5GB"``; one file when everything fits.
        dtype: cast floating tensors to this dtype on the way out.
    Returns:
        the weight files written.
    """
    if detect_layout(state_dict.keys()).kind != "diffusers":
        raise CheckpointError("save_diffusers needs a diffusers-keyed state dict, got the original layout")
    check_fits_config(state_dict, config, f"save_diffusers to {directory}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt"}
    shards = _plan_shards(state_dict, parse_size(max_shard_size), dtype)
    if len(shards) == 1:
        files = [write_safetensors(directory / DIFFUSERS_WEIGHTS_NAME, state_dict, metadata, dtype)]
    else:
        files, weight_map = [], {}
        for number, keys in enumerate(shards, start=1):
            name = f"diffusion_pytorch_model-{number:05d}-of-{len(shards):05d}.safetensors"
            files.append(write_safetensors(directory / name, {key: state_dict[key] for key in keys}, metadata, dtype))
            weight_map.update({key: name for key in keys})
        total_bytes = sum(_stored_nbytes(tensor, dtype) for tensor in state_dict.values())
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        write_text(directory / DIFFUSERS_INDEX_NAME, json.dumps(index, indent=2) + "\n")
    index_files = [directory / DIFFUSERS_INDEX_NAME] if len(shards) > 1 else []
    _remove_stale_weights(directory, keep=[*files, *index_files])
    diffusers_config = {
        "_class_name": DIFFUSERS_CLASS_NAME,
        "_diffusers_version": version("diffusers"),
        **_json_config(config),
    }
    write_text(directory / DIFFUSERS_CONFIG_NAME, json.dumps(diffusers_config, indent=2, sort_keys=True) + "\n")
    return files


def save_original(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    config: Mapping | None = None,
    *,
    prefix: str = "model.diffusion_model.",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write one safetensors file in the original krea layout (what ComfyUI and
    ``Krea2Transformer2DModel.from_single_file`` read); ``config`` goes into its metadata."""
    if detect_layout(state_dict.keys()).kind != "diffusers":
        raise CheckpointError("save_original needs a diffusers-keyed state dict, got the original layout")
    metadata = {"format": "pt"}
    if config is not None:
        check_fits_config(state_dict, config, f"save_original to {path}")
        metadata[CONFIG_METADATA_KEY] = json.dumps(_json_config(config), sort_keys=True)
    return write_safetensors(path, diffusers_to_original(state_dict, prefix), metadata, dtype)


def save_model(
    model: Krea2DiT, path: str | os.PathLike, *, layout: Literal["diffusers", "original"] = "diffusers", **options
) -> list[Path] | Path:
    """Write ``model`` in ``layout``; ``options`` go to :func:`save_diffusers` or :func:`save_original`.

    Training-only modules (``model.auxiliary``) are left out; a model with LoRA layers injected
    is refused (bake the LoRA, or write it with ``krea2_train.model.lora_formats``).
    """
    state_dict = {key: value for key, value in model.state_dict().items() if not key.startswith(AUXILIARY_PREFIX)}
    if layout == "diffusers":
        return save_diffusers(state_dict, path, model.config, **options)
    if layout == "original":
        return save_original(state_dict, path, model.config, **options)
    raise ValueError(f"unknown checkpoint layout {layout!r}; expected 'diffusers' or 'original'")


# ----------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointIndex:
    """Where each tensor of a Krea 2 DiT checkpoint lies, under its diffusers name."""

    source: Path  # the file or directory indexed
    layout: Layout
    tensors: dict[str, StoredTensor]  # diffusers key -> stored tensor
    shapes: dict[str, tuple[int, ...]]  # diffusers key -> shape in the diffusers layout
    unknown_keys: list[str]  # stored keys (within the layout's prefix) with no diffusers name
    config: dict | None  # Krea2DiT keywords when the checkpoint records them

    def model_config(self) -> dict:
        """The Krea2DiT keywords: recorded, else inferred from the shapes (:func:`infer_config`)."""
        return self.config if self.config is not None else infer_config(self.shapes)


def _config_from_json(values: Mapping) -> dict:
    """Drop diffusers' bookkeeping (``_class_name`` ...) and turn JSON lists back into tuples."""
    return {
        key: tuple(value) if isinstance(value, list) else value
        for key, value in values.items()
        if not key.startswith("_")
    }


def _diffusers_directory(path: Path) -> Path:
    """The model directory itself, or the ``transformer/`` folder of a diffusers pipeline."""
    if not (path / DIFFUSERS_CONFIG_NAME).is_file() and (path / "transformer" / DIFFUSERS_CONFIG_NAME).is_file():
        return path / "transformer"
    return path


def read_checkpoint_json(path: Path, *required: str) -> dict:
    """A checkpoint's JSON file (a config, an index) as a dict holding ``required`` keys.

    Raises:
        CheckpointError: the file is not valid JSON (truncated, say) or lacks a required key.
    """
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON (truncated or corrupt?): {error}") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} holds a JSON {type(values).__name__}, not an object")
    missing = [key for key in required if key not in values]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}")
    return values


def _read_diffusers_config(directory: Path) -> dict | None:
    config_path = directory / DIFFUSERS_CONFIG_NAME
    if not config_path.is_file():
        return None
    values = read_checkpoint_json(config_path)
    class_name = values.get("_class_name", DIFFUSERS_CLASS_NAME)
    if class_name != DIFFUSERS_CLASS_NAME:
        raise CheckpointError(
            f"{config_path} describes a {class_name}, not a {DIFFUSERS_CLASS_NAME} (another model architecture)"
        )
    return _config_from_json(values)


def _stored_tensors_of_directory(directory: Path) -> dict[str, StoredTensor]:
    index_path = directory / DIFFUSERS_INDEX_NAME
    if index_path.is_file():
        weight_map: dict[str, str] = read_checkpoint_json(index_path, "weight_map")["weight_map"]
        stored = {}
        for file_name in sorted(set(weight_map.values())):
            shard_path = directory / file_name
            if not shard_path.is_file():
                raise CheckpointError(f"{index_path} lists {file_name}, which is missing from {directory}")
            stored.update(read_safetensors_header(shard_path)[0])
        listed_elsewhere = [
            key for key, file_name in weight_map.items() if key not in stored or stored[key].file.name != file_name
        ]
        if listed_elsewhere:
            raise CheckpointError(f"{index_path} does not match its shards, e.g. for {listed_elsewhere[:3]}")
        return stored
    single_path = directory / DIFFUSERS_WEIGHTS_NAME
    if single_path.is_file():
        return read_safetensors_header(single_path)[0]
    raise CheckpointError(
        f"{directory} holds no diffusers weights: expected {DIFFUSERS_WEIGHTS_NAME} or {DIFFUSERS_INDEX_NAME}"
    )


def index_checkpoint(path: str | os.PathLike) -> CheckpointIndex:
    """Index a diffusers directory (sharded or not, or a pipeline with ``transformer/``) or a
    single safetensors file in either layout, without reading tensor data."""
    path = Path(path)
    if path.is_dir():
        directory = _diffusers_directory(path)
        config = _read_diffusers_config(directory)
        stored = _stored_tensors_of_directory(directory)
    elif path.is_file():
        stored, metadata = read_safetensors_header(path)
        recorded = metadata.get(CONFIG_METADATA_KEY)
        config = _config_from_json(json.loads(recorded)) if recorded is not None else None
    else:
        raise MissingPathError(f"no checkpoint at {path}")
    try:
        layout = detect_layout(stored)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    if layout.kind == "diffusers":
        return CheckpointIndex(path, layout, stored, {key: entry.shape for key, entry in stored.items()}, [], config)
    tensors, shapes, unknown = {}, {}, []
    for name, entry in stored.items():
        if not name.startswith(layout.prefix):
            continue  # another model bundled in the same file (VAE, text encoder)
        key = _rename(name[len(layout.prefix) :], source=0)
        if key is None:
            unknown.append(name)
            continue
        tensors[key] = entry
        shapes[key] = diffusers_shape(key, entry.shape)
    return CheckpointIndex(path, layout, tensors, shapes, unknown, config)


def _few(keys: Iterable[str], limit: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(key) for key in keys[:limit])
    return f"{shown} ... ({len(keys)} in all)" if len(keys) > limit else shown


def _stored_name(checkpoint: CheckpointIndex, key: str) -> str:
    name = checkpoint.tensors[key].name
    return "" if name == key else f" (stored as {name!r})"


def check_compatible(checkpoint: CheckpointIndex, expected_shapes: Mapping[str, Sequence[int]]) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint has exactly the expected keys and shapes."""
    problems = _fit_problems(checkpoint.shapes, checkpoint.unknown_keys, expected_shapes, lambda key: _stored_name(checkpoint, key))
    if problems:
        raise CheckpointError(f"{checkpoint.source} does not fit the model config: " + "; ".join(problems))


def check_fits_config(state_dict: Mapping[str, torch.Tensor], config: Mapping, what: str) -> None:
    """Raise :class:`CheckpointError` unless diffusers-keyed ``state_dict`` holds exactly the
    parameters of the Krea2DiT that ``config`` builds (no training-only or LoRA keys)."""
    expected = build_model(dict(config), device="meta").state_dict()
    shapes = {key: tuple(tensor.shape) for key, tensor in state_dict.items()}
    problems = _fit_problems(shapes, (), {key: tuple(tensor.shape) for key, tensor in expected.items()})
    if problems:
        raise CheckpointError(f"{what}: the weights are not those of the Krea 2 DiT their config builds: " + "; ".join(problems))


def _fit_problems(
    shapes: Mapping[str, Sequence[int]],
    unknown_keys: Iterable[str],
    expected_shapes: Mapping[str, Sequence[int]],
    stored_name=lambda key: "",
) -> list[str]:
    missing = set(expected_shapes) - set(shapes)
    unexpected = (set(shapes) - set(expected_shapes)) | set(unknown_keys)
    problems = []
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    mismatched = [key for key, shape in expected_shapes.items() if key in shapes and tuple(shapes[key]) != tuple(shape)]
    for key in mismatched[:5]:
        problems.append(
            f"shape mismatch for {key!r}{stored_name(key)}: checkpoint {tuple(shapes[key])}, model {tuple(expected_shapes[key])}"
        )
    if len(mismatched) > 5:
        problems.append(f"... {len(mismatched)} shape mismatches in all")
    return problems


def load_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Read a checkpoint in any layout.

    Returns:
        (diffusers-keyed CPU tensors in their stored dtype, the Krea2DiT config or None when the
        checkpoint does not record it).
    """
    checkpoint = index_checkpoint(path)
    if checkpoint.unknown_keys:
        raise CheckpointError(f"{path} has keys that are not Krea 2 DiT parameters: {_few(checkpoint.unknown_keys)}")
    loaded = dict(read_tensors(checkpoint.tensors))
    state_dict = {key: loaded.pop(key).reshape(checkpoint.shapes[key]) for key in checkpoint.tensors}
    return state_dict, checkpoint.config


SHAPELESS_KEYS = ("axes_dims_rope", "rope_theta", "norm_eps")  # Krea2DiT keywords no weight's shape shows


def infer_config(shapes: Mapping[str, Sequence[int]]) -> dict:
    """Recover Krea2DiT keywords from diffusers-keyed tensor shapes.

    ``rope_theta`` and ``norm_eps`` leave no trace in the weights and take Krea 2's values; so does
    ``axes_dims_rope``, which is only known for Krea 2's head dim (otherwise pass a config).
    """

    def block_count(stack: str) -> int:
        return len({match.group(1) for key in shapes if (match := re.match(rf"{stack}\.(\d+)\.", key))})

    layerwise = block_count(r"text_fusion\.layerwise_blocks")
    text_block = "text_fusion.layerwise_blocks.0" if layerwise else "text_fusion.refiner_blocks.0"
    try:
        hidden_size, in_channels = shapes["img_in.weight"]
        (head_dim,) = shapes["transformer_blocks.0.attn.norm_q.weight"]
        (text_head_dim,) = shapes[f"{text_block}.attn.norm_q.weight"]
        text_hidden_dim = shapes["txt_in.linear_1.weight"][1]
        config = dict(
            in_channels=in_channels,
            num_layers=block_count("transformer_blocks"),
            attention_head_dim=head_dim,
            num_attention_heads=hidden_size // head_dim,
            num_key_value_heads=shapes["transformer_blocks.0.attn.to_k.weight"][0] // head_dim,
            intermediate_size=shapes["transformer_blocks.0.ff.gate.weight"][0],
            timestep_embed_dim=shapes["time_embed.linear_1.weight"][1],
            text_hidden_dim=text_hidden_dim,
            num_text_layers=shapes["text_fusion.projector.weight"][1],
            text_num_attention_heads=text_hidden_dim // text_head_dim,
            text_num_key_value_heads=shapes[f"{text_block}.attn.to_k.weight"][0] // text_head_dim,
            text_intermediate_size=shapes[f"{text_block}.ff.gate.weight"][0],
            num_layerwise_text_blocks=layerwise,
            num_refiner_text_blocks=block_count(r"text_fusion\.refiner_blocks"),
        )
    except KeyError as missing:
        raise CheckpointError(
            f"cannot infer the model config from the checkpoint ({missing} is missing); pass config="
        ) from None
    if head_dim != DEFAULT_CONFIG["attention_head_dim"]:
        raise CheckpointError(
            f"the checkpoint records no config and its head dim {head_dim} is not Krea 2's "
            f"{DEFAULT_CONFIG['attention_head_dim']}, so the rotary split axes_dims_rope is unknown; pass config="
        )
    return {**config, **{key: DEFAULT_CONFIG[key] for key in SHAPELESS_KEYS}}


def load_model(
    path: str | os.PathLike,
    config: Mapping | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Krea2DiT:
    """Build a :class:`Krea2DiT` from a checkpoint in any layout, streaming tensors in.

    The model is built on the meta device, every key and shape is checked before any data is read,
    then each tensor is read into its final memory and assigned, so host memory peaks at about the
    model's size.

    Args:
        config: Krea2DiT keywords; defaults to the checkpoint's own, else inferred from shapes.
        dtype: parameter dtype; defaults to the dtypes :func:`build_model` gives. The RMSNorm
            scales stay fp32, as diffusers keeps them (``_keep_in_fp32_modules``): the norms
            compute in fp32, and the same file gives both models the same weights.
    """
    checkpoint = index_checkpoint(path)
    config = dict(config) if config is not None else checkpoint.model_config()
    model = build_model(config, device="meta", dtype=dtype)
    for module in model.modules():
        if isinstance(module, ZeroCenteredRMSNorm):
            module.float()
    expected = model.state_dict()
    check_compatible(checkpoint, {key: tensor.shape for key, tensor in expected.items()})
    loaded = {
        key: tensor.reshape(expected[key].shape).to(device=device, dtype=expected[key].dtype)
        for key, tensor in read_tensors(checkpoint.tensors)
    }
    model.load_state_dict(loaded, strict=True, assign=True)
    return model
