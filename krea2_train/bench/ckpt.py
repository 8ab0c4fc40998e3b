"""Checkpoint cost: the time a save blocks training versus its full write time, and its write
rate as a fraction of the disk's sequential write bandwidth, measured in the same run.

One process saves a model with its AdamW state (one optimizer step taken, so both moments exist)
through :class:`~krea2_train.train.checkpoint.CheckpointManager` in async mode, several times;
the median save is reported. A save blocks training while it snapshots the state to host memory
(``blocked``: the ``save()`` call); the full write time runs from the start of the save to the
committed checkpoint: files fsynced, verified, ``manifest.json`` written and the directory renamed
to ``step-N`` and fsynced, the point from which a restart finds it. The previous checkpoint is
deleted before each save, so the retention pass inside the timed write has nothing to delete. The
write rate is the checkpoint's bytes over the part of the write that runs in the background (full
minus blocked), the phase that competes with the disk. The disk's bandwidth is measured by
writing a file of the same size in 64 MiB chunks to the same directory and fsyncing it, as DCP
fsyncs its files.
Targets: blocked time under 10% of the full write time; write rate at least 70% of the disk's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from krea2_train.arguments import positive_int
from krea2_train.errors import UsageError
from krea2_train.bench.mttr import MODEL_100M
from krea2_train.model.presets import build_model, count_parameters
from krea2_train.train.checkpoint import CheckpointManager, ModelOptimizerState

CHUNK_BYTES = 64 * 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt-dir", default=None, help="where to write (default: a temporary directory under $TMPDIR)")
    parser.add_argument("--ckpt-saves", type=positive_int, default=5, help="saves to time (default 5; the median is reported: the first save allocates the reusable staging buffers)")
    parser.add_argument("--ckpt-model", default="100m", choices=list(BENCH_MODELS),
                        help="model to save (default 100m; full_width: the real text path and one full-width block, 1.1B)")
    parser.add_argument("--ckpt-device", default="cpu", choices=["cpu", "cuda"],
                        help="where the model and its optimizer state live (cuda: the blocked time is the copy to pinned host memory)")


BENCH_MODELS = {"tiny": ("tiny", {}), "100m": ("tiny", MODEL_100M), "full_width": ("bench_full_width", {"num_layers": 1})}


def build_bench_model(name: str, device: str = "cpu") -> torch.nn.Module:
    preset, overrides = BENCH_MODELS[name]
    return build_model(preset, device=device, **overrides)


def model_with_optimizer_state(name: str, device: str = "cpu") -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_bench_model(name, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    optimizer.step()
    return model, optimizer


def disk_write_bytes_per_s(directory: Path, total_bytes: int) -> float:
    """Sequential write bandwidth: ``total_bytes`` in 64 MiB chunks, fsynced, then deleted."""
    path = directory / "disk-bandwidth.bin"
    chunk = os.urandom(min(CHUNK_BYTES, total_bytes))
    started = time.perf_counter()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        written = 0
        while written < total_bytes:
            written += os.write(descriptor, chunk[: total_bytes - written])
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    elapsed = time.perf_counter() - started
    path.unlink()
    return total_bytes / elapsed


def remove_checkpoints(manager: CheckpointManager) -> None:
    for path in manager.committed().values():
        shutil.rmtree(path)


def time_saves(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    saves: int,
    clock: Callable[[], float] = time.perf_counter,
) -> list[dict]:
    """Blocked and full write seconds (to the committed checkpoint) and bytes of ``saves`` async checkpoints.

    The last checkpoint stays in ``run_dir``.
    """
    results = []
    with CheckpointManager(run_dir, interval=1, keep_last=1, async_mode="async") as manager:
        for step in range(1, saves + 1):
            remove_checkpoints(manager)
            started = clock()
            manager.save(step, {"model_optim": ModelOptimizerState(model, optimizer)})
            blocked_s = clock() - started
            manager.wait()  # the background write and the commit
            write_s = clock() - started
            manifest = (manager.committed()[step] / "manifest.json").read_text()
            results.append({"blocked_s": blocked_s, "write_s": write_s, "bytes": json.loads(manifest)["bytes"]})
    return results


def run(args: argparse.Namespace) -> list[dict]:
    if args.ckpt_device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--ckpt-device cuda was asked for but torch sees no CUDA device")
    model, optimizer = model_with_optimizer_state(args.ckpt_model, args.ckpt_device)
    label = f"{args.ckpt_model} ({count_parameters(model) / 1e6:.0f}M params, {args.ckpt_device})"
    if args.ckpt_dir:  # e.g. the shared filesystem a run would checkpoint to; created when new
        Path(args.ckpt_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="krea2-bench-ckpt-", dir=args.ckpt_dir) as tmp:
        saves = time_saves(Path(tmp) / "run", model, optimizer, args.ckpt_saves)
        size = int(statistics.median(save["bytes"] for save in saves))
        disk_rate = disk_write_bytes_per_s(Path(tmp), size)
    blocked = statistics.median(save["blocked_s"] for save in saves)
    write = statistics.median(save["write_s"] for save in saves)
    blocked_fraction = blocked / write
    write_rate = size / (write - blocked)
    rate_fraction = write_rate / disk_rate
    return [
        {"bench": "ckpt", "metric": f"{label} checkpoint size", "value": size / 1e6, "unit": "MB", "target": None, "met": None},
        {"bench": "ckpt", "metric": f"{label} blocked time", "value": blocked, "unit": "s", "target": None, "met": None},
        {"bench": "ckpt", "metric": f"{label} full write time", "value": write, "unit": "s", "target": None, "met": None},
        {"bench": "ckpt", "metric": "blocked / full write time", "value": blocked_fraction, "unit": "fraction",
         "target": "< 0.10", "met": blocked_fraction < 0.10},
        {"bench": "ckpt", "metric": "checkpoint write rate (background phase)", "value": write_rate / 1e6, "unit": "MB/s", "target": None, "met": None},
        {"bench": "ckpt", "metric": "disk sequential write rate", "value": disk_rate / 1e6, "unit": "MB/s", "target": None, "met": None},
        {"bench": "ckpt", "metric": "checkpoint / disk write rate", "value": rate_fraction, "unit": "fraction",
         "target": ">= 0.70", "met": rate_fraction >= 0.70},
    ]  # fmt: skip
