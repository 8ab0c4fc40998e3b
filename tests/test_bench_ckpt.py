"""``krea2 bench ckpt`` on the tiny model: well-formed rows, the bytes it reports are the files on
disk, and its full write time ends at the committed checkpoint."""

import argparse
import math

import pytest
import torch

from krea2_train.bench import ckpt as bench_ckpt
from krea2_train.train.checkpoint import MANIFEST_NAME, CheckpointManager

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_ckpt.add_arguments(parser)
    return parser.parse_args(["--ckpt-model", "tiny", "--ckpt-saves", "2", *extra])


def test_run_gives_every_row_consistent_with_the_others(tmp_path):
    rows = {row["metric"]: row for row in bench_ckpt.run(_args("--ckpt-dir", str(tmp_path)))}
    label = next(metric for metric in rows if metric.endswith("checkpoint size")).removesuffix(" checkpoint size")
    assert label.startswith("tiny (")
    size_mb, blocked, write = (rows[f"{label} {what}"]["value"] for what in ("checkpoint size", "blocked time", "full write time"))
    assert size_mb > 0 and 0 < blocked <= write and math.isfinite(write)
    fraction = rows["blocked / full write time"]
    assert fraction["value"] == pytest.approx(blocked / write) and fraction["met"] == (fraction["value"] < 0.10)
    write_rate = rows["checkpoint write rate (background phase)"]["value"]
    assert write_rate == pytest.approx(size_mb / (write - blocked), rel=1e-3)  # size is rounded to whole bytes
    disk_rate = rows["disk sequential write rate"]["value"]
    ratio = rows["checkpoint / disk write rate"]
    assert disk_rate > 0 and ratio["value"] == pytest.approx(write_rate / disk_rate) and ratio["met"] == (ratio["value"] >= 0.70)
    assert all(row["bench"] == "ckpt" for row in rows.values())
    assert list(tmp_path.iterdir()) == []  # its temporary directory is gone


def test_reported_bytes_are_the_checkpoint_files_on_disk(tmp_path):
    model, optimizer = bench_ckpt.model_with_optimizer_state("tiny")
    saves = bench_ckpt.time_saves(tmp_path / "run", model, optimizer, saves=2)
    [checkpoint] = (tmp_path / "run" / "checkpoints").iterdir()  # only the last one is kept
    assert checkpoint.name == "step-00000002"
    on_disk = sum(path.stat().st_size for path in checkpoint.rglob("*") if path.is_file() and path.name != MANIFEST_NAME)
    assert [save["bytes"] for save in saves] == [on_disk, on_disk]


class StepClock:
    """A clock that moves only when a checkpoint commits (its manifest and rename)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_full_write_time_includes_the_commit(tmp_path, monkeypatch):
    clock, commit = StepClock(), CheckpointManager._commit

    def commit_then_tick(manager, *args, **kwargs):
        commit(manager, *args, **kwargs)
        clock.now += 100.0

    monkeypatch.setattr(CheckpointManager, "_commit", commit_then_tick)
    model, optimizer = bench_ckpt.model_with_optimizer_state("tiny")
    saves = bench_ckpt.time_saves(tmp_path / "run", model, optimizer, saves=2, clock=clock)
    assert [save["write_s"] for save in saves] == [100.0, 100.0]


def test_the_full_width_model_and_a_missing_cuda_device():
    """``full_width`` is the real text path and one full-width Krea 2 block (the GPU check's
    model: its bytes per parameter extrapolate to the 12.9B model); asking for CUDA where there
    is none names the flag."""
    from krea2_train.errors import UsageError
    from krea2_train.model.dit import DEFAULT_CONFIG
    from krea2_train.model.presets import count_parameters

    model = bench_ckpt.build_bench_model("full_width", device="meta")
    assert model.config["num_layers"] == 1 and model.config["intermediate_size"] == DEFAULT_CONFIG["intermediate_size"]
    assert 1.0e9 < count_parameters(model) < 1.2e9
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="--ckpt-device cuda"):
            bench_ckpt.run(_args("--ckpt-device", "cuda"))
