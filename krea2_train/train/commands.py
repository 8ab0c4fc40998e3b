"""`krea2 export | average | merge`: turn training checkpoints into weights others can load.

- ``export RUN``: one checkpoint of a run, in the diffusers or the original (ComfyUI) layout.
- ``average RUN --last K``: the uniform average of a run's last K committed checkpoints
  (pre-trained model averaging, PMA, arXiv 2505.12082).
- ``merge A B ... --weights wa wb ...``: the weighted average of checkpoints of one model config,
  each a run, a DCP checkpoint directory, a diffusers directory or an original-layout file.

Averages accumulate in float32, one checkpoint in memory at a time, and are written in the
checkpoints' own dtype unless ``--dtype`` says otherwise.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from krea2_train.arguments import non_negative_int, positive_int
from krea2_train.errors import UsageError
from krea2_train.model import layouts
from krea2_train.train.checkpoint import (
    CHECKPOINTS_DIR,
    CheckpointWriteError,
    NoCheckpointError,
    check_same_model_config,
    committed_checkpoints,
    find_run_checkpoint,
    is_dcp_checkpoint,
    is_run_directory,
    load_checkpoint_weights,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LAYOUTS = ("diffusers", "original")


def write_weights(
    weights: Mapping[str, torch.Tensor], config: Mapping, out: str | Path, layout: str, dtype: torch.dtype | None = None
) -> Path:
    """Write diffusers-keyed weights: a diffusers directory, or one original-layout safetensors file.

    Raises:
        CheckpointWriteError: ``out`` is a run's directory (an export there would mix with the run's files).
        UsageError: ``out`` names the other layout's kind of path (see :func:`check_output_path`).
    """
    check_output_path(out, layout)
    if is_run_directory(out):
        raise CheckpointWriteError(f"--out {out} is a run directory; write the export elsewhere (e.g. {Path(out) / 'export'})")
    if layout == "diffusers":
        layouts.save_diffusers(weights, out, config, dtype=dtype)
    elif layout == "original":
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        layouts.save_original(weights, out, config, dtype=dtype)
    else:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    return Path(out)


def check_output_path(out: str | Path, layout: str) -> None:
    """Refuse an ``--out`` that names the other layout's kind of path, before any work: a
    ``.safetensors`` name for a diffusers directory, a directory for an original-layout file."""
    text = str(out)
    if layout == "diffusers" and text.endswith(".safetensors"):
        raise UsageError(f"--out {text} names a .safetensors file, and the diffusers layout writes a directory:"
                         " add --layout original for one file, or name a directory")
    if layout == "original" and (text.endswith(("/", os.sep)) or Path(out).is_dir()):
        raise UsageError(f"--out {text} names a directory, and the original layout writes one file: name a .safetensors file"
                         " (e.g. model.safetensors), or use --layout diffusers for a directory")


def check_not_a_source(out: str | Path, sources: Sequence[Path]) -> None:
    """Refuse an ``--out`` that is one of the checkpoints being read: writing it would replace
    the input (a cast to bf16 would lose its fp32 weights for good)."""
    target = Path(out).resolve()
    for source in sources:
        if target == Path(source).resolve():
            raise UsageError(f"--out {out} is the checkpoint being read ({source}): write the result elsewhere")


def normalised_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Mixing weights summing to 1 (uniform when None)."""
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise UsageError(f"--weights: got {len(weights)} weights for {count} checkpoints")
    if any(weight < 0 for weight in weights) or sum(weights) <= 0:
        raise UsageError(f"--weights must be non-negative with a positive sum, got {list(weights)}")
    total = sum(weights)
    return [weight / total for weight in weights]


def weighted_average(
    sources: Sequence[Path], weights: Sequence[float], dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """``sum_i weights[i] * checkpoint_i``, loading one checkpoint at a time (summed in fp32).

    Returns:
        (averaged weights in ``dtype``, default the first checkpoint's dtypes; the shared config).
        A LoRA run's adapters are baked in ``dtype`` too.
    Raises:
        CheckpointError: the checkpoints have different configs or keys.
    """
    accumulated: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    reference_config: dict | None = None
    for index, (source, weight) in enumerate(zip(sources, weights)):
        state_dict, config = load_checkpoint_weights(source, lora_dtype=dtype)
        if reference_config is None:
            reference_config = config
            dtypes = {key: tensor.dtype for key, tensor in state_dict.items()}
            accumulated = {key: torch.zeros(tensor.shape, dtype=torch.float32) for key, tensor in state_dict.items()}
        check_same_model_config(config, reference_config, str(source), str(sources[0]))
        if set(state_dict) != set(accumulated):
            raise layouts.CheckpointError(f"{source} has other tensors than {sources[0]} despite the same config")
        for key, tensor in state_dict.items():
            accumulated[key].add_(tensor.float(), alpha=weight)
        del state_dict
    return {key: tensor.to(dtype or dtypes[key]) for key, tensor in accumulated.items()}, reference_config


def last_checkpoints(run: str, count: int, runs_root: str) -> list[Path]:
    """The ``count`` newest committed checkpoints of a run, oldest first."""
    if count < 1:
        raise ValueError(f"--last must be at least 1, got {count}")
    newest = find_run_checkpoint(run, runs_root)  # raises when the run has none
    if not is_dcp_checkpoint(newest) or newest.parent.name != CHECKPOINTS_DIR:
        raise NoCheckpointError(f"{run} is not a training run (a checkpoint file or directory cannot be averaged over time)")
    committed = committed_checkpoints(newest.parent)
    if len(committed) < count:
        raise NoCheckpointError(f"run {run} has {len(committed)} committed checkpoints ({sorted(committed)}), fewer than --last {count}")
    return [committed[step] for step in sorted(committed)[-count:]]


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------


def run_export(args: argparse.Namespace) -> int:
    check_output_path(args.out, args.layout)
    source = find_run_checkpoint(args.run, args.runs_root, step=args.step)
    check_not_a_source(args.out, [source])
    weights, config = load_checkpoint_weights(source, lora_dtype=DTYPES.get(args.dtype))
    out = write_weights(weights, config, args.out, args.layout, DTYPES.get(args.dtype))
    print(f"exported {source} -> {out} ({args.layout} layout)")
    return 0


def run_average(args: argparse.Namespace) -> int:
    check_output_path(args.out, args.layout)
    sources = last_checkpoints(args.run, args.last, args.runs_root)
    check_not_a_source(args.out, sources)
    weights, config = weighted_average(sources, normalised_weights(None, len(sources)), DTYPES.get(args.dtype))
    out = write_weights(weights, config, args.out, args.layout, DTYPES.get(args.dtype))
    print(f"averaged {len(sources)} checkpoints ({', '.join(path.name for path in sources)}) -> {out} ({args.layout} layout)")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    check_output_path(args.out, args.layout)
    mixing = normalised_weights(args.weights, len(args.checkpoints))
    sources = [find_run_checkpoint(checkpoint, args.runs_root) for checkpoint in args.checkpoints]
    check_not_a_source(args.out, sources)
    weights, config = weighted_average(sources, mixing, DTYPES.get(args.dtype))
    if args.lora:  # baked in the output dtype: a small LoRA would round away in bf16 before an fp32 cast
        from krea2_train.model.lora_commands import bake_lora_files
        from krea2_train.model.lora_formats import parse_lora_argument

        bake_lora_files(weights, [parse_lora_argument(lora) for lora in args.lora], DTYPES.get(args.dtype))
    out = write_weights(weights, config, args.out, args.layout, DTYPES.get(args.dtype))
    parts = ", ".join(f"{weight:.4g} x {source}" for weight, source in zip(mixing, sources))
    loras = f" + LoRAs {', '.join(args.lora)}" if args.lora else ""
    print(f"merged {parts}{loras} -> {out} ({args.layout} layout)")
    return 0


def _add_output_options(parser: argparse.ArgumentParser, layout_required: bool) -> None:
    parser.add_argument("--out", required=True, help="diffusers: a directory; original: a .safetensors file")
    parser.add_argument("--layout", choices=LAYOUTS, required=layout_required, default=None if layout_required else "diffusers")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: as stored)")
    parser.add_argument("--runs-root", default="runs", help="where run names are looked up (default: runs)")


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser("export", help="write a run's checkpoint in the diffusers or original layout")
    export.add_argument("run", help="run directory or name, or a checkpoint path")
    export.add_argument("--step", type=non_negative_int, default=None, help="the committed step to export (default: newest)")
    _add_output_options(export, layout_required=True)
    export.set_defaults(func=run_export)

    average = subparsers.add_parser("average", help="uniform average of a run's last K checkpoints (PMA)")
    average.add_argument("run", help="run directory or name")
    average.add_argument("--last", type=positive_int, required=True, metavar="K", help="how many of the newest committed checkpoints")
    _add_output_options(average, layout_required=False)
    average.set_defaults(func=run_average)

    merge = subparsers.add_parser("merge", help="weighted average of checkpoints of one model config")
    merge.add_argument("checkpoints", nargs="+", help="runs, DCP checkpoint dirs, diffusers dirs or safetensors files")
    merge.add_argument("--weights", type=float, nargs="+", default=None, help="one per checkpoint, normalised (default: uniform)")
    merge.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                       help="bake a LoRA (any layout) into the merged weights at SCALE (default 1); repeatable")
    _add_output_options(merge, layout_required=False)
    merge.set_defaults(func=run_merge)
