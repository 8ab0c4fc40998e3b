"""``krea2 demo`` (the README's main job) at a small scale: every stage of the recipe runs in
order, each initialised from the previous one, and writes its sample grid and loss curve; the
post-training stages pass the checks the GPU kit applies to them (STPO starts at ln 2 against its
reference, every GRPO rollout's first update has ratio 1)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from krea2_train.train.demo import DEMO_STAGES

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "infra" / "gpu"))
import summarize  # noqa: E402


@pytest.mark.slow
@pytest.mark.postgres
def test_demo_runs_every_stage_of_the_recipe(tmp_path, fresh_database_dsn):
    runs = tmp_path / "runs"
    result = subprocess.run(
        [sys.executable, "-m", "krea2_train.cli", "demo", "--scale", "0.02", "--sample-steps", "3", "--runs-root", str(runs), "--wandb", "disabled"],
        cwd=tmp_path, env={**os.environ, "KREA2_PG_DSN": fresh_database_dsn}, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert list(DEMO_STAGES) == ["pretrain_256", "pretrain_512", "pretrain_1024", "midtrain", "sft", "stpo", "grpo", "tdm"]
    for stage in DEMO_STAGES:
        assert (runs / stage / "loss.png").is_file(), stage
        assert list((runs / stage / "samples").glob("step-*.png")), stage
        assert f"initialised from {list(DEMO_STAGES)[list(DEMO_STAGES).index(stage) - 1]}" in result.stdout or stage == "pretrain_256"
    table = "\n".join(summarize.post_training_table([runs]))
    assert "| stpo |" in table and "(PASS)" in table.split("| stpo |")[1].split("\n")[0], table
    assert "| grpo |" in table and "(PASS)" in table.split("| grpo |")[1].split("\n")[0], table
    assert "| tdm | 1 | yes |" in table, table
    assert f"krea2 sample --checkpoint {runs / 'tdm'}" in result.stdout  # next commands with the demo's own paths
    assert "sampling 4 image(s) at 256x256 px: 3 steps" in result.stdout + result.stderr  # --sample-steps reaches the grids


def test_a_stage_stopped_by_a_signal_ends_the_demo(tmp_path, monkeypatch, capsys):
    """Ctrl-C or SIGTERM stops a stage after a checkpoint: the demo must not train the next stage
    from the half-trained one, and says how to go on."""
    import krea2_train.train.trainer as trainer
    from krea2_train.cli import main
    from krea2_train.train.demo import SIGNAL_STOP_EXIT

    started = []

    def stopped_early(config):
        started.append(config.stage.name)
        return trainer.RunResult(tmp_path / config.stage.name, 3, config.stage.steps, "signal")

    monkeypatch.setattr(trainer, "run", stopped_early)
    assert main(["demo", "--runs-root", str(tmp_path), "--wandb", "disabled"]) == SIGNAL_STOP_EXIT
    assert started == ["pretrain_256"]
    assert "pretrain_256 stopped at step 3 of 400 after a checkpoint; the same `krea2 demo` command resumes it" in capsys.readouterr().out
