"""Register a dataset's images and captions in the store (``krea2 data ingest``).

Sources:
    folder   NAME.png|jpg|jpeg|webp + NAME.txt (long caption) + optional NAME.json
             ({"captions": {"long", "medium", "short"}, "facts": {...}}), searched recursively
    parquet  a ``uri`` column and optional ``caption_long``, ``caption_medium``,
             ``caption_short``, ``facts`` (JSON text or a struct) columns
    uris     a text file, one path or file:// URI a line ('#' comments); captions come from
             sidecar .txt/.json files next to local images when present

Rows are written by batched, key-sorted unnest upserts; a row whose values did not change is not
rewritten, so ingesting the same source twice changes nothing. A source with no images, or a URI
list naming local files that do not exist, is refused before anything is written. A NUL character
in a URI, caption or facts string (PostgreSQL text cannot hold one) stops the ingest before the
batch that holds it, naming its rows; the batches before it are kept, and running the same ingest
again once the source is fixed completes it (sources are streamed, never held whole). Images
without a long caption are registered but never packed; the report counts them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from contextlib import contextmanager
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from krea2_train.store import Store, StoreError
from krea2_train.store.upsert import batched, upsert_batch, upsert_statement

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
BATCH_ROWS = 500
LISTED = 5  # how many missing files or NUL-holding values an error message names
IMAGE_COLUMNS = {
    "dataset_id": "int",
    "uri": "text",
    "caption_long": "text",
    "caption_medium": "text",
    "caption_short": "text",
    "facts": "jsonb",
}
IMAGES_UPSERT = upsert_statement("images", IMAGE_COLUMNS, ("dataset_id", "uri"), touch=("ingested_at",))


@dataclass(frozen=True)
class Record:
    uri: str
    caption_long: str | None = None
    caption_medium: str | None = None
    caption_short: str | None = None
    facts: dict | None = None


@dataclass(frozen=True)
class IngestReport:
    dataset: str
    dataset_id: int
    rows: int
    inserted: int
    updated: int
    uncaptioned: int = 0  # rows without a long caption: registered, never packed
    uncaptioned_example: str | None = None  # the first such URI

    @property
    def unchanged(self) -> int:
        return self.rows - self.inserted - self.updated


def read_sidecars(image_path: Path) -> Record:
    """The record of a local image with its NAME.txt / NAME.json captions, if any."""
    captions: dict = {}
    facts = None
    json_path = image_path.with_suffix(".json")
    if json_path.is_file():
        try:
            meta = json.loads(json_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise StoreError(f"invalid JSON in {json_path}: {error}") from None
        if not isinstance(meta, dict):
            raise StoreError(f"{json_path} must hold a JSON object with 'captions' and/or 'facts'")
        captions = meta.get("captions") or {}
        facts = meta.get("facts")
        if not isinstance(captions, dict) or not all(isinstance(captions.get(k), (str, type(None))) for k in ("long", "medium", "short")):
            raise StoreError(f"{json_path}: 'captions' must be an object of texts (long, medium, short), got {json.dumps(captions)[:80]}")
        if facts is not None and not isinstance(facts, dict):
            raise StoreError(f"{json_path}: 'facts' must be an object, got {json.dumps(facts)[:80]}")
    text_path = image_path.with_suffix(".txt")
    try:
        long_caption = text_path.read_text(encoding="utf-8").strip() if text_path.is_file() else captions.get("long")
    except UnicodeDecodeError as error:
        raise StoreError(f"caption file {text_path} is not UTF-8 text ({error}): convert it (e.g. iconv -f latin1 -t utf-8)") from None
    return Record(str(image_path.resolve()), long_caption, captions.get("medium"), captions.get("short"), facts)


def folder_records(folder: Path) -> Iterator[Record]:
    if not folder.is_dir():
        raise StoreError(f"image folder {folder} {'is a file, not a folder' if folder.exists() else 'does not exist'}")
    images = [path for path in sorted(folder.rglob("*")) if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()]
    if not images:
        raise StoreError(f"image folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}, searched recursively)")
    for path in images:
        yield read_sidecars(path)


def _facts_value(value, where: str) -> dict | None:
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as error:
            raise StoreError(f"invalid facts JSON at {where}: {error}") from None
    raise StoreError(f"facts at {where} must be JSON text or a struct, got {type(value).__name__}")


UNREADABLE_SCHEME = "only local paths and file:// URIs are read (mount the storage and list its paths)"


def parquet_records(parquet_file: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    if not parquet_file.is_file():
        raise StoreError(f"parquet file {parquet_file} does not exist")
    try:
        reader = pq.ParquetFile(parquet_file)
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise StoreError(f"{parquet_file} does not read as a parquet file: {error}") from None
    names = reader.schema_arrow.names
    if "uri" not in names:
        raise StoreError(f"{parquet_file} has no 'uri' column (columns: {names})")
    wanted = [c for c in ("uri", "caption_long", "caption_medium", "caption_short", "facts") if c in names]
    # record batches of the wanted columns: a 100M-row file is never in memory at once (the whole
    # table as Python rows took 1.2 KB a row)
    def rows() -> Iterator[dict]:
        read = 0
        try:
            for batch in reader.iter_batches(batch_size=BATCH_ROWS, columns=wanted):
                yield from batch.to_pylist()
                read += batch.num_rows
        except (OSError, ValueError) as error:  # a damaged row group, met only when read
            reason = " ".join(str(error).split())
            raise StoreError(f"{parquet_file} does not read past row {read}: {reason}. The rows before it were ingested; "
                             "fix or replace the file and run the same ingest again (rows already there are skipped)") from None
        finally:
            reader.close()

    for index, row in enumerate(rows()):
        if not isinstance(row["uri"], str) or not row["uri"].strip():
            raise StoreError(f"{parquet_file} row {index} has no uri (an empty or non-text value: {row['uri']!r})")
        uri = canonical_uri(row["uri"].strip(), parquet_file.parent)
        if "://" in uri:
            raise StoreError(f"{parquet_file} row {index}: {uri}: {UNREADABLE_SCHEME}")
        yield Record(
            uri,
            row.get("caption_long"),
            row.get("caption_medium"),
            row.get("caption_short"),
            _facts_value(row.get("facts"), f"{parquet_file} row {index}"),
        )


def uri_list_records(uri_file: Path) -> Iterator[Record]:
    """Local paths and file:// URIs become absolute paths (one canonical form, with sidecar
    captions); a list naming other URIs (http, s3) is refused, naming them."""
    if not uri_file.is_file():
        raise StoreError(f"URI list {uri_file} does not exist")
    uris = list(listed_uris(uri_file))
    missing = [uri for uri in uris if "://" not in uri and not Path(uri).is_file()]
    if missing:
        raise StoreError(
            f"URI list {uri_file} names {len(missing)} file(s) that do not exist, nothing was ingested: "
            + first_listed(missing)
        )
    remote = [uri for uri in uris if "://" in uri]
    if remote:
        raise StoreError(f"URI list {uri_file} names {len(remote)} URI(s) that cannot be read, nothing was ingested: "
                         f"{first_listed(remote)}; {UNREADABLE_SCHEME}")  # fmt: skip
    for uri in uris:
        yield read_sidecars(Path(uri))


def first_listed(items: list[str]) -> str:
    return ", ".join(items[:LISTED]) + (", ..." if len(items) > LISTED else "")


def holds_nul(value) -> bool:
    """Whether a string in ``value`` (text, or a JSON value: its keys too) holds a NUL character."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(holds_nul(key) or holds_nul(item) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return any(holds_nul(item) for item in value)
    return False


def check_no_nul(batch: list[Record], first_row: int, source: str) -> None:
    """PostgreSQL text and jsonb cannot hold a NUL character (common in scraped text): refuse the
    batch (rows ``first_row``... of ``source``) before it is written, naming the rows (position in
    ``source``, URI) and fields that hold one."""
    found = [
        f"{field.name} of row {first_row + index} ({record.uri})"
        for index, record in enumerate(batch)
        for field in fields(record)
        if holds_nul(getattr(record, field.name))
    ]
    if found:
        raise StoreError(
            f"{source}: {len(found)} value(s) hold a NUL character (\\x00), which PostgreSQL text cannot "
            f"store: {first_listed(found)}. The {first_row} rows before this batch were ingested; remove "
            "the NUL characters and run the same ingest again (it skips what is already there)"
        )


def listed_uris(uri_file: Path) -> Iterator[str]:
    """The URIs of a URI list: local paths and file:// URIs as absolute paths, others as given."""
    for line in uri_file.read_text(encoding="utf-8").splitlines():
        uri = line.strip()
        if not uri or uri.startswith("#"):
            continue
        yield canonical_uri(uri, uri_file.parent)


def canonical_uri(uri: str, base: Path) -> str:
    """Local paths and file:// URIs as absolute paths (a relative one against ``base``), other URIs
    as given: one spelling per local file."""
    if uri.startswith("file://"):
        uri = unquote(urlparse(uri).path)
    if "://" in uri or Path(uri).is_absolute():
        return uri
    return str((base / uri).resolve())


@contextmanager
def registered_dataset(store: Store, name: str, source: str) -> Iterator[int]:
    """The dataset's id for an ingest from ``source``, created or given the new source as needed.

    An ingest that fails inside leaves the registry as it found it: a dataset it created is removed
    when it holds no image (images committed before the failure stay, and running the same ingest
    again completes it), and an existing dataset gets its recorded source back.
    """
    if not name or not name.strip():
        raise StoreError("dataset name must not be empty")
    with store.pool.connection() as conn:
        dataset_id, created, previous_source = conn.execute(
            "WITH old AS (SELECT source FROM datasets WHERE name = %(name)s)"
            " INSERT INTO datasets (name, source) VALUES (%(name)s, %(source)s) ON CONFLICT (name) DO UPDATE"
            " SET source = EXCLUDED.source RETURNING id, xmax = 0, (SELECT source FROM old)",
            {"name": name, "source": source},
        ).fetchone()
    try:
        yield dataset_id
    except BaseException:
        try:
            with store.pool.connection() as conn:
                if created:
                    conn.execute("DELETE FROM datasets d WHERE d.id = %s AND NOT EXISTS"
                                 " (SELECT 1 FROM images i WHERE i.dataset_id = d.id)", (dataset_id,))
                else:
                    conn.execute("UPDATE datasets SET source = %s WHERE id = %s AND source = %s", (previous_source, dataset_id, source))
        except psycopg.Error as error:  # the database that failed the ingest, or another process's rows on it now
            logger.warning("dataset %r: could not undo its registration after the failed ingest (%s)", name, error)
        raise


class SeenHashes:
    """Which of many strings were seen, in about 8 bytes each (a set of the strings themselves
    takes ~170 bytes a URI: 17 GB for a list of 100M): their 64-bit BLAKE2b hashes in sorted runs,
    the newest merged into the one before while it is as large (a log-structured set: a few dozen
    runs at most). A hit may be a collision of two strings (for 100M strings, a chance of about
    3e-4): the caller confirms it."""

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(run) for run in self.runs)

    @staticmethod
    def hashes(keys: list[str]) -> np.ndarray:
        digests = b"".join(hashlib.blake2b(key.encode(), digest_size=8).digest() for key in keys)
        return np.frombuffer(digests, dtype=np.uint64)

    def add(self, keys: list[str]) -> list[int]:
        """Add ``keys``; return the positions of those whose hash was seen before (in an earlier
        call, or earlier in ``keys``), ascending."""
        hashes = self.hashes(keys)
        order = np.argsort(hashes, kind="stable")
        ordered = hashes[order]
        hit = np.zeros(len(keys), dtype=bool)
        hit[order[1:][ordered[1:] == ordered[:-1]]] = True  # a repeat of the one before it
        for run in self.runs:
            at = np.minimum(np.searchsorted(run, hashes), len(run) - 1)
            hit |= run[at] == hashes
        self.runs.append(ordered)
        while len(self.runs) > 1 and len(self.runs[-1]) >= len(self.runs[-2]):
            newest = self.runs.pop()
            merged = np.concatenate([self.runs[-1], newest])
            merged.sort(kind="stable")  # two sorted runs: timsort merges them in linear time
            self.runs[-1] = merged
        return np.flatnonzero(hit).tolist()


def ingest_records(store: Store, dataset: str, source: str, read: Callable[[], Iterable[Record]]) -> IngestReport:
    """Upsert the records ``read()`` gives into ``images`` in batches; a URI given twice is an
    error naming it, a NUL character stops before its batch (:func:`check_no_nul`), and no record
    at all is an error naming ``source`` (the dataset is not created).

    Args:
        read: reads the source from its start; called again to confirm a URI that its hash alone
            shows as repeated (:class:`SeenHashes`).
    """
    records = iter(read())
    first = next(records, None)
    if first is None:
        raise StoreError(f"no images in {source}: nothing to ingest")
    seen = SeenHashes()
    uncaptioned, uncaptioned_example = 0, None
    rows = inserted = updated = 0
    with registered_dataset(store, dataset, source) as dataset_id, store.pool.connection() as conn:
        # Ingest is idempotent: a crash may lose the last few commits, and running the same ingest
        # again restores them. Not waiting for the WAL flush on each batch doubles the write rate.
        conn.execute("SET synchronous_commit = off")
        try:
            for batch in batched(itertools.chain([first], records), BATCH_ROWS):
                check_no_nul(batch, rows, source)
                for position in seen.add([record.uri for record in batch]):
                    _refuse_a_repeat(batch[position].uri, rows + position, batch, rows, read, source)
                values = []
                for record in batch:
                    if not record.caption_long:
                        uncaptioned += 1
                        uncaptioned_example = uncaptioned_example or record.uri
                    facts = None if record.facts is None else Jsonb(record.facts)
                    values.append(
                        (dataset_id, record.uri, record.caption_long, record.caption_medium, record.caption_short, facts)
                    )
                added, changed = upsert_batch(conn, IMAGES_UPSERT, values, key_width=2)
                rows, inserted, updated = rows + len(values), inserted + added, updated + changed
        finally:
            conn.execute("RESET synchronous_commit")  # the pooled connection goes back as it came
    return IngestReport(dataset, dataset_id, rows, inserted, updated, uncaptioned, uncaptioned_example)


def _refuse_a_repeat(
    uri: str, row: int, batch: list[Record], batch_row: int, read: Callable[[], Iterable[Record]], source: str
) -> None:
    """Raise if ``uri`` (row ``row``) is in the source before it; a hash collision passes."""
    in_batch = batch[: row - batch_row]
    if any(record.uri == uri for record in in_batch) or any(record.uri == uri for record in itertools.islice(read(), batch_row)):
        raise StoreError(f"URI {uri} appears twice in {source}")
    logger.info("URI %s shares its 64-bit hash with an earlier one of %s (a collision): ingested", uri, source)


def ingest(
    store: Store,
    dataset: str,
    *,
    folder: str | Path | None = None,
    parquet: str | Path | None = None,
    uris: str | Path | None = None,
) -> IngestReport:
    """Ingest exactly one source into ``dataset``."""
    given = [(kind, Path(p)) for kind, p in (("folder", folder), ("parquet", parquet), ("uris", uris)) if p is not None]
    if len(given) != 1:
        raise StoreError("give exactly one of folder, parquet or uris")
    kind, path = given[0]
    readers = {"folder": folder_records, "parquet": parquet_records, "uris": uri_list_records}
    return ingest_records(store, dataset, f"{kind}:{path.resolve()}", lambda: readers[kind](path))
