"""MTTR on CPU: from a SIGKILLed rank to the first step after the automatic restart.

Each model trains with 2 processes through ``launch/local/train.sh`` (torchrun --max-restarts)
with ``KREA2_FAULTS=kill@K:rank=1``. The failure time is when step K finished (its metrics
record; the rank kills itself right after it); the recovery ends at the ``first_step`` record of
the second start in the run log. Both clocks are the wall clock of the same machine. The restart
includes torchrun noticing the death and stopping the group, process start-up, imports, building
the model, loading the checkpoint and the first step. Target: under 30 s for the tiny model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from krea2_train.arguments import positive_int
from krea2_train.store.db import DSN_ENV, STORE_DIR_ENV
from krea2_train.train.metrics import read_metrics
from krea2_train.train.runlog import read_events, summarize

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
# A ~100M-parameter Krea2DiT on the tiny text encoder's width (tiny preset + these overrides).
MODEL_100M = dict(
    num_layers=10, attention_head_dim=64, num_attention_heads=12, num_key_value_heads=4, intermediate_size=3072,
    axes_dims_rope=(16, 24, 24),
)  # fmt: skip
TINY_TARGET_S = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mttr-models", nargs="+", default=["tiny", "100m"], choices=["tiny", "100m"])
    parser.add_argument("--mttr-kill-step", type=positive_int, default=5, help="step after which rank 1 is SIGKILLed (default 5)")
    parser.add_argument("--mttr-dir", default=None, help="where the runs go (default: a temporary directory)")


def model_overrides(name: str) -> list[str]:
    if name == "tiny":
        return []
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in MODEL_100M.items()}
    return [f"++model.overrides.{key}={json.dumps(value).replace(' ', '')}" for key, value in values.items()]


def measure_mttr(root: Path, model: str, kill_step: int) -> dict:
    """Train with a kill at ``kill_step``; returns the recovery time and the run log's view of it."""
    steps = kill_step + 3
    command = [
        "bash", str(REPO / "launch/local/train.sh"), "--config", "stage/pretrain_256", f"runs_root={root / 'runs'}",
        f"run_name=mttr_{model}", f"stage.steps={steps}", "checkpoint.interval=2", "logging.wandb=disabled",
        "logging.sample_steps=1", "logging.sample_prompts=[a red circle]", "data.num_samples=48", "data.num_workers=0",
        "data.global_batch_size=4", *model_overrides(model),
    ]  # fmt: skip
    env = {key: value for key, value in os.environ.items() if key != DSN_ENV}  # never the user's database
    env |= {"KREA2_NPROC": "2", "KREA2_MAX_RESTARTS": "1", "KREA2_FAULTS": f"kill@{kill_step}:rank=1", "PYTHON": sys.executable,
            STORE_DIR_ENV: str(root / "_store")}  # fmt: skip
    output = root / "train.log"
    logger.info("mttr: training %s on 2 ranks for %d steps, rank 1 SIGKILLed after step %d (its output: %s)",
                model, steps, kill_step, output)
    with output.open("w") as log:
        result = subprocess.run(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"the MTTR run of {model} failed:\n{output.read_text()[-6000:]}")
    run_dir = root / "runs" / f"mttr_{model}"
    killed_at = min(r["time"] for r in read_metrics(run_dir) if r["step"] == kill_step)
    events = read_events(run_dir)
    first_step = next(e for e in events if e["kind"] == "first_step" and e["incarnation"] == 2)
    logger.info("mttr: %s took its first step %.1f s after the SIGKILL", model, first_step["time"] - killed_at)
    phases = summarize(events, []).get("mttr_phases_s") or {}
    return {"mttr_s": first_step["time"] - killed_at, "runlog_recovery_s": first_step["recovery_s"], "phases_s": phases}


PHASES = {"relaunch": "failure -> process up", "setup": "imports, model, checkpoint", "first_step": "compilation, warm-up"}


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    if args.mttr_dir:  # created when new, like --ckpt-dir
        Path(args.mttr_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="krea2-bench-mttr-", dir=args.mttr_dir) as tmp:
        for model in args.mttr_models:
            root = Path(tmp) / model
            root.mkdir()
            measured = measure_mttr(root, model, args.mttr_kill_step)
            target = TINY_TARGET_S if model == "tiny" else None
            rows.append({
                "bench": "mttr", "metric": f"{model}: SIGKILL -> first step after restart", "value": measured["mttr_s"],
                "unit": "s", "target": f"< {TINY_TARGET_S:g}" if target else None,
                "met": None if target is None else measured["mttr_s"] < target,
            })  # fmt: skip
            rows.append({
                "bench": "mttr", "metric": f"{model}: recovery in the run log", "value": measured["runlog_recovery_s"],
                "unit": "s", "target": None, "met": None,
            })  # fmt: skip
            for phase, what in PHASES.items():  # where the recovery went (krea2 runs report's split)
                if phase in measured["phases_s"]:
                    rows.append({"bench": "mttr", "metric": f"{model}: {phase.replace('_', ' ')} ({what})",
                                 "value": measured["phases_s"][phase], "unit": "s", "target": None, "met": None})  # fmt: skip
    return rows
