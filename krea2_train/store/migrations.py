"""Versioned migrations: ``migrations/NNNN_name.sql`` applied in lexical order, once each.

Each file runs in its own transaction and is recorded in ``schema_migrations`` with its sha256;
a session-level advisory lock serialises processes that open the store at the same time. A file
edited after it was applied is an error (write a new migration instead), and so are a database
migrated by a newer krea2 and a new file numbered before one already applied.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection
from importlib import resources

import psycopg

from krea2_train.store.errors import StoreError

MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
MIGRATIONS_LOCK_KEY = 0x6B72_6561_3200  # arbitrary constant shared by every krea2 process

CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version text PRIMARY KEY,
    name text NOT NULL,
    sha256 text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


def migration_files() -> list[tuple[str, str, str]]:
    """(version, file name, sql) for every migration file, in lexical order."""
    folder = resources.files("krea2_train.store") / "migrations"
    found = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".sql"):
            continue
        match = MIGRATION_NAME.match(entry.name)
        if match is None:
            raise StoreError(f"migration file name {entry.name!r} does not match NNNN_name.sql")
        found.append((match.group(1), entry.name, entry.read_text(encoding="utf-8")))
    versions = [version for version, _, _ in found]
    duplicates = sorted({v for v in versions if versions.count(v) > 1})
    if duplicates:
        raise StoreError(f"two migration files share version(s) {duplicates}")
    return found


def check_versions(applied: Collection[str], known: list[str]) -> None:
    """Refuse a database this code cannot serve: one migrated by a newer krea2 (a version this
    code has no file for), or one where a pending file sorts before an applied one (it was added
    out of order, so this database and a fresh one would get different schemas)."""
    unknown = sorted(set(applied) - set(known))
    if unknown:
        raise StoreError(
            f"the database has migrations {unknown} that this krea2 does not know: it was migrated by a newer "
            "version. Use that version (or a database of its own for this one)"
        )
    newest = max(applied, default="")
    early = [version for version in known if version not in applied and version < newest]
    if early:
        raise StoreError(
            f"migration(s) {early} sort before {newest}, already applied to this database: renumber them after "
            f"{max(known)} (files are applied in order, once each)"
        )


def apply_migrations(conn: psycopg.Connection) -> list[str]:
    """Apply every pending migration on an autocommit connection; returns the names applied."""
    applied_now = []
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATIONS_LOCK_KEY,))
    try:
        conn.execute(CREATE_LEDGER)
        recorded = dict(conn.execute("SELECT version, sha256 FROM schema_migrations").fetchall())
        files = migration_files()
        check_versions(recorded, [version for version, _, _ in files])
        for version, name, text in files:
            digest = hashlib.sha256(text.encode()).hexdigest()
            if version in recorded:
                if recorded[version] != digest:
                    raise StoreError(f"migration {name} was edited after it was applied; add a new migration instead")
                continue
            with conn.transaction():
                conn.execute("SET LOCAL statement_timeout = 0")
                conn.execute(text)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, sha256) VALUES (%s, %s, %s)",
                    (version, name, digest),
                )
            applied_now.append(name)
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATIONS_LOCK_KEY,))
    return applied_now
