"""CheckpointManager: round trips, async snapshots, atomic commit, retention, failures, resharding."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from krea2_train.files import file_sha256
from krea2_train.model import build_model
from krea2_train.train import checkpoint as ckpt
from krea2_train.train.checkpoint import (
    CheckpointManager,
    CheckpointVerificationError,
    CheckpointWriteError,
    ModelOptimizerState,
    NoCheckpointError,
    TrainState,
    find_run_checkpoint,
    load_model_weights,
    reseed_rng,
    write_model_config,
)

SCRIPTS = Path(__file__).parent / "ckpt_scripts"
REPO_ROOT = Path(__file__).parent.parent


class FakeLoader:
    """A loader position: the Stateful a data loader exposes."""

    def __init__(self, epoch: int = 0, batch_index: int = 0) -> None:
        self.epoch, self.batch_index = epoch, batch_index

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_index": self.batch_index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch_index = state["epoch"], state["batch_index"]


def tiny_model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = build_model("tiny")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, optimizer


def optimizer_step(model, optimizer, seed: int) -> None:
    """One AdamW step on random gradients (so exp_avg, exp_avg_sq and step are all non-trivial)."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.parameters():
        parameter.grad = torch.randn(parameter.shape, generator=generator)
    optimizer.step()
    optimizer.zero_grad()


def optimizer_tensors(optimizer) -> list[torch.Tensor]:
    return [value.clone() for state in optimizer.state.values() for value in state.values()]


def optimizer_state_by_name(model, optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's state tensors keyed ``"<parameter name>.<state key>"`` (e.g. ``"blocks.0.w.exp_avg"``)."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return {
        f"{names[id(parameter)]}.{key}": torch.as_tensor(value).clone()
        for parameter, state in optimizer.state.items()
        for key, value in state.items()
    }


def rng_draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3)


def assert_rng_draws_equal(actual, expected) -> None:
    assert actual[0] == expected[0] and actual[1] == expected[1]
    assert torch.equal(actual[2], expected[2])


def gated_writer(gate: threading.Event | None = None, error: OSError | None = None):
    """A DCP writer factory whose data write waits for ``gate`` or fails with ``error``."""

    class Writer(torch.distributed.checkpoint.FileSystemWriter):
        def write_data(self, plan, planner):
            if gate is not None and not gate.wait(timeout=120):
                raise TimeoutError("the test never opened the gate")
            if error is not None:
                raise error
            return super().write_data(plan, planner)

    return lambda path: Writer(str(path), single_file_per_rank=True, sync_files=True)


# ----------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------


def test_state_added_later_is_optional_in_older_checkpoints_and_saved_in_new_ones(tmp_path):
    """A checkpoint written before TrainState had consecutive_skips (or STPO saved its alarm
    streak) still loads, the new field keeping its value; a new checkpoint saves it; a key that is
    not optional and missing still fails the load."""
    from krea2_train.train.checkpoint import CheckpointLoadError

    class OldTrainState:  # the counters as checkpoints of the previous version hold them
        def __init__(self, **fields):
            self.fields = fields

        def state_dict(self):
            return dict(self.fields)

        def load_state_dict(self, state):
            self.fields = dict(state)

    old = CheckpointManager(tmp_path / "old", interval=1, async_mode="sync")
    assert old.save(4, {"train_state": OldTrainState(step=4, tokens_seen=40, samples_seen=8, skipped_steps=1)})
    loaded_state = TrainState(consecutive_skips=3)
    assert CheckpointManager(tmp_path / "old", interval=1).load({"train_state": loaded_state}).step == 4
    assert loaded_state == TrainState(step=4, tokens_seen=40, samples_seen=8, skipped_steps=1, consecutive_skips=3)

    new = CheckpointManager(tmp_path / "new", interval=1, async_mode="sync")
    assert new.save(5, {"train_state": TrainState(step=5, skipped_steps=2, consecutive_skips=2)})
    resumed = TrainState()
    CheckpointManager(tmp_path / "new", interval=1).load({"train_state": resumed})
    assert resumed.consecutive_skips == 2

    with pytest.raises(CheckpointLoadError, match="skipped_steps"):  # not optional
        older = CheckpointManager(tmp_path / "older", interval=1, async_mode="sync")
        older.save(6, {"train_state": OldTrainState(step=6, tokens_seen=0, samples_seen=0)})
        CheckpointManager(tmp_path / "older", interval=1).load({"train_state": TrainState()})


@pytest.mark.parametrize("async_mode", ["sync", "async"])
def test_round_trip_model_optimizer_train_state_rng_and_loader(tmp_path, async_mode):
    model, optimizer = tiny_model_and_optimizer(seed=0)
    optimizer_step(model, optimizer, seed=1)
    train_state = TrainState(step=10, tokens_seen=12345, samples_seen=80, skipped_steps=2, consecutive_skips=1)
    loader, local = FakeLoader(epoch=3, batch_index=17), FakeLoader(epoch=9, batch_index=99)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    manager = CheckpointManager(tmp_path, interval=10, async_mode=async_mode)
    stateful = {"model": ModelOptimizerState(model, optimizer), "train_state": train_state, "loader": loader}
    assert manager.save(10, stateful, rank_local={"local": local})
    expected_weights = {key: value.clone() for key, value in model.state_dict().items()}
    expected_optimizer = optimizer_tensors(optimizer)
    expected_draws = rng_draws()
    manager.wait()

    fresh_model, fresh_optimizer = tiny_model_and_optimizer(seed=1)
    fresh_state, fresh_loader, fresh_local = TrainState(), FakeLoader(), FakeLoader()
    loaded = CheckpointManager(tmp_path, interval=10).load(
        {"model": ModelOptimizerState(fresh_model, fresh_optimizer), "train_state": fresh_state, "loader": fresh_loader},
        rank_local={"local": fresh_local},
    )

    assert loaded.step == 10 and loaded.rank_state_restored and loaded.saved_world_size == 1
    for key, value in fresh_model.state_dict().items():
        assert torch.equal(value, expected_weights[key]), key
    restored_optimizer = optimizer_tensors(fresh_optimizer)
    assert len(restored_optimizer) == len(expected_optimizer) > 0
    assert all(torch.equal(a, b) for a, b in zip(restored_optimizer, expected_optimizer))
    assert fresh_optimizer.param_groups[0]["weight_decay"] == 0.1
    assert fresh_state == train_state
    assert (fresh_loader.epoch, fresh_loader.batch_index) == (3, 17)
    assert (fresh_local.epoch, fresh_local.batch_index) == (9, 99)
    assert_rng_draws_equal(rng_draws(), expected_draws)


def test_manifest_records_the_commit(tmp_path):
    model, optimizer = tiny_model_and_optimizer(seed=0)
    manager = CheckpointManager(tmp_path, interval=5, async_mode="sync", config_hash="abc123")
    assert not manager.save(7, {"model": ModelOptimizerState(model, optimizer)})  # not due
    assert manager.save(7, {"model": ModelOptimizerState(model, optimizer)}, force=True)
    directory = tmp_path / "checkpoints" / "step-00000007"
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["step"] == 7 and manifest["world_size"] == 1 and manifest["config_hash"] == "abc123"
    assert manifest["model_prefix"] == "model.model."
    on_disk = {p.relative_to(directory).as_posix(): p.stat().st_size for p in directory.rglob("*") if p.is_file()}
    del on_disk["manifest.json"]
    assert manifest["files"] == on_disk and manifest["bytes"] == sum(on_disk.values())
    assert manifest["sha256"] == {name: file_sha256(directory / name) for name in on_disk}  # every file, by its writer
    assert {".metadata", "__0_0.distcp", "rank_state/rank-00000.pt"} <= set(on_disk)
    assert manager.latest_step() == 7 and not list((tmp_path / "checkpoints").glob("*.tmp*"))


def test_load_model_weights_reads_only_the_model(tmp_path):
    model, optimizer = tiny_model_and_optimizer(seed=0)
    optimizer_step(model, optimizer, seed=1)
    manager = CheckpointManager(tmp_path, interval=1, async_mode="sync")
    manager.save(1, {"model": ModelOptimizerState(model, optimizer), "train_state": TrainState(step=1)})
    weights = load_model_weights(find_run_checkpoint(tmp_path))
    expected = model.state_dict()
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[key], expected[key]) for key in expected)


def test_single_process_with_an_initialised_process_group(tmp_path):
    from datetime import timedelta

    timeout = timedelta(seconds=77)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1, timeout=timeout)
    try:
        model, optimizer = tiny_model_and_optimizer(seed=0)
        optimizer_step(model, optimizer, seed=1)
        manager = CheckpointManager(tmp_path / "run", interval=2, async_mode="async")
        # its own group keeps the run's collective timeout (not gloo's default 30 minutes)
        assert manager._group._get_backend(torch.device("cpu")).options._timeout == timeout
        manager.save(2, {"model": ModelOptimizerState(model, optimizer), "train_state": TrainState(step=2)})
        manager.close()
        fresh_model, fresh_optimizer = tiny_model_and_optimizer(seed=3)
        state = TrainState()
        CheckpointManager(tmp_path / "run", interval=2).load({"model": ModelOptimizerState(fresh_model, fresh_optimizer), "train_state": state})
    finally:
        dist.destroy_process_group()
    assert state.step == 2
    expected_weights, restored_weights = model.state_dict(), fresh_model.state_dict()
    assert restored_weights.keys() == expected_weights.keys() and len(expected_weights) > 0
    for key, value in restored_weights.items():
        assert torch.equal(value, expected_weights[key]), key
    # the fresh optimizer never stepped: its state exists only if the checkpoint restored it
    expected_optimizer = optimizer_state_by_name(model, optimizer)
    restored_optimizer = optimizer_state_by_name(fresh_model, fresh_optimizer)
    assert len(expected_optimizer) > 0
    assert restored_optimizer.keys() == expected_optimizer.keys()
    for key, value in restored_optimizer.items():
        assert torch.equal(value, expected_optimizer[key]), key


# ----------------------------------------------------------------------------------------------
# Asynchronous saves
# ----------------------------------------------------------------------------------------------


def test_async_save_returns_before_the_write_and_snapshots_the_state(tmp_path, monkeypatch):
    gate = threading.Event()
    monkeypatch.setattr(ckpt, "_storage_writer", gated_writer(gate))
    model, optimizer = tiny_model_and_optimizer(seed=0)
    snapshot = {key: value.clone() for key, value in model.state_dict().items()}
    manager = CheckpointManager(tmp_path, interval=10, async_mode="async")
    try:
        assert manager.save(10, {"model": ModelOptimizerState(model, optimizer)})
        # save() returned while the write is held back: nothing is committed yet
        assert manager.latest_step() is None
        assert (tmp_path / "checkpoints" / ckpt.tmp_dir_name(10, manager._token)).is_dir()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(1.0)  # training continues and changes the weights in place
    finally:
        gate.set()
    manager.wait()
    assert manager.latest_step() == 10 and manager.last_blocked_s is not None and manager.last_write_s is not None
    weights = load_model_weights(tmp_path / "checkpoints" / "step-00000010")
    assert all(torch.equal(weights[key], snapshot[key]) for key in snapshot)


@pytest.mark.parametrize("async_mode", ["sync", "async"])
def test_a_failed_write_is_reported_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, async_mode):
    state = {"weights": torch.arange(10.0)}
    manager = CheckpointManager(tmp_path, interval=10, async_mode=async_mode)
    manager.save(10, state)
    manager.wait()
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ckpt, "_storage_writer", gated_writer(error=disk_full))
    tmp_dir = tmp_path / "checkpoints" / ckpt.tmp_dir_name(20, manager._token)
    with pytest.raises(CheckpointWriteError) as failure:
        manager.save(20, state)  # sync: raises here
        manager.wait()  # async: raises when the pending save is finished
    assert str(tmp_dir) in str(failure.value) and "No space left on device" in str(failure.value)
    assert manager.latest_step() == 10 and not tmp_dir.exists()
    monkeypatch.undo()
    manager.save(30, state)  # the manager keeps working after a failure
    manager.wait()
    assert sorted(manager.committed()) == [10, 30]


@pytest.mark.parametrize("async_mode", ["sync", "async"])
def test_tolerated_failed_saves_let_training_go_on_until_too_many_fail_in_a_row(tmp_path, monkeypatch, async_mode):
    """checkpoint.tolerated_failures=1: one failed periodic save is logged and listed, the next
    save tries again and a success resets the count; two in a row raise, naming both; a save that
    must succeed (the run's last) and an explicit wait raise at the first failure."""
    state = {"weights": torch.arange(10.0)}
    manager = CheckpointManager(tmp_path, interval=10, async_mode=async_mode, tolerated_failures=1)
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    real_writer = ckpt._storage_writer

    def save(step, failing, **kwargs):
        monkeypatch.setattr(ckpt, "_storage_writer", gated_writer(error=disk_full) if failing else real_writer)
        return manager.save(step, state, **kwargs)

    save(10, failing=False)
    save(20, failing=True)  # async: fails in the background, found by the next save
    assert len(manager.failed_saves) == (0 if async_mode == "async" else 1)  # sync: found at once
    save(30, failing=False)  # tries again
    manager.wait()
    ((failed_step, message),) = manager.failed_saves
    assert failed_step == 20 and "checkpoint step 20 could not be written" in message
    assert sorted(manager.committed()) == [10, 30] and manager.failures_in_a_row == 0
    manager.failed_saves.clear()

    save(40, failing=True)
    with pytest.raises(CheckpointWriteError, match=r"checkpoint step 50 could not be written .*\(2 saves in a row failed\)"):
        save(50, failing=True)
        manager.wait(tolerate=True)  # async: the second failure is found here
    assert [step for step, _ in manager.failed_saves] == [40]
    assert sorted(manager.committed()) == [10, 30]

    manager.failures_in_a_row = 0
    with pytest.raises(CheckpointWriteError, match="checkpoint step 60"):
        save(60, failing=True, may_fail=False)  # the last save of a run
        manager.wait()
    if async_mode == "async":
        manager.failures_in_a_row = 0
        save(70, failing=True)
        with pytest.raises(CheckpointWriteError, match="checkpoint step 70"):
            manager.wait()  # an explicit wait (an exit, the end of a run) raises
    assert sorted(manager.committed()) == [10, 30]


def _fail_with(error: OSError):
    def failing(*args, **kwargs):
        raise error

    return failing


@pytest.mark.parametrize("async_mode", ["sync", "async"])
@pytest.mark.parametrize("where", ["directory", "rank state", "manifest"])
def test_a_disk_full_before_or_after_the_dcp_write_is_a_checkpoint_write_error_that_leaves_nothing(
    tmp_path, monkeypatch, async_mode, where
):
    """Full (or read-only) when the save starts, or when its manifest is written: the same one
    error as a failed DCP write, naming the directory, which is removed (a whole checkpoint's space,
    kept for 15 minutes as another start's work). Before, a raw OSError naming no file, or the
    directory left behind."""
    state = {"weights": torch.arange(10.0)}
    manager = CheckpointManager(tmp_path, interval=10, async_mode=async_mode)
    manager.save(10, state)
    manager.wait()
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    if where == "directory":
        real_mkdir = Path.mkdir
        monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: _fail_with(disk_full)() if ".tmp-" in self.name else real_mkdir(self, *a, **k))
    elif where == "rank state":
        monkeypatch.setattr(ckpt.torch, "save", _fail_with(disk_full))
    else:
        monkeypatch.setattr(ckpt.json, "dump", _fail_with(disk_full))
    tmp_dir = tmp_path / "checkpoints" / ckpt.tmp_dir_name(20, manager._token)
    with pytest.raises(CheckpointWriteError, match=f"checkpoint step 20 could not be written to {re.escape(str(tmp_dir))}: .*No space left"):
        manager.save(20, state)
        manager.wait()
    assert manager.latest_step() == 10 and not tmp_dir.exists()
    monkeypatch.undo()
    manager.save(30, state)
    manager.wait()
    assert sorted(manager.committed()) == [10, 30]


# ----------------------------------------------------------------------------------------------
# Crashes, retention, verification
# ----------------------------------------------------------------------------------------------

CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    from krea2_train.train.checkpoint import CheckpointManager
    manager = CheckpointManager(sys.argv[1], interval=10, async_mode="async")
    manager.save(10, {"weights": torch.arange(4.0)})
    manager.wait()
    manager._commit = lambda *args, **kwargs: os._exit(3)  # die after the write, before the commit
    manager.save(20, {"weights": torch.arange(4.0) + 1})
    manager.wait()
    """
)


def test_a_crash_before_commit_leaves_the_previous_checkpoint_latest(tmp_path):
    result = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    checkpoints = tmp_path / "checkpoints"
    (crashed,) = checkpoints.glob("step-00000020.tmp-*")
    assert (crashed / ".metadata").is_file()  # fully written, never committed
    assert find_run_checkpoint(tmp_path).name == "step-00000010"
    manager = CheckpointManager(tmp_path, interval=10)
    assert manager.latest_step() == 10
    # freshly written: it may be an older start still running (a requeued job's predecessor), so it stays ...
    assert crashed.exists()
    state = {"weights": torch.zeros(4)}
    manager.load(state)
    assert torch.equal(state["weights"], torch.arange(4.0))
    # ... until nothing has written to it for STALE_TMP_S: then the next start removes it
    old = time.time() - ckpt.STALE_TMP_S - 60
    for path in [crashed, *crashed.rglob("*")]:
        os.utime(path, (old, old))
    CheckpointManager(tmp_path, interval=10)
    assert not crashed.exists()


def test_retention_keeps_the_last_k_and_every_mth(tmp_path):
    manager = CheckpointManager(tmp_path, interval=10, keep_last=2, keep_every=30, async_mode="sync")
    for step in range(1, 101):
        manager.save(step, {"weights": torch.full((3,), float(step))})
    assert sorted(manager.committed()) == [30, 60, 90, 100]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-00000030", "step-00000060", "step-00000090", "step-00000100"
    ]  # fmt: skip


def test_checkpoints_not_matching_their_manifest_do_not_count(tmp_path):
    manager = CheckpointManager(tmp_path, interval=10, async_mode="sync")
    manager.save(10, {"weights": torch.arange(5.0)})
    manager.save(20, {"weights": torch.arange(5.0) + 1})
    manager.save(30, {"weights": torch.arange(5.0) + 2})
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step-00000030" / "__0_0.distcp").unlink()  # manifest points at a missing file
    with open(checkpoints / "step-00000020" / "__0_0.distcp", "ab") as file:  # a resized file
        file.write(b"x")
    shutil.copytree(checkpoints / "step-00000010", checkpoints / "step-00000040")
    (checkpoints / "step-00000040" / "manifest.json").unlink()  # no manifest: never committed
    assert manager.latest_step() == 10
    state = {"weights": torch.zeros(5)}
    assert manager.load(state).step == 10 and torch.equal(state["weights"], torch.arange(5.0))
    with pytest.raises(CheckpointVerificationError, match=r"__0_0\.distcp is missing"):
        load_model_weights(checkpoints / "step-00000030")
    with pytest.raises(NoCheckpointError, match="step 30"):
        manager.load(state, step=30)


def test_verification_of_a_written_checkpoint_names_missing_rank_files(tmp_path):
    directory = tmp_path / "step-00000001.tmp"
    torch.distributed.checkpoint.save({"w": torch.ones(3)}, checkpoint_id=str(directory), no_dist=True)
    with pytest.raises(CheckpointVerificationError, match="rank 1's state"):
        ckpt.verify_written_checkpoint(directory, world_size=2)


def test_no_committed_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path / "run", interval=10)
    assert manager.latest_step() is None
    assert manager.load({"weights": torch.zeros(2)}) is None
    with pytest.raises(NoCheckpointError, match="step 5"):
        manager.load({"weights": torch.zeros(2)}, step=5)
    write_model_config(tmp_path / "run", {"num_layers": 2})
    with pytest.raises(NoCheckpointError, match="no committed checkpoint"):
        find_run_checkpoint(tmp_path / "run")
    with pytest.raises(NoCheckpointError, match="'missing-run' does not exist"):
        find_run_checkpoint("missing-run", runs_root=tmp_path)
    (tmp_path / "notes").mkdir()  # there, but neither a run nor a checkpoint
    with pytest.raises(NoCheckpointError, match="neither a checkpoint"):
        find_run_checkpoint(tmp_path / "notes", runs_root=tmp_path)


def test_find_run_checkpoint_by_name_and_direct_paths(tmp_path):
    manager = CheckpointManager(tmp_path / "runs" / "exp1", interval=10, async_mode="sync")
    manager.save(10, {"w": torch.ones(2)})
    manager.save(20, {"w": torch.ones(2)})
    newest = tmp_path / "runs" / "exp1" / "checkpoints" / "step-00000020"
    assert find_run_checkpoint("exp1", runs_root=tmp_path / "runs") == newest
    assert find_run_checkpoint("exp1", runs_root=tmp_path / "runs", step=10).name == "step-00000010"
    assert find_run_checkpoint(newest) == newest
    weights_file = tmp_path / "model.safetensors"
    weights_file.write_bytes(b"")
    assert find_run_checkpoint(weights_file) == weights_file


def test_train_state_rejects_unknown_fields():
    with pytest.raises(ValueError, match="no fields"):
        TrainState().load_state_dict({"step": 1, "epochs": 2})


# ----------------------------------------------------------------------------------------------
# Resharding with FSDP2 (torchrun, gloo)
# ----------------------------------------------------------------------------------------------


def torchrun(script: str, *args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPTS / script), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.mark.slow
def test_reshard_two_fsdp_ranks_to_one_process(tmp_path):
    torchrun("fsdp_checkpoint.py", "save", str(tmp_path / "run"), str(tmp_path / "reference.pt"))
    reference = torch.load(tmp_path / "reference.pt")
    model, optimizer = tiny_model_and_optimizer(seed=123)  # different weights, to be overwritten
    state = TrainState()
    loaded = CheckpointManager(tmp_path / "run", interval=1, seed=7).load(
        {"model": ModelOptimizerState(model, optimizer), "train_state": state}
    )
    assert loaded.saved_world_size == 2 and not loaded.rank_state_restored and state.step == 3
    draws = rng_draws()
    reseed_rng(7, 3, 0)
    assert_rng_draws_equal(draws, rng_draws())  # reseeded from (seed, step, rank)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference["model"][key]), key
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    optimizer_state = get_optimizer_state_dict(model, optimizer)["state"]
    assert optimizer_state.keys() == reference["optimizer"].keys()
    for key, values in reference["optimizer"].items():
        for name, value in values.items():
            assert torch.equal(optimizer_state[key][name], value), (key, name)


@pytest.mark.slow
def test_reshard_one_process_to_two_fsdp_ranks(tmp_path):
    model, optimizer = tiny_model_and_optimizer(seed=0)
    optimizer_step(model, optimizer, seed=1)
    optimizer_step(model, optimizer, seed=2)
    manager = CheckpointManager(tmp_path / "run", interval=1, async_mode="sync")
    manager.save(2, {"model": ModelOptimizerState(model, optimizer), "train_state": TrainState(step=2)})
    torchrun("fsdp_checkpoint.py", "load", str(tmp_path / "run"), str(tmp_path / "loaded.pt"))
    loaded = torch.load(tmp_path / "loaded.pt")
    assert loaded["train_step"] == 2
    for key, value in model.state_dict().items():
        assert torch.equal(loaded["model"][key], value), key
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    expected = get_optimizer_state_dict(model, optimizer)["state"]
    assert expected.keys() == loaded["optimizer"].keys()
    for key, values in expected.items():
        for name, value in values.items():
            assert torch.equal(loaded["optimizer"][key][name], value), (key, name)


def test_a_full_disk_is_named_even_when_the_writer_does_not_say_so(tmp_path, monkeypatch):
    """torch's zip writer reports only "file write failed"; the checkpoint error must still say why."""
    import collections

    from krea2_train.train import checkpoint

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(12 * 2**20, 12 * 2**20 - 4096, 4096))
    assert "No space left on device: 0.0 MiB free of 12.0 MiB" in checkpoint._disk_full_note(tmp_path / "step-1.tmp")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(2**40, 2**39, 2**39))
    assert checkpoint._disk_full_note(tmp_path / "step-1.tmp") == ""


def test_async_staging_works_save_after_save_and_reuses_buffers_where_torch_allows():
    """torch 2.13 keeps a stager's host buffers between saves; 2.11 closes it after each stage
    (a reused stager then fails), so there every save gets a fresh one."""
    from packaging.version import Version

    from krea2_train.train.checkpoint import _Staging

    staging = _Staging()
    first = staging.stager()
    for value in range(3):
        staged = staging.stager().stage({"weights": torch.full((3,), float(value))})
        assert torch.equal(staged["weights"], torch.full((3,), float(value)))
    if Version(torch.__version__.split("+")[0]) >= Version("2.13"):
        assert staging.reuses_buffers and staging.stager() is first


# ----------------------------------------------------------------------------------------------
# Two starts of one run, checkpoints that do not read, checkpoints of another model
# ----------------------------------------------------------------------------------------------


def test_a_newer_start_never_removes_an_older_ones_save_in_flight(tmp_path, monkeypatch):
    """A requeued job while its predecessor still runs: each start writes its own unfinished
    directory; a step the other committed first is not replaced; an abandoned save commits nothing."""
    gate = threading.Event()
    monkeypatch.setattr(ckpt, "_storage_writer", gated_writer(gate))
    older = CheckpointManager(tmp_path, interval=10, async_mode="async")
    try:
        older.save(10, {"weights": torch.arange(4.0)})
        monkeypatch.undo()
        newer = CheckpointManager(tmp_path, interval=10, async_mode="sync")
        assert (tmp_path / "checkpoints" / ckpt.tmp_dir_name(10, older._token)).is_dir()  # still there
        newer.save(10, {"weights": torch.arange(4.0) + 100})
    finally:
        gate.set()
    older.wait()  # its commit finds step 10 committed by the newer start: its copy is discarded, no error
    state = {"weights": torch.zeros(4)}
    newer.load(state)
    assert torch.equal(state["weights"], torch.arange(4.0) + 100)

    gate = threading.Event()
    monkeypatch.setattr(ckpt, "_storage_writer", gated_writer(gate))
    older.save(20, {"weights": torch.arange(4.0)})
    older.abandon()  # a newer start took the run's data lease: the older one stops
    gate.set()
    older.close()  # raises nothing, commits nothing
    assert sorted(newer.committed()) == [10] and not list((tmp_path / "checkpoints").glob("step-00000020*"))


def test_a_run_whose_checkpoints_all_fail_to_verify_is_refused_not_restarted(tmp_path):
    manager = CheckpointManager(tmp_path, interval=10, async_mode="sync")
    for step in (10, 20):
        manager.save(step, {"weights": torch.arange(4.0)})
    assert sorted(ckpt.resumable_checkpoints(tmp_path / "checkpoints")) == [10, 20]
    for step in (10, 20):
        (tmp_path / "checkpoints" / ckpt.step_dir_name(step) / "manifest.json").write_text("x")
    with pytest.raises(ckpt.CheckpointVerificationError, match="2 checkpoint directories .* none verifies .*start over at step 0"):
        ckpt.resumable_checkpoints(tmp_path / "checkpoints")
    assert ckpt.resumable_checkpoints(tmp_path / "nothing") == {}  # a new run


@pytest.mark.parametrize("damaged", [".metadata", "rank_state/rank-00000.pt"])
def test_a_checkpoint_that_does_not_read_falls_back_to_the_one_before(tmp_path, damaged):
    manager = CheckpointManager(tmp_path, interval=10, async_mode="sync")
    for step in (10, 20, 30):
        manager.save(step, {"weights": torch.full((4,), float(step))})
    for step in (20, 30):  # garbage of the same size: the manifest's size check passes, reading fails
        directory = tmp_path / "checkpoints" / ckpt.step_dir_name(step)
        (directory / damaged).write_bytes(b"\x07" * (directory / damaged).stat().st_size)
        manifest = json.loads((directory / "manifest.json").read_text())
        del manifest["sha256"]  # as written before digests were recorded: the read itself must fail
        (directory / "manifest.json").write_text(json.dumps(manifest))
    state = {"weights": torch.zeros(4)}
    with pytest.raises(ckpt.CheckpointVerificationError, match="step-00000030 does not (read|load)"):
        manager.load(state, step=30)  # a step asked for does not fall back
    loaded = manager.load(state)
    assert loaded.step == 10 and torch.equal(state["weights"], torch.full((4,), 10.0))
    assert sorted(manager.committed()) == [10]  # the two that do not read are set aside, bytes kept
    assert sorted(p.name[:len("unreadable-step-00000020")] for p in (tmp_path / "checkpoints").glob("unreadable-*")) == [
        "unreadable-step-00000020", "unreadable-step-00000030"]


def test_a_checkpoint_of_another_model_or_step_is_refused(tmp_path):
    model, optimizer = tiny_model_and_optimizer(seed=0)
    manager = CheckpointManager(tmp_path, interval=10, async_mode="sync")
    manager.save(10, {"model": ModelOptimizerState(model, optimizer)})
    torch.manual_seed(0)
    smaller = build_model("tiny", num_layers=1)
    with pytest.raises(ckpt.CheckpointMismatchError, match="another model's weights: .* weights this model lacks \\(e.g. transformer_blocks.1"):
        manager.load({"model": ModelOptimizerState(smaller, torch.optim.AdamW(smaller.parameters()))})
    os.rename(tmp_path / "checkpoints" / "step-00000010", tmp_path / "checkpoints" / "step-00000030")
    with pytest.raises(ckpt.CheckpointMismatchError, match="holds the checkpoint of step 10, not of step 30"):
        manager.load({"model": ModelOptimizerState(model, optimizer)})


def test_a_lora_run_resumed_with_other_lora_settings_says_which_settings(tmp_path):
    """Only the LoRA matrices differ (lora.rank 8 saved, 4 now): the message named another model
    config (model_config.json holds no LoRA settings) and said to move the checkpoint away."""
    from krea2_train.model.lora import LoRASpec, inject_lora

    def lora_model(rank):
        model, _ = tiny_model_and_optimizer(seed=0)
        inject_lora(model, LoRASpec(rank=rank, alpha=rank))
        return model

    saved = lora_model(8)
    manager = CheckpointManager(tmp_path, interval=10, async_mode="sync")
    manager.save(10, {"model": ModelOptimizerState(saved, torch.optim.AdamW(saved.parameters()))})
    resumed = lora_model(4)
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"holds LoRA weights of other lora settings than this start's: "
                       r".*lora_A.weight: \[8, \d+\] saved, \[4, \d+\] here\)\. Resume with the lora.rank and lora.targets"):
        manager.load({"model": ModelOptimizerState(resumed, torch.optim.AdamW(resumed.parameters()))})


def test_retention_renames_before_deleting_so_an_interrupted_deletion_is_an_unfinished_checkpoint(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, interval=10, keep_last=1, async_mode="sync")
    manager.save(10, {"weights": torch.arange(4.0)})
    monkeypatch.setattr(ckpt.shutil, "rmtree", lambda *args, **kwargs: None)  # killed inside the deletion
    manager.save(20, {"weights": torch.arange(4.0)})
    monkeypatch.undo()
    left = tmp_path / "checkpoints" / ckpt.tmp_dir_name(10, "deleting")
    assert left.is_dir() and sorted(manager.committed()) == [20]  # not a step-N that fails to verify
    old = time.time() - ckpt.STALE_TMP_S - 60
    for path in [left, *left.rglob("*")]:
        os.utime(path, (old, old))
    manager.save(30, {"weights": torch.arange(4.0)})  # the next commit's clean-up removes it
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000030"]
    # a step-N that fails to verify (a storage fault, for now) is never deleted by retention
    (tmp_path / "checkpoints" / "step-00000030" / "manifest.json").rename(tmp_path / "manifest.json")
    manager.save(40, {"weights": torch.arange(4.0)})
    assert (tmp_path / "checkpoints" / "step-00000030").is_dir()


def test_a_checkpoint_with_weights_of_another_shape_is_refused_before_any_read(tmp_path):
    model, optimizer = tiny_model_and_optimizer(seed=0)
    manager = CheckpointManager(tmp_path, interval=10, async_mode="sync")
    for step in (10, 20):
        manager.save(step, {"model": ModelOptimizerState(model, optimizer)})
    wider = build_model("tiny", intermediate_size=2 * model.config["intermediate_size"])
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"weights of another shape \(e.g. transformer_blocks.0.ff"):
        manager.load({"model": ModelOptimizerState(wider, torch.optim.AdamW(wider.parameters()))})  # no fall back to 10


@pytest.mark.slow
def test_ranks_that_disagree_about_a_checkpoint_fall_back_together(tmp_path):
    """One rank cannot read the newest checkpoint's manifest (a stat failing on one node): every
    rank loads the one before, none loads a different step."""
    torchrun("fsdp_checkpoint.py", "fallback", str(tmp_path / "run"), str(tmp_path / "steps"))
    assert sorted(path.read_text() for path in (tmp_path / "steps").iterdir()) == ["3", "3"]


@pytest.mark.slow
def test_ranks_tolerate_a_failed_save_together(tmp_path):
    """One rank's write fails (an I/O error on one node): every rank tolerates the same failed save
    and takes the next one together, with no rank left waiting in a collective."""
    torchrun("fsdp_checkpoint.py", "tolerate", str(tmp_path / "run"), str(tmp_path / "seen"))
    seen = [json.loads(path.read_text()) for path in sorted((tmp_path / "seen").iterdir())]
    assert seen == [{"failed": [6], "committed": [3, 9]}] * 2


def test_a_checkpoint_whose_bytes_changed_falls_back_to_the_one_before(tmp_path):
    """A bit flip inside a DCP file keeps its size, so only the recorded SHA-256 tells."""
    manager = CheckpointManager(tmp_path, interval=10, async_mode="sync")
    for step in (10, 20):
        manager.save(step, {"weights": torch.full((64,), float(step))})
    data_file = tmp_path / "checkpoints" / "step-00000020" / "__0_0.distcp"
    flipped = bytearray(data_file.read_bytes())
    flipped[len(flipped) // 2] ^= 0x40
    data_file.write_bytes(bytes(flipped))
    state = {"weights": torch.zeros(64)}
    with pytest.raises(ckpt.CheckpointUnreadableError, match="__0_0.distcp changed since they were written \\(SHA-256 mismatch\\)"):
        manager.load(state, step=20)
    assert manager.load(state).step == 10 and torch.equal(state["weights"], torch.full((64,), 10.0))
    # set aside: the run saves step 20 again when it gets there (it skipped a step "already
    # committed" and ended on the unreadable one), and retention does not count it
    manager.keep_last = 2
    assert manager.save(20, {"weights": torch.full((64,), 21.0)})
    manager.save(30, {"weights": torch.full((64,), 30.0)})
    assert sorted(manager.committed()) == [20, 30] and manager.load(state, step=20).step == 20
    assert torch.equal(state["weights"], torch.full((64,), 21.0))
    assert len(list((tmp_path / "checkpoints").glob("unreadable-step-00000020-*/__0_0.distcp"))) == 1


def test_a_storage_fault_on_load_falls_back_without_moving_the_checkpoint_aside(tmp_path, monkeypatch):
    """An I/O error may pass (a stale mount on one node): the start falls back, and the next start
    loads the newest checkpoint again. Only bytes known bad are moved aside."""
    manager = CheckpointManager(tmp_path, interval=10, async_mode="sync")
    for step in (10, 20):
        manager.save(step, {"weights": torch.full((4,), float(step))})
    real_load = ckpt.torch.load

    def faulty_storage(file, *args, **kwargs):
        if "step-00000020" in str(file):
            raise OSError(errno.EIO, "Input/output error", str(file))
        return real_load(file, *args, **kwargs)

    state = {"weights": torch.zeros(4)}
    monkeypatch.setattr(ckpt.torch, "load", faulty_storage)
    assert manager.load(state).step == 10
    monkeypatch.undo()
    assert sorted(manager.committed()) == [10, 20] and not list((tmp_path / "checkpoints").glob("unreadable-*"))
    assert manager.load(state).step == 20 and torch.equal(state["weights"], torch.full((4,), 20.0))


def test_a_state_that_no_longer_fits_stops_the_start_without_falling_back(tmp_path, caplog):
    model, optimizer = tiny_model_and_optimizer(seed=0)
    manager = CheckpointManager(tmp_path, interval=10, async_mode="sync")
    for step in (10, 20):
        manager.save(step, {"model": ModelOptimizerState(model, optimizer)})
    parameters = list(model.parameters())
    two_groups = torch.optim.AdamW([{"params": parameters[:2]}, {"params": parameters[2:]}])  # the optimizer changed
    with pytest.raises(ckpt.CheckpointLoadError, match="step-00000020 does not read"):
        manager.load({"model": ModelOptimizerState(model, two_groups)})
    assert "falling back" not in caplog.text  # an older checkpoint would fail alike
