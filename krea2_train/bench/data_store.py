"""Store benchmarks: processing-queue throughput and metadata upsert throughput.

    queue   K worker processes claim batches (UPDATE ... FOR UPDATE SKIP LOCKED): rows claimed
            per second; and, separately, claimed and then completed with fenced writes; and
            claimed by workers scoped to a small dataset whose rows queue behind the large one's
            (a training run's data prep beside a large ingest).
    upsert  W writer processes each run 100-row unnest upserts with sorted, distinct keys that
            collide across writers; every row carries a new caption, so each is really written.

Runs on a scratch database of the embedded server (or ``--dsn``), dropped afterwards.
Targets (2 cores): >= 10,000 claimed rows/s, >= 40,000 upserted rows/s.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import random
import tempfile
import time
import uuid

import psycopg
from psycopg import conninfo, sql

from krea2_train.arguments import positive_float, positive_int

QUEUE_TARGET = 10_000.0
UPSERT_TARGET = 40_000.0
BENCH_JOB = "bench_noop"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dsn", default=None, help="server to benchmark (default: a fresh embedded server)")
    parser.add_argument("--queue-workers", type=positive_int, default=8)
    parser.add_argument("--queue-batch", type=positive_int, default=16)
    parser.add_argument("--queue-rows", type=positive_int, default=200_000, help="rows seeded for the queue benchmark")
    parser.add_argument("--upsert-writers", type=positive_int, default=4)
    parser.add_argument("--upsert-batch", type=positive_int, default=100)
    parser.add_argument("--upsert-keys", type=positive_int, default=100_000, help="key space the writers share")
    parser.add_argument("--seconds", type=positive_float, default=5.0, help="measured duration of each benchmark")


def _noop(rows, ctx):
    from krea2_train.store.queue import Done

    return [Done({}) for _ in rows]


def _bench_job():
    from krea2_train.store.queue import Job

    return Job(BENCH_JOB, "FALSE", _noop, batch_size=16, lease_s=60.0)


def _queue_worker(
    dsn: str, batch: int, complete: bool, datasets: list[str] | None, ready, start, seconds: float, results
) -> None:
    """Claim batches for ``seconds`` (of ``datasets``' images only, when given); with
    ``complete``, also finish each batch (fenced)."""
    from krea2_train.store import open_store
    from krea2_train.store.queue import Done, Queue

    with open_store(dsn) as store:
        queue = Queue(store, _bench_job(), datasets=datasets)
        ready.put(True)
        start.wait()
        deadline = time.perf_counter() + seconds
        rows = 0
        while time.perf_counter() < deadline:
            claims = queue.claim(batch)
            if not claims:
                break
            if complete:
                claims = claims[: queue.finish(claims, [Done({})] * len(claims))[0]]
            rows += len(claims)
        results.put(rows)
        queue.close()


def _upsert_writer(dsn: str, batch: int, keys: int, seed: int, ready, start, seconds: float, results) -> None:
    from krea2_train.data.ingest import IMAGES_UPSERT
    from krea2_train.store.upsert import upsert_batch

    rng = random.Random(seed)
    with psycopg.connect(dsn, autocommit=True, options="-c synchronous_commit=off") as conn:  # as ingest does
        dataset_id = conn.execute("SELECT id FROM datasets WHERE name = 'bench'").fetchone()[0]
        ready.put(True)
        start.wait()
        deadline = time.perf_counter() + seconds
        rows = 0
        version = 0
        while time.perf_counter() < deadline:
            version += 1
            picked = rng.sample(range(keys), batch)
            values = [
                (dataset_id, f"bench/{key:08d}", f"caption {seed}.{version}", None, None, None) for key in picked
            ]
            inserted, updated = upsert_batch(conn, IMAGES_UPSERT, values, key_width=2)
            rows += inserted + updated
        results.put(rows)


def _run_processes(target, args_list: list[tuple], seconds: float) -> float:
    """Start one process per args tuple, release them together once all are connected; returns the
    summed count / elapsed seconds."""
    context = multiprocessing.get_context("spawn")
    ready, start, results = context.Queue(), context.Event(), context.Queue()
    processes = [context.Process(target=target, args=(*args, ready, start, seconds, results)) for args in args_list]
    for process in processes:
        process.start()
    for _ in processes:  # each has connected and is waiting on `start`
        ready.get(timeout=120)
    began = time.perf_counter()
    start.set()
    total = sum(results.get(timeout=seconds + 120) for _ in processes)
    elapsed = time.perf_counter() - began
    for process in processes:
        process.join()
    return total / elapsed


SCOPED_DATASET = "bench_scoped"  # a quarter of the queue's rows, pending behind the others


def _seed_queue(dsn: str, rows: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name, count in (("bench_queue", rows), (SCOPED_DATASET, max(1, rows // 4))):
            dataset_id = conn.execute("INSERT INTO datasets (name) VALUES (%s) RETURNING id", (name,)).fetchone()[0]
            conn.execute(
                "INSERT INTO images (dataset_id, uri) SELECT %s, 'queue/' || g FROM generate_series(1, %s) g",
                (dataset_id, count),
            )
            conn.execute(
                "INSERT INTO job_runs (job, image_id) SELECT %s, id FROM images WHERE dataset_id = %s ORDER BY id",
                (BENCH_JOB, dataset_id),
            )
        conn.execute("VACUUM ANALYZE job_runs")
        conn.execute("INSERT INTO datasets (name) VALUES ('bench')")


def _scratch_database(server_dsn: str):
    name = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name, conninfo.make_conninfo(server_dsn, dbname=name)


def _drop_database(server_dsn: str, name: str) -> None:
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _record(bench: str, metric: str, value: float, unit: str, target: float) -> dict:
    from krea2_train.bench import bench_row

    return bench_row(bench, metric, float(value), unit, f">= {target:,.0f} {unit}", bool(value >= target))


@contextlib.contextmanager
def seeded_database(server_dsn: str, queue_rows: int):
    """A scratch database, migrated, with ``queue_rows`` pending jobs; dropped on exit. Each
    timed phase gets its own, so a phase never runs short of the rows an earlier one consumed."""
    from krea2_train.store import open_store

    name, dsn = _scratch_database(server_dsn)
    try:
        open_store(dsn).close()  # migrations
        _seed_queue(dsn, queue_rows)
        yield dsn
    finally:
        _drop_database(server_dsn, name)


def run(args) -> list[dict]:
    from krea2_train.store.embedded import EmbeddedServer

    with tempfile.TemporaryDirectory(prefix="krea2-bench-") as scratch:
        embedded = None if args.dsn else EmbeddedServer(scratch)
        server_dsn = args.dsn or embedded.dsn
        try:
            with seeded_database(server_dsn, args.queue_rows) as dsn:
                cycle_rate = _run_processes(
                    _queue_worker, [(dsn, args.queue_batch, True, None)] * args.queue_workers, args.seconds
                )
            with seeded_database(server_dsn, args.queue_rows) as dsn:
                scoped_rate = _run_processes(
                    _queue_worker, [(dsn, args.queue_batch, False, [SCOPED_DATASET])] * args.queue_workers, args.seconds
                )
            with seeded_database(server_dsn, args.queue_rows) as dsn:
                claim_rate = _run_processes(
                    _queue_worker, [(dsn, args.queue_batch, False, None)] * args.queue_workers, args.seconds
                )
                upsert_rate = _run_processes(
                    _upsert_writer,
                    [(dsn, args.upsert_batch, args.upsert_keys, seed) for seed in range(args.upsert_writers)],
                    args.seconds,
                )
        finally:
            if embedded is not None:
                embedded.stop()
    queue_setup = f"{args.queue_workers} workers, batch {args.queue_batch}"
    return [
        _record("data_store", f"queue claims ({queue_setup})", claim_rate, "rows/s", QUEUE_TARGET),
        {
            "bench": "data_store",
            "metric": f"queue claim + fenced completion ({queue_setup})",
            "value": float(cycle_rate),
            "unit": "rows/s",
            "target": None,
            "met": None,
        },
        _record(
            "data_store",
            f"scoped queue claims ({queue_setup}; a dataset's rows behind {args.queue_rows:,} others)",
            scoped_rate,
            "rows/s",
            QUEUE_TARGET,
        ),
        _record(
            "data_store",
            f"unnest upsert ({args.upsert_writers} writers, {args.upsert_batch}-row sorted batches)",
            upsert_rate,
            "rows/s",
            UPSERT_TARGET,
        ),
    ]


if __name__ == "__main__":
    from krea2_train.bench import module_main

    raise SystemExit(module_main(__spec__.name))
