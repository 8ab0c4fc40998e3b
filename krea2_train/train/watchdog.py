"""Hang detection: per-rank heartbeats and a watchdog thread that ends a stuck rank.

Every rank runs one daemon thread. Each ``poll_interval_s`` it writes this rank's heartbeat file
(``heartbeat_dir/rank-NNNNN``: last finished step, when it finished, when the thread last beat,
host, pid) and checks the main thread's progress, which the training loop reports with
:meth:`Watchdog.beat` (two attribute writes: no system call, no device sync in the hot loop).

The watchdog trips when

- no step finished for ``hang_timeout_s`` (``first_step_timeout_s`` before the first step), or
- the running step has lasted ``slow_step_factor`` times the median of the recent steps and at
  least ``slow_step_min_s``, or
- another rank tripped (it leaves ``heartbeat_dir/HANG``): every rank then dumps its stacks.

Tripping writes ``run_dir/hangs/rank-N-TIME.txt`` (the reason, every rank's heartbeat and this
process's Python stacks from :func:`faulthandler.dump_traceback`, and on CUDA the NCCL flight
recorder next to it), names the ranks whose heartbeat stopped (a SIGSTOPped or wedged process
cannot run its own watchdog, but its heartbeat thread stops too), SIGKILLs such a rank when it
runs on this host (the launcher would otherwise wait its shutdown timeout for it), reports the
failure through ``on_trip`` and leaves with ``os._exit(hang_exit_code)`` so the launcher
restarts the group. Collective timeouts are set well above ``hang_timeout_s`` so the watchdog,
which knows more, acts first.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import socket
import statistics
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from krea2_train.files import write_text

logger = logging.getLogger("krea2_train")

HANG_MARKER = "HANG"
_HEARTBEAT_PREFIX = "rank-"
_MEDIAN_MIN_STEPS = 5  # the slow-step rule waits for this many finished steps
_SAME_START_S = 60.0  # ranks of one start begin their heartbeats within this of each other


@dataclass(frozen=True)
class HeartbeatRecord:
    """One rank's heartbeat: its last finished step and its last signs of life (unix seconds)."""

    rank: int
    step: int
    progress_time: float  # when that step finished
    beat_time: float  # when the rank's watchdog thread last wrote the file
    host: str
    pid: int


def heartbeat_path(directory: Path, rank: int) -> Path:
    return Path(directory) / f"{_HEARTBEAT_PREFIX}{rank:05d}"


def write_heartbeat(directory: Path, record: HeartbeatRecord) -> None:
    """Replace the rank's heartbeat file atomically (readers never see half a line)."""
    path = heartbeat_path(directory, record.rank)
    write_text(path, f"{record.step} {record.progress_time:.3f} {record.beat_time:.3f} {record.host} {record.pid}\n", durable=False)


def read_heartbeats(directory: str | os.PathLike) -> dict[int, HeartbeatRecord]:
    """Every rank's last heartbeat under ``directory`` (unreadable files are skipped)."""
    records = {}
    directory = Path(directory)
    if not directory.is_dir():
        return records
    for path in directory.glob(f"{_HEARTBEAT_PREFIX}[0-9]*"):
        if not path.name[len(_HEARTBEAT_PREFIX) :].isdigit():  # a heartbeat being written
            continue
        try:
            step, progress, beat, host, pid = path.read_text().split()
            rank = int(path.name[len(_HEARTBEAT_PREFIX) :])
            records[rank] = HeartbeatRecord(rank, int(step), float(progress), float(beat), host, int(pid))
        except (OSError, ValueError):
            continue
    return dict(sorted(records.items()))


def process_gone(pid: int) -> bool:
    """Whether ``pid`` (on this host) has exited (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def _process_stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def silent_ranks(records: dict[int, HeartbeatRecord], now: float, stale_s: float, host: str) -> dict[int, str]:
    """Ranks that stopped beating, each with a one-line reason (rank -> reason)."""
    silent = {}
    for rank, record in records.items():
        age = now - record.beat_time
        where = f"on {record.host} (pid {record.pid}), last step {record.step}"
        if record.host == host and process_gone(record.pid):
            silent[rank] = f"rank {rank} {where}: process gone"
        elif age > stale_s:
            stopped = " (process stopped)" if record.host == host and _process_stopped(record.pid) else ""
            silent[rank] = f"rank {rank} {where}: heartbeat stopped {age:.1f} s ago{stopped}"
    return silent


def describe_heartbeats(records: dict[int, HeartbeatRecord], now: float) -> str:
    lines = [
        f"  rank {r.rank}: step {r.step}, finished {now - r.progress_time:.1f} s ago, heartbeat {now - r.beat_time:.1f} s ago, "
        f"{r.host} pid {r.pid}"
        for r in records.values()
    ]
    return "\n".join(lines) or "  (no heartbeat files)"


def dump_flight_recorder(path: Path) -> Path | None:
    """Write the NCCL flight recorder of this process (CUDA builds with a trace buffer), if any."""
    import torch

    dump = getattr(torch._C._distributed_c10d, "_dump_nccl_trace", None)
    if dump is None or not torch.cuda.is_available():
        return None
    try:
        path.write_bytes(dump())
    except Exception as error:  # the recorder is a debugging aid; never mask the hang itself
        logger.warning("could not dump the NCCL flight recorder: %s", error)
        return None
    return path


class Watchdog:
    """The hang watchdog of one rank (see the module docstring).

    Args:
        run_dir: hang reports go to ``run_dir/hangs``.
        heartbeat_dir: shared by every rank of the run (on every node).
        on_trip: called with ``(cause, detail, step, report_path)`` before the process exits;
            ``cause`` is ``"hang"``, ``"slow_step"`` or ``"peer_hang"``.
        exit: how the process leaves (``os._exit`` in training; tests pass a recorder).
    """

    def __init__(
        self,
        run_dir: Path,
        heartbeat_dir: Path,
        *,
        rank: int,
        world_size: int,
        hang_timeout_s: float,
        first_step_timeout_s: float,
        slow_step_factor: float,
        slow_step_min_s: float,
        poll_interval_s: float,
        heartbeat_stale_s: float,
        exit_code: int,
        on_trip: Callable[[str, str, int, Path], None] | None = None,
        exit: Callable[[int], None] = os._exit,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.heartbeat_dir = Path(heartbeat_dir)
        self.rank = rank
        self.world_size = world_size
        self.hang_timeout_s = hang_timeout_s
        self.first_step_timeout_s = first_step_timeout_s
        self.slow_step_factor = slow_step_factor
        self.slow_step_min_s = slow_step_min_s
        self.poll_interval_s = poll_interval_s
        self.heartbeat_stale_s = heartbeat_stale_s
        self.exit_code = exit_code
        self.on_trip = on_trip
        self._exit = exit
        self.host = socket.gethostname()
        self.step = 0
        self.steps_done = 0  # steps finished since start()
        self._progress_mono = time.monotonic()
        self._progress_wall = time.time()
        self._durations: deque[float] = deque(maxlen=50)
        self._slow_section = 0
        self._section_limits: list[float] = []  # the no-progress limits of the sections entered
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_wall = time.time()
        self.tripped: str | None = None

    # -- called by the training loop -----------------------------------------------------------

    def start(self, step: int) -> Watchdog:
        self.heartbeat_dir.mkdir(parents=True, exist_ok=True)
        self.step = step
        self._started_wall = time.time()
        self._progress_mono, self._progress_wall = time.monotonic(), self._started_wall
        self._write_heartbeat()
        self._thread = threading.Thread(target=self._run, name=f"krea2-watchdog-rank{self.rank}", daemon=True)
        self._thread.start()
        return self

    def beat(self, step: int) -> None:
        """A step finished (cheap: called every step)."""
        now = time.monotonic()
        if self._slow_section == 0 and self.steps_done > 0:
            self._durations.append(now - self._progress_mono)
        self.step, self.steps_done = step, self.steps_done + 1
        self._progress_mono, self._progress_wall = now, time.time()

    @contextmanager
    def slow_section(self, limit_s: float | None = None) -> Iterator[None]:
        """Work between steps that may take long (sample grids, checkpoint saves and waits).

        The slow-step rule is off inside; the no-progress rule still applies, with ``limit_s``
        instead of ``hang_timeout_s`` when given and longer (a large model's checkpoint). Leaving
        the section counts as progress (the next step is timed from there).
        """
        self._slow_section += 1
        if limit_s is not None:
            self._section_limits.append(limit_s)
        try:
            yield
        finally:
            if limit_s is not None:
                self._section_limits.remove(limit_s)
            self._slow_section -= 1
            self._progress_mono, self._progress_wall = time.monotonic(), time.time()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(5.0, 2 * self.poll_interval_s))
        self._thread = None

    # -- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            self._write_heartbeat()
            try:
                reason = self.check(time.monotonic())
            except Exception as error:  # the watchdog must outlive a bad poll
                logger.warning("rank %d's watchdog could not check this poll: %s", self.rank, error)
                continue
            if reason is not None:
                self.trip(*reason)
                return

    def _write_heartbeat(self) -> None:
        record = HeartbeatRecord(self.rank, self.step, self._progress_wall, time.time(), self.host, os.getpid())
        try:
            write_heartbeat(self.heartbeat_dir, record)
        except OSError as error:  # a full or flaky shared disk must not kill a healthy rank
            logger.warning("rank %d could not write its heartbeat: %s", self.rank, error)

    def check(self, now_mono: float) -> tuple[str, str] | None:
        """``(cause, detail)`` when the watchdog must trip now, else None."""
        elapsed = now_mono - self._progress_mono
        marker = self.heartbeat_dir / HANG_MARKER
        try:
            peer = marker.stat().st_mtime >= self._started_wall
        except OSError:
            peer = False
        if peer:
            return "peer_hang", f"another rank detected a hang ({marker.read_text().strip()}); dumping this rank's stacks"
        limit = self.hang_timeout_s if self.steps_done else self.first_step_timeout_s
        limit = max([limit, *self._section_limits])  # never max(x) of one number: the loop thread changes the list
        if elapsed > limit:
            which = "step" if self.steps_done else "first step"
            return "hang", f"no {which} finished for {elapsed:.1f} s (limit {limit:g} s) after step {self.step}"
        if self._slow_section == 0 and len(self._durations) >= _MEDIAN_MIN_STEPS:
            median = statistics.median(self._durations)
            if elapsed > max(self.slow_step_factor * median, self.slow_step_min_s):
                return "slow_step", (
                    f"step {self.step + 1} has run {elapsed:.1f} s, over {self.slow_step_factor:g} x the median "
                    f"step time {median:.3f} s (and over {self.slow_step_min_s:g} s)"
                )
        return None

    def trip(self, cause: str, detail: str) -> None:
        """Dump stacks, name the silent ranks, report, and exit the process."""
        self.tripped = cause
        now = time.time()
        records = {r: rec for r, rec in read_heartbeats(self.heartbeat_dir).items() if r < self.world_size}
        silent = silent_ranks({r: rec for r, rec in records.items() if r != self.rank}, now, self.heartbeat_stale_s, self.host)
        named = "; ".join(silent.values()) or "none (every rank's heartbeat is alive: a collective or a kernel is stuck)"
        report = self.write_report(cause, detail, records, named, now)
        if cause != "peer_hang":
            try:
                (self.heartbeat_dir / HANG_MARKER).write_text(f"rank {self.rank} at {now:.3f}: {cause}\n")
            except OSError:
                pass
        logger.error("[watchdog] rank %d: %s; silent ranks: %s; stacks in %s", self.rank, detail, named, report)
        self._kill_local_silent(records, silent)
        if self.on_trip is not None:
            try:
                self.on_trip(cause, f"{detail}; silent ranks: {named}", self.step, report)
            except Exception as error:
                logger.error("[watchdog] could not record the failure: %s", error)
        logging.shutdown()
        self._exit(self.exit_code)

    def write_report(self, cause: str, detail: str, records: dict[int, HeartbeatRecord], named: str, now: float) -> Path:
        hangs = self.run_dir / "hangs"
        hangs.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
        path = hangs / f"rank-{self.rank}-{stamp}.txt"
        with open(path, "w") as handle:
            handle.write(f"{cause}: {detail}\nrank {self.rank} on {self.host} pid {os.getpid()}\n")
            handle.write(f"silent ranks: {named}\nheartbeats:\n{describe_heartbeats(records, now)}\n\n")
            handle.flush()
            faulthandler.dump_traceback(handle, all_threads=True)
        dump_flight_recorder(hangs / f"rank-{self.rank}-{stamp}.nccl_trace.pkl")
        return path

    def _kill_local_silent(self, records: dict[int, HeartbeatRecord], silent: dict[int, str]) -> None:
        """SIGKILL silent peers on this host: a stopped or wedged process ignores the launcher's SIGTERM."""
        for rank in silent:
            record = records[rank]
            this_start = record.beat_time >= self._started_wall - _SAME_START_S  # not a file left by an earlier start
            if record.host == self.host and this_start and not process_gone(record.pid):
                try:
                    os.kill(record.pid, signal.SIGKILL)
                    logger.error("[watchdog] SIGKILLed rank %d (pid %d), whose heartbeat stopped", rank, record.pid)
                except OSError:
                    pass
