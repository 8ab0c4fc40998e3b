"""Run metrics: one console line per logged step, JSONL in the run directory, wandb.

The console line suits both a terminal and a Slurm log (plain text, one line, no carriage
returns): step, loss, grad norm, lr, images/s, tokens/s, step time, memory, ETA.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import statistics
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any

import torch

from krea2_train.files import append_line, read_json_lines
from krea2_train.logs import format_duration

logger = logging.getLogger("krea2_train")


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class HostSyncCounter:
    """Counts the host-device synchronisations inside a ``with`` block, as CUDA's sync debug mode
    reports them (each one a warning). ``count`` stays None off CUDA or when not enabled; other
    warnings raised in the block are passed on."""

    SYNC_WARNING = "synchronizing CUDA operation"

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.active = enabled and device.type == "cuda"
        self.count: int | None = None

    def __enter__(self) -> HostSyncCounter:
        if self.active:
            self._catcher = warnings.catch_warnings(record=True)
            self._caught = self._catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc_info) -> None:
        if not self.active:
            return
        torch.cuda.set_sync_debug_mode("default")
        self._catcher.__exit__(*exc_info)
        syncs = [w for w in self._caught if self.SYNC_WARNING in str(w.message)]
        for other in (w for w in self._caught if self.SYNC_WARNING not in str(w.message)):
            warnings.warn_explicit(other.message, other.category, other.filename, other.lineno)
        self.count = len(syncs)


class MetricsLogger:
    """Writes metrics on rank 0; every rank may call it (others do nothing)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        rank: int,
        total_steps: int,
        wandb_mode: str = "disabled",
        wandb_project: str = "krea2_train",
        run_name: str = "",
        config: dict[str, Any] | None = None,
    ) -> None:
        self.is_writer = rank == 0
        self.total_steps = total_steps
        self.step_times: deque[float] = deque(maxlen=50)  # the recent steps' times, not a start's first (compilation, warm-up)
        self._first_step_logged = False
        self.jsonl_path = run_dir / "metrics.jsonl"
        self.wandb_run = None
        if self.is_writer and wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(
                project=wandb_project,
                name=run_name,
                dir=str(run_dir),
                mode=wandb_mode,
                config=config,
                resume="allow",
                id=_wandb_id(run_dir, run_name),
            )

    def eta_seconds(self, step: int) -> float:
        if not self.step_times:
            return float("nan")
        return statistics.median(self.step_times) * (self.total_steps - step)

    def log_step(self, step: int, metrics: dict[str, float], *, step_time: float, print_line: bool = True) -> None:
        if self._first_step_logged:
            self.step_times.append(step_time)
        self._first_step_logged = True
        if not self.is_writer:
            return
        record = {"step": step, "time": time.time(), "step_time_s": step_time, **metrics}
        self._append(record)
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=step)
        if print_line:
            # the stage's own objective beside the total when they differ (iREPA's term in the first epoch)
            objective = f" (fm {metrics['loss_fm']:.4f})" if "loss_fm" in metrics and metrics["loss_fm"] != metrics.get("loss") else ""
            logger.info(
                "step %d/%d  loss %.4f%s  grad %.3g  lr %.2e  %.1f img/s  %.0f tok/s  %.2fs/step  mem %.2fGiB  eta %s%s",
                step,
                self.total_steps,
                metrics.get("loss", float("nan")),
                objective,
                metrics.get("grad_norm", float("nan")),
                metrics.get("lr", float("nan")),
                metrics.get("images_per_s", float("nan")),
                metrics.get("tokens_per_s", float("nan")),
                statistics.median(self.step_times) if self.step_times else step_time,  # as the ETA: one slow step does not swing it
                metrics.get("memory_gib", float("nan")),
                format_duration(self.eta_seconds(step)) if self.step_times else "-",  # after the first step of a start
                "  SKIPPED (non-finite)" if metrics.get("skipped") else "",
            )

    def log_image(self, step: int, key: str, path: Path) -> None:
        if self.is_writer and self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Image(str(path))}, step=step)

    def event(self, step: int, kind: str, warn: bool = False, **fields: Any) -> None:
        """A non-metric event (resume, skip, rollback, checkpoint) in the JSONL and the log (as a
        warning when ``warn``)."""
        if not self.is_writer:
            return
        self._append({"step": step, "time": time.time(), "event": kind, **fields})
        logger.log(logging.WARNING if warn else logging.INFO, "[%s] step %d %s", kind, step, " ".join(f"{k}={v}" for k, v in fields.items()))

    def _append(self, record: dict) -> None:
        """One JSON line onto ``metrics.jsonl``; a failure (a full disk) names the file, so it is
        reported in one line (:func:`krea2_train.errors.is_user_error`)."""
        try:
            append_line(self.jsonl_path, json.dumps(record))
        except OSError as error:
            if error.filename is not None:
                raise
            raise OSError(error.errno, error.strerror, str(self.jsonl_path)) from error

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _wandb_id(run_dir: Path, run_name: str) -> str:
    """A stable wandb id per run directory, so a resumed run continues the same wandb run."""
    id_file = run_dir / "wandb_id.txt"
    if not id_file.exists():
        import uuid

        id_file.write_text(f"{run_name}-{uuid.uuid4().hex[:8]}")
    return id_file.read_text().strip()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The step records of a run's metrics.jsonl (events excluded)."""
    return [record for record in read_json_lines(Path(run_dir) / "metrics.jsonl") if "event" not in record]
