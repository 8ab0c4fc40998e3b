"""``krea2 sample``: images from a checkpoint of a run, or from weights in either layout.

    krea2 sample --checkpoint runs/pretrain_256 --prompt "a red circle" --out samples/
    krea2 sample --checkpoint krea2-raw/ --text-encoder qwen3-vl/ --autoencoder qwen_image \\
        --autoencoder-path qwen-image-vae/ --preset raw --prompt "..."
    krea2 sample --checkpoint krea2-turbo.safetensors --lora my_style.safetensors:0.8 --preset turbo ...

``--lora FILE[:SCALE]`` (repeatable) adds LoRAs in any layout into the weights before sampling;
a run of the lora stage samples with its own LoRA.

A run (name or directory) or one of its checkpoints brings its own conditioning networks (the
run's config); other checkpoints need --text-encoder and --autoencoder.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf

from krea2_train.arguments import help_text, non_negative_float, positive_int, torch_device
from krea2_train.errors import UsageError
from krea2_train.flow.sampler import SAMPLER_PRESETS
from krea2_train.model.lora_formats import parse_lora_argument
from krea2_train.train.checkpoint import find_run_checkpoint, is_dcp_checkpoint, run_dir_of
from krea2_train.train.commands import DTYPES


def load_for_sampling(
    checkpoint: str, runs_root: str = "runs", loras: Sequence[tuple[Path, float]] = (), dtype: torch.dtype | None = None
) -> tuple[torch.nn.Module, Path | None]:
    """(Krea2DiT in eval mode, the run directory if the checkpoint belongs to a run).

    ``loras``: (LoRA file, strength) pairs baked into the weights; a lora-stage run's own LoRA
    is baked in first. ``dtype``: the sampling dtype, in which the LoRA-targeted weights are
    baked (not the checkpoint's: fp32 sampling of a bf16 checkpoint keeps a small LoRA whole).
    """
    from krea2_train.model.lora_commands import bake_lora_files
    from krea2_train.model.presets import build_model
    from krea2_train.train.checkpoint import load_checkpoint_weights

    source = find_run_checkpoint(checkpoint, runs_root)
    weights, config = load_checkpoint_weights(source, lora_dtype=dtype)
    bake_lora_files(weights, loras, dtype)
    with torch.device("meta"):
        model = build_model(config)
    model.load_state_dict(weights, strict=True, assign=True)
    run_dir = run_dir_of(source) if is_dcp_checkpoint(source) else None
    return model.eval(), run_dir


def run_sampler(run_dir: Path | None) -> tuple[str, int | None, float | None]:
    """The sampler a run's checkpoints default to: (preset, steps, mu). A TDM run's student
    samples on its own grid (``tdm.student_steps`` steps shifted by ``tdm.mu``, no guidance: the
    CFG is baked in); anything else with the ``raw`` preset."""
    from krea2_train.stages.tdm import student_sampler

    if run_dir is not None and (run_dir / "config.yaml").exists():
        run_config = OmegaConf.load(run_dir / "config.yaml")
        if OmegaConf.select(run_config, "stage.kind") == "tdm":
            student = student_sampler(run_config.tdm)
            return "turbo", student.num_steps, student.mu
    return "raw", None, None


def conditioning_settings(args: argparse.Namespace, run_dir: Path | None) -> dict:
    """Conditioning networks: the run's, overridden by what the command line gives."""
    settings = dict(
        autoencoder=None, autoencoder_path=None, text_encoder=None, max_text_tokens=512, text_select_layers=None, patch_size=2
    )
    if run_dir is not None and (run_dir / "config.yaml").exists():
        run_conditioning = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml").conditioning)
        settings.update({key: run_conditioning[key] for key in settings})
        if settings["text_encoder"] == "tiny":
            settings["text_encoder"] = str(run_dir / "text_encoder")
    for key in ("autoencoder", "autoencoder_path", "text_encoder", "max_text_tokens"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    missing = [f"--{key.replace('_', '-')}" for key in ("autoencoder", "text_encoder") if not settings[key]]
    if missing:
        raise UsageError(
            f"{args.checkpoint} is not a run of this trainer, so its conditioning is unknown: pass {' and '.join(missing)} "
            "(Krea 2: --text-encoder QWEN3_VL_DIR --autoencoder qwen_image --autoencoder-path VAE_DIR; a tiny CPU run's "
            "export: --text-encoder runs/RUN/text_encoder --autoencoder pixel)"
        )
    return settings


def run_sample(args: argparse.Namespace) -> int:
    from krea2_train.conditioning.conditioner import build_conditioner
    from krea2_train.flow.generate import generate, to_pil
    from krea2_train.flow.sampler import resolve_sampler_settings

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    loras = [parse_lora_argument(lora) for lora in args.lora]
    model, run_dir = load_for_sampling(args.checkpoint, args.runs_root, loras, dtype)
    settings = conditioning_settings(args, run_dir)
    conditioner = build_conditioner(
        settings["autoencoder"],
        settings["text_encoder"],
        autoencoder_path=settings["autoencoder_path"],
        text_select_layers=settings["text_select_layers"],
        max_text_tokens=settings["max_text_tokens"],
        patch_size=settings["patch_size"],
    )
    model.to(device=device, dtype=dtype)  # whatever dtype the weights were stored in
    unit = conditioner.pixels_per_token
    height = args.height or conditioner.image_side(args.resolution)
    width = args.width or conditioner.image_side(args.resolution)
    if height % unit or width % unit:
        given = "--height/--width" if args.height or args.width else f"--resolution {args.resolution}"
        raise UsageError(f"{given} gives {height}x{width} px: this autoencoder needs multiples of {unit} px")
    grid = conditioner.grid(height, width)
    preset, steps, mu = (args.preset, None, None) if args.preset else run_sampler(run_dir)
    sampler = resolve_sampler_settings(preset, grid.num_tokens, num_steps=args.steps or steps, guidance_scale=args.guidance, mu=mu)
    print(f"sampler: {preset} preset, {sampler.num_steps} steps, guidance {sampler.guidance_scale}, mu {sampler.mu:.3f}")
    prompts = [p for p in args.prompt for _ in range(args.num_images)]
    images = generate(
        model, conditioner, prompts, height, width, sampler, seed=args.seed, negative_prompt=args.negative_prompt,
        device=device, dtype=dtype,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(to_pil(images)):
        path = out / f"sample-{index:03d}.png"
        image.save(path)
        print(path)
    return 0


def multiple_of_16(text: str) -> int:
    """argparse type of ``--resolution``: a positive multiple of 16 px (one token per 16 px)."""
    value = int(text)
    if value <= 0 or value % 16:
        raise argparse.ArgumentTypeError(f"{value} is not a positive multiple of 16 (one token per 16 px)")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("sample", help="generate images from a checkpoint", description=help_text(__doc__),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run name or dir, checkpoint dir, diffusers dir or safetensors file")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                        help="a LoRA (diffusers, ComfyUI or ai-toolkit layout) applied at SCALE (default 1); repeatable")
    parser.add_argument("--out", default="samples")
    parser.add_argument("--preset", default=None, choices=sorted(SAMPLER_PRESETS), help="sampler preset: raw (52 steps, g=3.5) or turbo (8 steps, g=0); "
                        "default: a TDM run's own student grid, else raw")
    parser.add_argument("--steps", type=positive_int, default=None)
    parser.add_argument("--guidance", type=non_negative_float, default=None)
    parser.add_argument("--resolution", type=multiple_of_16, default=256, help="nominal resolution (Qwen-VAE pixels; 16 px per token; default 256, whatever the run trained at)")
    parser.add_argument("--height", type=positive_int, default=None, help="image height in pixels (overrides --resolution)")
    parser.add_argument("--width", type=positive_int, default=None)
    parser.add_argument("--num-images", type=positive_int, default=1, help="images per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs-root", default="runs")
    parser.add_argument("--text-encoder", default=None, help="local Qwen3-VL directory (runs bring their own)")
    parser.add_argument("--autoencoder", default=None, choices=["pixel", "qwen_image"])
    parser.add_argument("--autoencoder-path", default=None)
    parser.add_argument("--max-text-tokens", type=positive_int, default=None)
    parser.add_argument("--device", type=torch_device, default=None, help="where the DiT runs (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="the DiT's compute dtype, whatever the stored one (default: bf16 on cuda, fp32 on cpu)")
    parser.set_defaults(func=run_sample)
