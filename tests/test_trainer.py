"""The trainer end to end on CPU: a stage runs, checkpoints, resumes, skips non-finite steps,
refuses bad stage settings before any work, and its outputs load elsewhere."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from krea2_train.config import load_config
from krea2_train.model.dit import AUXILIARY_PREFIX
from krea2_train.model.presets import build_model, model_config
from krea2_train.stages import StageConfigError

from helpers import random_tiny_model

REPO = Path(__file__).resolve().parents[1]


def overrides(runs_root, steps=6, interval=3, extra=()):
    return [
        f"runs_root={runs_root}",
        f"stage.steps={steps}",
        f"checkpoint.interval={interval}",
        "logging.wandb=disabled",
        "logging.sample_steps=2",
        "logging.sample_prompts=[a red circle,a blue square]",
        "data.num_samples=48",
        "data.num_workers=0",
        "data.global_batch_size=4",
        *extra,
    ]


def train(tmp_path, dsn, stage="pretrain_256", nproc=1, env=None, check=True, **kwargs):
    args = overrides(tmp_path / "runs", **kwargs)
    if nproc == 1:
        command = [sys.executable, "-m", "krea2_train", "--config", f"stage/{stage}", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "krea2_train", "--config", f"stage/{stage}", *args]
    result = subprocess.run(command, cwd=tmp_path, env={**os.environ, "KREA2_PG_DSN": dsn, **(env or {})}, capture_output=True, text=True, timeout=900)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def step_losses(run_dir):
    return {r["step"]: r["loss"] for r in records(run_dir) if "event" not in r}


def test_step_values_are_reduced_in_one_place():
    """One process: the loss and the stage's metrics come back as floats, signals as flags."""
    from krea2_train.train.trainer import reduce_step_values

    values = reduce_step_values(
        torch.tensor(2.5),
        {"loss_fm": torch.tensor(2.0), "a_metric": torch.tensor([0.25])},
        signals=(False, True),
        grad_norm=torch.tensor(7.0),
    )
    assert values == {"loss": 2.5, "a_metric": 0.25, "loss_fm": 2.0, "signals": (False, True), "grad_norm": 7.0}
    extremes = reduce_step_values(
        torch.tensor(1.0), {"w_max": torch.tensor(3.0), "w_min": torch.tensor(-0.5), "w_mean": torch.tensor(1.0)},
        signals=(), grad_norm=torch.tensor(2.0),
    )
    assert extremes == {"loss": 1.0, "w_mean": 1.0, "w_max": 3.0, "w_min": -0.5, "signals": (), "grad_norm": 2.0}


def test_extreme_metrics_take_the_extreme_over_micro_batches():
    from krea2_train.train.trainer import accumulate_metric

    total = None
    for value in (2.0, 5.0, 1.0):
        total = accumulate_metric("w_is_max", total, torch.tensor(value))
    assert total.item() == 5.0
    total = None
    for value in (2.0, 5.0, 1.0):
        total = accumulate_metric("w_is_min", total, torch.tensor(value))
    assert total.item() == 1.0
    assert accumulate_metric("loss_fm", torch.tensor(2.0), torch.tensor(5.0)).item() == 7.0  # summed, averaged later


def test_each_network_is_clipped_on_its_own():
    """TDM's fake score (an lr_scales prefix) must not shrink the student's step, nor the reverse."""
    from torch import nn

    from krea2_train.train.trainer import clip_networks, trained_networks

    def model_with_gradients():
        model = nn.ModuleDict({"student": nn.Linear(2, 2, bias=False), "auxiliary": nn.ModuleDict({"fake": nn.Linear(2, 2, bias=False)})})
        model.student.weight.grad = torch.full((2, 2), 0.25)  # norm 0.5
        model.auxiliary.fake.weight.grad = torch.full((2, 2), 5.0)  # norm 10
        return model

    model = model_with_gradients()
    norm = clip_networks(trained_networks(model, {"auxiliary.fake": 5.0}), 1.0)
    assert norm.item() == pytest.approx(math.sqrt(0.5**2 + 10**2))
    assert model.student.weight.grad.norm().item() == pytest.approx(0.5)  # under the limit: untouched
    assert model.auxiliary.fake.weight.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    joint = model_with_gradients()
    clip_networks(trained_networks(joint), 1.0)  # one network: one norm for everything
    assert joint.student.weight.grad.norm().item() == pytest.approx(0.5 / math.sqrt(0.5**2 + 10**2), rel=1e-5)


def test_the_error_that_stopped_training_is_the_one_raised_and_every_part_closes(monkeypatch, caplog):
    """A save in flight that fails while the trainer closes after another error (its wait raises)
    is logged, not raised in its place; and the loader still closes after the checkpointer raised."""
    from krea2_train.train import trainer as trainer_module
    from krea2_train.train.checkpoint import CheckpointWriteError

    closed = []

    class Part:
        def __init__(self, name, error=None):
            self.name, self.error = name, error

        def close(self):
            closed.append(self.name)
            if self.error is not None:
                raise self.error

    class Failing(trainer_module.Trainer):
        def __init__(self, config):
            self.supervision, self.train_state = None, trainer_module.TrainState()
            self.checkpointer = Part("checkpointer", CheckpointWriteError("checkpoint step 4 could not be written"))
            self.metrics, self.loader = Part("metrics"), Part("loader")

        def _restore_signal_handlers(self):
            pass

        def train(self):
            raise FloatingPointError("the loss is NaN")

    monkeypatch.setattr(trainer_module, "Trainer", Failing)
    with pytest.raises(FloatingPointError, match="the loss is NaN"):
        trainer_module.run(None)
    assert closed == ["checkpointer", "metrics", "loader"]
    assert "while stopping after FloatingPointError: CheckpointWriteError: checkpoint step 4" in caplog.text


def test_bad_stage_settings_refuse_before_heavy_work(tmp_path):
    from krea2_train.__main__ import main
    from krea2_train.train.trainer import Trainer

    config = load_config("stage/grpo", [f"runs_root={tmp_path}", "grpo.group_size=1"])
    with pytest.raises(StageConfigError, match="grpo.group_size must be >= 2"):
        Trainer(config)
    assert main(["--config", "stage/stpo", f"runs_root={tmp_path}", "stage.init_from=null"]) == 2  # "bad config", not a traceback
    # nothing but the record that tells the Slurm launcher not to resubmit
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == ["stpo", "stpo/user_error.txt"]


def test_a_text_encoder_that_does_not_fit_the_model_is_refused_before_the_model_is_built(tmp_path, monkeypatch):
    from krea2_train.train.trainer import Trainer

    def never(self):
        raise AssertionError("the DiT was built")

    monkeypatch.setattr(Trainer, "_build_model", never)
    config = load_config("stage/pretrain_256", [f"runs_root={tmp_path}", "model.overrides={num_text_layers: 6}"])
    with pytest.raises(StageConfigError, match="gives 4 tapped layers of width 64; model.preset=tiny reads 6 of width 64"):
        Trainer(config)


def test_cli_rejects_bad_key_and_prints_config(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "krea2_train", "--config", "stage/pretrain_256", "optim.lrr=1"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "unknown config key 'optim.lrr'" in bad.stderr
    shown = subprocess.run([sys.executable, "-m", "krea2_train", "--config", "stage/pretrain_512", "--print-config"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert shown.returncode == 0 and "init_from: pretrain_256" in shown.stdout


@pytest.mark.postgres
def test_stage_runs_resumes_exports_and_samples(tmp_path, fresh_database_dsn):
    kernels = ["parallel.attention_backends=[flash,math]"]  # the SDPA choice is checked and applied
    # the Slurm script's grace at the time limit, too short for any checkpoint: one alarm, at the
    # first save whose predecessor's write time is known
    train(tmp_path, fresh_database_dsn, steps=6, interval=3, extra=kernels, env={"KREA2_CHECKPOINT_GRACE_S": "0"})
    run_dir = tmp_path / "runs" / "pretrain_256"
    assert sorted(step_losses(run_dir)) == [1, 2, 3, 4, 5, 6]
    (alarm,) = [r for r in records(run_dir) if r.get("event") == "alarm"]
    assert alarm["step"] == 6 and "more than KREA2_CHECKPOINT_GRACE_S=0 s allow" in alarm["message"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    assert (run_dir / "samples" / "step-00000006.png").exists() and (run_dir / "loss.png").exists()
    for name in ("config.yaml", "model_config.json", "manifest.json"):
        assert (run_dir / name).exists()

    # the same command with more steps resumes from step 6
    train(tmp_path, fresh_database_dsn, steps=8, interval=3, extra=kernels)
    events = [r for r in records(run_dir) if r.get("event") == "resume"]
    assert len(events) == 1 and events[0]["step"] == 6
    assert sorted(step_losses(run_dir)) == list(range(1, 9))
    assert [r["step"] for r in records(run_dir) if r.get("event") == "checkpoint"] == [3, 6, 8]
    # the same command again: finished already, nothing trained or redrawn
    grid_written = (run_dir / "samples" / "step-00000008.png").stat().st_mtime_ns
    again = train(tmp_path, fresh_database_dsn, steps=8, interval=3, extra=kernels)
    assert "finished already (step 8 of 8): nothing to train" in again.stdout + again.stderr
    assert (run_dir / "samples" / "step-00000008.png").stat().st_mtime_ns == grid_written
    assert sorted(step_losses(run_dir)) == list(range(1, 9))

    # the logged lr is the one each step trained with: the first start's schedule (6 steps), read
    # from the optimizer before each scheduler step
    from krea2_train.train.trainer import build_optimizer

    first_start = load_config("stage/pretrain_256", overrides(tmp_path / "runs", steps=6, interval=3, extra=kernels))
    optimizers, schedulers = build_optimizer(random_tiny_model(), first_start, torch.device("cpu"))
    used = []
    for _ in range(6):
        used.append(optimizers.optimizers[0].param_groups[-1]["lr"])
        schedulers.step()
    logged = {r["step"]: r["lr"] for r in records(run_dir) if "event" not in r}
    assert [logged[step] for step in range(1, 7)] == pytest.approx(used) and used[0] < used[1]

    # a restart with another model refuses, naming the setting, and leaves the run's record alone
    recorded = (run_dir / "model_config.json").read_text()
    changed = train(tmp_path, fresh_database_dsn, steps=10, interval=3, extra=[*kernels, "+model.overrides.num_layers=3"], check=False)
    assert changed.returncode != 0 and "different model config" in changed.stderr and "num_layers: 3 vs 2" in changed.stderr
    assert (run_dir / "model_config.json").read_text() == recorded

    # so does a restart with another batch size (the loader's order) or other data (the pinned shards)
    batch = train(tmp_path, fresh_database_dsn, steps=10, interval=3, extra=[*kernels, "data.global_batch_size=2"], check=False)
    assert batch.returncode == 1 and "Traceback" not in batch.stderr, batch.stderr[-2000:]
    assert "saved with data.global_batch_size=4 and this start has 2" in batch.stderr
    assert "does not read" not in batch.stderr  # the checkpoint is fine: the setting is refused,
    assert "data.global_batch_size=4" in (run_dir / "user_error.txt").read_text()  # and not retried
    data = train(tmp_path, fresh_database_dsn, steps=10, interval=3, extra=[*kernels, "data.num_samples=40"], check=False)
    assert data.returncode == 1 and "data.num_samples 48 pinned, 40 now" in data.stderr, data.stderr[-2000:]
    import yaml  # the refused starts left the run's recorded settings (read by export, sample) as they were

    recorded_data = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]
    assert (recorded_data["global_batch_size"], recorded_data["num_samples"]) == (4, 48)

    # export loads in diffusers; sample writes a PNG from the run
    from diffusers import Krea2Transformer2DModel

    export = tmp_path / "export"
    subprocess.run([sys.executable, "-m", "krea2_train.cli", "export", str(run_dir), "--layout", "diffusers",
                    "--out", str(export)], check=True, cwd=tmp_path, capture_output=True)
    reference = Krea2Transformer2DModel.from_pretrained(export)
    from krea2_train.train.checkpoint import load_model_weights

    weights = load_model_weights(run_dir / "checkpoints" / "step-00000008")
    exported = {k: v for k, v in weights.items() if not k.startswith(AUXILIARY_PREFIX)}  # training-only modules
    assert set(exported) == set(reference.state_dict())
    assert all(torch.equal(reference.state_dict()[k], v) for k, v in exported.items())
    sampled = subprocess.run([sys.executable, "-m", "krea2_train.cli", "sample", "--checkpoint", str(run_dir),
                              "--prompt", "a red circle", "--steps", "2", "--out", str(tmp_path / "samples")],
                             cwd=tmp_path, capture_output=True, text=True)
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    assert (tmp_path / "samples" / "sample-000.png").exists()


@pytest.mark.slow
@pytest.mark.postgres
def test_a_restart_on_another_node_starts_from_the_runs_compile_cache(tmp_path, fresh_database_dsn):
    """With compiled blocks rank 0 keeps the run's compile results in compile_cache.bin; a restart
    on a node without them in its local Inductor cache loads them, and compiles no graph again."""
    import re

    compiled = ["parallel.compile=true", "irepa.enabled=false", "float8.enabled=false"]
    run_dir = tmp_path / "runs" / "pretrain_256"

    def graphs(result):
        hits, misses = re.search(r"compiled graphs of this start: (\d+) from the cache, (\d+) compiled", result.stdout).groups()
        return int(hits), int(misses)

    first = train(tmp_path, fresh_database_dsn, steps=3, interval=3, extra=compiled, env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "node-a")})
    hits, misses = graphs(first)
    assert hits == 0 and misses > 0 and (run_dir / "compile_cache.bin").stat().st_size > 0
    second = train(tmp_path, fresh_database_dsn, steps=6, interval=3, extra=compiled, env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "node-b")})
    assert re.search(r"compile cache: [1-9]\d* artifacts loaded from .*compile_cache.bin", second.stdout)
    assert graphs(second) == (misses, 0)


@pytest.mark.postgres
def test_nonfinite_steps_are_skipped_then_rolled_back(tmp_path, fresh_database_dsn):
    train(tmp_path, fresh_database_dsn, steps=7, interval=2, env={"KREA2_FAULTS": "nan@4,nan@5,nan@6"},
          extra=["optim.max_consecutive_skips=3"])
    run_dir = tmp_path / "runs" / "pretrain_256"
    events = [r for r in records(run_dir) if "event" in r]
    assert [e["step"] for e in events if e["event"] == "skip"] == [4, 5, 6]
    rollbacks = [e for e in events if e["event"] == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["to"].endswith("step-00000002")
    losses = step_losses(run_dir)
    assert all(losses[s] == losses[s] for s in (1, 2, 3, 7))  # finite outside the injected steps
    assert all(losses[s] != losses[s] for s in (4, 5, 6))  # NaN where injected


@pytest.mark.slow
@pytest.mark.postgres
def test_exact_resume_after_sigkill_and_on_another_world_size(tmp_path, fresh_database_dsn):
    """2 ranks uninterrupted vs. 2 ranks SIGKILLed after a checkpoint and restarted: identical
    losses and final weights; resuming the same checkpoint on 1 rank continues the trajectory."""
    import random
    import shutil

    from krea2_train.train.checkpoint import load_model_weights

    steps, interval = 8, 3
    runs = tmp_path / "runs"
    train(tmp_path, fresh_database_dsn, nproc=2, steps=steps, interval=interval, extra=["run_name=reference"])

    kill_step = random.Random(0).choice([4, 5, 7])
    crashed = train(tmp_path, fresh_database_dsn, nproc=2, steps=steps, interval=interval, extra=["run_name=faulty"],
                    env={"KREA2_FAULTS": f"kill@{kill_step}:rank=1"}, check=False)
    assert crashed.returncode != 0
    assert len(step_losses(runs / "faulty")) >= kill_step
    train(tmp_path, fresh_database_dsn, nproc=2, steps=steps, interval=interval, extra=["run_name=faulty"])
    resumed_at = [r["step"] for r in records(runs / "faulty") if r.get("event") == "resume"]
    assert len(resumed_at) == 1 and resumed_at[0] in (3, 6) and resumed_at[0] <= kill_step  # newest committed

    # the stage's metrics are averaged over both ranks like the loss (iREPA weight 1 in this stage)
    for record in (r for r in records(runs / "reference") if "event" not in r):
        assert record["loss"] == pytest.approx(record["loss_fm"] + record["loss_irepa"], rel=1e-5, abs=1e-6)

    reference_losses, resumed_losses = step_losses(runs / "reference"), step_losses(runs / "faulty")
    assert reference_losses == resumed_losses  # bit for bit, every step (re-run steps overwrite)
    final = "checkpoints/step-00000008"
    expected, actual = load_model_weights(runs / "reference" / final), load_model_weights(runs / "faulty" / final)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)

    # resume the reference's step-6 checkpoint with one process: the same trajectory (reduction order aside)
    single = runs / "single"
    (single / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "model_config.json", "manifest.json"):
        shutil.copy(runs / "reference" / name, single / name)
    shutil.copytree(runs / "reference" / "checkpoints" / "step-00000006", single / "checkpoints" / "step-00000006")
    train(tmp_path, fresh_database_dsn, nproc=1, steps=steps, interval=interval, extra=["run_name=single"])
    single_losses = step_losses(single)
    for step in (7, 8):
        assert single_losses[step] == pytest.approx(reference_losses[step], rel=1e-6)


@pytest.mark.postgres
def test_registry_dataset_trains_right_after_ingest(tmp_path, fresh_database_dsn):
    """The small-data path: a folder of images with captions, `krea2 data ingest`, then a run: the
    trainer decodes, dedups and packs the dataset at the stage's resolution by itself, and only
    that dataset: one ingested beside it (a large one, on a cluster) is left to its own workers."""
    import psycopg

    from krea2_train.data.shapes import write_shapes_dataset

    folder = write_shapes_dataset(tmp_path / "my_images", 24, 96, seed=3)
    for path in folder.glob("*.json"):
        path.unlink()  # a plain folder: image + caption .txt only
    env = {**os.environ, "KREA2_PG_DSN": fresh_database_dsn}
    for dataset in ("my_images", "beside"):
        subprocess.run([sys.executable, "-m", "krea2_train.cli", "data", "ingest", "--dataset", dataset, "--folder", str(folder)],
                       check=True, env=env, cwd=tmp_path, capture_output=True)
    train(tmp_path, fresh_database_dsn, steps=2, interval=2,
          extra=["data=registry", "data.dataset=my_images", "data.buckets=[1:1]", "data.global_batch_size=4", "data.num_workers=0"])
    run_dir = tmp_path / "runs" / "pretrain_256"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert sum(shard["num_samples"] for shard in manifest) == 24
    assert sorted(step_losses(run_dir)) == [1, 2]
    with psycopg.connect(fresh_database_dsn) as conn:
        decoded = dict(conn.execute(
            "SELECT d.name, count(i.decode_ok) FROM images i JOIN datasets d ON d.id = i.dataset_id GROUP BY d.name"
        ).fetchall())
        beside_rows = conn.execute(
            "SELECT count(*) FROM job_runs j JOIN images i ON i.id = j.image_id JOIN datasets d ON d.id = i.dataset_id"
            " WHERE d.name = 'beside'"
        ).fetchone()[0]
    assert decoded == {"my_images": 24, "beside": 0} and beside_rows == 0


@pytest.mark.postgres
def test_a_restart_during_a_database_outage_trains_on_its_pinned_data(tmp_path, fresh_database_dsn):
    """The database restarts, and the run restarts with it (a node failure): its data is pinned
    and its order is the checkpoint's, so it trains on, saying so, and writes its leases later. A
    run with nothing pinned cannot prepare its data and says which server it cannot reach."""
    unreachable = "postgresql://krea2@127.0.0.1:9/nowhere"
    train(tmp_path, fresh_database_dsn, steps=2, interval=2, extra=["irepa.enabled=false"])
    result = train(tmp_path, unreachable, steps=4, interval=2, extra=["irepa.enabled=false"])
    assert "so it trains on without the database" in result.stdout + result.stderr
    assert sorted(step_losses(tmp_path / "runs" / "pretrain_256")) == [1, 2, 3, 4]
    fresh = train(tmp_path, unreachable, steps=2, interval=2, check=False, extra=["irepa.enabled=false", "run_name=other"])
    assert fresh.returncode != 0 and "cannot reach PostgreSQL at 127.0.0.1:9" in fresh.stderr


@pytest.mark.postgres
@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_sigusr1_checkpoints_and_continues_sigterm_checkpoints_and_exits(tmp_path, fresh_database_dsn, stop):
    """As Slurm signals a job step, and as Ctrl-C interrupts a terminal's command: every process
    of it, the loader's worker included (a worker killed by the signal would make the next batch
    raise before the exit checkpoint)."""
    import signal
    import time

    args = [arg for arg in overrides(tmp_path / "runs", steps=500, interval=1000, extra=["irepa.enabled=false"])
            if not arg.startswith("data.num_workers=")]  # fmt: skip
    command = [sys.executable, "-m", "krea2_train", "--config", "stage/pretrain_256", *args, "data.num_workers=1"]
    process = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "KREA2_PG_DSN": fresh_database_dsn},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    run_dir = tmp_path / "runs" / "pretrain_256"
    checkpoints = run_dir / "checkpoints"

    def wait_for(condition, timeout=180):
        deadline = time.time() + timeout
        while not condition():
            assert process.poll() is None and time.time() < deadline, "the run ended or stalled"
            time.sleep(0.2)

    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(step_losses(run_dir)) >= 2)
        os.killpg(process.pid, signal.SIGUSR1)
        wait_for(lambda: checkpoints.exists() and any(not p.name.endswith(".tmp") for p in checkpoints.iterdir()))
        first = max(step_losses(run_dir))
        wait_for(lambda: max(step_losses(run_dir)) >= first + 2)  # it went on training
        os.killpg(process.pid, getattr(signal, stop))
        assert process.wait(timeout=120) == 0
    finally:
        process.kill()
    last = max(step_losses(run_dir))
    assert f"step-{last:08d}" in {p.name for p in checkpoints.iterdir()}  # the exit checkpoint is the last step
    assert [r["event"] for r in records(run_dir) if r.get("event") == "signal_exit"] == ["signal_exit"]
    assert last < 500


@pytest.mark.postgres
def test_a_sigterm_during_a_sigusr1_checkpoint_is_kept(tmp_path, fresh_database_dsn):
    """SIGUSR1 after step 3 makes step 4 checkpoint and go on; a SIGTERM that arrives between step
    4's signal agreement and the end of its checkpoint must still stop the run at step 5."""
    train(tmp_path, fresh_database_dsn, steps=10, interval=1000, env={"KREA2_FAULTS": "usr1@3,term@4"},
          extra=["irepa.enabled=false"])
    run_dir = tmp_path / "runs" / "pretrain_256"
    assert max(step_losses(run_dir)) == 5
    events = [(r["event"], r["step"]) for r in records(run_dir) if r.get("event") in ("checkpoint", "signal_exit")]
    assert events == [("checkpoint", 4), ("checkpoint", 5), ("signal_exit", 5)]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000004", "step-00000005"]


@pytest.mark.postgres
def test_a_start_fenced_by_a_newer_one_stops_without_writing_to_the_run(tmp_path, fresh_database_dsn):
    """A leftover process of an older start (a requeued job whose node kept running) must not write
    checkpoints beside the newer start: the newer start's lease claim fences it within a step."""
    import psycopg
    import time

    command = [sys.executable, "-m", "krea2_train", "--config", "stage/pretrain_256",
               *overrides(tmp_path / "runs", steps=500, interval=1000, extra=["irepa.enabled=false"])]
    process = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "KREA2_PG_DSN": fresh_database_dsn},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "runs" / "pretrain_256"
    try:
        deadline = time.time() + 180
        while not ((run_dir / "metrics.jsonl").exists() and len(step_losses(run_dir)) >= 2):
            assert process.poll() is None and time.time() < deadline, "the run ended or stalled"
            time.sleep(0.2)
        with psycopg.connect(fresh_database_dsn, autocommit=True) as conn:  # what a newer start's claim does
            claimed = conn.execute("UPDATE loader_ranks SET owner = 'a-newer-start', attempt = attempt + 1").rowcount
        assert claimed == 1
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, output[-3000:]
    assert "holds its data lease: this process is a leftover of an older start" in output
    assert "a newer start of this run owns it (do not restart this one)" in output and "run the same command again" not in output
    fenced = [r for r in records(run_dir) if r.get("event") == "fenced"]
    assert len(fenced) == 1 and max(step_losses(run_dir)) < fenced[0]["step"] < 60
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
    runlog = [json.loads(line) for line in (run_dir / "runlog.jsonl").read_text().splitlines()]
    assert [e.get("reason") for e in runlog if e["kind"] == "stop"] == ["fenced"]


def test_a_signal_checkpoint_that_outlasts_its_window_is_named_with_its_remedy():
    from krea2_train.train.trainer import exit_checkpoint_problem, exit_windows_s

    assert exit_windows_s({}) == {}  # neither torchrun nor the Slurm script: nothing kills the trainers early
    assert exit_windows_s({"TORCHELASTIC_RUN_ID": "x"}) == {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": 30.0}  # torchrun's default
    windows = exit_windows_s({"TORCHELASTIC_RUN_ID": "x", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120", "KREA2_CHECKPOINT_GRACE_S": "300"})
    assert windows == {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": 120.0, "KREA2_CHECKPOINT_GRACE_S": 300.0}
    assert exit_checkpoint_problem(write_s=50.0, step_s=10.0, windows_s=windows) is None  # 110 s fit in both
    problem = exit_checkpoint_problem(write_s=100.0, step_s=10.0, windows_s=windows)  # 210 s
    assert "needs about 210 s, more than TORCH_ELASTIC_SHUTDOWN_TIMEOUT=120 s allow" in problem
    assert "KREA2_SHUTDOWN_TIMEOUT_S" in problem and "KREA2_CHECKPOINT_GRACE_S" not in problem
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=120 and KREA2_CHECKPOINT_GRACE_S=300" in exit_checkpoint_problem(200.0, 10.0, windows)
    # the watchdog's limit on a save (and the wait for the one before it) counts too, anywhere
    watched = exit_windows_s({}, checkpoint_timeout_s=900.0)
    assert exit_checkpoint_problem(400.0, 10.0, watched) is None
    assert "resilience.checkpoint_timeout_s=900 s allow" in exit_checkpoint_problem(500.0, 10.0, watched)


def test_host_sync_counter_counts_sync_warnings_and_passes_others_on(monkeypatch):
    """The counter (CUDA's sync debug mode) is exercised with a stand-in mode switch on CPU."""
    import warnings

    from krea2_train.train.metrics import HostSyncCounter

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    with pytest.warns(UserWarning, match="unrelated"):
        with HostSyncCounter(torch.device("cuda")) as syncs:
            for _ in range(2):
                warnings.warn("called a synchronizing CUDA operation")
            warnings.warn("unrelated")
    assert syncs.count == 2 and modes == ["warn", "default"]
    with HostSyncCounter(torch.device("cuda"), enabled=False) as off, HostSyncCounter(torch.device("cpu")) as cpu:
        pass
    assert off.count is None and cpu.count is None and modes == ["warn", "default"]  # mode untouched


def test_init_from_is_pinned_to_the_checkpoint_the_run_started_from(tmp_path):
    """A restart rebuilds a stage's frozen reference from stage.init_from: it must be the weights
    the run began from even after the init_from run trained on."""
    from krea2_train.train.checkpoint import CheckpointManager, NoCheckpointError, find_run_checkpoint
    from krea2_train.train.trainer import INIT_FROM_RECORD, pinned_init_checkpoint

    base = tmp_path / "runs" / "sft"
    manager = CheckpointManager(base, interval=1, async_mode="sync")
    manager.save(1, {"model": {"w": torch.zeros(2)}})
    config = load_config("stage/stpo", [f"runs_root={tmp_path / 'runs'}", "stage.init_from=sft"])
    run_dir = tmp_path / "runs" / "stpo"
    run_dir.mkdir()
    first = pinned_init_checkpoint(config, tmp_path / "runs", run_dir, is_main=True)
    assert first.name == "step-00000001" and (run_dir / INIT_FROM_RECORD).is_file()
    manager.save(2, {"model": {"w": torch.ones(2)}})  # the sft run trains on
    manager.close()
    assert pinned_init_checkpoint(config, tmp_path / "runs", run_dir, is_main=True) == first
    fresh = tmp_path / "runs" / "stpo_fresh"
    fresh.mkdir()
    assert pinned_init_checkpoint(config, tmp_path / "runs", fresh, is_main=True).name == "step-00000002"
    # the sft run's retention pruned the pinned checkpoint: the restart says so instead of a bare "not found"
    import shutil

    shutil.rmtree(first)
    with pytest.raises(NoCheckpointError, match="the checkpoint this run started from .* no longer exists.*keep_last"):
        pinned_init_checkpoint(config, tmp_path / "runs", run_dir, is_main=True)
    # a checkpoint path with a step: the step needs a run
    with pytest.raises(NoCheckpointError, match="is a checkpoint itself: a step \\(1\\) picks a checkpoint of a run"):
        find_run_checkpoint(base / "checkpoints" / "step-00000002", step=1)


def test_init_from_another_model_is_refused_naming_what_differs(tmp_path, monkeypatch, caplog):
    """stage.init_from pointing at another model's checkpoint is refused before any weight is
    loaded, naming the differing keywords (not PyTorch's size-mismatch dump); keywords no shape
    shows (rope_theta) may change between the checkpoint and the run, with a warning naming them
    when the checkpoint records its own values (not when they would be inferred defaults)."""
    from krea2_train.model import layouts
    from krea2_train.model.layouts import CheckpointError
    from krea2_train.train.trainer import load_initial_weights

    path = layouts.save_model(build_model("tiny", num_layers=2), tmp_path / "two_layers.safetensors", layout="original")
    import krea2_train.train.trainer as trainer

    with monkeypatch.context() as patch:  # refused from the header alone: no weight is read (26 GB for the 12.9B model)
        patch.setattr(trainer, "load_checkpoint_weights", lambda source: pytest.fail("read the weights first"))
        with pytest.raises(CheckpointError, match=r"stage.init_from's checkpoint .*two_layers.safetensors.*num_layers: 2 vs 3"):
            load_initial_weights(path, model_config("tiny", num_layers=3))
    recorded_theta = model_config("tiny")["rope_theta"]
    with caplog.at_level("WARNING", logger="krea2_train.train.trainer"):
        weights = load_initial_weights(path, model_config("tiny", num_layers=2, rope_theta=1e5))
    assert f"other settings than this run's model: rope_theta {recorded_theta!r} -> 100000.0" in caplog.text
    build_model("tiny", num_layers=2).load_state_dict(weights, strict=True)
    caplog.clear()
    with caplog.at_level("WARNING", logger="krea2_train.train.trainer"):
        load_initial_weights(path, model_config("tiny", num_layers=2))
    assert "other settings" not in caplog.text


@pytest.mark.parametrize("fused", [False, True], ids=["read-on-host", "skipped-on-device"])
def test_update_phases_step_in_turn_and_a_phase_that_is_not_finite_stops_the_rest(fused):
    """A stage with update_phases: each phase's loss sees the previous phase's step; a phase whose
    norm is not finite steps nothing, nor do the phases after it, and the step counts as skipped.
    A fused optimizer (CUDA's) skips on the device, without reading each phase's norm on the host:
    nothing moves, its moments included, and its step count stays."""
    from types import SimpleNamespace

    from torch import nn

    from krea2_train.train.trainer import Trainer, trained_networks

    class TwoPhases:
        update_phases = ("first", "second")

        def __init__(self, model, poisoned):
            self.model, self.poisoned, self.seen = model, poisoned, []

        def loss(self, ctx, batch, phase):
            if phase == "second":  # what the second phase sees of the first network
                self.seen.append(self.model.first.weight.detach().clone())
            layer = self.model.first if phase == "first" else self.model.auxiliary.second
            loss = layer(batch["x"]).square().mean() * (float("nan") if phase in self.poisoned else 1.0)
            return loss, {f"loss_{phase}": loss.detach()}

    def step(poisoned):
        torch.manual_seed(0)
        model = nn.Module()
        model.first, model.auxiliary = nn.Linear(2, 2), nn.ModuleDict({"second": nn.Linear(2, 2)})
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True) if fused else torch.optim.SGD(model.parameters(), lr=0.1)
        stage = TwoPhases(model, poisoned)
        trainer = SimpleNamespace(
            config=SimpleNamespace(optim=SimpleNamespace(grad_accum_steps=1, grad_clip=1.0), seed=0),
            local_batch_size=4, dp_rank=0, model=model, conditioner=None, device=torch.device("cpu"),
            dtype=torch.float32, frozen={}, train_state=SimpleNamespace(step=0), stage=stage,
            faults=SimpleNamespace(poison_loss=lambda step: False), networks=trained_networks(model, {"auxiliary.": 1.0}),
            optimizers=optimizer, lr_schedulers=SimpleNamespace(schedulers=[SimpleNamespace(get_last_lr=lambda: [0.1])], step=lambda: None),
            _signal=0, loader=SimpleNamespace(fenced=False),
        )
        result = Trainer.train_step(trainer, {"x": torch.ones(4, 2)})
        moved = {name.split(".")[-2]: not torch.equal(p, before[name]) for name, p in model.named_parameters() if name.endswith("weight")}
        if fused:  # a skipped update leaves the step count and the moments as they were
            steps = {name.split(".")[-2]: float(optimizer.state[p]["step"]) for name, p in model.named_parameters() if name.endswith("weight")}
            assert steps == {layer: float(was_moved) for layer, was_moved in moved.items()}
            assert all(not torch.any(optimizer.state[p]["exp_avg_sq"]) for name, p in model.named_parameters()
                       if not moved[name.split(".")[-2]])  # fmt: skip
            assert getattr(optimizer, "found_inf", None) is None  # cleared after the step
        return result["finite"], moved, stage.seen[0], before["first.weight"]

    finite, moved, seen, before = step(poisoned=())
    assert finite and moved == {"first": True, "second": True}
    assert not torch.equal(seen, before)  # the second phase saw the first phase's step
    finite, moved, _, _ = step(poisoned=("first",))
    assert not finite and moved == {"first": False, "second": False}
    finite, moved, _, _ = step(poisoned=("second",))
    assert not finite and moved == {"first": True, "second": False}


@pytest.mark.parametrize("world_size, overrides, error, message", [
    (1, ["parallel.tp=2"], "ConfigError", r"'parallel.\*' do not fit this start's 1 rank\(s\): dp_shard=-1 needs world_size \(1\) divisible by"),
    (2, ["data.global_batch_size=6", "optim.grad_accum_steps=2"], "ConfigError",
     r"'data.global_batch_size': 6 is not divisible by 2 data-parallel rank\(s\) x 2 accumulation step\(s\)"),
    (4, ["stage=grpo", "data.global_batch_size=8", "grpo.group_size=4", "grpo.beta_kl=0"], "StageConfigError",
     r"a micro-batch of 2 sample\(s\) per rank .* must be a multiple of 4: each micro-batch holds whole groups of grpo.group_size=4"),
])
def test_settings_that_do_not_fit_the_world_size_are_refused_as_settings(world_of_one, monkeypatch, world_size, overrides, error, message):
    """A start on another world size (a restart on fewer nodes) whose parallel degrees, batch or
    GRPO groups no longer fit is a setting to fix, refused before the model is built: not a
    ValueError traceback from every rank (which the launcher would retry), nor GRPO's first step."""
    from types import SimpleNamespace

    import krea2_train.train.trainer as trainer_module
    from krea2_train.stages import build_stage

    config = load_config("stage/pretrain_256", overrides + ["stage.init_from=null"])
    if world_size > 1:  # the mesh itself needs that many processes: only its data-parallel size matters here
        monkeypatch.setattr(trainer_module, "build_parallel_dims", lambda *degrees: "dims")
        monkeypatch.setattr(trainer_module, "data_parallel_rank_size", lambda dims: (0, world_size))
    trainer = trainer_module.Trainer.__new__(trainer_module.Trainer)
    trainer.config, trainer.dist, trainer.stage = config, SimpleNamespace(world_size=world_size), build_stage(config)
    with pytest.raises(getattr(trainer_module, error), match=message):
        trainer._build_parallel_dims()


def test_a_fresh_start_gives_each_rank_generators_of_its_own():
    """LoRA dropout draws from the global generators: after the weights are built from one seed
    on every rank, a fresh start reseeds them by rank (before: every rank drew rank 0's masks),
    the same way on every start."""
    from types import SimpleNamespace

    from krea2_train.train.trainer import Trainer

    def draws_after_a_fresh_start(rank: int) -> torch.Tensor:
        trainer = Trainer.__new__(Trainer)
        trainer.config, trainer.dist = SimpleNamespace(seed=0), SimpleNamespace(rank=rank)
        trainer.checkpointer, trainer.checkpoint_state = SimpleNamespace(load=lambda state: None), dict
        torch.manual_seed(0)  # as _build_model leaves every rank
        trainer.resume()
        return torch.nn.functional.dropout(torch.ones(64), p=0.5, training=True)

    first, second = draws_after_a_fresh_start(0), draws_after_a_fresh_start(1)
    assert not torch.equal(first, second)
    assert torch.equal(draws_after_a_fresh_start(1), second)


def test_a_curve_that_reaches_zero_or_below_is_drawn_on_a_linear_axis(tmp_path):
    """GRPO's policy loss is about 0 and often negative: a log axis dropped every such value and
    left an empty picture."""
    import numpy as np
    from PIL import Image

    from krea2_train.train.plots import plot_curve

    def blue_pixels(values):
        path = plot_curve(list(range(len(values))), values, tmp_path / "curve.png", title="t")
        pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
        return int(((pixels[..., 2] > 150) & (pixels[..., 0] < 80)).sum())

    assert blue_pixels([0.02, -0.01, 0.0, -0.03, 0.01, -0.02]) > 100
    assert blue_pixels([2.0, 1.0, 0.5, 0.25]) > 100  # positive: log axis, drawn as before
    assert blue_pixels([float("nan"), 1.0]) == 0  # one finite value: nothing to draw, and no error
