"""The store: migrations, DSN resolution, unreachable servers, the embedded server's lifecycle."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

import psycopg
import pytest

from krea2_train.store import StoreError, StoreUnavailable, open_store
from krea2_train.store.db import DSN_ENV, STORE_DIR_ENV, default_store_dir
from krea2_train.store.migrations import MIGRATION_NAME, migration_files

pytestmark = pytest.mark.postgres


def _applied(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [name for (name,) in conn.execute("SELECT name FROM schema_migrations ORDER BY version")]


def test_migrations_applied_once_in_order(fresh_database_dsn):
    expected = [name for _, name, _ in migration_files()]
    assert expected[:2] == ["0001_metadata.sql", "0002_job_runs.sql"]
    open_store(fresh_database_dsn).close()
    assert _applied(fresh_database_dsn) == expected
    with open_store(fresh_database_dsn) as store, store.pool.connection() as conn:
        tables = {name for (name,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"datasets", "images", "job_runs", "schema_migrations"} <= tables
    assert _applied(fresh_database_dsn) == expected


def test_concurrent_opens_apply_each_migration_once(fresh_database_dsn):
    errors: list[BaseException] = []

    def open_close():
        try:
            open_store(fresh_database_dsn).close()
        except BaseException as error:  # collected and re-raised by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=open_close) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert _applied(fresh_database_dsn) == [name for _, name, _ in migration_files()]


def test_edited_migration_is_refused(fresh_database_dsn):
    open_store(fresh_database_dsn).close()
    with psycopg.connect(fresh_database_dsn, autocommit=True) as conn:
        conn.execute("UPDATE schema_migrations SET sha256 = 'edited' WHERE version = '0001'")
    with pytest.raises(StoreError, match="0001_metadata.sql was edited"):
        open_store(fresh_database_dsn)


def test_a_database_of_a_newer_krea2_is_refused(fresh_database_dsn):
    open_store(fresh_database_dsn).close()
    with psycopg.connect(fresh_database_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations (version, name, sha256) VALUES ('9000', '9000_future.sql', 'x')")
    with pytest.raises(StoreError, match=r"migrations \['9000'\] that this krea2 does not know"):
        open_store(fresh_database_dsn)


def test_a_migration_numbered_before_an_applied_one_is_refused(fresh_database_dsn):
    open_store(fresh_database_dsn).close()
    with psycopg.connect(fresh_database_dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM schema_migrations WHERE version = '0030'")  # as if 0030 were added after 0032
    with pytest.raises(StoreError, match=r"\['0030'\] sort before \d{4}.*renumber"):
        open_store(fresh_database_dsn)


def test_job_runs_of_a_database_migrated_before_0040_get_their_images_dataset(fresh_database_dsn, monkeypatch):
    """Migration 0040 fills job_runs.dataset_id in for rows written before it, and the database
    fills it in for every row inserted after, whatever writes it (a scoped queue's index)."""
    import krea2_train.store.migrations as migrations

    every_file = migration_files()
    monkeypatch.setattr(migrations, "migration_files", lambda: [f for f in every_file if f[0] < "0040"])
    open_store(fresh_database_dsn).close()
    with psycopg.connect(fresh_database_dsn, autocommit=True) as conn:
        a, b = (conn.execute("INSERT INTO datasets (name) VALUES (%s) RETURNING id", (n,)).fetchone()[0] for n in "ab")
        conn.execute("INSERT INTO images (dataset_id, uri) VALUES (%s, 'a0'), (%s, 'b0'), (%s, 'b1')", (a, b, b))
        conn.execute("INSERT INTO job_runs (job, image_id) SELECT 'old', id FROM images")
    monkeypatch.setattr(migrations, "migration_files", lambda: every_file)
    open_store(fresh_database_dsn).close()
    with psycopg.connect(fresh_database_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO job_runs (job, image_id) SELECT 'new', id FROM images")
        rows = conn.execute(
            "SELECT j.job, i.uri, j.dataset_id FROM job_runs j JOIN images i ON i.id = j.image_id ORDER BY 1, 2"
        ).fetchall()
    assert rows == [("new", "a0", a), ("new", "b0", b), ("new", "b1", b), ("old", "a0", a), ("old", "b0", b), ("old", "b1", b)]


def test_a_dsn_the_server_refuses_is_a_lasting_error_naming_it(fresh_database_dsn):
    """No such database or role is the DSN's fault: not retryable (no resubmission), and named."""
    from psycopg import conninfo

    from krea2_train.errors import is_lasting_error
    from krea2_train.store.errors import StoreRefused

    for wrong, named in ((dict(dbname="no_such_db"), 'database "no_such_db" does not exist'),
                         (dict(user="no_such_role"), 'role "no_such_role" does not exist')):  # fmt: skip
        with pytest.raises(StoreRefused, match=f"refused the connection: .*{named}.*Fix the database") as raised:
            open_store(conninfo.make_conninfo(fresh_database_dsn, **wrong), connect_timeout_s=2)
        assert is_lasting_error(raised.value)


def test_migration_names_follow_the_pattern():
    folder = Path(__file__).parents[1] / "krea2_train" / "store" / "migrations"
    for path in folder.glob("*.sql"):
        assert MIGRATION_NAME.match(path.name), path.name


def test_pool_connections_autocommit(fresh_store):
    with fresh_store.pool.connection() as conn:
        assert conn.autocommit
        conn.execute("INSERT INTO datasets (name) VALUES ('a')")
    with psycopg.connect(fresh_store.dsn) as other:
        assert other.execute("SELECT count(*) FROM datasets").fetchone()[0] == 1


def test_dsn_from_environment(fresh_database_dsn, monkeypatch):
    monkeypatch.setenv(DSN_ENV, fresh_database_dsn)
    with open_store() as store:
        assert store.dsn == fresh_database_dsn
        assert store.embedded is None


def test_no_dsn_and_no_data_dir_is_an_error(monkeypatch):
    monkeypatch.delenv(DSN_ENV, raising=False)
    with pytest.raises(StoreError, match="no PostgreSQL DSN"):
        open_store()


def _closed_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens once the socket is closed


@pytest.mark.timeout(30)
def test_krea2_data_and_the_trainer_default_to_the_same_embedded_store(monkeypatch):
    from krea2_train.cli import build_parser

    monkeypatch.delenv(STORE_DIR_ENV, raising=False)
    parse = lambda: build_parser("data").parse_args(["data", "status"]).data_dir  # noqa: E731
    assert parse() == default_store_dir() == Path("runs/_store")  # the trainer: <runs_root>/_store
    assert default_store_dir("/scratch/runs") == Path("/scratch/runs/_store")
    monkeypatch.setenv(STORE_DIR_ENV, "/shared/krea2_store")
    assert parse() == default_store_dir("/scratch/runs") == Path("/shared/krea2_store")


def test_refused_connection_names_the_host():
    port = _closed_loopback_port()
    with pytest.raises(StoreUnavailable, match=rf"127\.0\.0\.1:{port}/krea2"):
        open_store(f"postgresql://u@127.0.0.1:{port}/krea2", connect_timeout_s=2)


@pytest.mark.timeout(30)
def test_silent_host_fails_after_connect_timeout():
    # a TEST-NET-1 address (RFC 5737): packets go nowhere, so only connect_timeout ends the wait
    with pytest.raises(StoreUnavailable, match=r"192\.0\.2\.1:5432/krea2 within 2s"):
        open_store("postgresql://u@192.0.2.1:5432/krea2", connect_timeout_s=2)


def test_bad_dsn_is_a_clear_error():
    with pytest.raises(StoreError, match="invalid PostgreSQL DSN"):
        open_store("host=x port", connect_timeout_s=1)


EMBEDDED_CHILD = """
import sys
from krea2_train.store import open_store
store = open_store(data_dir=sys.argv[1])
with store.pool.connection() as conn:
    conn.execute("INSERT INTO datasets (name) VALUES ('kept')")
print(store.embedded.pgdata, flush=True)
# exits without close(): the server must stop at interpreter exit
"""


def _postmaster_running(pgdata: Path) -> bool:
    pid_file = pgdata / "postmaster.pid"
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text().split()[0])
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_embedded_server_lives_under_data_dir_and_stops_at_exit(public_tmp_dir, monkeypatch):
    monkeypatch.delenv(DSN_ENV, raising=False)
    run_dir = public_tmp_dir / "run"
    child = subprocess.run(
        [sys.executable, "-c", EMBEDDED_CHILD, str(run_dir)], capture_output=True, text=True, timeout=100
    )
    assert child.returncode == 0, child.stderr
    pgdata = Path(child.stdout.strip())
    assert pgdata == (run_dir / "pgdata").resolve()
    assert (pgdata / "PG_VERSION").exists()
    assert not _postmaster_running(pgdata)

    with open_store(data_dir=run_dir) as store, store.pool.connection() as conn:
        assert conn.execute("SELECT name FROM datasets").fetchall() == [("kept",)]
        assert conn.execute("SHOW idle_in_transaction_session_timeout").fetchone()[0] == "1min"
    assert not _postmaster_running(pgdata)
