"""Batched, key-sorted upserts: ``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO UPDATE``.

Rules measured in docs/data.md: one statement per batch of ~100-1000 rows; the keys of a batch
are distinct and sorted (writers that lock keys in different orders deadlock); a row whose values
did not change is not rewritten (``WHERE ... IS DISTINCT FROM``), so re-running an ingest writes
nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice

import psycopg
from psycopg import sql

from krea2_train.store.errors import StoreError


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of at most ``size`` items."""
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def sorted_distinct(rows: Sequence[Sequence], key_width: int) -> list[Sequence]:
    """Rows sorted by their first ``key_width`` values; a repeated key is an error naming it."""
    ordered = sorted(rows, key=lambda row: tuple(row[:key_width]))
    for previous, current in zip(ordered, ordered[1:]):
        if tuple(previous[:key_width]) == tuple(current[:key_width]):
            raise StoreError(f"duplicate key {tuple(current[:key_width])!r} in one upsert batch")
    return ordered


def upsert_statement(
    table: str, columns: Mapping[str, str], key_columns: Sequence[str], touch: Sequence[str] = ()
) -> sql.Composed:
    """The unnest upsert for ``table``; ``columns`` maps name -> SQL type, keys first.

    ``touch`` columns are set to now() when a row actually changes. The statement returns one
    ``(inserted: bool)`` row per row inserted or changed; unchanged rows are not rewritten.
    """
    names = list(columns)
    if list(key_columns) != names[: len(key_columns)]:
        raise StoreError(f"key columns {list(key_columns)} must come first in {names}")
    updated = names[len(key_columns) :]
    ident = sql.Identifier
    arrays = sql.SQL(", ").join(
        sql.SQL("{}::{}[]").format(sql.Placeholder(), sql.SQL(columns[name])) for name in names
    )
    target = ident(table)
    update_clause = sql.SQL(", ").join(
        [sql.SQL("{} = EXCLUDED.{}").format(ident(n), ident(n)) for n in updated]
        + [sql.SQL("{} = now()").format(ident(n)) for n in touch]
    )
    changed = sql.SQL("({}) IS DISTINCT FROM ({})").format(
        sql.SQL(", ").join(sql.SQL("{}.{}").format(target, ident(n)) for n in updated),
        sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(ident(n)) for n in updated),
    )
    return sql.SQL(
        "INSERT INTO {target} ({cols}) SELECT * FROM unnest({arrays}) AS u ({cols}) "
        "ON CONFLICT ({keys}) DO UPDATE SET {update_clause} WHERE {changed} "
        "RETURNING (xmax = 0) AS inserted"
    ).format(
        target=target,
        cols=sql.SQL(", ").join(map(ident, names)),
        arrays=arrays,
        keys=sql.SQL(", ").join(map(ident, key_columns)),
        update_clause=update_clause,
        changed=changed,
    )


def upsert_batch(
    conn: psycopg.Connection,
    statement: sql.Composed,
    rows: Sequence[Sequence],
    key_width: int,
) -> tuple[int, int]:
    """Run one upsert statement over ``rows`` (tuples in column order); returns (inserted, updated)."""
    if not rows:
        return 0, 0
    ordered = sorted_distinct(rows, key_width)
    column_arrays = [list(values) for values in zip(*ordered)]
    flags = [inserted for (inserted,) in conn.execute(statement, column_arrays).fetchall()]
    inserted = sum(flags)
    return inserted, len(flags) - inserted
