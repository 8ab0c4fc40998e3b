"""The processing queue, in the pattern of Krea's krablets.

A job is a Python function over a batch of image rows plus the SQL predicate (over ``images i``)
that selects its rows. Per-job state lives in the small hot table ``job_runs``; the big
``images`` table only receives results.

Life of a row (``job_runs.state``)::

    seed:      images matching the predicate get a 'pending' row (idempotent)
    claim:     pending -> running; owner, attempt+1, lease_expires_at, last_tried_at = now()
               (one short autocommit UPDATE ... FOR UPDATE SKIP LOCKED; rows past their
               not_before only; smallest batch_limit first, then oldest try last)
    heartbeat: running -> running, lease extended            } fenced by
    complete:  running -> done, result written to images     } (job, image_id, owner, attempt):
    fail:      running -> pending after a backoff,           } a zombie's late write changes 0 rows
               or dead at max_attempts                       }
    reap:      running with an expired lease -> pending after a backoff; a batch of k > 1 rows
               comes back with batch_limit ceil(k / 2), and a row that expired alone is dead at
               max_attempts

Retries back off: a failed or reaped row waits ``retry_backoff_s * 2 ** (attempt - 1)`` seconds
(x0.5 to x1.5 jitter, at most ``MAX_BACKOFF_S``), so an outage of what a job reads (a mount, a
bucket) does not spend every attempt at once. A poison row, one that kills its worker, is found
by bisection: its batch's leases expire, the batch comes back in halves, and only the row that
still kills its worker when claimed alone is set aside. A handler's exception is bisected in
process the same way (:func:`run_handler`), so one bad row fails alone.

Queue statements run on their own connections with ``synchronous_commit=off``: every write is
idempotent and fenced, so losing the last commits in a server crash only re-runs work.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from contextlib import nullcontext
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from krea2_train.store.db import Store, connection_kwargs, find_dataset_id
from krea2_train.store.errors import StoreError, StoreUnavailable

logger = logging.getLogger(__name__)

STATES = ("pending", "running", "done", "dead")
SEED_CHUNK = 5000
REAP_LIMIT = 1000
MAX_BACKOFF_S = 600.0
SWEEP_SPACING = 3.0  # a followed job's sweeps start at least 3 durations of the last apart


@dataclass(frozen=True)
class Done:
    """A row processed successfully; ``result`` keys named in ``Job.result_columns`` go to images."""

    result: dict


@dataclass(frozen=True)
class Failed:
    """A row that failed this attempt; it is retried, or set aside as dead at max_attempts."""

    error: str


Outcome = Done | Failed


@dataclass(frozen=True)
class Claim:
    """One claimed row: its image id, the attempt that fences writes, and the image columns."""

    image_id: int
    attempt: int
    row: dict


@dataclass(frozen=True)
class JobContext:
    """What a handler may use besides its rows: the store (for queries), its owner id, and
    ``check_lease()``, which a long handler calls between units of work (a shard, a batch of
    embeddings) to stop once every row of its batch was taken from it."""

    store: Store
    owner: str
    leases_lost: Callable[[], bool] = field(default=lambda: False, compare=False)

    def check_lease(self) -> None:
        """Raise :class:`LeaseLost` when this worker no longer holds any row of its batch (its lease
        ran out, e.g. while the database was away, and the rows went to another worker): whatever
        it would still write is fenced out, so going on only wastes time."""
        if self.leases_lost():
            raise LeaseLost(f"worker {self.owner} lost the leases of its whole batch")


class LeaseLost(Exception):
    """A handler stopped because its batch's rows belong to other workers now (see JobContext)."""


@dataclass(frozen=True)
class Job:
    """A processing job.

    Attributes:
        name: registry key, also ``job_runs.job``.
        select_predicate_sql: SQL boolean over ``images i`` selecting the rows to process,
            e.g. ``"i.decode_ok"``; it may reference other tables (chained jobs form a DAG).
        handler: ``handler(rows, ctx) -> list[Outcome]``, one outcome per row, in order; rows
            are dicts of ``image_columns``. An exception fails the whole batch.
        batch_size: rows per claim.
        image_columns: columns of ``images`` handed to the handler.
        result_columns: images column -> SQL type, written from ``Done.result`` in the fenced
            completion transaction.
        on_done: optional ``on_done(conn, claims, results)`` run inside that same transaction
            for the rows this worker still held (extra writes, e.g. other tables).
        max_attempts: failures, or leases that expired with the row claimed alone, after which
            a row is dead.
        lease_s: lease length; the worker heartbeats every lease_s / 3.
        retry_backoff_s: the wait before a row's first retry; it doubles with every attempt.
        uses_gpu: the handler runs a model on the GPU: ``krea2 data work --workers N`` gives each
            worker process one of the node's GPUs, round-robin.
    """

    name: str
    select_predicate_sql: str
    handler: Callable[[list[dict], JobContext], Sequence[Outcome]]
    batch_size: int = 16
    image_columns: tuple[str, ...] = ("id", "dataset_id", "uri")
    result_columns: Mapping[str, str] = field(default_factory=dict)
    on_done: Callable[[psycopg.Connection, list[Claim], list[dict]], None] | None = None
    max_attempts: int = 5
    lease_s: float = 60.0
    retry_backoff_s: float = 15.0
    uses_gpu: bool = False

    def __post_init__(self):
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"job name {self.name!r} must be non-empty letters, digits and underscores")
        if self.batch_size < 1 or self.max_attempts < 1 or self.lease_s <= 0 or self.retry_backoff_s < 0:
            raise ValueError(
                f"job {self.name!r}: batch_size, max_attempts and lease_s must be positive, retry_backoff_s not negative"
            )


_REGISTRY: dict[str, Job] = {}


def register_job(job: Job) -> Job:
    """Add a job to the registry; a second, different job under the same name is an error."""
    existing = _REGISTRY.get(job.name)
    if existing is not None and existing != job:
        raise StoreError(f"a different job named {job.name!r} is already registered")
    _REGISTRY[job.name] = job
    return job


def get_job(name: str) -> Job:
    if name not in _REGISTRY:
        raise StoreError(f"unknown job {name!r}; registered jobs: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def registered_jobs() -> list[str]:
    return sorted(_REGISTRY)


def new_owner_id() -> str:
    """Unique per incarnation: host:pid:uuid (a restarted process never reuses it)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def _fence_rows(claims: Sequence[Claim]) -> tuple[list[int], list[int]]:
    ordered = sorted(claims, key=lambda c: c.image_id)
    return [c.image_id for c in ordered], [c.attempt for c in ordered]


# the next try of a row whose attempt ``j.attempt`` just failed or expired
RETRY_AT = (
    "now() + least(%(max_backoff)s, %(backoff)s * power(2, greatest(j.attempt, 1) - 1))"
    " * (0.5 + random()) * interval '1 second'"
)

# a pending row a claim may take now, and the order claims take them in: a split batch's rows
# first (smallest batch_limit), then never tried, then least recently tried
PENDING_DUE = "job = %(job)s AND state = 'pending' AND (not_before IS NULL OR not_before <= now())"
CLAIM_ORDER = "batch_limit, last_tried_at NULLS FIRST"

FENCE = """
    FROM unnest(%(ids)s::bigint[], %(attempts)s::int[]) AS f (image_id, attempt)
    WHERE j.job = %(job)s AND j.image_id = f.image_id AND j.attempt = f.attempt
      AND j.owner = %(owner)s AND j.state = 'running'
"""


class Queue:
    """Queue operations for one job, as one worker incarnation (``owner``).

    With ``datasets`` the worker seeds, claims and counts the rows of those datasets' images only
    (a training run processes its own data, not a large dataset someone ingested beside it);
    reaping stays job-wide, since an expired lease is everyone's to return.
    """

    def __init__(self, store: Store, job: Job, *, connect_timeout_s: float = 5, datasets: Sequence[str] | None = None):
        self.store = store
        self.job = job
        self.owner = new_owner_id()
        kwargs = connection_kwargs(connect_timeout_s) | {"options": "-c synchronous_commit=off"}
        # two connections: the worker's statements and its heartbeat thread
        self.pool = ConnectionPool(store.dsn, min_size=1, max_size=2, kwargs=kwargs, open=False, name="krea2-queue")
        self.pool.open(wait=True, timeout=max(10.0, 2 * connect_timeout_s))
        self.dataset_ids: list[int] | None = None
        if datasets is not None:
            try:
                with self.pool.connection() as conn:
                    self.dataset_ids = sorted({find_dataset_id(conn, name) for name in datasets})
            except BaseException:
                self.pool.close()
                raise
        # which pending rows a claim takes, the smallest batch_limit among them, and whether any
        # row is unfinished; a scoped queue asks each dataset through its own range of
        # job_runs_claimable_by_dataset (migration 0040): one filter on the dataset over the
        # job's pending rows walked a large dataset's rows queued ahead (1.4 s a claim at 800k)
        if datasets is None:
            due_rows = f"SELECT image_id FROM job_runs WHERE {PENDING_DUE} ORDER BY {CLAIM_ORDER} LIMIT %(limit)s FOR UPDATE SKIP LOCKED"
            self._smallest_limit_sql = f"SELECT min(batch_limit) FROM job_runs WHERE {PENDING_DUE} AND batch_limit IS NOT NULL"
            self._unfinished_sql = (
                "SELECT EXISTS (SELECT 1 FROM job_runs WHERE job = %(job)s AND state = 'pending')"
                " OR EXISTS (SELECT 1 FROM job_runs WHERE job = %(job)s AND state = 'running')"
            )
        else:
            each_dataset = "FROM unnest(%(datasets)s::int[]) AS scope (dataset_id)"
            ours = "dataset_id = scope.dataset_id"
            due_rows = (
                f"SELECT image_id {each_dataset} CROSS JOIN LATERAL ("
                f"SELECT image_id, batch_limit, last_tried_at FROM job_runs WHERE {PENDING_DUE} AND {ours}"
                f" ORDER BY {CLAIM_ORDER} LIMIT %(limit)s FOR UPDATE SKIP LOCKED) AS due"
                f" ORDER BY {CLAIM_ORDER} LIMIT %(limit)s"
            )
            # (each in the index's order: without it the planner, blind to which dataset, expects
            # half the job's rows to match and reads them all in a seq scan)
            self._smallest_limit_sql = (
                f"SELECT min(batch_limit) {each_dataset} CROSS JOIN LATERAL (SELECT batch_limit FROM job_runs"
                f" WHERE {PENDING_DUE} AND batch_limit IS NOT NULL AND {ours} ORDER BY {CLAIM_ORDER} LIMIT 1) AS smallest"
            )
            self._unfinished_sql = (
                f"SELECT EXISTS (SELECT 1 {each_dataset} CROSS JOIN LATERAL (SELECT 1 FROM job_runs"
                f" WHERE job = %(job)s AND state = 'pending' AND {ours} ORDER BY {CLAIM_ORDER} LIMIT 1) AS pending)"
                " OR EXISTS (SELECT 1 FROM job_runs WHERE job = %(job)s AND state = 'running'"
                " AND dataset_id = ANY(%(datasets)s::int[]))"
            )
        columns = sql.SQL(", ").join(sql.SQL("i.{}").format(sql.Identifier(c)) for c in job.image_columns)
        self._claim_sql = sql.SQL(
            """
            UPDATE job_runs j
               SET state = 'running', owner = %(owner)s, attempt = j.attempt + 1,
                   lease_expires_at = now() + %(lease_s)s * interval '1 second',
                   last_tried_at = now(), updated_at = now()
              FROM images i
             WHERE i.id = j.image_id AND j.job = %(job)s AND j.image_id IN ({due_rows})
            RETURNING j.image_id, j.attempt, {columns}
            """
        ).format(columns=columns, due_rows=sql.SQL(due_rows))
        self._seed_sql = sql.SQL(
            """
            WITH scanned AS (
                SELECT i.id, ({predicate}) AS wanted FROM images i
                 WHERE i.id > %(after)s{scope} ORDER BY i.id LIMIT %(limit)s),
            added AS (
                INSERT INTO job_runs (job, image_id)
                SELECT %(job)s, id FROM scanned WHERE wanted ORDER BY id
                ON CONFLICT DO NOTHING RETURNING 1)
            SELECT (SELECT max(id) FROM scanned), (SELECT count(*) FROM added)
            """
        ).format(
            predicate=sql.SQL(job.select_predicate_sql),
            scope=sql.SQL("" if datasets is None else " AND i.dataset_id = ANY(%(datasets)s)"),
        )

    def close(self) -> None:
        self.pool.close()

    def _params(self, **extra) -> dict:
        return {"job": self.job.name, "owner": self.owner, "datasets": self.dataset_ids, **extra}

    def seed(self, min_interval_s: float = 0.0) -> int | None:
        """Create pending rows for images matching the predicate; returns how many were added,
        or None when another worker is seeding this job (one seeder at a time, advisory lock)
        or, with ``min_interval_s``, when the job's last sweep (by any worker) ended less than
        max(min_interval_s, SWEEP_SPACING x its duration) ago.

        A sweep reads every image (in id order, SEED_CHUNK at a time): predicates may become
        true for old rows when the jobs they depend on finish. Spacing sweeps by their duration
        keeps workers that follow a job from sweeping a large table back to back. A scoped queue
        sweeps its datasets' images only, and so leaves the job's sweep record alone.
        """
        added_total = 0
        with self.pool.connection() as conn:
            lock = conn.execute("SELECT pg_try_advisory_lock(hashtext('krea2-seed:' || %s))", (self.job.name,))
            if not lock.fetchone()[0]:
                return None
            try:
                if min_interval_s > 0 and conn.execute(
                    "SELECT 1 FROM job_sweeps WHERE job = %s"
                    " AND now() - swept_at < greatest(%s, %s * sweep_s) * interval '1 second'",
                    (self.job.name, min_interval_s, SWEEP_SPACING),
                ).fetchone():
                    return None
                began = time.monotonic()
                after = 0
                while True:
                    last_id, added = conn.execute(
                        self._seed_sql, self._params(after=after, limit=SEED_CHUNK)
                    ).fetchone()
                    if last_id is None:
                        break
                    after, added_total = last_id, added_total + added
                if self.dataset_ids is None:
                    conn.execute(
                        "INSERT INTO job_sweeps (job, swept_at, sweep_s) VALUES (%s, now(), %s)"
                        " ON CONFLICT (job) DO UPDATE SET swept_at = excluded.swept_at, sweep_s = excluded.sweep_s",
                        (self.job.name, time.monotonic() - began),
                    )
            finally:
                conn.execute("SELECT pg_advisory_unlock(hashtext('krea2-seed:' || %s))", (self.job.name,))
        return added_total

    def claim(self, limit: int | None = None) -> list[Claim]:
        """Claim up to ``limit`` pending rows that are due (a split batch's first, then least
        recently tried), fewer where a row's ``batch_limit`` says so."""
        limit = limit or self.job.batch_size
        with self.pool.connection() as conn:
            # the smallest due batch_limit first, in its own statement: a LIMIT the planner cannot
            # read as a constant makes it plan for a tenth of the queue (a seq scan per claim)
            (batch_limit,) = conn.execute(self._smallest_limit_sql, self._params()).fetchone()
            params = self._params(lease_s=self.job.lease_s, limit=min(limit, batch_limit or limit))
            cursor = conn.execute(self._claim_sql, params)
            names = [column.name for column in cursor.description]
            claims = []
            for values in cursor.fetchall():
                image_id, attempt, *row = values
                claims.append(Claim(image_id, attempt, dict(zip(names[2:], row))))
        return sorted(claims, key=lambda c: c.image_id)

    def heartbeat(self, claims: Sequence[Claim]) -> set[int]:
        """Extend the leases still held; returns their image ids (a missing id was lost)."""
        if not claims:
            return set()
        ids, attempts = _fence_rows(claims)
        statement = (
            "UPDATE job_runs j SET lease_expires_at = now() + %(lease_s)s * interval '1 second'"
            + FENCE
            + "RETURNING j.image_id"
        )
        params = self._params(ids=ids, attempts=attempts, lease_s=self.job.lease_s)
        with self.pool.connection() as conn:
            return {image_id for (image_id,) in conn.execute(statement, params).fetchall()}

    def finish(self, claims: Sequence[Claim], outcomes: Sequence[Outcome]) -> tuple[int, int]:
        """Record outcomes (fenced); returns (rows completed, rows failed) actually written."""
        if len(outcomes) != len(claims):
            raise RuntimeError(f"job {self.job.name!r}: {len(outcomes)} outcomes for {len(claims)} rows")
        done = [(c, o) for c, o in zip(claims, outcomes) if isinstance(o, Done)]
        failed = [(c, o) for c, o in zip(claims, outcomes) if isinstance(o, Failed)]
        if len(done) + len(failed) != len(claims):
            raise RuntimeError(f"job {self.job.name!r}: handler returned something other than Done/Failed")
        # one statement commits on its own; several (or a hook) share one transaction
        several = bool(done and failed) or bool(done and (self.job.result_columns or self.job.on_done))
        with self.pool.connection() as conn, (conn.transaction() if several else nullcontext()):
            completed = self._complete(conn, done) if done else 0
            failed_count = self._fail(conn, failed) if failed else 0
        return completed, failed_count

    def _complete(self, conn: psycopg.Connection, done: list[tuple[Claim, Done]]) -> int:
        done = sorted(done, key=lambda pair: pair[0].image_id)
        ids, attempts = _fence_rows([c for c, _ in done])
        results = [Jsonb(outcome.result) for _, outcome in done]
        statement = (
            "UPDATE job_runs j SET state = 'done', result = r.result, error = NULL, owner = NULL,"
            " lease_expires_at = NULL, updated_at = now()"
            " FROM unnest(%(ids)s::bigint[], %(attempts)s::int[], %(results)s::jsonb[])"
            "      AS r (image_id, attempt, result)"
            " WHERE j.job = %(job)s AND j.image_id = r.image_id AND j.attempt = r.attempt"
            "   AND j.owner = %(owner)s AND j.state = 'running'"
            " RETURNING j.image_id"
        )
        params = self._params(ids=ids, attempts=attempts, results=results)
        held = {image_id for (image_id,) in conn.execute(statement, params).fetchall()}
        kept = [(c, o) for c, o in done if c.image_id in held]
        if kept and self.job.result_columns:
            write_image_columns(conn, self.job.result_columns, [(c.image_id, o.result) for c, o in kept])
        if kept and self.job.on_done is not None:
            self.job.on_done(conn, [c for c, _ in kept], [o.result for _, o in kept])
        return len(kept)

    def _fail(self, conn: psycopg.Connection, failed: list[tuple[Claim, Failed]]) -> int:
        failed = sorted(failed, key=lambda pair: pair[0].image_id)
        ids, attempts = _fence_rows([c for c, _ in failed])
        statement = (
            "UPDATE job_runs j SET state = CASE WHEN j.attempt >= %(max)s THEN 'dead' ELSE 'pending' END,"
            " error = e.error, owner = NULL, lease_expires_at = NULL, updated_at = now(), not_before = " + RETRY_AT +
            " FROM unnest(%(ids)s::bigint[], %(attempts)s::int[], %(errors)s::text[]) AS e (image_id, attempt, error)"
            " WHERE j.job = %(job)s AND j.image_id = e.image_id AND j.attempt = e.attempt"
            "   AND j.owner = %(owner)s AND j.state = 'running'"
            " RETURNING j.image_id"
        )
        params = self._params(
            ids=ids, attempts=attempts, errors=[o.error for _, o in failed], max=self.job.max_attempts,
            **self._backoff(),
        )
        return len(conn.execute(statement, params).fetchall())

    def _backoff(self) -> dict:
        return {"backoff": self.job.retry_backoff_s, "max_backoff": MAX_BACKOFF_S}

    def reap(self) -> tuple[int, int]:
        """Return rows whose lease expired; returns (back to pending, set aside as dead).

        The rows one worker claimed together (same owner and attempt) come back with half their
        number as their ``batch_limit``; a row that expired alone is dead at ``max_attempts``.
        """
        statement = """
            WITH expired AS (
                SELECT image_id, owner, attempt FROM job_runs
                 WHERE job = %(job)s AND state = 'running' AND lease_expires_at < now()
                 ORDER BY lease_expires_at LIMIT %(limit)s
                   FOR UPDATE SKIP LOCKED),
            batches AS (
                SELECT image_id, count(*) OVER (PARTITION BY owner, attempt) AS claimed FROM expired)
            UPDATE job_runs j
               SET state = CASE WHEN b.claimed = 1 AND j.attempt >= %(max)s THEN 'dead' ELSE 'pending' END,
                   batch_limit = CASE WHEN b.claimed > 1 THEN (b.claimed + 1) / 2 ELSE j.batch_limit END,
                   error = format('lease expired (owner %%s, attempt %%s) in a batch of %%s',
                                  j.owner, j.attempt, b.claimed),
                   owner = NULL, lease_expires_at = NULL, updated_at = now(), not_before = """ + RETRY_AT + """
              FROM batches b
             WHERE j.job = %(job)s AND j.image_id = b.image_id
            RETURNING j.state
        """
        params = self._params(max=self.job.max_attempts, limit=REAP_LIMIT, **self._backoff())
        with self.pool.connection() as conn:
            states = [state for (state,) in conn.execute(statement, params).fetchall()]
        return states.count("pending"), states.count("dead")

    def has_unfinished(self) -> bool:
        """Whether a row of this job is still pending or running (of the scoped datasets' images).

        One EXISTS per state, each through its partial index (``state IN (...)`` matches neither
        and scanned every row of every job: 1.3 s at 12M rows, 0.3 ms this way); an idle worker
        asks every poll."""
        with self.pool.connection() as conn:
            return conn.execute(self._unfinished_sql, self._params()).fetchone()[0]


def write_image_columns(conn: psycopg.Connection, columns: Mapping[str, str], results: list[tuple[int, dict]]) -> None:
    """``UPDATE images`` from one unnest batch: for each (image_id, result), set columns[k] = result[k].

    Array-typed columns (``"int[]"``) travel as their text form (``"{1,2}"``), since unnest would
    flatten an array of arrays.
    """
    results = sorted(results, key=lambda pair: pair[0])
    names = list(columns)
    missing = sorted({name for name in names for _, result in results if name not in result})
    if missing:
        raise RuntimeError(f"job result lacks column(s) {missing}")
    ident = sql.Identifier

    def carried_type(name: str) -> sql.SQL:
        return sql.SQL("text" if columns[name].endswith("[]") else columns[name])

    statement = sql.SQL(
        "UPDATE images i SET {sets} FROM unnest(%s::bigint[], {arrays}) AS u (id, {cols}) WHERE i.id = u.id"
    ).format(
        sets=sql.SQL(", ").join(
            sql.SQL("{} = u.{}::{}").format(ident(n), ident(n), sql.SQL(columns[n])) for n in names
        ),
        arrays=sql.SQL(", ").join(sql.SQL("%s::{}[]").format(carried_type(n)) for n in names),
        cols=sql.SQL(", ").join(map(ident, names)),
    )
    arrays = [[image_id for image_id, _ in results]]
    for name in names:
        values = [result[name] for _, result in results]
        if columns[name].endswith("[]"):
            values = [None if v is None else "{" + ",".join(map(str, v)) + "}" for v in values]
        arrays.append(values)
    conn.execute(statement, arrays)


def requeue(
    conn: psycopg.Connection, job: str, image_ids_sql: str, params: Sequence, *, states: Sequence[str] = ("done",)
) -> None:
    """Send ``job``'s rows in ``states`` of the images ``image_ids_sql`` selects (a ``SELECT`` of
    ids taking ``params``) back to pending, with a fresh attempt count, so workers run them again.

    With "running" among the states, the rows workers hold now go back too. Their workers'
    completions are then fenced out (the row has no owner), so work begun before whatever made the
    rows stale (a new pack target) is done again instead of being recorded as done. "dead" revives
    rows that were given up on (a cause since removed).
    """
    unknown = set(states) - set(STATES)
    if unknown:
        raise ValueError(f"unknown job states {sorted(unknown)}; states are {STATES}")
    conn.execute(
        "UPDATE job_runs SET state = 'pending', attempt = 0, owner = NULL, lease_expires_at = NULL,"
        " batch_limit = NULL, not_before = NULL, updated_at = now()"
        f" WHERE job = %s AND state = ANY(%s) AND image_id IN ({image_ids_sql})",
        (job, list(states), *params),
    )


REQUEUE_CHUNK = 10_000  # images a statement of requeue_dataset sends back


def requeue_dataset(conn: psycopg.Connection, job: str, dataset_id: int, *, states: Sequence[str] = ("done",)) -> None:
    """:func:`requeue` of every image of a dataset, REQUEUE_CHUNK images (in id order) a
    statement, each committing on its own on an autocommit connection: no statement grows with
    the dataset (one UPDATE of 2M rows took 65-87 s and held their row locks throughout)."""
    after = 0
    while True:
        ids = [image_id for (image_id,) in conn.execute(
            "SELECT id FROM images WHERE dataset_id = %s AND id > %s ORDER BY id LIMIT %s", (dataset_id, after, REQUEUE_CHUNK)
        )]
        if not ids:
            return
        requeue(conn, job, "SELECT unnest(%s::bigint[])", (ids,), states=states)
        after = ids[-1]


@dataclass(frozen=True)
class JobProgress:
    """A job's rows per state, and how many became done in the last ``window_s`` seconds."""

    counts: dict[str, int]
    recent_done: int
    window_s: float

    @property
    def rows_per_s(self) -> float:
        return self.recent_done / self.window_s

    @property
    def eta_s(self) -> float | None:
        """Seconds until no row is pending or running at the recent rate; None when nothing moved."""
        left = self.counts["pending"] + self.counts["running"]
        return 0.0 if left == 0 else left / self.rows_per_s if self.recent_done else None


def job_progress(store: Store, window_s: float = 300.0) -> dict[str, JobProgress]:
    """{job: JobProgress} over job_runs, every state present (0 when none), in one scan."""
    with store.pool.connection() as conn:
        rows = conn.execute(
            "SELECT job, state, count(*), count(*) FILTER (WHERE updated_at > now() - make_interval(secs => %s))"
            " FROM job_runs GROUP BY job, state",
            (window_s,),
        ).fetchall()
    counts: dict[str, dict[str, int]] = {}
    recent: dict[str, int] = {}
    for job, state, count, recently in rows:
        counts.setdefault(job, dict.fromkeys(STATES, 0))[state] = count
        recent[job] = recent.get(job, 0) + (recently if state == "done" else 0)
    return {job: JobProgress(counts[job], recent[job], window_s) for job in sorted(counts)}


def job_counts(store: Store) -> dict[str, dict[str, int]]:
    """{job: {state: count}} over job_runs, every state present (0 when none)."""
    return {job: progress.counts for job, progress in job_progress(store).items()}


def run_handler(job: Job, claims: Sequence[Claim], ctx: JobContext) -> list[Outcome]:
    """Call the handler; a wrong-length answer fails every row with the reason.

    An exception over several rows runs each half again (handlers are idempotent), down to the
    rows that raise alone: one bad row fails alone, with its exception, and the rest of its batch
    completes. An exception every row raises (a missing mount) costs about twice as many calls
    as rows, and every row fails with it.
    """
    try:
        outcomes = list(job.handler([c.row for c in claims], ctx))
    except LeaseLost:
        raise  # nothing of the batch is this worker's to record
    except Exception as error:  # bisect; a single row fails, to be retried or set aside
        if len(claims) == 1:
            return [Failed(f"{type(error).__name__}: {error}")]
        half = (len(claims) + 1) // 2
        return run_handler(job, claims[:half], ctx) + run_handler(job, claims[half:], ctx)
    if len(outcomes) != len(claims):
        return [Failed(f"handler returned {len(outcomes)} outcomes for {len(claims)} rows")] * len(claims)
    return outcomes


class Heartbeat:
    """Context manager: extends the batch's leases every lease_s / 3 from its own thread."""

    def __init__(self, queue: Queue, claims: Sequence[Claim]):
        self.queue = queue
        self.claims = list(claims)
        self.lost: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="krea2-heartbeat", daemon=True)

    def _beat(self) -> None:
        interval = self.queue.job.lease_s / 3
        while not self._stop.wait(interval):
            try:
                held = self.queue.heartbeat([c for c in self.claims if c.image_id not in self.lost])
            except psycopg.Error:
                continue  # a blip: the next beat retries; a lease that runs out is fenced anyway
            self.lost |= {c.image_id for c in self.claims} - held

    def all_lost(self) -> bool:
        """Whether no row of the batch is held any more."""
        return len(self.lost) == len(self.claims)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        # a beat stuck in a statement a hung server never answers is left behind (a daemon): the
        # worker's own next statement meets the same server, and the leases it did not extend expire
        self._thread.join(self.queue.job.lease_s)


@dataclass
class WorkerStats:
    claimed: int = 0
    completed: int = 0
    failed: int = 0
    lost: int = 0
    reaped: int = 0
    dead: int = 0
    database_errors: int = 0  # operations retried after the database went away


def run_worker(
    store: Store,
    job: Job,
    *,
    batch_size: int | None = None,
    follow: bool = False,
    poll_s: float = 0.5,
    seed_every_s: float = 30.0,
    stop: threading.Event | None = None,
    outage_s: float = 300.0,
    progress_every_s: float = 60.0,
    datasets: Sequence[str] | None = None,
) -> WorkerStats:
    """Claim, process and finish batches until no row of the job is pending or running and a
    fresh seed adds none.

    While others still hold rows (or always, with ``follow``), it polls with jitter and seeds
    at most every ``seed_every_s``, and no sooner than three durations of the job's last sweep
    after it (:meth:`Queue.seed`); ``follow`` runs until ``stop`` is set. A database that goes
    away (a restart, a failover) is waited for with backoff for up to ``outage_s``, then
    ``StoreUnavailable`` is raised; a batch whose outcomes could not be written is claimed
    again when its lease expires (handlers are idempotent). Every ``progress_every_s`` it logs
    what it has done and its rate (``krea2 data status`` counts the whole job's rows). With
    ``datasets`` it works on those datasets' images only (:class:`Queue`).
    """
    stop = stop or threading.Event()
    stats = WorkerStats()
    queue = Queue(store, job, datasets=datasets)
    ctx = JobContext(store=store, owner=queue.owner)
    reap_every = job.lease_s / 3
    next_reap = next_seed = 0.0
    failing_since: float | None = None
    backoff_s = 0.1
    began = last_progress = time.monotonic()
    try:
        while not stop.is_set():
            try:
                if time.monotonic() >= next_reap:
                    returned, dead = queue.reap()
                    stats.reaped, stats.dead = stats.reaped + returned, stats.dead + dead
                    next_reap = time.monotonic() + reap_every * random.uniform(0.5, 1.5)
                claims = queue.claim(batch_size)
                failing_since, backoff_s = None, 0.1  # the database answers
                if not claims:
                    idle = not follow and not queue.has_unfinished()
                    if idle or time.monotonic() >= next_seed:
                        added = queue.seed(0.0 if idle else seed_every_s)  # before stopping: a full sweep
                        next_seed = time.monotonic() + seed_every_s
                        if added:
                            continue
                        if idle and added == 0:
                            break
                    stop.wait(poll_s * random.uniform(0.5, 1.5))
                    continue
                stats.claimed += len(claims)
                try:
                    with Heartbeat(queue, claims) as heartbeat:
                        outcomes = run_handler(job, claims, replace(ctx, leases_lost=heartbeat.all_lost))
                except LeaseLost as error:  # the rows are another worker's now
                    stats.lost += len(claims)
                    logger.warning("job %s: %s; stopped its handler", job.name, error)
                    continue
                completed, failed = queue.finish(claims, outcomes)
                stats.completed, stats.failed = stats.completed + completed, stats.failed + failed
                stats.lost += len(claims) - completed - failed
                if time.monotonic() >= last_progress + progress_every_s:
                    last_progress = time.monotonic()
                    logger.info(
                        "job %s: %d rows done, %d failed, %d lost by this worker  %.1f rows/s", job.name,
                        stats.completed, stats.failed, stats.lost, stats.completed / (last_progress - began),
                    )
            except psycopg.OperationalError as error:  # the server or the connection went away
                now = time.monotonic()
                failing_since = failing_since or now
                reason = " ".join(str(error).split())
                if now - failing_since > outage_s:
                    raise StoreUnavailable(
                        f"job {job.name}: the database has been unreachable for over {outage_s:.0f}s: {reason}"
                    ) from error
                stats.database_errors += 1
                logger.warning("job %s: database error, retrying in about %.1fs: %s", job.name, backoff_s, reason)
                stop.wait(backoff_s * random.uniform(0.5, 1.5))
                backoff_s = min(5.0, 2 * backoff_s)
    finally:
        queue.close()
    return stats
