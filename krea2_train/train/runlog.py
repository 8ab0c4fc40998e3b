"""The run log: every start, stop and failure of a run, and what each failure cost.

One JSON object per line in ``run_dir/runlog.jsonl``, mirrored to PostgreSQL (table
``run_events``, migration 0020). The file is written first and is the record; the database copy
is sent by a background thread on rank 0, and events it could not send (server down, restarting)
go with the next event or the next start. A database problem is logged and never stops training.

Every event has ``id`` (uuid), ``time`` (unix s), ``kind``, ``incarnation`` (1 for the first
start of the run, +1 per start), ``rank``, ``host`` and ``step``; by kind:

- ``start`` (rank 0, after resuming): ``resumed_step``, ``world_size``, ``process_started``,
  ``steps_lost`` (the previous incarnation's failure step minus ``resumed_step``), launcher ids;
- ``first_step`` (rank 0): ``recovery_s``, from the failure this start recovers from to this
  first step (the MTTR sample; after a start that failed before its first step, from the earlier
  failure: the repair was not over), null on a run's first start;
- ``stop`` (rank 0): ``reason``: ``completed``, ``signal`` (checkpointed and left on SIGTERM) or
  ``fenced`` (a newer start holds the run's data leases; left without checkpointing);
- ``failure`` (any rank): ``cause`` (``hang``, ``slow_step``, ``peer_hang``, ``exception``,
  ``checkpoint_write``, or ``lost`` for a start that ended with no record at all: SIGKILL, the
  OOM killer, a lost node), ``detail``. A ``lost`` failure is written by the next start, dated by
  the last step any rank finished (from the heartbeats).

:func:`summarize` turns the log and the step times of ``metrics.jsonl`` into MTBF, MTTR, goodput
and the list of failures (``krea2 runs report RUN``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import statistics
import threading
import time
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from krea2_train.errors import Krea2Error
from krea2_train.files import append_line, read_json_lines
from krea2_train.train.metrics import read_metrics
from krea2_train.train.watchdog import Watchdog, process_gone, read_heartbeats

logger = logging.getLogger("krea2_train")

RUNLOG_NAME = "runlog.jsonl"
SAMPLE_IDS_DIR = "sample_ids"
DB_CONNECT_TIMEOUT_S = 3
ENDINGS = ("stop", "failure")

_INSERT = """
INSERT INTO run_events (id, run, run_dir, incarnation, kind, rank, host, step, at, fields)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, to_timestamp(%s), %s)
ON CONFLICT (id) DO NOTHING
"""
_CORE_FIELDS = ("id", "time", "kind", "incarnation", "rank", "host", "step")


# ----------------------------------------------------------------------------------------------
# The file
# ----------------------------------------------------------------------------------------------


def read_events(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The events of a run, oldest first (a line torn by a crash, or edited into something that
    is not an event, is skipped)."""
    events = read_json_lines(Path(run_dir) / RUNLOG_NAME)
    whole = [e for e in events if isinstance(e, dict) and all(name in e for name in _CORE_FIELDS)
             and isinstance(e["time"], (int, float))]  # fmt: skip
    return sorted(whole, key=lambda event: event["time"])


def append_event(run_dir: Path, event: dict[str, Any]) -> None:
    """Append one event line (one write, then fsync), on a line of its own after a torn one."""
    append_line(Path(run_dir) / RUNLOG_NAME, json.dumps(event), durable=True)


def new_event(kind: str, *, incarnation: int, rank: int, step: int | None, when: float | None = None, **fields) -> dict:
    return {
        "id": str(uuid.uuid4()),
        "time": time.time() if when is None else when,
        "kind": kind,
        "incarnation": incarnation,
        "rank": rank,
        "host": socket.gethostname(),
        "step": step,
        **fields,
    }


# ----------------------------------------------------------------------------------------------
# PostgreSQL mirror
# ----------------------------------------------------------------------------------------------


def mirror_events(conn, run: str, run_dir: str, events: list[dict[str, Any]]) -> None:
    """Insert events into ``run_events`` (idempotent: an event already there is skipped)."""
    from psycopg.types.json import Jsonb

    rows = [
        (
            event["id"], run, run_dir, event["incarnation"], event["kind"], event["rank"], event["host"], event["step"],
            event["time"], Jsonb({k: v for k, v in event.items() if k not in _CORE_FIELDS}),
        )
        for event in events
    ]  # fmt: skip
    with conn.cursor() as cursor:
        cursor.executemany(_INSERT, rows)


def database_events(conn, run: str) -> list[dict[str, Any]]:
    """The events of the newest run named ``run`` as stored in PostgreSQL, in the file's shape,
    oldest first. A name may have been used by several runs (a run directory moved away or
    deleted, then a new run of that name): their events are told apart by ``run_id``, and only
    the run with the newest event is returned (the others are named in a warning)."""
    rows = conn.execute(
        "SELECT id, extract(epoch FROM at), kind, incarnation, rank, host, step, fields FROM run_events "
        "WHERE run = %s ORDER BY at, id",
        (run,),
    ).fetchall()
    events = [
        {"id": str(i), "time": float(at), "kind": kind, "incarnation": inc, "rank": rank, "host": host, "step": step, **fields}
        for i, at, kind, inc, rank, host, step, fields in rows
    ]
    runs: dict[str | None, list[dict]] = {}
    for event in events:
        runs.setdefault(event.get("run_id"), []).append(event)
    legacy = runs.pop(None, [])  # written before events carried run_id: the run whose id is one of their starts'
    owner = next((e["id"] for e in legacy if e["kind"] == "start" and e["id"] in runs), None)
    if legacy:
        runs.setdefault(owner, []).extend(legacy)
    if len(runs) <= 1:
        return events  # in time order already (ORDER BY at)
    newest = max(runs, key=lambda key: max(e["time"] for e in runs[key]))
    logger.warning("%d other run(s) named %r have events in the database (a run directory moved or deleted, then "
                   "the name used again): reporting the newest, run_id %s", len(runs) - 1, run, newest)
    return sorted(runs[newest], key=lambda e: e["time"])


def run_id_of(events: list[dict[str, Any]]) -> str | None:
    """A run's identity in its events: its first start's ``run_id``, or that start's own id (a run
    whose first start predates run ids); None before any start."""
    starts = [e for e in events if e["kind"] == "start"]
    if not starts:
        return None
    first = min(starts, key=lambda e: (e["incarnation"], e["time"]))
    return first.get("run_id", first["id"])


class RunLog:
    """Writes a run's events; rank 0 (given a ``dsn``) also mirrors them to PostgreSQL.

    Args:
        dsn: PostgreSQL DSN for the mirror (None: the file only).
    """

    def __init__(
        self, run_dir: Path, run_name: str, *, rank: int, incarnation: int, dsn: str | None = None, run_id: str | None = None
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_name = run_name
        self.run_id = run_id  # in every event: tells apart runs that shared a name in the database
        self.rank = rank
        self.incarnation = incarnation
        self.dsn = dsn
        self._mirrored: set[str] = set()
        self._lock = threading.Lock()
        # the mirror runs in a daemon thread of its own: a database that never answers (a hung
        # server, a partition) holds neither the training loop nor the process's exit
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._mirror_loop, name="krea2-runlog", daemon=True) if dsn else None
        if self._thread is not None:
            self._thread.start()

    def record(self, kind: str, step: int | None, **fields) -> dict[str, Any]:
        if self.run_id is not None:
            fields["run_id"] = self.run_id
        event = new_event(kind, incarnation=self.incarnation, rank=self.rank, step=step, **fields)
        self.write(event)
        return event

    def write(self, event: dict[str, Any]) -> None:
        try:
            append_event(self.run_dir, event)
        except OSError as error:  # a full disk: say what was lost, keep going
            logger.error("could not write %s to the run log: %s (%s)", event["kind"], error, json.dumps(event))
        self.mirror_soon()

    def mirror_soon(self) -> None:
        """Have the mirror thread send what the file holds (at once, or after the send under way)."""
        if self._thread is not None:
            self._wake.set()

    def _mirror_loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            closing = self._closing
            try:
                self.mirror_now()
            except Exception:  # the next event tries again; the file keeps every event
                logger.warning("run log: mirroring to PostgreSQL failed", exc_info=True)
            if closing:
                return

    def mirror_now(self) -> bool:
        """Send every event of the file not yet in the database; False (logged) when that failed."""
        if self.dsn is None:
            return False
        import psycopg

        from krea2_train.store.db import connection_kwargs

        with self._lock:
            pending = [event for event in read_events(self.run_dir) if event["id"] not in self._mirrored]
            if not pending:
                return True
            try:
                with psycopg.connect(self.dsn, **connection_kwargs(DB_CONNECT_TIMEOUT_S)) as conn:
                    mirror_events(conn, self.run_name, str(self.run_dir), pending)
            except Exception as error:
                logger.warning("run log: %d event(s) not mirrored to PostgreSQL yet (%s)", len(pending), " ".join(str(error).split()))
                return False
            self._mirrored.update(event["id"] for event in pending)
            return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Mirror what is left, waiting up to ``timeout_s`` for the database; the file keeps every
        event either way (``krea2 runs`` reads it), and a later start mirrors what this one did not."""
        if self._thread is not None:
            self._closing = True
            self._wake.set()
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("run log: the database did not answer within %.0fs; the events stay in the run's file", timeout_s)
            self._thread = None


# ----------------------------------------------------------------------------------------------
# Starting an incarnation, and what the training loop calls
# ----------------------------------------------------------------------------------------------


def first_failure(events: list[dict[str, Any]], incarnation: int) -> dict[str, Any] | None:
    failures = [e for e in events if e["incarnation"] == incarnation and e["kind"] == "failure"]
    return min(failures, key=lambda e: e["time"]) if failures else None


def unrecovered_failure(events: list[dict[str, Any]], incarnation: int) -> dict[str, Any] | None:
    """The failure a start after ``incarnation`` recovers from, for MTTR: ``incarnation``'s own, or,
    when that start failed before its first step (the repair was not over), the earliest failure
    since the last start that reached a step."""
    failure = None
    while incarnation >= 1:
        found = first_failure(events, incarnation)
        if found is None:
            break
        failure = found
        if any(e["incarnation"] == incarnation and e["kind"] == "first_step" for e in events):
            break
        incarnation -= 1
    return failure


class RunInProgressError(Krea2Error):
    """Another start of the run is alive on this host: a second one would train beside it."""

    retryable = True  # it may have ended by the next try


def heartbeat_dir_of(resilience, run_dir: Path) -> Path:
    return Path(resilience.heartbeat_dir) if resilience.heartbeat_dir else run_dir / "heartbeats"


def another_start_running(heartbeat_dir: Path, stale_s: float, run_name: str) -> str | None:
    """Why this start must not begin (a live process of another start of the run on this host,
    whose heartbeat is fresh), else None. A process on another host cannot be checked: a requeued
    job there is fenced by its data lease instead."""
    host, now = socket.gethostname(), time.time()
    for beat in read_heartbeats(heartbeat_dir).values():
        if beat.host == host and beat.pid != os.getpid() and now - beat.beat_time < stale_s and not process_gone(beat.pid):
            return (f"run {run_name!r} is running already: rank {beat.rank} of another start is alive on this host "
                    f"(pid {beat.pid}, step {beat.step}, heartbeat {now - beat.beat_time:.0f} s ago). Stop it first "
                    f"(SIGTERM checkpoints and exits), or train under another run_name")
    return None


def lost_incarnation_event(
    events: list[dict[str, Any]], heartbeat_dir: Path, step_records: list[dict[str, Any]] = ()
) -> dict[str, Any] | None:
    """A ``lost`` failure for the newest incarnation when it ended with neither stop nor failure,
    dated by the last step it finished: the newest of its heartbeats (written every second or so)
    and of its ``step_records`` (metrics.jsonl, one per step: a step shorter than a heartbeat's
    period shows only there)."""
    if not events:
        return None
    last = max(e["incarnation"] for e in events)
    if any(e["incarnation"] == last and e["kind"] in ENDINGS for e in events):
        return None
    started = min(e["time"] for e in events if e["incarnation"] == last)
    beats = [b for b in read_heartbeats(heartbeat_dir).values() if b.beat_time >= started]
    finished = [(r["step"], r["time"]) for r in step_records if r.get("time", 0) >= started]
    step = max([b.step for b in beats] + [s for s, _ in finished],
               default=max((e["step"] or 0) for e in events if e["incarnation"] == last))
    when = max([b.progress_time for b in beats] + [t for _, t in finished],
               default=max(e["time"] for e in events if e["incarnation"] == last))
    first_silent = min(beats, key=lambda b: b.beat_time) if beats else None
    detail = "the processes ended without a record (SIGKILL, the OOM killer, a lost node)"
    if first_silent is not None:
        detail += f"; the first heartbeat to stop was rank {first_silent.rank}'s on {first_silent.host} (pid {first_silent.pid})"
    return new_event("failure", incarnation=last, rank=first_silent.rank if first_silent else -1, step=step, when=when,
                     cause="lost", detail=detail)  # fmt: skip


def _launcher_ids() -> dict[str, str]:
    names = ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_RUN_ID")
    return {name.lower(): os.environ[name] for name in names if name in os.environ}


def _process_started() -> float:
    """When this process started (unix s)."""
    import psutil

    return psutil.Process().create_time()


class Supervision:
    """The watchdog and the run log of one rank, behind the few calls the training loop makes."""

    def __init__(self, run_log: RunLog, watchdog: Watchdog | None, recovering_from: dict | None, sample_ids_path: Path | None,
                 world_size: int = 1):
        self.run_log = run_log
        self.world_size = world_size
        self.watchdog = watchdog
        self.recovering_from = recovering_from
        self.sample_ids_path = sample_ids_path
        self._first_step_seen = False

    @property
    def incarnation(self) -> int:
        return self.run_log.incarnation

    def step_done(self, step: int, batch: dict | None = None) -> None:
        """After each optimizer step: heartbeat; the first step after a start is recorded."""
        if self.watchdog is not None:
            self.watchdog.beat(step)
        if self.sample_ids_path is not None and batch is not None:
            append_line(self.sample_ids_path, json.dumps({"step": step, "epoch": int(batch["epoch"]), "ids": list(map(int, batch["sample_ids"])),
                                                          "incarnation": self.incarnation, "world_size": self.world_size}))
        if not self._first_step_seen:
            self._first_step_seen = True
            if self.run_log.rank == 0:
                recovery = None if self.recovering_from is None else time.time() - self.recovering_from["time"]
                self.run_log.record("first_step", step, recovery_s=recovery)
                logger.info("first step of start %d%s", self.incarnation,
                            "" if recovery is None else f": {recovery:.1f} s after the failure")  # fmt: skip

    def slow_section(self, limit_s: float | None = None):
        """See Watchdog.slow_section (a no-op without a watchdog)."""
        return self.watchdog.slow_section(limit_s) if self.watchdog is not None else nullcontext()

    def stopped(self, step: int, reason: str) -> None:
        if self.run_log.rank == 0:
            self.run_log.record("stop", step, reason=reason)

    def checkpoint_failed(self, step: int, detail: str) -> None:
        """A save that failed and was tolerated: not a failure of the run, which goes on."""
        if self.run_log.rank == 0:
            self.run_log.record("checkpoint_failed", step, detail=detail)

    def failed(self, step: int, error: BaseException) -> None:
        from krea2_train.train.checkpoint import CheckpointWriteError

        if isinstance(error, KeyboardInterrupt):  # a second Ctrl-C (or one during setup): asked for, not a failure
            self.stopped(step, "interrupted")
            return
        cause = "checkpoint_write" if isinstance(error, CheckpointWriteError) else "exception"
        self.run_log.record("failure", step, cause=cause, detail=f"{type(error).__name__}: {error}")

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
        self.run_log.close()


def start_supervision(config, run_dir: Path, *, rank: int, world_size: int, step: int, dsn: str | None) -> Supervision:
    """Open the run log (collective: rank 0 decides the incarnation) and start the watchdog.

    Rank 0 first accounts for the previous incarnation (a ``lost`` failure when it left no
    record), then records this ``start`` with the steps the previous failure lost.
    """
    import torch.distributed as dist

    resilience = config.resilience
    heartbeat_dir = heartbeat_dir_of(resilience, run_dir)
    decided: list[Any] = [None, None, None, None]
    if rank == 0:
        events = read_events(run_dir)
        run_id = run_id_of(events) or str(uuid.uuid4())
        lost = lost_incarnation_event(events, heartbeat_dir, read_metrics(run_dir))
        if lost is not None:
            lost["run_id"] = run_id
            append_event(run_dir, lost)
            events.append(lost)
        previous = max((e["incarnation"] for e in events), default=0)
        decided = [previous + 1, first_failure(events, previous), unrecovered_failure(events, previous), run_id]
    if dist.is_initialized():
        dist.broadcast_object_list(decided, src=0)
    incarnation, previous_failure, recovering_from, run_id = decided
    run_log = RunLog(run_dir, config.run_name, rank=rank, incarnation=incarnation, dsn=dsn if rank == 0 else None, run_id=run_id)
    if rank == 0:
        steps_lost = None if previous_failure is None else max(0, (previous_failure["step"] or 0) - step)
        run_log.record("start", step, resumed_step=step, world_size=world_size, process_started=_process_started(),
                       steps_lost=steps_lost, **_launcher_ids())  # fmt: skip
    watchdog = None
    if resilience.watchdog:
        watchdog = Watchdog(
            run_dir, heartbeat_dir, rank=rank, world_size=world_size,
            hang_timeout_s=resilience.hang_timeout_s, first_step_timeout_s=resilience.first_step_timeout_s,
            slow_step_factor=resilience.slow_step_factor, slow_step_min_s=resilience.slow_step_min_s,
            poll_interval_s=resilience.poll_interval_s, heartbeat_stale_s=resilience.heartbeat_stale_s,
            exit_code=resilience.hang_exit_code,
            on_trip=lambda cause, detail, at_step, report: run_log.record("failure", at_step, cause=cause, detail=detail, report=str(report)),
        ).start(step)  # fmt: skip
    sample_ids_path = None
    if resilience.record_sample_ids:
        sample_ids_path = run_dir / SAMPLE_IDS_DIR / f"rank-{rank:05d}.jsonl"
        sample_ids_path.parent.mkdir(parents=True, exist_ok=True)
    return Supervision(run_log, watchdog, recovering_from, sample_ids_path, world_size)


def read_sample_ids(run_dir: Path) -> dict[int, tuple[int, list[int]]]:
    """``{step: (epoch, the ids every rank trained on)}`` from ``resilience.record_sample_ids``'s
    files, across the run's starts: a step trained again after a restart (its first training never
    reached a checkpoint) counts as the last start that trained it, on whatever world size."""
    records = [record for path in sorted((Path(run_dir) / SAMPLE_IDS_DIR).glob("rank-*.jsonl"))
               for record in read_json_lines(path)  # a line torn by a SIGKILLed rank is skipped
               if isinstance(record, dict) and {"step", "epoch", "ids"} <= record.keys()]
    last_start: dict[int, int] = {}
    for record in records:
        last_start[record["step"]] = max(last_start.get(record["step"], 0), record.get("incarnation", 0))
    steps: dict[int, tuple[int, list[int]]] = {}
    for record in records:
        if record.get("incarnation", 0) == last_start[record["step"]]:
            steps.setdefault(record["step"], (record["epoch"], []))[1].extend(record["ids"])
    return dict(sorted(steps.items()))


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


def productive_step_time(step_records: list[dict[str, Any]]) -> float:
    """Seconds spent in steps that count: the last record of each step (a step re-run after a
    failure replaces the lost one, whose time is not productive)."""
    final: dict[int, float] = {}
    for record in step_records:
        final[record["step"]] = float(record.get("step_time_s", 0.0))
    return sum(final.values())


def summarize(events: list[dict[str, Any]], step_records: list[dict[str, Any]], now: float | None = None) -> dict[str, Any]:
    """MTBF, MTTR, goodput and the failures of a run.

    Args:
        events: :func:`read_events` (any order).
        step_records: the step records of ``metrics.jsonl`` (``step``, ``time``, ``step_time_s``).
        now: the end of a run still going without a stop record (default: its last sign of life).
    Returns:
        ``incarnations``, ``failures`` (one row per failed incarnation: time, cause, rank, step,
        steps_lost, recovery_s, detail), ``wall_s``, ``uptime_s``, ``productive_s``, ``mtbf_s``
        (uptime / failures; None without failures), ``mttr_s`` (mean recovery; None without a
        recovery), ``mttr_phases_s`` (the mean of each restart's ``relaunch``: failure -> its process
        started, ``setup``: -> its start record, after imports, model and checkpoint load, and
        ``first_step``: -> its first step, compilation included; None without one), ``goodput``
        (productive step time / wall time), ``failed_saves`` (the periodic saves that failed while
        training went on: time, step, detail).
    """
    events = sorted(events, key=lambda e: e["time"])
    if not events:
        raise ValueError("the run log has no events: the run never started under a trainer that records them")
    by_incarnation: dict[int, list[dict]] = {}
    for event in events:
        by_incarnation.setdefault(event["incarnation"], []).append(event)
    last_alive = max([e["time"] for e in events] + [r["time"] for r in step_records if "time" in r])
    end_of_run = last_alive if now is None else now
    uptime, failures, phases = 0.0, [], []
    for incarnation, group in sorted(by_incarnation.items()):
        start = next((e for e in group if e["kind"] == "start"), group[0])
        began = start.get("process_started") or start["time"]
        ending = [e for e in group if e["kind"] in ENDINGS]
        nxt = [e for e in by_incarnation.get(incarnation + 1, [])]
        ended = min(e["time"] for e in ending) if ending else (min(e["time"] for e in nxt) if nxt else end_of_run)
        uptime += max(0.0, ended - began)
        failure = first_failure(group, incarnation)
        if failure is None:
            continue
        next_start = next((e for e in nxt if e["kind"] == "start"), None)
        next_first = next((e for e in nxt if e["kind"] == "first_step"), None)
        if next_start is not None and next_first is not None and next_start.get("process_started"):
            launched = next_start["process_started"]
            phases.append({"relaunch": launched - failure["time"], "setup": next_start["time"] - launched,
                           "first_step": next_first["time"] - next_start["time"]})  # fmt: skip
        failures.append({
            "incarnation": incarnation,
            "time": failure["time"],
            "cause": failure.get("cause"),
            "rank": failure.get("rank"),
            "step": failure.get("step"),
            "steps_lost": None if next_start is None else next_start.get("steps_lost"),
            "recovery_s": None if next_first is None else next_first.get("recovery_s"),
            "detail": failure.get("detail", ""),
        })  # fmt: skip
    first_began = min(e.get("process_started") or e["time"] for e in events if e["kind"] == "start") if any(
        e["kind"] == "start" for e in events
    ) else events[0]["time"]
    wall = max(0.0, end_of_run - first_began)
    productive = productive_step_time(step_records)
    recoveries = [f["recovery_s"] for f in failures if f["recovery_s"] is not None]
    return {
        "incarnations": len(by_incarnation),
        "failures": failures,
        "wall_s": wall,
        "uptime_s": uptime,
        "productive_s": productive if step_records else None,  # unknown without metrics.jsonl, not 0
        "mtbf_s": uptime / len(failures) if failures else None,
        "mttr_s": statistics.fmean(recoveries) if recoveries else None,
        "mttr_phases_s": {name: statistics.fmean(p[name] for p in phases) for name in phases[0]} if phases else None,
        "goodput": productive / wall if wall > 0 and step_records else None,
        "steps_lost": sum(f["steps_lost"] or 0 for f in failures),
        "failed_saves": [
            {"time": e["time"], "step": e.get("step"), "detail": e.get("detail", "")} for e in events if e["kind"] == "checkpoint_failed"
        ],
    }


def checkpoint_interval_advice(
    mtbf_s: float | None, failures: int, step_s: float, blocked_s: float, write_s: float, interval_steps: int
) -> dict[str, Any] | None:
    """The checkpoint interval that loses the least time for this run's failure rate, or None
    without a failure (no MTBF) or step time.

    Young's first-order optimum, T = sqrt(2 C MTBF), with C the time a save costs training (the
    time it blocks: saves are asynchronous), and never below one save's write time (a save that
    starts before the previous one is written blocks until it is).
    """
    if mtbf_s is None or step_s <= 0:
        return None
    optimum_s = math.sqrt(2 * blocked_s * mtbf_s)
    advised_s = max(optimum_s, write_s)
    return {
        "interval_steps": interval_steps, "interval_s": interval_steps * step_s, "optimum_s": optimum_s,
        "advised_steps": max(1, round(advised_s / step_s)), "limited_by_write": write_s > optimum_s,
        "blocked_s": blocked_s, "write_s": write_s, "mtbf_s": mtbf_s, "failures": failures, "step_s": step_s,
    }  # fmt: skip


def format_interval_advice(advice: dict[str, Any]) -> str:
    young = f"sqrt(2 x {advice['blocked_s']:.3g} s blocked x {advice['mtbf_s']:.0f} s MTBF) = {advice['optimum_s']:.1f} s"
    if advice["limited_by_write"]:
        young += f", raised to one save's write time, {advice['write_s']:.1f} s"
    return (
        f"  checkpoints      every {advice['interval_steps']} steps ({advice['interval_s']:.1f} s); for this failure rate "
        f"every {advice['advised_steps']} steps loses the least ({young}; from {advice['failures']} failure(s))"
    )


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} s"


def format_report(run: str, summary: dict[str, Any]) -> str:
    goodput = summary["goodput"]
    lines = [
        f"run {run}: {summary['incarnations']} start(s), {len(summary['failures'])} failure(s), "
        f"{summary['steps_lost']} step(s) lost",
        f"  wall time        {_seconds(summary['wall_s'])}",
        f"  uptime           {_seconds(summary['uptime_s'])}",
        f"  productive steps {_seconds(summary['productive_s'])}",
        f"  goodput          {'n/a' if goodput is None else f'{100 * goodput:.1f} %'}  (productive step time / wall time)",
        f"  MTBF             {_seconds(summary['mtbf_s'])}  (uptime / failures)",
        f"  MTTR             {_seconds(summary['mttr_s'])}  (failure -> first step after the restart)",
    ]
    if summary.get("mttr_phases_s"):
        phases = summary["mttr_phases_s"]
        lines.append(
            f"                   = relaunch {phases['relaunch']:.1f} s (failure -> process up) + setup {phases['setup']:.1f} s "
            f"(imports, model, checkpoint) + first step {phases['first_step']:.1f} s (compilation)"
        )
    if summary.get("checkpoint_interval"):
        lines.append(format_interval_advice(summary["checkpoint_interval"]))
    if summary["failures"]:
        lines.append("failures:")
        header = ("start", "time", "cause", "rank", "step", "lost", "recovery", "detail")
        rows = [
            (
                str(f["incarnation"]), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(f["time"])), str(f["cause"]),
                str(f["rank"]), str(f["step"]), "n/a" if f["steps_lost"] is None else str(f["steps_lost"]),
                _seconds(f["recovery_s"]), f["detail"],
            )
            for f in summary["failures"]
        ]  # fmt: skip
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
        for row in [header, *rows]:
            lines.append("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    failed_saves = summary.get("failed_saves") or []
    if failed_saves:
        lines.append(f"checkpoint saves that failed while training went on: {len(failed_saves)}")
        for save in failed_saves:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(save["time"]))
            lines.append(f"  {when}  step {save['step']}  {save['detail']}")
    return "\n".join(lines)
