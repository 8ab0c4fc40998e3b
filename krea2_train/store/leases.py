"""Training-read bookkeeping: which rank of which run holds which shard, progress, quarantine.

This is bookkeeping only: the sample order is a pure function of the epoch plan, so nothing here
can change what a rank trains on. A ``LeaseKeeper`` runs in the rank's main process with one
background thread and its own connection. The loader tells it where the rank is
(``begin_epoch``, ``advance``) and which shards proved unreadable (``quarantine``); the thread
writes that state, heartbeats the rank's lease every ``lease_s / 3``, and when the server goes
away it reconnects with backoff and writes the latest state: nothing waits on the database and
nothing is lost, because every write is an idempotent upsert of the current state.

Fencing: a keeper claims its rank row with a new owner id (host:pid:uuid) and attempt + 1; every
later write joins on ``loader_ranks`` with that (owner, attempt). When another incarnation has
taken the rank over (the row holds another owner with an attempt at least ours), the writes
change 0 rows and ``lost`` becomes true. A row that is missing or holds an older attempt (a
failover to a standby that had not received the claim) is taken back instead. Fencing needs the
database: a start cut off from it is not fenced until it reaches it again.

Imports no torch.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import psycopg

from krea2_train.store.db import connection_kwargs
from krea2_train.store.queue import new_owner_id, requeue

logger = logging.getLogger(__name__)

# One query for a run's progress: a row per rank of the run's current world size.
RUN_PROGRESS_SQL = """
SELECT r.rank,
       r.epoch,
       r.batch_index,
       run.batches_per_epoch,
       round(100.0 * r.batch_index / run.batches_per_epoch, 2)        AS epoch_percent,
       r.owner,
       r.attempt,
       r.expires_at > now()                                            AS alive,
       r.heartbeat_at,
       count(l.shard_id) FILTER (WHERE l.state = 'held')               AS shards_held,
       count(l.shard_id) FILTER (WHERE l.state = 'done')               AS shards_done,
       count(l.shard_id) FILTER (WHERE s.state = 'quarantined')        AS shards_quarantined
  FROM loader_runs run
  JOIN loader_ranks r ON r.run_id = run.run_id AND r.rank < run.world_size
  LEFT JOIN shard_leases l ON l.run_id = r.run_id AND l.rank = r.rank AND l.epoch = r.epoch
  LEFT JOIN shards s ON s.id = l.shard_id
 WHERE run.run_id = %(run_id)s
 GROUP BY r.rank, r.epoch, r.batch_index, run.batches_per_epoch, r.owner, r.attempt, r.expires_at, r.heartbeat_at
 ORDER BY r.rank
"""


def run_progress(conn: psycopg.Connection, run_id: str) -> list[dict]:
    """The rows of ``RUN_PROGRESS_SQL`` for ``run_id`` as dicts (empty for an unknown run)."""
    cursor = conn.execute(RUN_PROGRESS_SQL, {"run_id": run_id})
    names = [column.name for column in cursor.description]
    return [dict(zip(names, values)) for values in cursor.fetchall()]


@dataclass(frozen=True)
class RunInfo:
    """What ``loader_runs`` records about a run."""

    run_id: str
    manifest_sha256: str
    num_shards: int
    num_samples: int
    batches_per_epoch: int
    global_batch_size: int
    world_size: int


@dataclass(frozen=True)
class Span:
    """Shard ``shard_id`` is read by this rank in global batches first_batch .. last_batch."""

    shard_id: int
    first_batch: int
    last_batch: int


class LeaseKeeper:
    """Keeps one rank's lease, shard leases, position and quarantine reports in the database."""

    def __init__(self, dsn: str, run: RunInfo, rank: int, *, lease_s: float = 30.0, connect_timeout_s: float = 5.0):
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        self.dsn = dsn
        self.run = run
        self.rank = rank
        self.lease_s = lease_s
        self.owner = new_owner_id()
        self.attempt: int | None = None
        self.lost = False
        self.last_error: str | None = None
        self._connect_timeout_s = connect_timeout_s
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop = False
        # desired state (set by the loader) and what the database is known to hold
        self._epoch = 0
        self._batch_index = 0
        self._by_first: list[Span] = []
        self._by_last: list[Span] = []
        self._quarantine: dict[int, str] = {}
        self._version = 0
        self._written_version = -1
        self._written: dict[tuple[int, int], str] = {}  # (epoch, shard_id) -> state in the database
        self._thread = threading.Thread(target=self._run, name=f"krea2-leases-rank{rank}", daemon=True)
        self._conn: psycopg.Connection | None = None

    # ---- called by the loader (never blocks on the database) ----

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def begin_epoch(self, epoch: int, batch_index: int, spans: Sequence[Span]) -> None:
        """The rank is at ``batch_index`` of ``epoch`` and will read ``spans`` this epoch."""
        with self._changed:
            self._epoch, self._batch_index = epoch, batch_index
            self._by_first = sorted(spans, key=lambda span: (span.first_batch, span.shard_id))
            self._by_last = sorted(spans, key=lambda span: (span.last_batch, span.shard_id))
            self._written = {key: state for key, state in self._written.items() if key[0] == epoch}
            self._bump()

    def advance(self, batch_index: int) -> None:
        """The trainer has consumed every global batch before ``batch_index`` of this epoch."""
        with self._changed:
            self._batch_index = batch_index
            self._bump()

    def quarantine(self, shard_id: int, error: str) -> None:
        with self._changed:
            self._quarantine.setdefault(shard_id, error)
            self._bump()

    def flush(self, timeout_s: float) -> bool:
        """Wait until the database holds the latest state; False if ``timeout_s`` passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: self._written_version == self._version, timeout_s)

    def close(self, flush_timeout_s: float = 5.0, join_timeout_s: float = 5.0) -> None:
        """Write the latest state (waiting up to ``flush_timeout_s``) and stop the thread. A
        thread stuck in a statement the server never answers (a hung server, a partition) is
        left behind after ``join_timeout_s`` with its connection: it is a daemon, and the state
        it did not write is bookkeeping only."""
        if self._thread.is_alive():
            self.flush(flush_timeout_s)
            with self._changed:
                self._stop = True
                self._changed.notify_all()
            self._thread.join(join_timeout_s)
            if self._thread.is_alive():
                logger.warning(
                    "rank %d's lease keeper is still waiting for the database after %.0fs; leaving it (its last"
                    " error: %s)", self.rank, flush_timeout_s + join_timeout_s, self.last_error or "none",
                )
                return
        if self._conn is not None:
            self._conn.close()

    def _bump(self) -> None:
        self._version += 1
        self._changed.notify_all()

    # ---- the background thread ----

    def _run(self) -> None:
        backoff_s = 0.05
        next_heartbeat = 0.0
        while True:
            with self._changed:
                if self._stop:
                    return
                version = self._version
            try:
                if self._written_version != version or time.monotonic() >= next_heartbeat:
                    self._sync(version)
                    next_heartbeat = time.monotonic() + self.lease_s / 3
                backoff_s = 0.05
                with self._changed:
                    if self._version == version and not self._stop:
                        self._changed.wait(max(0.0, next_heartbeat - time.monotonic()))
            except psycopg.Error as error:
                self.last_error = " ".join(str(error).split())
                self._drop_connection()
                with self._changed:
                    self._changed.wait_for(lambda: self._stop, backoff_s * random.uniform(0.5, 1.5))
                backoff_s = min(2.0, backoff_s * 2)

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass
            self._conn = None

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.dsn, **connection_kwargs(self._connect_timeout_s))
        return self._conn

    def _sync(self, version: int) -> None:
        """Write the state as of ``version`` in one transaction; on any error nothing is
        recorded as written, so the next try writes it again."""
        conn = self._connection()
        with self._lock:
            epoch, batch_index = self._epoch, self._batch_index
            held = [s for s in self._by_first if s.first_batch <= batch_index <= s.last_batch]
            done = [s for s in self._by_last if s.last_batch < batch_index]
            quarantine = dict(self._quarantine)
            written = dict(self._written)
        attempt = self.attempt
        changed: list[tuple[Span, str]] = []
        with conn.transaction():
            if attempt is None:
                attempt = self._claim(conn, epoch, batch_index)
            alive = self._heartbeat(conn, epoch, batch_index, attempt)
            if alive:
                for spans, state in ((held, "held"), (done, "done")):
                    spans = [s for s in spans if written.get((epoch, s.shard_id)) != state]
                    self._write_leases(conn, epoch, spans, state, attempt)
                    changed += [(span, state) for span in spans]
            for shard_id, error in sorted(quarantine.items()):
                cursor = conn.execute(
                    "UPDATE shards SET state = 'quarantined', error = %s, quarantined_at = now()"
                    " WHERE id = %s AND state = 'ready'",
                    (error, shard_id),
                )
                if cursor.rowcount == 1:  # the pack job packs its images again (as unpacked: see data.pack)
                    from krea2_train.data.pack import PACK_JOB_NAME  # pack builds on the store: not a top import

                    requeue(conn, PACK_JOB_NAME, "SELECT image_id FROM shard_samples WHERE shard_id = %s", (shard_id,))
        self.attempt = attempt
        self.lost = self.lost or not alive
        with self._changed:
            for span, state in changed:
                self._written[(epoch, span.shard_id)] = state
            for shard_id in quarantine:
                self._quarantine.pop(shard_id, None)
            self._written_version = max(self._written_version, version)
            self._changed.notify_all()

    def _claim(self, conn: psycopg.Connection, epoch: int, batch_index: int) -> int:
        self._record_run(conn)
        (attempt,) = conn.execute(
            """
            INSERT INTO loader_ranks (run_id, rank, owner, attempt, epoch, batch_index, expires_at)
            VALUES (%(run_id)s, %(rank)s, %(owner)s, 1, %(epoch)s, %(batch_index)s,
                    now() + %(lease_s)s * interval '1 second')
            ON CONFLICT (run_id, rank) DO UPDATE
               SET owner = excluded.owner, attempt = loader_ranks.attempt + 1, epoch = excluded.epoch,
                   batch_index = excluded.batch_index, heartbeat_at = now(), expires_at = excluded.expires_at
            RETURNING attempt
            """,
            self._params(epoch=epoch, batch_index=batch_index, owner=self.owner),
        ).fetchone()
        return attempt

    def _record_run(self, conn: psycopg.Connection, *, update: bool = True) -> None:
        """The run's ``loader_runs`` row, which the rank rows reference (idempotent). Without
        ``update`` an existing row is left as it is: a start that may have been superseded does
        not rewrite the newer start's world."""
        run = self.run
        on_conflict = """DO UPDATE
               SET manifest_sha256 = excluded.manifest_sha256, num_shards = excluded.num_shards,
                   num_samples = excluded.num_samples, batches_per_epoch = excluded.batches_per_epoch,
                   global_batch_size = excluded.global_batch_size, world_size = excluded.world_size,
                   updated_at = now()""" if update else "DO NOTHING"
        conn.execute(
            """
            INSERT INTO loader_runs (run_id, manifest_sha256, num_shards, num_samples, batches_per_epoch,
                                     global_batch_size, world_size)
            VALUES (%s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (run_id) """ + on_conflict,
            (run.run_id, run.manifest_sha256, run.num_shards, run.num_samples, run.batches_per_epoch,
             run.global_batch_size, run.world_size),
        )

    def _heartbeat(self, conn: psycopg.Connection, epoch: int, batch_index: int, attempt: int) -> bool:
        cursor = conn.execute(
            """
            UPDATE loader_ranks
               SET epoch = %(epoch)s, batch_index = %(batch_index)s, heartbeat_at = now(),
                   expires_at = now() + %(lease_s)s * interval '1 second'
             WHERE run_id = %(run_id)s AND rank = %(rank)s AND owner = %(owner)s AND attempt = %(attempt)s
            """,
            self._params(epoch=epoch, batch_index=batch_index, owner=self.owner, attempt=attempt),
        )
        if cursor.rowcount == 1:
            return True
        # Not ours as we claimed it. Fenced only when a later claim holds the row (its attempt is
        # ours or more: each claim adds one); a row that is gone or older (a failover to a standby
        # that had not received our claim, which may have lost the run's row too) is taken back,
        # so the live start is not stopped.
        self._record_run(conn, update=False)
        retaken = conn.execute(
            """
            INSERT INTO loader_ranks (run_id, rank, owner, attempt, epoch, batch_index, expires_at)
            VALUES (%(run_id)s, %(rank)s, %(owner)s, %(attempt)s, %(epoch)s, %(batch_index)s,
                    now() + %(lease_s)s * interval '1 second')
            ON CONFLICT (run_id, rank) DO UPDATE
               SET owner = excluded.owner, attempt = excluded.attempt, epoch = excluded.epoch,
                   batch_index = excluded.batch_index, heartbeat_at = now(), expires_at = excluded.expires_at
             WHERE loader_ranks.attempt < excluded.attempt
            RETURNING 1
            """,
            self._params(epoch=epoch, batch_index=batch_index, owner=self.owner, attempt=attempt),
        ).fetchone()
        if retaken is not None:
            logger.warning("rank %d's lease row was missing or older than its claim (attempt %d): taken back", self.rank, attempt)
        return retaken is not None

    def _write_leases(self, conn: psycopg.Connection, epoch: int, spans: list[Span], state: str, attempt: int) -> None:
        """Upsert shard leases to ``state``, fenced by this incarnation's (owner, attempt)."""
        if not spans:
            return
        spans = sorted(spans, key=lambda span: span.shard_id)
        conn.execute(
            """
            INSERT INTO shard_leases (run_id, epoch, rank, shard_id, owner, attempt, state, first_batch,
                                      last_batch, done_at)
            SELECT r.run_id, %(epoch)s, r.rank, u.shard_id, r.owner, r.attempt, %(state)s, u.first_batch,
                   u.last_batch, CASE WHEN %(state)s = 'done' THEN now() END
              FROM loader_ranks r,
                   unnest(%(shard_ids)s::bigint[], %(firsts)s::bigint[], %(lasts)s::bigint[])
                     AS u (shard_id, first_batch, last_batch)
             WHERE r.run_id = %(run_id)s AND r.rank = %(rank)s AND r.owner = %(owner)s AND r.attempt = %(attempt)s
            ON CONFLICT (run_id, epoch, rank, shard_id) DO UPDATE
               SET owner = excluded.owner, attempt = excluded.attempt, state = excluded.state,
                   first_batch = excluded.first_batch, last_batch = excluded.last_batch,
                   leased_at = CASE WHEN excluded.state = 'held' THEN now() ELSE shard_leases.leased_at END,
                   done_at = excluded.done_at
            """,
            self._params(
                epoch=epoch, state=state, owner=self.owner, attempt=attempt,
                shard_ids=[s.shard_id for s in spans], firsts=[s.first_batch for s in spans],
                lasts=[s.last_batch for s in spans],
            ),
        )

    def _params(self, **extra) -> dict:
        return {"run_id": self.run.run_id, "rank": self.rank, "lease_s": self.lease_s, **extra}

