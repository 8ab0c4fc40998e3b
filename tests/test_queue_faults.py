"""Fault injection on real worker processes: SIGKILL mid-batch, and a paused zombie that wakes up
after its rows were taken over. No row may be lost and none completed twice."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest

from krea2_train.store import open_store
from krea2_train.store.queue import Done, Job, run_worker

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.timeout(180)]


def _record_completions(conn, claims, results):
    """Audit every fenced completion: a row completed twice would appear twice."""
    with conn.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO completions (image_id, owner, attempt) VALUES (%s, %s, %s)",
            [(c.image_id, r["owner"], c.attempt) for c, r in zip(claims, results)],
        )


def _probe_job(lease_s: float, sleep_s: float) -> Job:
    def slow_handler(rows, ctx):
        time.sleep(sleep_s)
        return [Done({"owner": ctx.owner}) for _ in rows]

    return Job("fault_probe", "TRUE", slow_handler, batch_size=4, on_done=_record_completions, lease_s=lease_s)


def _worker_process(dsn: str, lease_s: float, sleep_s: float, batch: int, stats_queue) -> None:
    with open_store(dsn) as store:
        stats = run_worker(store, _probe_job(lease_s, sleep_s), batch_size=batch, poll_s=0.05)
    stats_queue.put(vars(stats))


def _prepare(store, n: int) -> None:
    with store.pool.connection() as conn:
        conn.execute("CREATE TABLE completions (image_id bigint NOT NULL, owner text NOT NULL, attempt int NOT NULL)")
        dataset_id = conn.execute("INSERT INTO datasets (name) VALUES ('faults') RETURNING id").fetchone()[0]
        conn.execute(
            "INSERT INTO images (dataset_id, uri) SELECT %s, 'f' || g FROM generate_series(1, %s) g", (dataset_id, n)
        )


def _count(store, query: str) -> int:
    with store.pool.connection() as conn:
        return conn.execute(query).fetchone()[0]


def _wait_for(store, query: str, at_least: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while _count(store, query) < at_least:
        assert time.monotonic() < deadline, f"timed out waiting for {query} >= {at_least}"
        time.sleep(0.02)


def _assert_each_row_completed_once(store, n: int) -> list[tuple]:
    with store.pool.connection() as conn:
        states = dict(conn.execute("SELECT state, count(*) FROM job_runs GROUP BY state").fetchall())
        audit = conn.execute(
            "SELECT c.image_id, c.owner, c.attempt, r.attempt, r.result->>'owner'"
            " FROM completions c JOIN job_runs r ON r.job = 'fault_probe' AND r.image_id = c.image_id"
            " ORDER BY c.image_id"
        ).fetchall()
    assert states == {"done": n}
    assert len(audit) == n and len({row[0] for row in audit}) == n  # nothing lost, nothing twice
    for image_id, owner, attempt, final_attempt, result_owner in audit:
        assert (attempt, owner) == (final_attempt, result_owner), image_id
    return audit


def test_sigkilled_workers_lose_nothing_and_complete_nothing_twice(fresh_store):
    n = 48
    _prepare(fresh_store, n)
    context = multiprocessing.get_context("spawn")
    stats_queue = context.Queue()
    workers = [
        context.Process(target=_worker_process, args=(fresh_store.dsn, 1.0, 0.3, 4, stats_queue)) for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    _wait_for(fresh_store, "SELECT count(*) FROM completions", 8)
    _wait_for(fresh_store, "SELECT count(*) FROM job_runs WHERE state = 'running'", 1)
    for worker in workers:
        os.kill(worker.pid, signal.SIGKILL)
    for worker in workers:
        worker.join()
    assert [worker.exitcode for worker in workers] == [-signal.SIGKILL] * 3
    assert _count(fresh_store, "SELECT count(*) FROM job_runs WHERE state <> 'done'") > 0

    survivor = run_worker(fresh_store, _probe_job(1.0, 0.05), poll_s=0.05)
    audit = _assert_each_row_completed_once(fresh_store, n)
    assert survivor.reaped >= 1
    assert any(attempt >= 2 for _, _, attempt, _, _ in audit)  # reclaimed after a worker died mid-batch


def test_paused_zombie_finds_its_rows_taken_over(fresh_store):
    n = 8
    _prepare(fresh_store, n)
    context = multiprocessing.get_context("spawn")
    stats_queue = context.Queue()
    zombie = context.Process(target=_worker_process, args=(fresh_store.dsn, 0.6, 1.5, n, stats_queue))
    zombie.start()
    _wait_for(fresh_store, "SELECT count(*) FROM job_runs WHERE state = 'running'", n)
    os.kill(zombie.pid, signal.SIGSTOP)  # no heartbeats: its lease runs out
    try:
        successor = run_worker(fresh_store, _probe_job(0.6, 0.0), batch_size=n, poll_s=0.05)
    finally:
        os.kill(zombie.pid, signal.SIGCONT)
    zombie_stats = stats_queue.get(timeout=60)
    zombie.join(timeout=60)
    assert zombie.exitcode == 0
    assert (zombie_stats["claimed"], zombie_stats["completed"], zombie_stats["lost"]) == (n, 0, n)
    assert (successor.completed, successor.reaped) == (n, n)
    audit = _assert_each_row_completed_once(fresh_store, n)
    assert {(owner, attempt) for _, owner, attempt, _, _ in audit} == {(audit[0][1], 2)}
