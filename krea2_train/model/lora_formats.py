"""LoRA files in the layouts the Krea 2 community uses, read and written as safetensors.

Every layout stores, for each adapted linear layer, ``<module>.lora_A.weight`` (``[r, in]``) and
``<module>.lora_B.weight`` (``[out, r]``); the update is ``(alpha / r) B A``. They differ in
module names, prefix and where alpha lives:

- ``diffusers`` (PEFT): ``transformer.<diffusers module>`` (``transformer.transformer_blocks.0.attn.to_q``);
  rank and alpha in the ``lora_adapter_metadata`` JSON (``transformer.r``, ``transformer.lora_alpha``,
  ``rank_pattern``/``alpha_pattern`` when modules differ), which diffusers' ``load_lora_weights``
  turns into the PEFT ``LoraConfig``.
- ``comfyui`` (the original krea layout): ``diffusion_model.<original module>``
  (``diffusion_model.blocks.0.attn.wq``).
- ``ai-toolkit``: ``base_model.model.<original module>``.

diffusers reads the last two through its Krea 2 converter, which accepts only ``lora_A``/``lora_B``
keys (no ``.alpha`` entries) and then applies scale 1; ComfyUI applies scale 1 too when a file has
no ``.alpha``. So those files are written with ``alpha / r`` folded into ``lora_B``, and rank and
alpha are recorded in the ``krea2_lora`` metadata entry (:data:`METADATA_KEY`), from which
:func:`read_lora` unfolds them again. Reading also accepts kohya-style ``lora_down``/``lora_up``
names under those prefixes (not kohya's flattened ``lora_unet_...`` names) and ``<module>.alpha``
tensors (alpha defaults to the rank: scale 1, the PEFT convention), PEFT's own files (diffusers
names under ``base_model.model.`` or no prefix; rank and alpha from an ``adapter_config.json``
beside the file) and PEFT's rsLoRA scaling.
Every module must be a linear layer of Krea 2 (:func:`check_krea2_modules`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from krea2_train.model import layouts
from krea2_train.errors import MissingPathError
from krea2_train.model.lora import LoRAError, LoRAPair

LAYOUT_PREFIXES = {"diffusers": "transformer.", "comfyui": "diffusion_model.", "ai-toolkit": "base_model.model."}
LAYOUTS = tuple(LAYOUT_PREFIXES)
METADATA_KEY = "krea2_lora"
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
PEFT_CONFIG_NAME = "adapter_config.json"  # what PEFT's save_pretrained writes beside adapter_model.safetensors
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
_STORED_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_down|lora_up)\.weight$")
_PARTS = {"lora_A": "down", "lora_down": "down", "lora_B": "up", "lora_up": "up"}


@dataclass
class LoRAFile:
    """A LoRA read from disk: pairs under diffusers module names, and where it came from."""

    pairs: dict[str, LoRAPair]
    layout: str
    metadata: dict[str, str]


# ----------------------------------------------------------------------------------------------
# Module names
# ----------------------------------------------------------------------------------------------


def to_original_module(module: str) -> str:
    """``transformer_blocks.0.attn.to_q`` -> ``blocks.0.attn.wq``."""
    return layouts.diffusers_to_original_key(module + ".weight")[: -len(".weight")]


def to_diffusers_module(module: str) -> str:
    """``blocks.0.attn.wq`` -> ``transformer_blocks.0.attn.to_q``."""
    try:
        return layouts.original_to_diffusers_key(module + ".weight")[: -len(".weight")]
    except layouts.CheckpointError:
        raise LoRAError(f"LoRA module {module!r} is not a Krea 2 layer in the original layout") from None


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _most_common(values: Mapping[str, float | int]) -> float | int:
    return Counter(values.values()).most_common(1)[0][0]


def peft_metadata(pairs: Mapping[str, LoRAPair]) -> dict:
    """The PEFT ``LoraConfig`` keywords of ``pairs`` (rank/alpha patterns for modules that differ)."""
    ranks = {name: pair.rank for name, pair in pairs.items()}
    alphas = {name: pair.alpha for name, pair in pairs.items()}
    rank, alpha = _most_common(ranks), _most_common(alphas)
    return {
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {name: value for name, value in ranks.items() if value != rank},
        "alpha_pattern": {name: value for name, value in alphas.items() if value != alpha},
        "target_modules": sorted(pairs),
        "use_dora": False,
        "lora_bias": False,
    }


def _record(pairs: Mapping[str, LoRAPair], folded: bool) -> str:
    ranks = {pair.rank for pair in pairs.values()}
    alphas = {pair.alpha for pair in pairs.values()}
    record = {"alpha_folded_into_lora_B": folded}
    if len(ranks) == 1 and len(alphas) == 1:
        record.update(rank=ranks.pop(), alpha=alphas.pop())
    else:
        record.update(ranks={n: p.rank for n, p in pairs.items()}, alphas={n: p.alpha for n, p in pairs.items()})
    return json.dumps(record, sort_keys=True)


def lora_tensors(pairs: Mapping[str, LoRAPair], layout: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of ``pairs`` in ``layout``."""
    if layout not in LAYOUT_PREFIXES:
        raise LoRAError(f"unknown LoRA layout {layout!r}; accepted: {', '.join(LAYOUTS)}")
    if not pairs:
        raise LoRAError("no LoRA weights to write")
    prefix = LAYOUT_PREFIXES[layout]
    tensors: dict[str, torch.Tensor] = {}
    metadata = {"format": "pt"}
    if layout == "diffusers":
        for name, pair in pairs.items():
            tensors[f"{prefix}{name}.lora_A.weight"] = pair.down
            tensors[f"{prefix}{name}.lora_B.weight"] = pair.up
        packed = {f"transformer.{key}": value for key, value in peft_metadata(pairs).items()}
        metadata[PEFT_METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True)
        metadata[METADATA_KEY] = _record(pairs, folded=False)
    else:
        for name, pair in pairs.items():
            module = prefix + to_original_module(name)
            tensors[f"{module}.lora_A.weight"] = pair.down
            tensors[f"{module}.lora_B.weight"] = (pair.up.float() * (pair.alpha / pair.rank)).to(pair.up.dtype)  # folded in fp32
        metadata[METADATA_KEY] = _record(pairs, folded=True)
    return tensors, metadata


def save_lora(
    pairs: Mapping[str, LoRAPair],
    path: str | os.PathLike,
    layout: str = "diffusers",
    dtype: torch.dtype | None = None,
    *,
    carried_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``pairs`` (diffusers module names) as one safetensors file in ``layout``.

    ``carried_metadata``: a source file's metadata to keep (a conversion keeps kohya's ``ss_*``
    entries, trigger words, a license), except the entries the layout itself writes."""
    tensors, metadata = lora_tensors(pairs, layout)
    written = {"format", PEFT_METADATA_KEY, METADATA_KEY}
    metadata = {key: value for key, value in (carried_metadata or {}).items() if key not in written} | metadata
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return layouts.write_safetensors(path, {key: tensor.contiguous() for key, tensor in tensors.items()}, metadata, dtype)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _stored_module(key: str) -> str | None:
    """The module a LoRA key belongs to (``<module>.lora_A.weight``, ``<module>.alpha`` ...)."""
    if key.endswith(".alpha"):
        return key[: -len(".alpha")]
    match = _STORED_KEY.match(key)
    return match["module"] if match else None


def detect_lora_layout(keys: list[str]) -> tuple[str, str]:
    """(layout, key prefix) of a LoRA state dict, from its key prefix. A PEFT state dict without
    prefix (``get_peft_model_state_dict``) under diffusers module names reads as ``diffusers``."""
    for layout, prefix in LAYOUT_PREFIXES.items():
        if keys and all(key.startswith(prefix) for key in keys):
            return layout, prefix
    if keys and all((module := _stored_module(key)) is not None and is_diffusers_module(module) for key in keys):
        return "diffusers", ""
    examples = ", ".join(repr(key) for key in sorted(keys)[:3]) or "none"
    raise LoRAError(
        f"not a Krea 2 LoRA: keys must all start with one of {sorted(LAYOUT_PREFIXES.values())} "
        f"(diffusers, ComfyUI, ai-toolkit layouts); found {len(keys)} keys: {examples}"
    )


# PEFT LoraConfig switches that change what the pair computes: read as (alpha / r) B A they would
# give another model, so such a file is refused.
_UNSUPPORTED_PEFT_OPTIONS = {"use_dora": "DoRA", "lora_bias": "a LoRA bias", "fan_in_fan_out": "fan_in_fan_out weights"}


def _peft_alphas(metadata: Mapping[str, str], ranks: Mapping[str, int]) -> dict[str, float]:
    """Per-module alpha from diffusers' ``lora_adapter_metadata``; alpha = rank without it.

    rsLoRA (``use_rslora``) scales by ``alpha / sqrt(r)``: returned as the alpha that gives that
    scale under ``alpha / r``, ``alpha * sqrt(r)``.
    """
    raw = metadata.get(PEFT_METADATA_KEY)
    if raw is None:
        return {name: float(rank) for name, rank in ranks.items()}
    config = {key.removeprefix("transformer."): value for key, value in json.loads(raw).items()}
    unsupported = [label for option, label in _UNSUPPORTED_PEFT_OPTIONS.items() if config.get(option)]
    if unsupported:
        raise LoRAError(f"the PEFT LoRA uses {', '.join(unsupported)}, which Krea 2 LoRAs (alpha / r) B A cannot express")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    alphas = {}
    for name, rank in ranks.items():
        expected_rank = _pattern_value(rank_pattern, name, config.get("r", rank))
        if expected_rank != rank:
            raise LoRAError(f"LoRA metadata gives {name!r} rank {expected_rank}, its tensors have rank {rank}")
        alpha = float(_pattern_value(alpha_pattern, name, config.get("lora_alpha", rank)))
        alphas[name] = alpha * math.sqrt(rank) if config.get("use_rslora") else alpha
    return alphas


@functools.cache
def _krea2_linear_modules() -> frozenset[str]:
    """Every linear layer of the Krea 2 DiT (diffusers names, block indices as ``N``)."""
    from krea2_train.model.presets import build_model

    model = build_model("tiny", device="meta")  # every kind of layer the architecture has
    return frozenset(_without_indices(name) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear))


def _without_indices(module: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", module)


def is_diffusers_module(module: str) -> bool:
    """Whether ``module`` names a linear layer of Krea 2 under diffusers' names (no original-layout
    name is also a diffusers name, so names tell the two apart)."""
    return _without_indices(module) in _krea2_linear_modules()


def check_krea2_modules(names: Iterable[str]) -> None:
    """Refuse LoRA module names (diffusers layout) that are not linear layers of Krea 2: another
    model's LoRA, a fused projection or a typo would otherwise convert into a meaningless file."""
    foreign = sorted(name for name in names if not is_diffusers_module(name))
    if foreign:
        raise LoRAError(
            f"not a Krea 2 LoRA: {len(foreign)} module(s) are not linear layers of the Krea 2 DiT, e.g. "
            f"{', '.join(repr(name) for name in foreign[:3])} (expected names like 'transformer_blocks.0.attn.to_q')"
        )


def _pattern_value(patterns: Mapping[str, float], name: str, default: float) -> float:
    """PEFT's rule: a pattern applies when it matches the end of the module name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def _unfold(pairs: dict[str, LoRAPair], record: Mapping) -> None:
    """Undo ``alpha / r`` folded into B by :func:`lora_tensors`, restoring the recorded alphas."""
    for name, pair in pairs.items():
        alpha = record["alphas"][name] if "alphas" in record else record["alpha"]
        pair.up = (pair.up.float() / (alpha / pair.rank)).to(pair.up.dtype)
        pair.alpha = float(alpha)


def lora_pairs_from_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> LoRAFile:
    """Parse a LoRA state dict in any supported layout into pairs under diffusers module names."""
    metadata = dict(metadata or {})
    layout, prefix = detect_lora_layout(list(tensors))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    stored_alphas: dict[str, float] = {}
    for key, tensor in tensors.items():
        rest = key[len(prefix) :]
        if rest.endswith(".alpha"):
            stored_alphas[rest[: -len(".alpha")]] = float(tensor)
            continue
        match = _STORED_KEY.match(rest)
        if match is None:
            raise LoRAError(f"{key!r} is not a LoRA weight (expected '.lora_A.weight', '.lora_B.weight', "
                            f"'.lora_down.weight', '.lora_up.weight' or '.alpha')")
        found = parts.setdefault(match["module"], {})
        part = _PARTS[match["part"]]
        if part in found:
            raise LoRAError(f"LoRA for {match['module']!r} stores its {'B (up)' if part == 'up' else 'A (down)'} matrix twice "
                            f"(both lora_A/lora_B and lora_down/lora_up names)")
        found[part] = tensor
    orphans = sorted(set(stored_alphas) - set(parts))
    if orphans:
        raise LoRAError(f"'.alpha' of {', '.join(repr(module) for module in orphans[:3])} has no LoRA A/B matrices (a misspelt module?)")
    pairs: dict[str, LoRAPair] = {}
    ranks: dict[str, int] = {}
    for module, found in parts.items():
        if set(found) != {"down", "up"}:
            raise LoRAError(f"LoRA for {module!r} lacks its {'B (up)' if 'up' not in found else 'A (down)'} matrix")
        # PEFT's save_pretrained writes diffusers names under ai-toolkit's prefix
        name = module if layout == "diffusers" or is_diffusers_module(module) else to_diffusers_module(module)
        ranks[name] = found["down"].shape[0]
        alpha = stored_alphas.get(module, float(ranks[name]))
        try:
            pairs[name] = LoRAPair(found["down"], found["up"], alpha)
        except LoRAError as error:
            raise LoRAError(f"LoRA for {module!r}: {error}") from None
    check_krea2_modules(pairs)
    if not stored_alphas:  # PEFT metadata (diffusers' files, PEFT's own); alpha = rank without it
        for name, alpha in _peft_alphas(metadata, ranks).items():
            pairs[name].alpha = alpha
    record = json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else {}
    if record.get("alpha_folded_into_lora_B"):
        _unfold(pairs, record)
    return LoRAFile(pairs, layout, metadata)


def read_lora(path: str | os.PathLike) -> LoRAFile:
    """Read a LoRA safetensors file in the diffusers, ComfyUI or ai-toolkit layout."""
    path = Path(path)
    if path.is_dir() and (path / PEFT_WEIGHTS_NAME).is_file():  # a directory PEFT's save_pretrained wrote
        path = path / PEFT_WEIGHTS_NAME
    elif path.is_dir() and ((path / "checkpoints").is_dir() or (path / "config.yaml").is_file()):
        raise LoRAError(f"{path} is a training run, not a LoRA file; `krea2 lora export {path} --out FILE` writes a lora-stage run's LoRA")
    elif path.is_dir():
        raise LoRAError(f"{path} is a directory, not a LoRA .safetensors file (nor a PEFT directory holding {PEFT_WEIGHTS_NAME})")
    if not path.is_file():
        raise MissingPathError(f"no LoRA file {path}")  # a lasting user error: the launcher does not resubmit a typo
    stored, metadata = layouts.read_safetensors_header(path)
    peft_config = path.parent / PEFT_CONFIG_NAME  # PEFT's save_pretrained directory; beside another file it is another LoRA's
    if PEFT_METADATA_KEY not in metadata and path.name == PEFT_WEIGHTS_NAME and peft_config.is_file():
        metadata[PEFT_METADATA_KEY] = peft_config.read_text()
    try:
        return lora_pairs_from_tensors(dict(layouts.read_tensors(stored)), metadata)
    except LoRAError as error:
        raise LoRAError(f"{path}: {error}") from None


def parse_lora_argument(argument: str) -> tuple[Path, float]:
    """``FILE[:SCALE]`` -> (path, strength); the strength defaults to 1. A file name that holds a
    colon is taken whole when it exists."""
    path, separator, scale = argument.rpartition(":")
    if separator and path:
        try:
            return Path(path), float(scale)
        except ValueError:
            if not Path(argument).exists():
                raise LoRAError(f"--lora {argument!r}: {scale!r} is not a strength (FILE[:SCALE], e.g. style.safetensors:0.8)") from None
    return Path(argument), 1.0
