"""Opening the store: DSN resolution, a reachability check with a deadline, the pool, migrations."""

from __future__ import annotations

import os
import re
from pathlib import Path

import psycopg
from psycopg import conninfo
from psycopg_pool import ConnectionPool

from krea2_train.store.embedded import EmbeddedServer
from krea2_train.store.errors import StoreError, StoreRefused, StoreUnavailable
from krea2_train.store.migrations import apply_migrations

DSN_ENV = "KREA2_PG_DSN"
STORE_DIR_ENV = "KREA2_DATA_DIR"

# libpq keepalives: notice a server that vanished without a FIN, and (tcp_user_timeout, ms) one
# that stopped acknowledging what was sent to it, in about a minute (both ignored on Unix
# sockets). A server process that hangs on a live host answers both: threads that talk to the
# database are therefore never joined without a timeout.
CLIENT_KEEPALIVES = {
    "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3, "tcp_user_timeout": 60_000,
}


class Store:
    """An open store.

    Attributes:
        dsn: the connection string (an embedded server's socket URI, or the one given).
        pool: a ``psycopg_pool.ConnectionPool``; its connections are in AUTOCOMMIT mode, so each
            statement commits on its own; group statements with ``with conn.transaction():``.
        embedded: the embedded server this store started, or None.
    """

    def __init__(self, dsn: str, pool: ConnectionPool, embedded: EmbeddedServer | None):
        self.dsn = dsn
        self.pool = pool
        self.embedded = embedded

    def close(self) -> None:
        """Close the pool and release the embedded server this store started (if any)."""
        self.pool.close()
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def resolve_dsn(dsn: str | None) -> str | None:
    """The DSN to use: the argument, else ``$KREA2_PG_DSN``, else None (embedded server)."""
    return dsn or os.environ.get(DSN_ENV) or None


def default_store_dir(runs_root: str | Path = "runs") -> Path:
    """Where the embedded server keeps its data when no DSN is set: ``$KREA2_DATA_DIR``, else
    ``<runs_root>/_store``. The trainer and ``krea2 data`` both use it, so what one ingests the
    other trains on."""
    return Path(os.environ.get(STORE_DIR_ENV) or Path(runs_root) / "_store")


def describe_target(dsn: str) -> str:
    """'host:port/dbname' of a DSN, for error messages (never includes the password)."""
    try:
        params = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as error:
        raise StoreError(f"invalid PostgreSQL DSN: {error}") from None
    host = params.get("host") or params.get("hostaddr") or "localhost"
    return f"{host}:{params.get('port') or 5432}/{params.get('dbname') or ''}"


def redact_dsn(dsn: str) -> str:
    """``dsn`` with its password replaced by ``***`` (key=value form), for files and logs."""
    try:
        params = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "*** (an unparsable DSN)"
    if "password" not in params:
        return dsn
    return conninfo.make_conninfo(**{**params, "password": "***"})


def connection_kwargs(connect_timeout_s: float) -> dict:
    """Keyword arguments for every connection the store opens."""
    return {"autocommit": True, "connect_timeout": max(2, round(connect_timeout_s)), **CLIENT_KEEPALIVES}


# what the server answers when the DSN itself is wrong (libpq gives no SQLSTATE for a refused
# connection, only the server's message): a restart meets it again
REFUSED_CONNECTION = re.compile(
    r'database ".*" does not exist|role ".*" does not exist|password authentication failed'
    r"|authentication failed for user|no pg_hba\.conf entry|no password supplied"
)


def check_reachable(dsn: str, connect_timeout_s: float) -> None:
    """Connect once. Raise StoreRefused when the server turns the DSN down (no such database or
    role, a wrong password), StoreUnavailable naming the host when it cannot be reached within the
    timeout (a server that may come back)."""
    try:
        psycopg.connect(dsn, **connection_kwargs(connect_timeout_s)).close()
    except psycopg.OperationalError as error:
        reason = " ".join(str(error).split())
        if REFUSED_CONNECTION.search(reason):
            raise StoreRefused(
                f"PostgreSQL at {describe_target(dsn)} refused the connection: {reason}. Fix the database, "
                f"user or password in the DSN (--dsn, data.dsn or ${DSN_ENV}); a restart would meet the same answer"
            ) from None
        raise StoreUnavailable(
            f"cannot reach PostgreSQL at {describe_target(dsn)}"
            f" within {connection_kwargs(connect_timeout_s)['connect_timeout']}s: {reason}"
        ) from None


def find_dataset_id(conn: psycopg.Connection, name: str) -> int:
    """The id of dataset ``name``.

    Raises:
        StoreError: no such dataset (the message lists the registered ones).
    """
    row = conn.execute("SELECT id FROM datasets WHERE name = %s", (name,)).fetchone()
    if row is None:
        known = [known for (known,) in conn.execute("SELECT name FROM datasets ORDER BY name LIMIT 20")]
        raise StoreError(f"unknown dataset {name!r}: ingest it first (registered: {', '.join(known) or 'none'})")
    return row[0]


def open_pool(dsn: str, connect_timeout_s: float, max_size: int = 8) -> ConnectionPool:
    pool = ConnectionPool(
        dsn,
        min_size=1,
        max_size=max_size,
        kwargs=connection_kwargs(connect_timeout_s),
        timeout=max(30.0, connect_timeout_s),
        reconnect_timeout=max(60.0, connect_timeout_s),
        open=False,
        name=f"krea2-store:{describe_target(dsn)}",
    )
    pool.open(wait=True, timeout=max(10.0, 2 * connect_timeout_s))
    return pool


def open_store(
    dsn: str | None = None,
    data_dir: str | Path | None = None,
    *,
    connect_timeout_s: float = 5,
    max_connections: int = 8,
) -> Store:
    """Open the store and apply pending migrations.

    Args:
        dsn: a PostgreSQL DSN/URI; defaults to ``$KREA2_PG_DSN``. With neither, an embedded
            server is started with its data under ``data_dir``.
        data_dir: the run's directory for the embedded server (required when no DSN is set).
        connect_timeout_s: an unreachable server fails within about this many seconds (whole
            seconds, at least 2: libpq's rule).
        max_connections: the pool's maximum size.
    Raises:
        StoreUnavailable: the server did not answer within ``connect_timeout_s``.
        StoreError: no DSN and no data_dir, or a migration problem.
    """
    dsn = resolve_dsn(dsn)
    embedded = None
    if dsn is None:
        if data_dir is None:
            raise StoreError(f"no PostgreSQL DSN (argument or ${DSN_ENV}) and no data_dir for the embedded server")
        embedded = EmbeddedServer(data_dir)
        dsn = embedded.dsn
    try:
        describe_target(dsn)  # a malformed DSN fails here with a clear message
        check_reachable(dsn, connect_timeout_s)
        pool = open_pool(dsn, connect_timeout_s, max_connections)
    except BaseException:
        if embedded is not None:
            embedded.stop()
        raise
    store = Store(dsn, pool, embedded)
    try:
        with pool.connection() as conn:
            apply_migrations(conn)
    except BaseException:
        store.close()
        raise
    return store
