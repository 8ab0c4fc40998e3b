"""``krea2 lora``: export, convert and extract LoRAs; estimate LoRA training memory.

    krea2 lora export RUN --layout comfyui --out my.safetensors     # the LoRA of a lora-stage run
    krea2 lora convert in.safetensors --layout diffusers --out out.safetensors
    krea2 lora extract --from RAW --to TURBO --rank 64 --out turbo_lora.safetensors
    krea2 lora memory --preset krea2_medium --rank 16 --base-dtype bf16 --resolution 1024

``extract`` approximates ``W_to - W_from`` of every targeted linear layer by a truncated SVD of
rank R (``B = U_R sqrt(S_R)``, ``A = sqrt(S_R) V_R^T``, alpha = R) and reports the relative
Frobenius error of the approximation, overall and for the worst layer, plus how much of the
difference lies outside the targeted layers (norms, biases, modulation tables: a LoRA cannot
carry it).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from krea2_train.arguments import help_text, image_resolution, non_negative_int, positive_int, torch_device
from krea2_train.model.lora import DEFAULT_TARGETS, LORA_KEY, BASE_DTYPES, LoRAError, LoRAPair, LoRASpec, compile_targets
from krea2_train.model.flops import image_tokens_at
from krea2_train.model.lora_formats import LAYOUTS, read_lora, save_lora
from krea2_train.model.presets import PRESETS

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EXACT_SVD_MAX_DIM = 2048  # beyond this (smaller side of a weight), a randomised truncated SVD


# ----------------------------------------------------------------------------------------------
# LoRA weights of a training run
# ----------------------------------------------------------------------------------------------


def run_lora_alpha(run_dir: Path | None) -> float | None:
    """``lora.alpha`` of a run's recorded config, or None outside a run."""
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return None
    from omegaconf import OmegaConf

    recorded = OmegaConf.load(run_dir / "config.yaml")
    return float(recorded.lora.alpha) if "lora" in recorded else None


def split_checkpoint_lora(weights: Mapping[str, torch.Tensor], run_dir: Path | None) -> tuple[dict[str, torch.Tensor], dict[str, LoRAPair]]:
    """(plain base weights, LoRA pairs) of a checkpoint's weights; no LoRA: (weights, {})."""
    from krea2_train.model.lora import pairs_from_state_dict, split_lora_weights

    base, lora = split_lora_weights(weights)
    if not lora:
        return base, {}
    alpha = run_lora_alpha(run_dir)
    if alpha is None:
        raise LoRAError("the checkpoint holds LoRA weights but no run config records lora.alpha")
    return base, pairs_from_state_dict(lora, alpha)


def read_run_lora(run: str, runs_root: str = "runs", step: int | None = None) -> dict[str, LoRAPair]:
    """The LoRA pairs of a lora-stage run's committed checkpoint, reading only the LoRA tensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from krea2_train.model.lora import pairs_from_state_dict
    from krea2_train.train.checkpoint import _model_prefix, find_run_checkpoint, is_dcp_checkpoint, run_dir_of

    checkpoint = find_run_checkpoint(run, runs_root, step=step)
    if not is_dcp_checkpoint(checkpoint):
        raise LoRAError(f"{checkpoint} is not a training checkpoint of a run; `krea2 lora convert` reads LoRA files")
    metadata = FileSystemReader(str(checkpoint)).read_metadata()
    prefix = _model_prefix(checkpoint, metadata.state_dict_metadata)
    buffers = {
        key: torch.empty(entry.size, dtype=entry.properties.dtype)
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata) and LORA_KEY.match(key[len(prefix) :])
    }
    if not buffers:
        raise LoRAError(f"{checkpoint} holds no LoRA weights (was the run a lora stage?)")
    dcp.load(buffers, checkpoint_id=str(checkpoint), no_dist=True)
    alpha = run_lora_alpha(run_dir_of(checkpoint))
    if alpha is None:
        raise LoRAError(f"{checkpoint}: the run's config.yaml records no lora.alpha")
    return pairs_from_state_dict({key[len(prefix) :]: tensor for key, tensor in buffers.items()}, alpha)


def bake_lora_files(
    weights: dict[str, torch.Tensor], loras: Sequence[tuple[Path, float]], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Add each LoRA file, at its strength, into diffusers-keyed weights (in place; the targeted
    weights are stored in ``dtype`` when given, see :func:`~krea2_train.model.lora.bake_pairs`)."""
    from krea2_train.model.lora import bake_pairs

    for path, strength in loras:
        pairs = read_lora(path).pairs  # its errors name the file already
        try:
            bake_pairs(weights, pairs, strength, dtype)
        except LoRAError as error:  # which of several --lora files does not fit
            raise LoRAError(f"{path}: {error}") from None
    return weights


# ----------------------------------------------------------------------------------------------
# Extraction by truncated SVD
# ----------------------------------------------------------------------------------------------


@dataclass
class Extraction:
    pairs: dict[str, LoRAPair]
    relative_error: float  # ||delta - BA||_F / ||delta||_F over the targeted layers
    worst_layer: tuple[str, float]
    untargeted_fraction: float  # ||delta outside the targets||_F / ||delta||_F over all tensors
    identical_layers: int  # targeted layers with no difference (left out)


def truncated_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``delta [out, in]`` -> (up ``[out, r]``, down ``[r, in]``), ``up @ down`` its best rank-r fit.

    Exact SVD up to :data:`EXACT_SVD_MAX_DIM`, else randomised (``torch.svd_lowrank``, 6 power
    iterations, 16 oversamples). The singular values are split evenly between the factors.
    """
    rank = min(rank, *delta.shape)
    if min(delta.shape) <= EXACT_SVD_MAX_DIM:
        left, values, right_t = torch.linalg.svd(delta, full_matrices=False)
        right = right_t.mT
    else:
        left, values, right = torch.svd_lowrank(delta, q=min(rank + 16, *delta.shape), niter=6)
    root = values[:rank].sqrt()
    return left[:, :rank] * root, (right[:, :rank] * root).mT.contiguous()


def extract_lora(
    source: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    rank: int,
    targets: Sequence[str] = DEFAULT_TARGETS,
    device: torch.device | str = "cpu",
) -> Extraction:
    """A LoRA that turns ``source`` into (approximately) ``target``, both diffusers-keyed."""
    if set(source) != set(target):
        raise LoRAError(f"the checkpoints have different tensors, e.g. {sorted(set(source) ^ set(target))[:3]}")
    patterns = compile_targets(targets)
    pairs, errors = {}, {}
    error_sq = targeted_sq = untargeted_sq = 0.0
    identical = 0
    for key in sorted(source):
        if source[key].shape != target[key].shape:
            raise LoRAError(f"{key!r} has shape {tuple(source[key].shape)} in one checkpoint, {tuple(target[key].shape)} in the other")
        delta = target[key].to(device, torch.float32) - source[key].to(device, torch.float32)
        module = key.removesuffix(".weight")
        norm_sq = float(delta.square().sum())
        if not (key.endswith(".weight") and delta.ndim == 2 and any(p.fullmatch(module) for p in patterns)):
            untargeted_sq += norm_sq
            continue
        if norm_sq == 0.0:
            identical += 1
            continue
        up, down = truncated_svd(delta, rank)
        residual_sq = float((delta - up @ down).square().sum())
        pairs[module] = LoRAPair(down.cpu(), up.cpu(), float(up.shape[1]))
        errors[module] = math.sqrt(residual_sq / norm_sq)
        error_sq += residual_sq
        targeted_sq += norm_sq
    if not pairs:
        raise LoRAError("the targeted layers of the two checkpoints are identical: nothing to extract")
    worst = max(errors.items(), key=lambda item: item[1])
    return Extraction(
        pairs=pairs,
        relative_error=math.sqrt(error_sq / targeted_sq),
        worst_layer=worst,
        untargeted_fraction=math.sqrt(untargeted_sq / (targeted_sq + untargeted_sq)),
        identical_layers=identical,
    )


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------


def _weights_of(source: str, runs_root: str) -> dict[str, torch.Tensor]:
    from krea2_train.train.checkpoint import find_run_checkpoint
    from krea2_train.train.checkpoint import load_checkpoint_weights

    # a LoRA run's adapters in fp32: the difference extracted may be as small as the LoRA
    weights, _ = load_checkpoint_weights(find_run_checkpoint(source, runs_root), lora_dtype=torch.float32)
    return weights


def run_extract(args: argparse.Namespace) -> int:
    compile_targets(args.targets or DEFAULT_TARGETS)  # a bad pattern is refused before two checkpoints are read
    extraction = extract_lora(_weights_of(args.source, args.runs_root), _weights_of(args.target, args.runs_root),
                              args.rank, args.targets or DEFAULT_TARGETS, args.device)
    out = save_lora(extraction.pairs, args.out, args.layout, DTYPES.get(args.dtype))
    name, worst = extraction.worst_layer
    print(f"extracted a rank-{args.rank} LoRA of {len(extraction.pairs)} layers -> {out} ({args.layout} layout)")
    print(f"relative error ||delta - BA|| / ||delta||: {extraction.relative_error:.4f} (worst layer {name}: {worst:.4f})")
    print(f"difference outside the targeted layers (not in the LoRA): {extraction.untargeted_fraction:.4f} of the total")
    if extraction.identical_layers:
        print(f"{extraction.identical_layers} targeted layers are identical in both checkpoints (left out)")
    return 0


def run_export(args: argparse.Namespace) -> int:
    pairs = read_run_lora(args.run, args.runs_root, args.step)
    out = save_lora(pairs, args.out, args.layout, DTYPES.get(args.dtype))
    print(f"exported the LoRA of {args.run} ({len(pairs)} layers) -> {out} ({args.layout} layout)")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    lora = read_lora(args.lora)
    out = save_lora(lora.pairs, args.out, args.layout, DTYPES.get(args.dtype), carried_metadata=lora.metadata)
    print(f"converted {args.lora} ({lora.layout} layout, {len(lora.pairs)} layers) -> {out} ({args.layout} layout)")
    return 0


def run_memory(args: argparse.Namespace) -> int:
    from krea2_train.model.lora import estimate_lora_training_memory

    tokens = image_tokens_at(args.resolution)
    estimate = estimate_lora_training_memory(
        args.preset, spec=LoRASpec(rank=args.rank, alpha=float(args.rank)), base_dtype=args.base_dtype,
        image_tokens=tokens, text_tokens=args.text_tokens, batch_size=args.batch_size,
    )
    print(f"LoRA training memory: {args.preset}, rank {args.rank}, {args.base_dtype} base, {args.resolution} px "
          f"({tokens} image + {args.text_tokens} text tokens), batch {args.batch_size}, full activation checkpointing")
    print(f"  base parameters {estimate.num_base_parameters / 1e9:.2f}B, LoRA parameters {estimate.num_lora_parameters / 1e6:.1f}M")
    for item, gib in estimate.rows():
        print(f"  {item:<16} {gib:8.2f} GiB")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    lora = subparsers.add_parser("lora", help="export, convert and extract LoRAs; LoRA training memory", description=help_text(__doc__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = lora.add_subparsers(dest="lora_command", metavar="COMMAND", required=True)

    def output_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--out", required=True, help="the LoRA .safetensors file to write")
        parser.add_argument("--layout", choices=LAYOUTS, default="diffusers",
                            help="diffusers (PEFT, transformer.*), comfyui (diffusion_model.*) or ai-toolkit (base_model.model.*)")
        parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the LoRA weights (default: as stored; a lora-stage run trains them in fp32)")
        parser.add_argument("--runs-root", default="runs")

    export = commands.add_parser("export", help="the LoRA of a lora-stage run's checkpoint, as a LoRA file")
    export.add_argument("run", help="run name or directory, or one of its checkpoint directories")
    export.add_argument("--step", type=non_negative_int, default=None, help="committed step (default: newest)")
    output_options(export)
    export.set_defaults(func=run_export)

    convert = commands.add_parser("convert", help="rewrite a LoRA file in another layout")
    convert.add_argument("lora", help="a LoRA .safetensors file (diffusers, ComfyUI or ai-toolkit layout)")
    output_options(convert)
    convert.set_defaults(func=run_convert)

    extract = commands.add_parser("extract", help="the difference of two checkpoints as a LoRA (truncated SVD)")
    extract.add_argument("--from", dest="source", required=True, help="base checkpoint (e.g. Raw): run, DCP, diffusers or original")
    extract.add_argument("--to", dest="target", required=True, help="checkpoint to reach (e.g. Turbo)")
    extract.add_argument("--rank", type=positive_int, required=True)
    extract.add_argument("--targets", nargs="+", default=None, help="regular expressions over module names (default: attention + MLP)")
    extract.add_argument("--device", type=torch_device, default="cpu", help="where the SVDs run (cuda is much faster at 12.9B)")
    output_options(extract)
    extract.set_defaults(func=run_extract)

    memory = commands.add_parser("memory", help="estimate LoRA training memory on the meta device")
    memory.add_argument("--preset", default="krea2_medium", choices=sorted(PRESETS))
    memory.add_argument("--rank", type=positive_int, default=16)
    memory.add_argument("--base-dtype", choices=sorted(BASE_DTYPES), default="bf16")
    memory.add_argument("--resolution", type=image_resolution, default=1024, help="square image side in pixels (16 px per token)")
    memory.add_argument("--text-tokens", type=positive_int, default=512)
    memory.add_argument("--batch-size", type=positive_int, default=1)
    memory.set_defaults(func=run_memory)
