"""Shared fixtures: one embedded PostgreSQL server per test session, a fresh database per test.

``pg_store_dsn``: the session server's DSN (database ``postgres``).
``fresh_store``: an open ``Store`` on a new, migrated database, dropped after the test.
``public_tmp_dir``: a temporary directory an embedded server may live in.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import psycopg

import pytest
from psycopg import conninfo, sql

from krea2_train.store import open_store
from krea2_train.store.embedded import EmbeddedServer


def pytest_sessionstart(session):
    # The suite writes checkpoints, shards and a PostgreSQL cluster under the temp directory;
    # when a run fails with ENOSPC this line says whether the disk was short from the start.
    directory = tempfile.gettempdir()
    free_gib = shutil.disk_usage(directory).free / 2**30
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"free disk under {directory}: {free_gib:.1f} GiB (the suite needs about 2 GiB)")


@pytest.fixture(scope="session")
def pg_server():
    # Not under pytest's tmp_path: pytest re-chmods /tmp/pytest-of-<user> to 0700 whenever a
    # session starts, which locks the server's system user (pgserver, as root) out of its files.
    with tempfile.TemporaryDirectory(prefix="krea2-pg-") as directory:
        server = EmbeddedServer(directory)
        try:
            yield server
        finally:
            server.stop()  # before the directory goes: pgserver finds its handles there


@pytest.fixture
def public_tmp_dir():
    """A temporary directory outside pytest's private tree, for embedded servers of one test."""
    with tempfile.TemporaryDirectory(prefix="krea2-test-") as directory:
        yield Path(directory)


@pytest.fixture(scope="session")
def pg_store_dsn(pg_server) -> str:
    return pg_server.dsn


@pytest.fixture
def fresh_database_dsn(pg_store_dsn):
    """DSN of a new, empty database on the session server; dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(pg_store_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield conninfo.make_conninfo(pg_store_dsn, dbname=name)
    with psycopg.connect(pg_store_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def fresh_store(fresh_database_dsn):
    store = open_store(fresh_database_dsn)
    yield store
    store.close()


@pytest.fixture(scope="module")
def world_of_one():
    """A single-process gloo group (no torchrun environment), torn down after the module."""
    from krea2_train.parallel.distributed import destroy_distributed, init_distributed

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        assert key not in os.environ, f"run these tests outside torchrun ({key} is set)"
    yield init_distributed(timeout_s=120)
    destroy_distributed()


@pytest.fixture
def one_cpu_thread():
    """Tiny ops on a shared, loaded CPU stall for milliseconds waiting on a second OpenMP thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
