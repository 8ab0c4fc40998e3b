"""Human preference pairs: register them (``krea2 data ingest-pairs``) and pack them
(``krea2 data pack-pairs``) for STPO's calibration phase (``stpo.loser=dataset``).

A pair is two images of one prompt and which one a person preferred. A pair file is JSON Lines
(``.jsonl``) or Parquet (``.parquet``) with three fields per pair:

    prompt   the text both images were made for (the pair's caption in training)
    winner   the preferred image: a path (relative to the pair file's folder), a file:// URI (both
             stored as absolute paths), or another URI as given
    loser    the other image

Both images become images of the pair dataset (the registry's ``images``, with the prompt of
their first pair as their long caption; an image may be in several pairs; an image already
registered keeps its row) and the pair a row of ``preference_pairs``. A pair dataset holds pairs
only: a dataset with images in no pair (a dataset of single images) is refused. Ingesting the
same file again changes nothing. A file with a bad row (a missing field, an empty prompt, the
winner equal to the loser, a NUL character, a local file that does not exist) is refused before
anything is written, naming the rows. Ties carry no preference: leave them out.

Packing writes shards of kind ``pairs`` (:mod:`krea2_train.data.shards`): one pair a row, the
winner and its loser resized into the winner's aspect bucket (cover, centre crop), shuffled per
bucket with the key of image packing; ``shard_pairs`` records the row of each pair. Only pairs
whose two images the ``decode`` job has read are packed; a pair with an undecodable image never
is (:class:`PairCounts` counts both). Packing records a pack target of kind ``pairs`` (its folder
and settings, which a run packing the dataset at that resolution follows; a later pack replaces
it with its own) and is incremental like image packing: pairs already in a live shard at the resolution are skipped, and those of a
quarantined shard are packed again by the next pack. It runs in one process (a calibration set is
thousands to a few million pairs), not as a queue job.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from krea2_train.data.ingest import LISTED, UNREADABLE_SCHEME, canonical_uri, first_listed, holds_nul, registered_dataset
from krea2_train.data.pack import (
    LIVE_SHARD_PAIRS_SQL,
    PackReport,
    PackSettings,
    add_pack_target,
    keyset_pages,
    pack_lock,
    pack_rows,
)
from krea2_train.store import Store, StoreError
from krea2_train.store.db import find_dataset_id
from krea2_train.store.upsert import batched

logger = logging.getLogger(__name__)

PAIR_FIELDS = ("prompt", "winner", "loser")
PAIR_FILE_SUFFIXES = (".jsonl", ".parquet")
# pairs (alias p) whose two images (aliases w, l) are decoded
DECODED_PAIRS_SQL = (
    "preference_pairs p JOIN images w ON w.id = p.winner_id AND w.decode_ok JOIN images l ON l.id = p.loser_id AND l.decode_ok"
)
PAIRS_PAGE = 100_000  # pairs a statement inserts


@dataclass(frozen=True)
class PairRecord:
    """One pair of a pair file; the URIs resolved (local paths absolute)."""

    prompt: str
    winner: str
    loser: str


def read_pair_file(path: str | Path) -> list[PairRecord]:
    """Every pair of a ``.jsonl`` or ``.parquet`` pair file, checked (see the module docstring).

    Raises:
        StoreError: a file that does not exist or is of another kind, or rows that are not pairs,
            naming up to LISTED of them (row numbers count from 1, as an editor's lines).
    """
    path = Path(path)
    if path.suffix not in PAIR_FILE_SUFFIXES:
        raise StoreError(f"pair file {path} must end in {' or '.join(PAIR_FILE_SUFFIXES)}")
    if not path.is_file():
        raise StoreError(f"pair file {path} does not exist")
    rows = _parquet_rows(path) if path.suffix == ".parquet" else _jsonl_rows(path)
    pairs, problems = [], []
    for number, row in rows:
        if not isinstance(row, dict):
            problems.append(f"row {number}: not an object")
            continue
        missing = [name for name in PAIR_FIELDS if row.get(name) is None or (isinstance(row[name], str) and not row[name].strip())]
        not_text = [f"{name} is {type(row[name]).__name__} {row[name]!r:.40}" for name in PAIR_FIELDS
                    if name not in missing and not isinstance(row[name], str)]
        if missing or not_text:
            problems.append(f"row {number}: " + "; ".join(([f"no {', '.join(missing)}"] if missing else []) + [f"{text}, not text" for text in not_text]))
            continue
        with_nul = [name for name in PAIR_FIELDS if holds_nul(row[name])]
        if with_nul:  # PostgreSQL text cannot hold one
            problems.append(f"row {number}: a NUL character (\\x00) in {', '.join(with_nul)}")
            continue
        pair = PairRecord(row["prompt"].strip(), *(canonical_uri(row[name].strip(), path.parent) for name in ("winner", "loser")))
        if pair.winner == pair.loser:
            problems.append(f"row {number}: the winner is the loser ({pair.winner})")
        pairs.append(pair)
    if not problems and not pairs:
        raise StoreError(f"pair file {path} holds no pairs")
    uris = dict.fromkeys(uri for pair in pairs for uri in (pair.winner, pair.loser))
    absent = [uri for uri in uris if "://" not in uri and not Path(uri).is_file()]
    problems += [f"{len(absent)} image(s) that do not exist: {first_listed(absent)}"] if absent else []
    remote = [uri for uri in uris if "://" in uri]
    problems += [f"{len(remote)} image URI(s) that cannot be read: {first_listed(remote)} ({UNREADABLE_SCHEME})"] if remote else []
    if problems:
        shown = "; ".join(problems[:LISTED]) + ("; ..." if len(problems) > LISTED else "")
        raise StoreError(f"pair file {path} is refused, nothing was ingested: {shown}")
    return pairs


def _jsonl_rows(path: Path) -> Iterator[tuple[int, object]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise StoreError(f"pair file {path} is not UTF-8 text ({error}); nothing was ingested") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise StoreError(f"pair file {path} line {number} is not JSON: {error}") from None


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise StoreError(f"pair file {path} does not read as a parquet file: {error}") from None
    absent = [name for name in PAIR_FIELDS if name not in table.column_names]
    if absent:
        raise StoreError(f"pair file {path} has no {', '.join(absent)} column (columns: {table.column_names})")
    yield from enumerate(table.select(list(PAIR_FIELDS)).to_pylist(), start=1)


@dataclass(frozen=True)
class PairIngestReport:
    dataset: str
    pairs: int  # in the file
    inserted: int  # new in the registry
    images: int  # distinct images of the file


def ingest_pairs(store: Store, dataset: str, pair_file: str | Path) -> PairIngestReport:
    """Register the pairs of ``pair_file`` (and their images) in ``dataset``; idempotent.

    Raises:
        StoreError: a bad pair file (:func:`read_pair_file`), or ``dataset`` holds images in no pair.
    """
    pairs = read_pair_file(pair_file)
    prompts: dict[str, str] = {}
    for pair in pairs:  # an image's caption: the prompt of its first pair
        prompts.setdefault(pair.winner, pair.prompt)
        prompts.setdefault(pair.loser, pair.prompt)
    with (registered_dataset(store, dataset, f"pairs:{Path(pair_file).resolve()}") as dataset_id,
          store.pool.connection() as conn, conn.transaction()):  # images and pairs together, or neither
        (lone,) = conn.execute(
            "SELECT count(*) FROM images i WHERE i.dataset_id = %s AND NOT EXISTS"
            " (SELECT 1 FROM preference_pairs p WHERE p.winner_id = i.id OR p.loser_id = i.id)",
            (dataset_id,),
        ).fetchone()
        if lone:
            raise StoreError(
                f"dataset {dataset!r} holds {lone} images that are in no preference pair: pairs go into a dataset of their"
                f" own (e.g. --dataset {dataset}_pairs), so that packing its images never mixes losers into training images"
            )
        for batch in batched(sorted(prompts.items()), PAIRS_PAGE):  # sorted keys: concurrent ingests cannot deadlock
            conn.execute(
                "INSERT INTO images (dataset_id, uri, caption_long) SELECT %s, u.uri, u.prompt"
                " FROM unnest(%s::text[], %s::text[]) AS u (uri, prompt) ON CONFLICT (dataset_id, uri) DO NOTHING",
                (dataset_id, [uri for uri, _ in batch], [prompt for _, prompt in batch]),
            )
        inserted = 0
        for batch in batched(pairs, PAIRS_PAGE):
            inserted += conn.execute(
                "INSERT INTO preference_pairs (dataset_id, prompt, winner_id, loser_id)"
                " SELECT %(dataset)s, u.prompt, w.id, l.id FROM unnest(%(prompts)s::text[], %(winners)s::text[], %(losers)s::text[])"
                "   AS u (prompt, winner, loser)"
                " JOIN images w ON w.dataset_id = %(dataset)s AND w.uri = u.winner"
                " JOIN images l ON l.dataset_id = %(dataset)s AND l.uri = u.loser"
                " ON CONFLICT (dataset_id, winner_id, loser_id, prompt) DO NOTHING",
                {"dataset": dataset_id, "prompts": [p.prompt for p in batch],
                 "winners": [p.winner for p in batch], "losers": [p.loser for p in batch]},
            ).rowcount
    return PairIngestReport(dataset, len(pairs), inserted, len(prompts))


@dataclass(frozen=True)
class PairCounts:
    """A dataset's preference pairs by what packing makes of them: ``packable`` (both images
    decoded), ``undecoded`` (the decode job has not read both), ``undecodable`` (an image does not
    decode)."""

    name: str
    pairs: int
    packable: int
    undecoded: int
    undecodable: int


def pair_counts(store: Store, dataset: str | None = None) -> list[PairCounts]:
    """:class:`PairCounts` of ``dataset`` (of every dataset with pairs when None), by name."""
    with store.pool.connection() as conn:
        rows = conn.execute(
            "SELECT d.name, count(*), count(*) FILTER (WHERE w.decode_ok AND l.decode_ok),"
            " count(*) FILTER (WHERE (w.decode_ok IS NULL OR l.decode_ok IS NULL) AND w.decode_ok IS NOT false AND l.decode_ok IS NOT false),"
            " count(*) FILTER (WHERE w.decode_ok = false OR l.decode_ok = false)"
            " FROM preference_pairs p JOIN datasets d ON d.id = p.dataset_id"
            " JOIN images w ON w.id = p.winner_id JOIN images l ON l.id = p.loser_id"
            " WHERE %(name)s::text IS NULL OR d.name = %(name)s GROUP BY d.name ORDER BY d.name",
            {"name": dataset},
        ).fetchall()
    return [PairCounts(*row) for row in rows]


def unpacked_pair_sizes(store: Store, dataset_id: int, resolution: int) -> Iterator[tuple[int, int, int]]:
    """(pair id, winner width, winner height) of the dataset's decoded pairs not packed at
    ``resolution``, in id order, a page at a time."""
    return keyset_pages(
        store,
        f"SELECT p.id, w.width, w.height FROM {DECODED_PAIRS_SQL} WHERE p.dataset_id = %s"
        f" AND NOT EXISTS (SELECT 1 FROM {LIVE_SHARD_PAIRS_SQL} WHERE s.pair_id = p.id AND s.resolution = %s)"
        " AND p.id > %s ORDER BY p.id LIMIT %s",
        (dataset_id, resolution),
    )


def load_pair_rows(store: Store, pair_ids: Sequence[int]) -> list[dict]:
    """The rows :func:`~krea2_train.data.pack.pack_rows` writes for ``pair_ids``, in their order:
    the pair's id, winner ``uri``, ``loser_uri``, the prompt as the long caption, the winner's facts."""
    with store.pool.connection() as conn:
        rows = conn.execute(
            "SELECT p.id, w.uri, l.uri, p.prompt, w.facts, p.winner_id, p.loser_id FROM preference_pairs p"
            " JOIN images w ON w.id = p.winner_id JOIN images l ON l.id = p.loser_id WHERE p.id = ANY(%s)",
            (list(pair_ids),),
        ).fetchall()
    by_id = {
        pair_id: {"id": pair_id, "uri": winner, "loser_uri": loser, "caption_long": prompt, "caption_medium": None,
                  "caption_short": None, "facts": (facts or {}) | {"winner_id": winner_id, "loser_id": loser_id}}
        for pair_id, winner, loser, prompt, facts, winner_id, loser_id in rows
    }  # fmt: skip
    return [by_id[pair_id] for pair_id in pair_ids]


def pack_pairs(
    store: Store, dataset: str, resolutions: Sequence[int], out_dir: str | Path, settings: PackSettings = PackSettings()
) -> PackReport:
    """Pack every decoded, not yet packed pair of ``dataset`` at each resolution (see the module
    docstring); ``report.unreadable`` holds the pairs whose files could not be read now."""
    if not resolutions:
        raise ValueError("resolutions is empty")
    with store.pool.connection() as conn:
        dataset_id = find_dataset_id(conn, dataset)
    counts = next(iter(pair_counts(store, dataset)), None)
    if counts is None:
        raise StoreError(f"dataset {dataset!r} has no preference pairs: ingest them with krea2 data ingest-pairs")
    if counts.undecoded or counts.undecodable:
        logger.warning(
            "dataset %s: %d of %d pairs are not packed: %d wait for the decode job (krea2 data work --job decode), %d have"
            " an image that does not decode (krea2 data status --errors)", dataset, counts.undecoded + counts.undecodable,
            counts.pairs, counts.undecoded, counts.undecodable,
        )
    report = PackReport()
    for resolution in resolutions:
        add_pack_target(store, dataset, resolution, out_dir, settings, kind="pairs")
        with pack_lock(store, dataset_id, resolution, "pairs"):
            sizes = unpacked_pair_sizes(store, dataset_id, resolution)
            pack_rows(store, dataset, dataset_id, sizes, resolution, Path(out_dir), settings, report,
                      lambda ids: load_pair_rows(store, ids), kind="pairs")  # fmt: skip
    return report
