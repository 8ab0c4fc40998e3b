"""The processing queue in one process: seeding, claims, fencing, failures, the reaper, workers."""

from __future__ import annotations

import time

import pytest

from krea2_train.store import StoreError
from krea2_train.store.queue import (
    Done,
    Failed,
    Job,
    Queue,
    get_job,
    job_counts,
    register_job,
    run_worker,
    write_image_columns,
)

pytestmark = pytest.mark.postgres


def _store_widths(rows, ctx):
    return [Done({"width": 10 * row["id"], "height": 1}) for row in rows]


def _job(**overrides) -> Job:
    settings = dict(
        name="probe",
        select_predicate_sql="i.width IS NULL",
        handler=_store_widths,
        batch_size=4,
        result_columns={"width": "int", "height": "int"},
        lease_s=30.0,
        max_attempts=3,
        retry_backoff_s=0.0,
    )
    return Job(**(settings | overrides))


def _add_images(store, n: int, dataset: str = "q") -> list[int]:
    with store.pool.connection() as conn:
        dataset_id = conn.execute("INSERT INTO datasets (name) VALUES (%s) RETURNING id", (dataset,)).fetchone()[0]
        rows = conn.execute(
            "INSERT INTO images (dataset_id, uri) SELECT %s, 'u' || g FROM generate_series(1, %s) g RETURNING id",
            (dataset_id, n),
        ).fetchall()
    return sorted(image_id for (image_id,) in rows)


def _runs(store, job="probe"):
    with store.pool.connection() as conn:
        return conn.execute(
            "SELECT image_id, state, owner, attempt, error, result FROM job_runs WHERE job = %s ORDER BY image_id",
            (job,),
        ).fetchall()


def _expire_leases(store, job="probe"):
    with store.pool.connection() as conn:
        conn.execute("UPDATE job_runs SET lease_expires_at = now() - interval '1 second' WHERE job = %s", (job,))


@pytest.fixture
def queue_pair(fresh_store):
    job = _job()
    first, second = Queue(fresh_store, job), Queue(fresh_store, job)
    yield fresh_store, first, second
    first.close()
    second.close()


def test_seed_follows_predicate_and_is_idempotent(queue_pair):
    store, queue, _ = queue_pair
    ids = _add_images(store, 10)
    with store.pool.connection() as conn:
        conn.execute("UPDATE images SET width = 1 WHERE id = %s", (ids[0],))
    assert queue.seed() == 9
    assert queue.seed() == 0
    assert [row[0] for row in _runs(store)] == ids[1:]
    assert {row[1] for row in _runs(store)} == {"pending"}


def test_following_workers_space_their_sweeps_by_the_last_ones_duration(queue_pair):
    """A periodic seed skips while the job's last sweep, by any worker, is recent: at least
    ``min_interval_s`` and three of its durations ago; a full seed (a worker about to stop) always
    sweeps."""
    store, first, second = queue_pair
    _add_images(store, 3)
    assert first.seed() == 3
    with store.pool.connection() as conn:
        conn.execute("INSERT INTO images (dataset_id, uri) SELECT id, 'late' FROM datasets")
        (swept_for,) = conn.execute("SELECT sweep_s FROM job_sweeps WHERE job = 'probe'").fetchone()
    assert 0 <= swept_for < 60
    assert second.seed(min_interval_s=60) is None  # the other worker swept a moment ago
    with store.pool.connection() as conn:  # a sweep of 100 s ended 200 s ago: 300 s must pass
        conn.execute("UPDATE job_sweeps SET sweep_s = 100, swept_at = now() - interval '200 seconds'")
    assert second.seed(min_interval_s=1) is None
    with store.pool.connection() as conn:
        conn.execute("UPDATE job_sweeps SET swept_at = now() - interval '301 seconds'")
    assert second.seed(min_interval_s=1) == 1
    assert first.seed(min_interval_s=60) is None and first.seed() == 0


def test_concurrent_claims_are_disjoint_and_leased(queue_pair):
    store, first, second = queue_pair
    _add_images(store, 10)
    first.seed()
    a, b = first.claim(4), second.claim(4)
    assert len(a) == len(b) == 4
    assert not {c.image_id for c in a} & {c.image_id for c in b}
    assert all(c.attempt == 1 and c.row["uri"].startswith("u") for c in a + b)
    owners = {row[0]: row[2] for row in _runs(store) if row[1] == "running"}
    assert owners == {c.image_id: first.owner for c in a} | {c.image_id: second.owner for c in b}
    assert len(second.claim(4)) == 2 and second.claim(4) == []


def test_owner_ids_are_unique_per_incarnation(queue_pair):
    _, first, second = queue_pair
    assert first.owner != second.owner
    host, pid, boot = first.owner.split(":")
    assert pid.isdigit() and len(boot) == 12


def test_completion_writes_results_once(queue_pair):
    store, queue, _ = queue_pair
    ids = _add_images(store, 3)
    queue.seed()
    claims = queue.claim()
    assert queue.finish(claims, _store_widths([c.row for c in claims], None)) == (3, 0)
    assert queue.finish(claims, _store_widths([c.row for c in claims], None)) == (0, 0)
    assert [(row[1], row[3], row[5]) for row in _runs(store)] == [
        ("done", 1, {"width": 10 * i, "height": 1}) for i in ids
    ]
    with store.pool.connection() as conn:
        assert conn.execute("SELECT id, width FROM images ORDER BY id").fetchall() == [(i, 10 * i) for i in ids]


def test_zombie_writes_change_nothing_after_takeover(queue_pair):
    store, zombie, successor = queue_pair
    _add_images(store, 2)
    zombie.seed()
    stale = zombie.claim()
    _expire_leases(store)
    assert successor.reap() == (2, 0)
    fresh = successor.claim() + successor.claim()  # the expired batch of 2 comes back in halves
    assert [c.attempt for c in fresh] == [2, 2]
    assert zombie.heartbeat(stale) == set()
    assert zombie.finish(stale, [Done({"width": -1, "height": -1})] * 2) == (0, 0)
    assert zombie.finish(stale, [Failed("late")] * 2) == (0, 0)
    assert successor.heartbeat(fresh) == {c.image_id for c in fresh}
    assert successor.finish(fresh, _store_widths([c.row for c in fresh], None)) == (2, 0)
    with store.pool.connection() as conn:
        assert conn.execute("SELECT count(*) FROM images WHERE width = -1").fetchone()[0] == 0
    assert {row[2] for row in _runs(store)} == {None}


def test_same_owner_older_attempt_is_fenced(fresh_store):
    queue = Queue(fresh_store, _job())
    try:
        _add_images(fresh_store, 1)
        queue.seed()
        first = queue.claim()
        _expire_leases(fresh_store)
        queue.reap()
        second = queue.claim()
        assert queue.finish(first, [Done({"width": 1, "height": 1})]) == (0, 0)
        assert queue.finish(second, [Done({"width": 2, "height": 2})]) == (1, 0)
    finally:
        queue.close()


def test_failures_retry_at_the_back_then_go_dead(queue_pair):
    store, queue, _ = queue_pair
    _add_images(store, 2)
    queue.seed()
    (failing,) = queue.claim(1)
    queue.finish([failing], [Failed("boom 1")])
    (untried,) = queue.claim(1)
    assert untried.image_id != failing.image_id  # never-tried rows come before retried ones
    queue.finish([untried], _store_widths([untried.row], None))
    for attempt in (2, 3):
        (retry,) = queue.claim(1)
        assert (retry.image_id, retry.attempt) == (failing.image_id, attempt)
        queue.finish([retry], [Failed(f"boom {attempt}")])
    runs = {row[0]: row for row in _runs(store)}
    assert runs[failing.image_id][1:5] == ("dead", None, 3, "boom 3")
    assert runs[untried.image_id][1] == "done"
    assert queue.claim() == []


def test_expired_leases_return_then_go_dead(queue_pair):
    store, queue, _ = queue_pair
    _add_images(store, 1)
    queue.seed()
    for attempt in (1, 2, 3):
        assert [c.attempt for c in queue.claim()] == [attempt]
        _expire_leases(store)
        assert queue.reap() == ((1, 0) if attempt < 3 else (0, 1))
    (run,) = _runs(store)
    assert run[1] == "dead" and run[4].startswith(f"lease expired (owner {queue.owner}, attempt 3)")


def test_unexpired_leases_are_not_reaped(queue_pair):
    store, queue, _ = queue_pair
    _add_images(store, 2)
    queue.seed()
    queue.claim()
    assert queue.reap() == (0, 0)


def test_heartbeat_extends_the_lease(fresh_store):
    queue = Queue(fresh_store, _job(lease_s=0.5))
    try:
        _add_images(fresh_store, 1)
        queue.seed()
        claims = queue.claim()
        with fresh_store.pool.connection() as conn:
            before = conn.execute("SELECT lease_expires_at FROM job_runs").fetchone()[0]
            time.sleep(0.05)
            assert queue.heartbeat(claims) == {claims[0].image_id}
            after = conn.execute("SELECT lease_expires_at FROM job_runs").fetchone()[0]
        assert after > before
    finally:
        queue.close()


def test_worker_drains_the_queue_and_a_rerun_does_nothing(fresh_store):
    ids = _add_images(fresh_store, 11)
    stats = run_worker(fresh_store, _job())
    assert (stats.claimed, stats.completed, stats.lost) == (11, 11, 0)
    assert job_counts(fresh_store) == {"probe": {"pending": 0, "running": 0, "done": 11, "dead": 0}}
    with fresh_store.pool.connection() as conn:
        assert conn.execute("SELECT id, width FROM images ORDER BY id").fetchall() == [(i, 10 * i) for i in ids]
    assert run_worker(fresh_store, _job()).claimed == 0


def test_a_worker_scoped_to_a_dataset_leaves_the_others_images_alone(fresh_store):
    """A training run processes its own dataset's images, not a large one ingested beside it: its
    worker neither seeds nor claims nor waits for the other dataset's rows, even ones already
    pending (seeded by a job-wide sweep), and leaves the job's sweep record to job-wide sweeps."""
    ours = _add_images(fresh_store, 5, "ours")
    theirs = _add_images(fresh_store, 7, "theirs")
    with fresh_store.pool.connection() as conn:  # half of theirs already pending
        conn.execute("INSERT INTO job_runs (job, image_id) SELECT 'probe', unnest(%s::bigint[])", (theirs[:4],))
    stats = run_worker(fresh_store, _job(), datasets=["ours"])
    assert (stats.claimed, stats.completed) == (5, 5)
    states = {image_id: state for image_id, state, *_ in _runs(fresh_store)}
    assert states == {**{i: "done" for i in ours}, **{i: "pending" for i in theirs[:4]}}
    with fresh_store.pool.connection() as conn:
        widths = dict(conn.execute("SELECT id, width FROM images").fetchall())
        assert conn.execute("SELECT count(*) FROM job_sweeps").fetchone()[0] == 0
    assert [widths[i] for i in ours] == [10 * i for i in ours] and all(widths[i] is None for i in theirs)
    assert run_worker(fresh_store, _job()).completed == 7  # a job-wide worker does the rest
    with pytest.raises(StoreError, match="unknown dataset 'nope'.*ours"):
        run_worker(fresh_store, _job(), datasets=["nope"])


def test_a_queue_scoped_to_several_datasets_claims_in_the_job_wide_order(fresh_store):
    """Each scoped dataset is asked through its own index range, and the answers merge into the
    order every claim keeps: a split batch's rows first (and no more of them than its limit), then
    never-tried rows, then the least recently tried. Another dataset's split batch limits nothing."""
    a, b, c = (_add_images(fresh_store, 4, name) for name in "abc")
    queue = Queue(fresh_store, _job(batch_size=4), datasets=["a", "b"])
    try:
        with fresh_store.pool.connection() as conn:
            conn.execute("INSERT INTO job_runs (job, image_id) SELECT 'probe', id FROM images")
            conn.execute(
                "UPDATE job_runs SET last_tried_at = now() - make_interval(secs => image_id) WHERE image_id = ANY(%s)",
                (a[:2] + b[:2],),
            )
            conn.execute("UPDATE job_runs SET batch_limit = 2 WHERE image_id = ANY(%s)", (b[2:],))
            conn.execute("UPDATE job_runs SET batch_limit = 1 WHERE image_id = ANY(%s)", (c,))
        assert queue.has_unfinished()
        assert [claim.image_id for claim in queue.claim()] == b[2:]  # the split batch, at its limit
        # never tried, then the longest ago (b's ids are larger: tried longer ago)
        assert [claim.image_id for claim in queue.claim()] == sorted(a[2:] + b[:2])
        assert [claim.image_id for claim in queue.claim()] == a[:2]
        assert queue.claim() == []
        assert queue.has_unfinished()  # its rows are running
        with fresh_store.pool.connection() as conn:
            conn.execute("UPDATE job_runs SET state = 'done' WHERE dataset_id <> (SELECT id FROM datasets WHERE name = 'c')")
        assert not queue.has_unfinished()  # c's pending rows are not this queue's
    finally:
        queue.close()


def test_job_progress_gives_the_recent_rate_and_an_eta(fresh_store, capsys):
    """`krea2 data status`: rows done in the last 5 minutes, and the time the rest takes at that rate."""
    from krea2_train.cli import main
    from krea2_train.store.queue import job_progress

    _add_images(fresh_store, 12)
    run_worker(fresh_store, _job())
    with fresh_store.pool.connection() as conn:  # 6 finished an hour ago, 6 just now; 3 sent back
        conn.execute("UPDATE job_runs SET updated_at = now() - interval '1 hour' WHERE image_id IN"
                     " (SELECT image_id FROM job_runs ORDER BY image_id LIMIT 6)")
        conn.execute("UPDATE job_runs SET state = 'pending' WHERE image_id IN"
                     " (SELECT image_id FROM job_runs ORDER BY image_id LIMIT 3)")
    (progress,) = job_progress(fresh_store, window_s=300).values()
    assert progress.counts == {"pending": 3, "running": 0, "done": 9, "dead": 0} and progress.recent_done == 6
    assert progress.rows_per_s == pytest.approx(6 / 300) and progress.eta_s == pytest.approx(150)
    assert main(["data", "status", "--dsn", fresh_store.dsn]) == 0
    assert ["probe", "3", "0", "9", "0", "1", "2m30s"] in [line.split() for line in capsys.readouterr().out.splitlines()]
    with fresh_store.pool.connection() as conn:
        conn.execute("UPDATE job_runs SET updated_at = now() - interval '1 hour'")
    (progress,) = job_progress(fresh_store).values()
    assert progress.eta_s is None  # nothing moved lately: no estimate


def test_a_handler_stops_once_its_whole_batch_was_taken_from_it(fresh_store, caplog):
    """The rows of a batch in progress go to another worker (this one's lease ran out): the next
    heartbeat sees none held, the handler's check_lease() stops it, nothing of it is written, and
    the rows are done later by whoever holds them."""
    ids = _add_images(fresh_store, 4)
    calls = []

    def slow_handler(rows, ctx):
        calls.append(0)
        if len(calls) == 1:  # the first time, another worker takes the batch meanwhile
            with fresh_store.pool.connection() as conn:
                conn.execute("UPDATE job_runs SET owner = 'other', attempt = attempt + 1 WHERE job = 'probe'")
        for _ in range(100):
            ctx.check_lease()
            calls[-1] += 1
            time.sleep(0.02)
        return [Done({"width": 1, "height": 1}) for _ in rows]

    job = _job(handler=slow_handler, batch_size=4, lease_s=0.3, max_attempts=10)
    with caplog.at_level("WARNING"):
        stats = run_worker(fresh_store, job, poll_s=0.05)
    assert calls[0] < 100  # stopped after a heartbeat or two, not after its 2 seconds of work
    assert stats.lost >= 4 and stats.completed == 4 and "lost the leases of its whole batch" in caplog.text
    assert job_counts(fresh_store)["probe"]["done"] == len(ids)


def test_worker_waits_out_a_database_outage_and_gives_up_after_outage_s(fresh_store, monkeypatch):
    import psycopg

    from krea2_train.store import StoreUnavailable

    ids = _add_images(fresh_store, 6)
    real_claim, real_finish = Queue.claim, Queue.finish
    outage = {"claim": 2, "finish": 1}  # calls that fail, as while the server restarts

    def failing(name, real):
        def call(self, *args, **kwargs):
            if outage[name]:
                outage[name] -= 1
                raise psycopg.OperationalError("server closed the connection unexpectedly")
            return real(self, *args, **kwargs)
        return call

    monkeypatch.setattr(Queue, "claim", failing("claim", real_claim))
    monkeypatch.setattr(Queue, "finish", failing("finish", real_finish))
    job = _job(lease_s=0.6)  # the batch whose outcomes were lost comes back one lease later
    stats = run_worker(fresh_store, job, poll_s=0.05)
    assert stats.database_errors == 3 and stats.completed == 6
    with fresh_store.pool.connection() as conn:
        assert conn.execute("SELECT id, width FROM images ORDER BY id").fetchall() == [(i, 10 * i) for i in ids]

    outage["claim"] = 10**6  # a server that does not come back
    with pytest.raises(StoreUnavailable, match="unreachable for over 1s: server closed the connection"):
        run_worker(fresh_store, job, outage_s=1.0)


def test_handler_exception_fails_the_batch_with_its_message(fresh_store):
    def explode(rows, ctx):
        raise RuntimeError("disk on fire")

    _add_images(fresh_store, 2)
    stats = run_worker(fresh_store, _job(handler=explode, max_attempts=2))
    assert (stats.failed, stats.completed) == (4, 0)
    assert {(row[1], row[4]) for row in _runs(fresh_store)} == {("dead", "RuntimeError: disk on fire")}


def test_wrong_number_of_outcomes_fails_the_batch(fresh_store):
    _add_images(fresh_store, 2)
    stats = run_worker(fresh_store, _job(handler=lambda rows, ctx: [], max_attempts=1))
    assert stats.failed == 2
    assert {row[4] for row in _runs(fresh_store)} == {"handler returned 0 outcomes for 2 rows"}


def test_missing_result_column_is_an_error(fresh_store):
    ids = _add_images(fresh_store, 1)
    with fresh_store.pool.connection() as conn, pytest.raises(RuntimeError, match=r"lacks column\(s\) \['height'\]") as raised:
        write_image_columns(conn, {"width": "int", "height": "int"}, [(ids[0], {"width": 1})])
    assert not isinstance(raised.value, StoreError)  # a job's bug keeps its traceback (not a user error)


def test_registry_refuses_a_different_job_under_a_taken_name():
    job = register_job(_job(name="probe_registry"))
    assert register_job(job) is job
    assert get_job("probe_registry") is job
    with pytest.raises(StoreError, match="already registered"):
        register_job(_job(name="probe_registry", batch_size=99))
    with pytest.raises(StoreError, match="unknown job 'nope'.*probe_registry"):
        get_job("nope")


def test_job_validates_its_settings():
    with pytest.raises(ValueError, match="job name"):
        _job(name="bad name")
    with pytest.raises(ValueError, match="must be positive"):
        _job(batch_size=0)


def test_a_failed_row_waits_out_its_backoff_before_its_retry(fresh_store):
    queue = Queue(fresh_store, _job(retry_backoff_s=60.0))
    try:
        _add_images(fresh_store, 1)
        queue.seed()
        (claim,) = queue.claim()
        queue.finish([claim], [Failed("mount gone")])
        assert queue.claim() == []  # not before its backoff: an outage does not spend every attempt
        with fresh_store.pool.connection() as conn:
            wait_s = conn.execute("SELECT extract(epoch FROM not_before - now()) FROM job_runs").fetchone()[0]
            assert 30 - 1 <= wait_s <= 90  # 60 s x [0.5, 1.5] jitter
            conn.execute("UPDATE job_runs SET not_before = now() - interval '1 second'")
        (retry,) = queue.claim()
        queue.finish([retry], [Failed("mount gone")])
        with fresh_store.pool.connection() as conn:
            wait_s = conn.execute("SELECT extract(epoch FROM not_before - now()) FROM job_runs").fetchone()[0]
            assert 60 - 1 <= wait_s <= 180  # doubled for the second attempt
        _expire_leases(fresh_store)
        assert queue.reap() == (0, 0)  # nothing running
    finally:
        queue.close()


def test_a_row_that_kills_its_worker_is_found_by_bisection_and_dies_alone(fresh_store):
    """A worker dies (its lease expires) whenever its batch holds the poison row: the batch comes
    back in halves until the poison row is claimed alone; only it ends dead, and every other row
    of its first batch completes. Its attempts in batches count, so it dies at its first expiry
    alone once it has max_attempts."""
    queue = Queue(fresh_store, _job(batch_size=8, max_attempts=2))
    try:
        ids = _add_images(fresh_store, 8)
        poison = ids[5]
        queue.seed()
        crashed_batches = []
        while claims := queue.claim():
            if poison in {c.image_id for c in claims}:
                crashed_batches.append(len(claims))  # the worker dies: nothing is written, the leases run out
                _expire_leases(fresh_store)
                queue.reap()
            else:
                assert queue.finish(claims, _store_widths([c.row for c in claims], None)) == (len(claims), 0)
        runs = {row[0]: row for row in _runs(fresh_store)}
        assert {image_id for image_id, run in runs.items() if run[1] == "dead"} == {poison}
        assert all(run[1] == "done" for image_id, run in runs.items() if image_id != poison)
        assert runs[poison][4].endswith("in a batch of 1")
        assert crashed_batches == [8, 4, 2, 1]
    finally:
        queue.close()


def test_a_handler_exception_is_bisected_so_one_bad_row_fails_alone(fresh_store):
    calls = []

    def raise_on_the_bad_row(rows, ctx):
        calls.append(len(rows))
        if any(row["uri"] == "u3" for row in rows):
            raise ValueError("cannot parse u3")
        return _store_widths(rows, ctx)

    ids = _add_images(fresh_store, 6)
    stats = run_worker(fresh_store, _job(handler=raise_on_the_bad_row, batch_size=8, max_attempts=2))
    assert (stats.completed, stats.failed) == (5, 2)  # the bad row failed twice, alone; the rest did not
    runs = {row[0]: row for row in _runs(fresh_store)}
    assert runs[ids[2]][1] == "dead" and runs[ids[2]][4] == "ValueError: cannot parse u3"
    assert all(runs[i][1] == "done" for i in ids if i != ids[2])
    assert calls[:5] == [6, 3, 2, 1, 3]  # 6 raises; its first half (3) raises: 2 pass, 1 raises; the second half passes
