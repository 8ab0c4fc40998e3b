"""``krea2 demo``: the recipe's chain on the shapes world, on CPU, in minutes.

pretrain_256 -> pretrain_512 -> pretrain_1024 -> midtrain -> sft -> stpo -> grpo -> tdm, each
stage initialised from the previous one (``init_from``), with the tiny model, the lossless pixel
autoencoder, a tiny random text encoder and an embedded PostgreSQL server. The post-training
stages run at the 256 px token grid (their own configs say 1024) so that their sampling (STPO's
on-policy losers, GRPO's rollouts, TDM's student rollouts) stays within CPU minutes. Every stage
writes a sample grid and a loss curve under ``runs/demo/<stage>``. Re-running resumes (a finished
stage is not retrained).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from krea2_train.arguments import help_text, int_in_range, positive_float

# stage -> steps on CPU (the 1024 stage is 4096 tokens per image: few steps)
DEMO_STAGES = {
    "pretrain_256": 400, "pretrain_512": 30, "pretrain_1024": 6, "midtrain": 4, "sft": 4, "stpo": 6, "grpo": 4, "tdm": 6,
}

# post-training at the 256 px grid, with batches and sampler steps sized for a CPU
POST_TRAINING_OVERRIDES = {
    "stpo": ["data.resolution=256", "stpo.loser_steps=6", "stpo.beta=50"],
    "grpo": [
        "data.resolution=256", "data.global_batch_size=8", "grpo.group_size=4", "grpo.num_steps=6",
        "grpo.sde_window_range=[0,2]",
    ],
    "tdm": ["data.resolution=256", "data.global_batch_size=4"],
}


def demo_overrides(stage: str, steps: int, runs_root: str, wandb: str, sample_steps: int = 12) -> list[str]:
    return [
        f"stage.steps={steps}",
        f"runs_root={runs_root}",
        f"logging.wandb={wandb}",
        f"logging.sample_steps={sample_steps}",
        "logging.log_interval=5",
        f"checkpoint.interval={max(steps // 2, 1)}",
        "data.num_samples=512",
        "optim.warmup_steps=5",
        "optim.lr=1e-3" if stage == "pretrain_256" else f"optim.lr={3e-4 if stage.startswith('pretrain') else 1e-4}",
        *POST_TRAINING_OVERRIDES.get(stage, []),
    ]


def run_demo(args: argparse.Namespace) -> int:
    from krea2_train.config import load_config
    from krea2_train.train.trainer import run

    stages = list(DEMO_STAGES)[: args.stages]
    for number, stage in enumerate(stages, start=1):
        steps = max(1, round(DEMO_STAGES[stage] * args.scale))
        print(f"[demo] stage {number}/{len(stages)}: {stage}, {steps} steps", flush=True)
        config = load_config(f"stage/{stage}", demo_overrides(stage, steps, args.runs_root, args.wandb, args.sample_steps))
        result = run(config)
        if not result.completed:  # the next stage must not start from a half-trained one
            why = ("after a checkpoint; the same `krea2 demo` command resumes it and goes on" if result.ending == "signal"
                   else "without writing: a newer start of the demo owns it")
            print(f"[demo] {stage} stopped at step {result.step} of {result.steps} {why}", flush=True)
            return SIGNAL_STOP_EXIT
        print(f"[demo] {stage}: samples in {result.run_dir / 'samples'}, loss curve {result.run_dir / 'loss.png'}", flush=True)
    print(f"[demo] done: {len(stages)} stages under {Path(args.runs_root)}")
    print(next_commands(Path(args.runs_root), stages))
    return 0


SIGNAL_STOP_EXIT = 130  # a shell's code for an interrupted command


def next_commands(runs_root: Path, stages: list[str]) -> str:
    """What to try after the demo, with its own paths (they are not the defaults' runs/<stage>)."""
    first, last = runs_root / stages[0], runs_root / stages[-1]
    return "\n".join([
        "[demo] next:",
        f"  krea2 runs report {stages[-1]} --runs-root {runs_root}          # starts, failures, goodput",
        f"  krea2 sample --checkpoint {last} --prompt 'a red circle' --out samples/   # sample the last stage",
        f"  krea2 export {first} --layout diffusers --out export/{stages[0]}       # a diffusers Krea2Transformer2DModel",
        f"  python -m krea2_train --config stage/lora runs_root={runs_root} stage.init_from={first} \\\n"
        "      stage.steps=40 data.resolution=256 data.num_samples=512 data.global_batch_size=4   # a LoRA on it, CPU-sized",
    ])


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run the recipe chain on the shapes world on CPU", description=help_text(__doc__),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-root", default="runs/demo", help="where the stages' runs go, one directory each (default runs/demo)")
    parser.add_argument("--stages", type=int_in_range(1, len(DEMO_STAGES)), default=len(DEMO_STAGES), help=f"run only the first N stages (1 to {len(DEMO_STAGES)})")
    parser.add_argument("--scale", type=positive_float, default=1.0, help="multiply every stage's steps")
    parser.add_argument("--sample-steps", type=int_in_range(1, 1000), default=12,
                        help="sampler steps of each stage's sample grid (default 12; the 256 px grids of the later stages take most of the demo's time)")
    parser.add_argument("--wandb", default="offline", choices=["offline", "online", "disabled"],
                        help="Weights & Biases logging (default offline: files under each run, nothing sent)")
    parser.set_defaults(func=run_demo)
